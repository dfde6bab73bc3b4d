"""The SVD reparameterisation baseline and its random-basis ablation, against float64 definitions
written from the reference (`fura/svd_layer.py`): `W = A · diag(s) · B`, `A = U S^p`, `B = S^q Vh`
(p + q = 1, or s kept apart), and with a random basis `A = Q`, `B = Q^T W`, `s = 1`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fura_kernels.svd_baseline import (
    SVDLinear,
    configure_svd_trainability,
    convert_to_svd,
    merge_svd,
    resolve_svd_s_merged_to,
)
from tests.helpers import DTYPE_IDS, assert_within_rule, tiny_llama

# (train_position, s_merged_to) -> where the reference puts S (its resolve_svd_s_merged_to).
RESOLVED = [
    ("output", None, "input"),
    ("input", None, "output"),
    ("both", None, "split"),
    ("output", "frozen", "input"),
    ("output", "trainable", "output"),
    ("input", "trainable", "input"),
    ("both", "trainable", "split"),
    ("output", "keep_trainable", "keep_trainable"),
    ("input", "split", "split"),
]


@pytest.mark.parametrize("position,given,expected", RESOLVED)
def test_s_goes_where_the_reference_puts_it(position, given, expected):
    assert resolve_svd_s_merged_to(position, given) == expected


def _linear(out_features: int, in_features: int, seed: int, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features).to(dtype)
    with torch.no_grad():
        linear.weight.normal_()
    return linear


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (31, 31)])
@pytest.mark.parametrize("position,given,where", RESOLVED)
def test_factors_are_the_svd_with_s_where_it_belongs(shape, position, given, where):
    linear = _linear(*shape, seed=sum(shape))
    layer = SVDLinear.from_linear(linear, position, given, svd_dtype=torch.float64)
    w = linear.weight.double()
    _, s_ref, _ = torch.linalg.svd(w, full_matrices=False)
    a, b = layer.svd_a.double(), layer.svd_b.double()
    s_kept = layer.svd_s.double() if layer.svd_s is not None else torch.ones_like(s_ref)
    assert torch.allclose(torch.einsum("ok,k,ki->oi", a, s_kept, b), w, atol=1e-5, rtol=0)
    # the singular values sit where the definition puts them: column norms of A, row norms of B
    power_a = {"output": 1.0, "split": 0.5}.get(where, 0.0)
    power_b = {"input": 1.0, "split": 0.5}.get(where, 0.0)
    assert torch.allclose(a.norm(dim=0), s_ref**power_a, atol=1e-5)
    assert torch.allclose(b.norm(dim=1), s_ref**power_b, atol=1e-5)
    if where.startswith("keep_"):
        assert torch.allclose(s_kept, s_ref, atol=1e-5)
    assert layer.svd_a.requires_grad == (position in ("output", "both"))
    assert layer.svd_b.requires_grad == (position in ("input", "both"))


def _einsum_forward(x, params, rank):
    s = params.get("svd_s", torch.ones(rank, dtype=x.dtype))
    return torch.einsum("bti,ki,k,ok->bto", x, params["svd_b"], s, params["svd_a"]) + params["bias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("position,given", [("output", None), ("both", "keep_trainable"), ("input", "split")])
def test_forward_and_gradients_match_a_float64_einsum(dtype, position, given):
    """Fresh random inputs, a 3-D non-contiguous batch; output and the gradient of every trained
    tensor within the STYLE.md rule of the same einsum in float64 (and in `dtype` for the rule)."""
    linear = _linear(37, 29, seed=7, dtype=dtype)
    layer = SVDLinear.from_linear(linear, position, given)
    if layer.svd_s is not None:
        layer.svd_s.requires_grad_(True)
    x = torch.randn(5, 29, 3, dtype=torch.float64).transpose(1, 2).to(dtype)  # (5, 3, 29), strided
    y = layer(x)
    assert y.dtype == dtype and y.shape == (5, 3, 37)
    upstream = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * upstream).sum().backward()

    grads = {}
    for ref_dtype in (torch.float64, dtype):
        params = {n: p.detach().to(ref_dtype).requires_grad_(True) for n, p in layer.named_parameters()}
        out = _einsum_forward(x.to(ref_dtype), params, layer.rank)
        (out.double() * upstream).sum().backward()
        grads[ref_dtype] = (out, {n: p.grad for n, p in params.items()})
    (ref, ref_grads), (same, same_grads) = grads[torch.float64], grads[dtype]
    assert_within_rule(y, same, ref, dtype, "SVD baseline forward")
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert_within_rule(p.grad, same_grads[name], ref_grads[name], dtype, f"d{name}")


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_random_basis_is_an_orthogonal_q_and_the_refitted_b(shape):
    """A = Q (orthonormal columns, not the pretrained U), B = Q^T W, s = 1: exact when out <= in,
    the projection of W onto span(Q) for a tall weight (as in the reference)."""
    linear = _linear(*shape, seed=3)
    gen = torch.Generator().manual_seed(11)
    layer = SVDLinear.from_linear(linear, "output", random_basis=True, generator=gen, svd_dtype=torch.float64)
    q, b = layer.svd_a.double(), layer.svd_b.double()
    w = linear.weight.double()
    out_features, in_features = shape
    rank = min(shape)
    assert torch.allclose(q.T @ q, torch.eye(rank, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(b, torch.einsum("ok,oi->ki", q, w), atol=1e-5)
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    assert (q.T @ u).abs().max() < 0.99  # not the pretrained basis, nor a signed copy of it
    fitted = torch.einsum("ok,kp,pi->oi", q, q.T, w)
    assert torch.allclose(q @ b, fitted, atol=1e-5)
    if out_features <= in_features:
        assert torch.allclose(q @ b, w, atol=1e-5) and layer.fit_relative_error < 1e-6
    else:
        assert layer.fit_relative_error > 0.1
    again = SVDLinear.from_linear(linear, "output", random_basis=True, generator=torch.Generator().manual_seed(11),
                                  svd_dtype=torch.float64)  # fmt: skip
    assert torch.equal(again.svd_a, layer.svd_a)  # a seed gives one basis


def test_convert_trains_what_the_reference_trains_and_merges_back():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    report = convert_to_svd(model, ["q_proj", "down_proj"], train_position="output")
    assert report["num_svd_layers"] == 2 * model.config.num_hidden_layers
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    svd_layers = {n for n, m in model.named_modules() if isinstance(m, SVDLinear)}
    assert {n.rpartition(".")[0] for n in trained} == svd_layers  # nothing outside the converted layers
    assert {n.rpartition(".")[2] for n in trained} == {"svd_a", "bias"}  # A (output) and the biases
    assert report["trainable_param_count"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-4)
    counts = configure_svd_trainability(model, "both", train_singular_values=True)
    assert counts["tuned_input_cores"] == counts["tuned_output_cores"] == report["num_svd_layers"]
    merge_svd(model)
    assert not any(isinstance(m, SVDLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-4)


def test_a_failed_conversion_leaves_the_model_as_it_was():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="train_position must be one of"):
        convert_to_svd(model, ["q_proj"], train_position="small")
    assert not any(isinstance(m, SVDLinear) for m in model.modules())
    with pytest.raises(ValueError, match="matched no convertible"):
        convert_to_svd(model, ["nothing_here"])
