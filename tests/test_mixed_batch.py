"""Mixed-adapter batches on FuRA's PEFT form: `model(..., adapter_names=[...])` and
`generate(..., adapter_names=[...])` run each sequence with its own adapter on one base.

Every check compares a mixed batch with each adapter run alone (`set_adapter`, or the base with
`disable_adapter` for `"__base__"`), in fp32: logits, and greedy and beam-search tokens with the
KV cache, on a plain and on a bitsandbytes 4-bit base. The adapters are trained far enough
apart that a sequence routed to the wrong adapter changes its logits by orders of magnitude
more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import fura_kernels.peft  # noqa: F401  (registers the method)
from fura_kernels.peft import FuRALinear, FuRAPeftConfig
from fura_kernels.peft.mixed import MixedBatch

from .helpers import max_rel_err, tiny_llama
from .test_peft_method import _peft, _train

BASE = "__base__"
IDS = torch.randint(0, 97, (6, 9), generator=torch.Generator().manual_seed(3))
# Every adapter twice, the base once, in an order that interleaves them.
NAMES = ["a", BASE, "c", "b", "a", "c"]
# Far above fp32 rounding of the tiny model, far below the gap between adapters (checked).
LOGIT_TOL = 1e-5


def _save_adapters(directory, make_base, seeds: dict[str, int], **fields) -> None:
    for name, seed in seeds.items():
        model = _train(_peft(make_base(), task_type="CAUSAL_LM", **fields), seed=seed)
        model.save_pretrained(directory / name)


def _served(directory, make_base, names) -> PeftModel:
    model = PeftModel.from_pretrained(make_base(), directory / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(directory / name), adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama serving three FuRA adapters trained from different seeds."""
    directory = tmp_path_factory.mktemp("mixed")
    _save_adapters(directory, tiny_llama, {"a": 0, "b": 1, "c": 2})
    return _served(directory, tiny_llama, ["a", "b", "c"])


def _alone(model, name, fn):
    """`fn()` with only adapter `name` on (the base for "__base__")."""
    if name == BASE:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


@torch.no_grad()
def _each_alone_logits(model, ids, names):
    return torch.stack([_alone(model, name, lambda: model(input_ids=ids).logits)[i] for i, name in enumerate(names)])


@torch.no_grad()
def test_mixed_batch_logits_equal_each_adapter_alone(served):
    mixed = served(input_ids=IDS, adapter_names=NAMES).logits
    alone = _each_alone_logits(served, IDS, NAMES)
    assert max_rel_err(mixed, alone) <= LOGIT_TOL
    # The test can fail: the adapters (and the base) give different logits for the same sequence.
    per_adapter = {
        name: _alone(served, name, lambda: served(input_ids=IDS[:1]).logits) for name in ("a", "b", "c", BASE)
    }
    for first, second in (("a", "b"), ("a", "c"), ("b", "c"), ("a", BASE)):
        assert max_rel_err(per_adapter[first], per_adapter[second]) > 1e3 * LOGIT_TOL
    # Bias updates are routed by sequence too (the tiny Llama's attention projections have biases).
    layer = served.base_model.model.model.layers[0].self_attn.q_proj
    assert set(layer.fura_bias) == {"a", "b", "c"} and layer.fura_bias["a"].abs().max() > 0


@torch.no_grad()
def test_base_only_batch_is_the_base_bit_for_bit(served):
    base_logits = tiny_llama()(input_ids=IDS).logits
    assert torch.equal(served(input_ids=IDS, adapter_names=[BASE] * len(IDS)).logits, base_logits)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam2"])
def test_generate_with_kv_cache_equals_each_adapter_alone(served, num_beams):
    """Prefill (9 tokens a sequence) then decode steps of one token a sequence, through the KV
    cache; beam search repeats each sequence's adapter for its beams."""
    settings = dict(max_new_tokens=7, do_sample=False, num_beams=num_beams, use_cache=True, pad_token_id=0)
    mask = torch.ones_like(IDS)
    mixed = served.generate(input_ids=IDS, attention_mask=mask, adapter_names=NAMES, **settings)
    for i, name in enumerate(NAMES):
        alone = _alone(served, name, lambda: served.generate(input_ids=IDS, attention_mask=mask, **settings))  # noqa: B023
        assert torch.equal(mixed[i], alone[i]), f"sequence {i} ({name}): {mixed[i].tolist()} != {alone[i].tolist()}"
    continuations = {tuple(mixed[i, IDS.shape[1] :].tolist()) for i in range(len(NAMES))}
    assert len(continuations) > 1  # the adapters answer differently


