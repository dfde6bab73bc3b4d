"""Adapter files (safetensors + JSON) and merged export, on tiny Llamas (FURA_SPEC.md §6)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fura_kernels import (
    FuRAConfig,
    FusedBTTLinear,
    convert_to_fura,
    load_fura_adapter,
    reference,
    save_fura_adapter,
    save_merged,
)
from fura_kernels.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _checksum, _sha256_file
from fura_kernels.factorization import canonicalize_signs

from .helpers import max_rel_err, naive_block_svd, tiny_llama, train_causal_lm

TARGETS = "all-linear"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_llama(seed=0)
    convert_to_fura(model, TARGETS, progress=False)
    train_causal_lm(model, steps=5)
    directory = tmp_path_factory.mktemp("adapter")
    save_fura_adapter(model, directory)
    return model, directory


def test_adapter_holds_only_trainable_tensors(trained):
    model, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Beside them, R and S as decomposed (the frozen L is rebuilt from them and the base weight).
    initial = {n.replace(".btt_", ".initial.btt_") for n in trainable if n.endswith((".btt_r", ".btt_s"))}
    assert set(tensors) == trainable | initial
    assert not any(k.endswith("btt_l") for k in tensors)  # the frozen core is re-decomposed, not stored
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    layer = meta["layers"]["model.layers.0.self_attn.o_proj"]
    assert layer["block_shape"] == {"m": 1, "n": 4, "a": 64, "b": 16, "r": 16}  # heads: 4 x 16
    assert meta["config"]["decomp_mode"] == "output_one_block" and len(layer["base_fingerprint"]) == 64


def test_round_trip_reproduces_the_trained_model(trained, monkeypatch):
    model, directory = trained
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    fresh = tiny_llama(seed=0)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle on the adapter load path")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    load_fura_adapter(fresh, directory, progress=False)
    assert max_rel_err(_logits(fresh, ids), _logits(model, ids)) < 1e-5
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_loaded_weights_match_an_independent_re_decomposition(trained):
    """Rebuild each trained weight from the adapter's tensors and a per-block SVD of the fresh
    base done by another code path (torch.linalg.svd block by block, signs fixed afterwards)."""
    model, directory = trained
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    base = tiny_llama(seed=0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        shape = layer.block_shape
        weight = base.get_submodule(name).weight.double()
        u, _, vh = naive_block_svd(weight, shape.m, shape.n)
        u, _ = canonicalize_signs(u[..., : shape.r], vh[..., : shape.r, :])
        btt_l = u.permute(0, 1, 3, 2).reshape(shape.m, shape.n * shape.r, shape.a)
        rebuilt = reference.dense_weight(btt_l, tensors[f"{name}.btt_r"].double(), tensors[f"{name}.btt_s"].double())
        # fp32 SVD in the model vs fp64 here; a flipped or rotated basis would be off by O(1)
        assert max_rel_err(rebuilt, layer.dense_weight()) < 1e-4


def test_qfura_round_trip(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed=1, hidden_size=128, intermediate_size=256)
    convert_to_fura(model, TARGETS, quantize="nf4", progress=False)
    train_causal_lm(model, steps=3)
    save_fura_adapter(model, tmp_path)
    fresh = tiny_llama(seed=1, hidden_size=128, intermediate_size=256)
    load_fura_adapter(fresh, tmp_path, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    assert max_rel_err(_logits(fresh, ids), _logits(model, ids)) < 1e-5


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    modules, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mismatched_base_raises_and_changes_nothing(trained):
    _, directory = trained
    other = tiny_llama(seed=7)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="base weight of 'model.layers.0.self_attn.q_proj' is not the one"):
        load_fura_adapter(other, directory, progress=False)
    _unchanged(other, snap)


def _copy_adapter(src, dst, edit_tensors=None, edit_bytes=None, edit_meta=None, reseal=True):
    """A copy of an adapter with its tensors, bytes or JSON edited. With `reseal`, the checksums
    are recomputed: a self-consistent but wrong adapter, which the structural checks must catch."""
    dst.mkdir()
    meta = json.loads((src / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    if edit_bytes:
        data = bytearray((src / ADAPTER_WEIGHTS).read_bytes())
        edit_bytes(data)
        (dst / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    else:
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, str(dst / ADAPTER_WEIGHTS))
        if reseal:
            meta["weights_sha256"] = _sha256_file(dst / ADAPTER_WEIGHTS)
    if edit_meta:
        edit_meta(meta)
    if reseal and not edit_bytes:
        meta["checksum"] = _checksum(meta)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(meta))
    return dst


Q_PROJ = "model.layers.0.self_attn.q_proj"
UP_S = "model.layers.0.mlp.up_proj.btt_s"


def _layer(meta, name=Q_PROJ):
    return meta["layers"][name]


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(edit_bytes=lambda d: d.__setitem__(-5, d[-5] ^ 0xFF)), "does not match the checksum"),
        (dict(edit_bytes=lambda d: d.__setitem__(slice(8, 40), b"\x00" * 32)), "does not match the checksum"),
        (dict(edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.btt_s")), "missing .*up_proj.btt_s"),
        (dict(edit_tensors=lambda t: t.update({"model.layers.0.extra": torch.zeros(3)})), "extra .*extra"),
        (
            dict(edit_tensors=lambda t: t.update({"model.layers.0.mlp.up_proj.btt_r": torch.zeros(4, 16, 5)})),
            "up_proj.btt_r is torch.float32 \\(4, 16, 5\\) in the adapter; expected a floating-point tensor of shape "
            "\\(8, 8, 8\\)",
        ),
        # The frozen core named as a trainable tensor: it used to overwrite L after the probe check.
        (
            dict(
                edit_tensors=lambda t: t.update(
                    {"model.layers.0.self_attn.q_proj.l_core.btt_l": torch.randn(1, 64, 64)}
                ),
                edit_meta=lambda m: _layer(m)["tensors"].append("l_core.btt_l"),
            ),
            "q_proj' lists tensors .*'l_core.btt_l'.*but its trainable tensors are \\['bias', 'btt_r', 'btt_s'\\]",
        ),
        (dict(edit_meta=lambda m: _layer(m)["tensors"].append("btt_l")), "is not one of \\['btt_r'"),
        (
            dict(edit_meta=lambda m: _layer(m)["core_probe"].__setitem__(0, float("nan")), reseal=False),
            "non-finite core_probe",
        ),
        (
            dict(edit_tensors=lambda t: t[UP_S].__setitem__((0, 0, 0), float("nan"))),
            "up_proj.btt_s holds NaN or inf",
        ),
        (
            dict(
                edit_tensors=lambda t: t.update(
                    {"model.layers.0.mlp.up_proj.btt_s": torch.ones(1, 8, 8, dtype=torch.int64)}
                )
            ),
            "up_proj.btt_s is torch.int64 \\(1, 8, 8\\) in the adapter; expected a floating-point",
        ),
        (dict(edit_meta=lambda m: m.update(format_version=True)), "format_version=True"),
        (
            dict(edit_meta=lambda m: m.update(format_version=1)),
            "format_version=1; this fura-kernels reads versions \\[2, 3\\]",
        ),
        (dict(edit_meta=lambda m: m.pop("layers")), "'layers' is a required property"),
        (dict(edit_meta=lambda m: m.update(layers=[])), "\\[\\] is not of type 'object'"),
        (dict(edit_meta=lambda m: _layer(m).pop("block_shape")), "'block_shape' is a required property"),
        (dict(edit_meta=lambda m: _layer(m).update(in_features="64")), "'64' is not of type 'integer'"),
        (dict(edit_meta=lambda m: m["config"].update(rank="half")), "adapter's config is invalid.*'half'"),
        (dict(edit_meta=lambda m: m["config"].update(colour=1)), "adapter's config is invalid.*colour"),
        # Metadata edited without resealing: the checksum now covers the JSON too.
        (dict(edit_meta=lambda m: _layer(m).update(bias=False), reseal=False), "metadata was edited"),
    ],
    ids=[
        "flipped-byte",
        "zeroed-header",
        "missing-tensor",
        "extra-tensor",
        "wrong-shape",
        "frozen-core-named",
        "unknown-name",
        "nan-probe",
        "nan-tensor",
        "int64-tensor",
        "format-version-bool",
        "format-version-1",
        "no-layers",
        "layers-list",
        "no-block-shape",
        "string-size",
        "bad-config-value",
        "unknown-config-field",
        "unsealed-edit",
    ],
)
def test_bad_adapter_files_raise_and_change_nothing(trained, tmp_path, edit, message):
    _, directory = trained
    bad = _copy_adapter(directory, tmp_path / "bad", **edit)
    fresh = tiny_llama(seed=0)
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load_fura_adapter(fresh, bad, progress=False)
    _unchanged(fresh, snap)


def test_degenerate_singular_values_are_named_at_save(tmp_path):
    model = tiny_llama(seed=0)
    with torch.no_grad():  # identity blocks: every singular value equals 1, the basis is free
        model.model.layers[0].mlp.up_proj.weight.zero_()
        model.model.layers[0].mlp.up_proj.weight[:64].copy_(torch.eye(64))
    convert_to_fura(model, ["up_proj"], progress=False)
    with pytest.warns(UserWarning, match=r"\['model.layers.0.mlp.up_proj'\] have repeated or zero singular values"):
        save_fura_adapter(model, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["degenerate_layers"] == ["model.layers.0.mlp.up_proj"]


def test_save_merged_reloads_with_transformers(trained, tmp_path):
    model, _ = trained
    save_merged(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, FusedBTTLinear) for m in reloaded.modules())
    assert any(isinstance(m, FusedBTTLinear) for m in model.modules())  # the live model is untouched
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) < 1e-5


def test_adapter_without_fingerprints_is_refused(tmp_path):
    holder = torch.nn.Sequential(FusedBTTLinear(16, 8, config=FuRAConfig()))  # built by hand, never decomposed
    with pytest.raises(ValueError, match="carry no base-weight fingerprint"):
        save_fura_adapter(holder, tmp_path)