@torch.no_grad()
def test_nf4_base_mixed_batch_equals_each_adapter_alone(tmp_path):
    """FuRA adapters over a QLoRA base (bitsandbytes 4-bit layers): the base GEMM is
    bitsandbytes' own, run once for the whole mixed batch."""
    bnb = pytest.importorskip("bitsandbytes")
    from fura_kernels.recipes.baselines import quantize_linears_bnb

    targets = ["q_proj", "v_proj", "down_proj"]

    def quantised():
        model = tiny_llama(intermediate_size=128)  # bitsandbytes' CPU path wants rows in multiples of 64
        quantize_linears_bnb(model, targets)
        return model

    with torch.enable_grad():
        _save_adapters(tmp_path, quantised, {"a": 0, "b": 1}, target_modules=targets)
    model = _served(tmp_path, quantised, ["a", "b"])
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj.get_base_layer(), bnb.nn.Linear4bit)
    names = ["b", "a", BASE, "a", "b", "b"]
    mixed = model(input_ids=IDS, adapter_names=names).logits
    assert max_rel_err(mixed, _each_alone_logits(model, IDS, names)) <= LOGIT_TOL
    tokens = model.generate(input_ids=IDS, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        alone = _alone(
            model, name, lambda: model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        )  # noqa: B023
        assert torch.equal(tokens[i], alone[i]), f"sequence {i} ({name})"


@torch.no_grad()
def test_adapters_of_different_block_shapes_and_targets_in_one_batch(served, tmp_path):
    """An adapter cut into other blocks (its own stack, a second launch) and on fewer layers
    (layers it does not target pass its sequences through unchanged)."""
    with torch.enable_grad():
        _save_adapters(tmp_path, tiny_llama, {"d": 4}, target_modules=["q_proj", "v_proj"], input_factorization=[4, 16])
    served.load_adapter(str(tmp_path / "d"), adapter_name="d")
    try:
        layer = served.base_model.model.model.layers[0].self_attn.q_proj
        names = ["d", "a", "d", BASE, "c", "d"]
        mixed = served(input_ids=IDS, adapter_names=names).logits
        assert {tuple(family.maps.shape[1:]) for family in layer.serving_maps.families} == {(4, 16, 16), (8, 8, 8)}
        assert max_rel_err(mixed, _each_alone_logits(served, IDS, names)) <= LOGIT_TOL
    finally:
        served.delete_adapter("d")
        served.set_adapter("a")


def test_maps_are_built_once_and_again_only_for_an_adapter_that_changed(served, monkeypatch):
    """A mixed batch computes no map while the adapters stay as they are; an in-place update of
    one adapter (an optimizer step, a load) rebuilds that adapter's maps only, and the next batch
    runs the updated adapter."""
    with torch.no_grad():
        served(input_ids=IDS, adapter_names=NAMES)  # maps cached
    built = []
    original = FuRALinear.transform_maps

    def counting(self, name):
        built.append(name)
        return original(self, name)

    monkeypatch.setattr(FuRALinear, "transform_maps", counting)
    with torch.no_grad():
        served(input_ids=IDS, adapter_names=NAMES)
        served.generate(input_ids=IDS, adapter_names=NAMES, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert built == []
    layers = [m for m in served.modules() if isinstance(m, FuRALinear)]
    saved = {id(layer): layer.fura_S["b"].detach().clone() for layer in layers}
    try:
        with torch.no_grad():
            for layer in layers:
                layer.fura_S["b"].mul_(1.5)  # in place, as an optimizer step writes
            mixed = served(input_ids=IDS, adapter_names=NAMES).logits
        assert built == ["b"] * len(layers)
        built.clear()
        assert max_rel_err(mixed, _each_alone_logits(served, IDS, NAMES)) <= LOGIT_TOL
    finally:
        with torch.no_grad():
            for layer in layers:
                layer.fura_S["b"].copy_(saved[id(layer)])


def test_what_a_mixed_batch_cannot_run_is_refused_by_name_and_leaves_the_model(served):
    reference = _each_alone_logits(served, IDS[:2], ["a", "a"])
    with torch.no_grad(), pytest.raises(ValueError, match=r"adapter\(s\) \['zz'\] that this model does not have"):
        served(input_ids=IDS[:2], adapter_names=["a", "zz"])
    with torch.no_grad(), pytest.raises(ValueError, match="first dimension must be the batch"):
        served(input_ids=IDS[:3], adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="one per sequence"):
        served(input_ids=IDS[:2], adapter_names="a")
    served.train()
    try:
        with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
            served(input_ids=IDS[:2], adapter_names=["a", "b"])
    finally:
        served.eval()
    served.set_adapter("b")
    served.merge_adapter()
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"merged into the base weight.*unmerge"):
            served(input_ids=IDS[:2], adapter_names=["a", "b"])
    finally:
        served.unmerge_adapter()
    with served.disable_adapter(), torch.no_grad():  # PEFT's rule, as for LoRA: disable_adapter() runs the base
        disabled = served(input_ids=IDS[:2], adapter_names=["a", "b"]).logits
        assert max_rel_err(disabled, tiny_llama()(IDS[:2]).logits) <= LOGIT_TOL  # (after a merge and unmerge)
    # The hooks are gone after each refusal: a plain call runs the active adapter as before.
    served.set_adapter("a")
    with torch.no_grad():
        assert max_rel_err(served(input_ids=IDS[:2]).logits, reference) <= LOGIT_TOL
    assert not any(m._forward_pre_hooks for m in served.modules() if isinstance(m, FuRALinear))


def test_routing_groups_sequences_and_copies_once_per_length():
    mixed = MixedBatch(["b", BASE, "a", "b"], adapters=("a", "b"))
    routing = mixed.routing(3, torch.device("cpu"))
    assert routing.rows.tolist() == [6, 7, 8, 0, 1, 2, 9, 10, 11, 3, 4, 5]  # a, then b (0 and 3), then the base
    assert routing.group_offsets.tolist() == [0, 3, 9, 12]
    assert routing.sequence_group.tolist() == [1, 2, 0, 1]
    assert routing.largest_group == 6
    assert mixed.routing(3, torch.device("cpu")) is routing
    decode = mixed.routing(1, torch.device("cpu"))
    assert decode.rows.tolist() == [2, 0, 3, 1] and decode.largest_group == 2


def test_a_mixed_batch_config_field_free_of_peft_internals():
    """A FuRAPeftConfig needs nothing new to serve mixed batches (no flag to turn it on)."""
    assert "mixed" not in " ".join(FuRAPeftConfig.__dataclass_fields__)


@torch.no_grad()
def test_bf16_model_caches_bf16_maps_and_matches_each_adapter_alone(served, tmp_path):
    """On a bf16 model the maps are cached in bf16 (half the bytes of fp32 R): the single-adapter
    path casts its fp32 map to bf16 at the product too, so the logits agree to bf16 rounding."""
    model = served.to(torch.bfloat16)
    try:
        mixed = model(input_ids=IDS, adapter_names=NAMES).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert {family.maps.dtype for family in layer.serving_maps.families} == {torch.bfloat16}
        alone = _each_alone_logits(model, IDS, NAMES)
        assert max_rel_err(mixed.float(), alone.float()) <= 2.0**-8  # one bf16 rounding
    finally:
        served.to(torch.float32)


def test_serving_from_the_maps_alone_answers_saves_and_merges_as_before(tmp_path, monkeypatch):
    """`serve_from_maps` leaves only the maps on the base's device. This machine has one device,
    so the layers are told their base sits on `cpu:0`, a device the adapters' tensors never report:
    every layer then takes the path of a GPU base whose adapters' tensors were moved to the host.
    (The move itself is checked on a GPU: tests/gpu/test_gpu_mixed.py.)"""
    from fura_kernels.peft import serve_from_maps

    _save_adapters(tmp_path, tiny_llama, {"a": 0, "b": 1})
    model = _served(tmp_path, tiny_llama, ["a", "b"])
    names = ["b", "a", BASE, "b", "a", "a"]
    with torch.no_grad():
        mixed_before = model(input_ids=IDS, adapter_names=names).logits
    alone_before = _each_alone_logits(model, IDS, names)
    monkeypatch.setattr(FuRALinear, "_device", lambda self: torch.device("cpu", 0))
    assert serve_from_maps(model) == 0  # nothing to move: the tensors already live on the host
    with pytest.raises(ValueError, match=r"no FuRA adapter\(s\) \['zz'\]"):
        serve_from_maps(model, ["zz"])
    built = []
    original = FuRALinear.transform_maps
    monkeypatch.setattr(FuRALinear, "transform_maps", lambda self, name: built.append(name) or original(self, name))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, adapter_names=names).logits, mixed_before)
    # The adapter alone reads its cached map now: the same products (fp32 maps here).
    assert max_rel_err(_each_alone_logits(model, IDS, names), alone_before) <= LOGIT_TOL
    assert built == []  # no forward built a map from R and S
    model.save_pretrained(tmp_path / "again", selected_adapters=["a"])
    monkeypatch.undo()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again" / "a", adapter_name="a").eval()
    with torch.no_grad():
        rows = [i for i, name in enumerate(names) if name == "a"]
        assert max_rel_err(reloaded(input_ids=IDS).logits[rows], alone_before[rows]) <= LOGIT_TOL
    monkeypatch.setattr(FuRALinear, "_device", lambda self: torch.device("cpu", 0))
    model.set_adapter("a")
    model.merge_adapter()  # from the moved tensors
    with torch.no_grad():
        assert max_rel_err(model(input_ids=IDS).logits[rows], alone_before[rows]) <= LOGIT_TOL
    model.unmerge_adapter()
    model.train()
    try:
        with pytest.raises(ValueError, match="served from its cached map.*cannot train"):
            model(input_ids=IDS)
    finally:
        model.eval()
