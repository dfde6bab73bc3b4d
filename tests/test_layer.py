"""FusedBTTLinear and its Function against the float64 reference (FURA_SPEC.md §1, §3)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fura_kernels import FusedBTTLinear, QFusedBTTLinear, reference
from fura_kernels.autograd import use_weight_side_merge

from .helpers import DTYPE_IDS, assert_within_rule, max_rel_err, unfused_same_dtype

MODES = ["output_one_block", "input_one_block", "square"]

# (id, in_features, out_features, leading dims of x)
SHAPES = [
    ("qwen_down_b96", 6144, 256, (2, 5)),  # 6144 = 64 x 96: b = 96, not a power of two; 3-D input
    ("prime_in", 97, 64, (7,)),
    ("T1", 128, 80, (1,)),
    ("3d_odd", 60, 36, (3, 5)),
]


def make_input(lead, in_features, layout, dtype=torch.float32):
    if layout == "strided":  # every other column of a wider tensor: last dim not contiguous
        return torch.randn(*lead, 2 * in_features, dtype=dtype)[..., ::2]
    if layout == "transposed":  # a transposed view: only the strides of the token dims differ
        return torch.randn(in_features, *lead, dtype=dtype).movedim(0, -1)
    return torch.randn(*lead, in_features, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("mode", MODES)
def test_lossless_fp32(mode, shape, layout):
    _, in_f, out_f, lead = shape
    lin = nn.Linear(in_f, out_f)
    layer = FusedBTTLinear.from_linear(lin, decomp_mode=mode)
    x = make_input(lead, in_f, layout)
    with torch.no_grad():
        y, y_ref = layer(x), lin(x)
    assert y.shape == y_ref.shape == (*lead, out_f)
    assert max_rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("mode", MODES)
def test_forward_half_precision_within_rule(mode, shape, dtype):
    _, in_f, out_f, lead = shape
    lin = nn.Linear(in_f, out_f).to(dtype)
    layer = FusedBTTLinear.from_linear(lin, decomp_mode=mode)
    assert layer.btt_l.dtype == (dtype if not layer.roles.train_l else torch.float32)
    x = make_input(lead, in_f, "strided", dtype)
    with torch.no_grad():
        y, unfused = layer(x), unfused_same_dtype(layer, x)
        # The computation: against float64 on the layer's own cores.
        own = reference.forward(x.double(), *(t.double() for t in (layer.btt_l, layer.btt_r, layer.btt_s, layer.bias)))
        assert_within_rule(y, unfused, own, dtype, f"{mode} forward vs its cores")
        # Losslessness: against the original linear in float64, as close as FuRA in this dtype gets.
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert_within_rule(y, unfused, ref, dtype, f"{mode} forward vs the original linear")


def _perturb_trainables(layer: nn.Module, scale: float = 0.05) -> None:
    """Move away from the SVD point, so no gradient is checked at a special value."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(scale * p.abs().mean() * torch.randn_like(p))


GRAD_CASES = [
    (mode, s, t)
    for mode, s, t in itertools.product(
        MODES,
        ["keep_trainable", "keep_frozen", "output", "input", "split", "frozen", "trainable"],
        ["small", "large", "both"],
    )
    if not (t == "both" and s in ("frozen", "trainable"))
]


@pytest.mark.parametrize("in_f, out_f", [(30, 21), (96 * 3, 40)], ids=["30x21", "b96"])
@pytest.mark.parametrize("mode, s_merged_to, train_position", GRAD_CASES)
def test_gradients_float64_match_dense_autograd(mode, s_merged_to, train_position, in_f, out_f):
    lin = nn.Linear(in_f, out_f, dtype=torch.float64)
    layer = FusedBTTLinear.from_linear(
        lin,
        decomp_mode=mode,
        s_merged_to=s_merged_to,
        train_position=train_position,
        svd_dtype=torch.float64,
        trainable_dtype=torch.float64,
    )
    _perturb_trainables(layer)
    x = torch.randn(2, 5, in_f, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, out_f, dtype=torch.float64)
    wrt = [x] + [p for p in layer.parameters() if p.requires_grad]
    assert len(wrt) >= 3  # x, at least one core, and the bias
    ours = torch.autograd.grad((layer(x) * dy).sum(), wrt)
    dense = torch.autograd.grad((F.linear(x, layer.dense_weight(), layer.bias) * dy).sum(), wrt)
    for g, g_ref in zip(ours, dense, strict=True):
        assert g.dtype == g_ref.dtype
        assert max_rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_low_precision_within_rule(mode, dtype):
    """Compute in fp32/fp16/bf16 with fp32 trainables; every gradient against float64."""
    lin = nn.Linear(96 * 2, 72)
    layer = FusedBTTLinear.from_linear(lin, decomp_mode=mode)
    _perturb_trainables(layer)
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(3, 11, 96 * 2)
    dy = torch.randn(3, 11, 72)
    params = [p for p in layer.parameters() if p.requires_grad]
    ref_params = [p for p in ref_layer.parameters() if p.requires_grad]

    x_low = x.to(dtype).requires_grad_()
    ours = torch.autograd.grad((layer(x_low) * dy.to(dtype)).sum(), [x_low, *params])
    x_low2 = x.to(dtype).requires_grad_()
    y_torch = unfused_same_dtype(layer, x_low2)
    same_dtype = torch.autograd.grad((y_torch * dy.to(dtype)).sum(), [x_low2, *params])
    x64 = x.double().requires_grad_()
    ref = torch.autograd.grad((unfused_same_dtype(ref_layer, x64) * dy.double()).sum(), [x64, *ref_params])
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, g_same, g_ref, p in zip(names, ours, same_dtype, ref, [x_low, *params], strict=True):
        assert g.dtype == p.dtype, name
        assert_within_rule(g, g_same, g_ref, dtype, f"{mode} d{name}")


def test_dtypes_storage_and_compute():
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    layer = FusedBTTLinear.from_linear(lin)
    assert layer.btt_l.dtype == torch.bfloat16 and not layer.btt_l.requires_grad
    assert layer.btt_r.dtype == layer.btt_s.dtype == layer.bias.dtype == torch.float32
    assert layer.btt_r.requires_grad and layer.btt_s.requires_grad and layer.bias.requires_grad
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.btt_r.grad.dtype == layer.btt_s.grad.dtype == layer.bias.grad.dtype == torch.float32
    # fp32 input: compute runs in fp32.
    assert layer(x.float()).dtype == torch.float32


def test_autocast_computes_in_autocast_dtype():
    lin = nn.Linear(64, 48)
    layer = FusedBTTLinear.from_linear(lin)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_lin = lin(x)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        assert_within_rule(y, unfused_same_dtype(layer, x.bfloat16()), ref, torch.bfloat16, "autocast forward")
    y.float().sum().backward()
    assert layer.btt_r.grad.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_dense_weight_and_to_linear(mode):
    lin = nn.Linear(60, 36).to(torch.float16)
    layer = FusedBTTLinear.from_linear(lin, decomp_mode=mode)
    w = layer.dense_weight()
    assert w.shape == (36, 60) and w.requires_grad
    assert max_rel_err(w, lin.weight.float()) < 2e-3  # the frozen core is stored in fp16
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float16
    assert merged.weight.device == lin.weight.device
    x = torch.randn(4, 60, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(merged.weight, w.detach().to(torch.float16))
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert_within_rule(merged(x), lin(x), ref, torch.float16, "merged")


def test_extra_repr_is_helpful():
    text = repr(FusedBTTLinear.from_linear(nn.Linear(64, 48), module_name="blk.q"))
    for part in (
        "in_features=64",
        "out_features=48",
        "bias=True",
        "m=1, n=8, a=48, b=8, r=8",
        "trains=R+S",
        "output_one_block",
    ):
        assert part in text


def test_default_step_costs_two_big_gemms():
    """FLOPs of forward + backward equal 2D(1 + 1.5 b/out) (FURA_SPEC.md §2): the big GEMM runs
    once forward and once backward, and dS costs no weight-gradient GEMM."""
    tokens, in_f, out_f = 32, 256, 96
    layer = FusedBTTLinear.from_linear(nn.Linear(in_f, out_f))
    b = layer.block_shape.b
    x = torch.randn(tokens, in_f, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    dense = 2 * tokens * in_f * out_f
    assert counter.get_total_flops() == round(2 * dense * (1 + 1.5 * b / out_f))


def test_weight_side_merge_path_float64_and_flops():
    """T > out in the default layout: the forward merges W_eff = L^T · blockdiag(R') first."""
    in_f, out_f, tokens = 96, 24, 64
    lin = nn.Linear(in_f, out_f, dtype=torch.float64)
    layer = FusedBTTLinear.from_linear(lin, svd_dtype=torch.float64, trainable_dtype=torch.float64)
    shape = layer.block_shape
    assert use_weight_side_merge(tokens, shape.m, shape.n, out_f, need_g_l=False)
    _perturb_trainables(layer)
    x = torch.randn(tokens, in_f, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(tokens, out_f, dtype=torch.float64)
    wrt = [x] + [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    ours = torch.autograd.grad((y * dy).sum(), wrt)
    with FlopCounterMode(display=False) as counter:
        (layer(x) * dy).sum().backward()
    dense = torch.autograd.grad((F.linear(x, layer.dense_weight(), layer.bias) * dy).sum(), wrt)
    for g, g_ref in zip(ours, dense, strict=True):
        assert max_rel_err(g, g_ref) < 1e-10
    assert max_rel_err(y, reference.forward(x, layer.btt_l, layer.btt_r, layer.btt_s, layer.bias)) < 1e-12
    # merge 2*in*out*r + forward GEMM D + backward GEMM D + K3 (dx and G) 4*T*in*r
    r = shape.r
    assert counter.get_total_flops() == 2 * in_f * out_f * r + 2 * (2 * tokens * in_f * out_f) + 4 * tokens * in_f * r


def test_default_mode_saves_nothing_weight_sized():
    in_f, out_f = 256, 96
    layer = FusedBTTLinear.from_linear(nn.Linear(in_f, out_f))
    params = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(8, in_f, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    activations = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.numel() for t in activations) == x.numel()  # only x itself is kept


def test_training_stays_in_the_column_space_of_frozen_u():
    lin = nn.Linear(64, 48)
    layer = FusedBTTLinear.from_linear(lin)
    l_before = layer.btt_l.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(32, 64), torch.randn(32, 48)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    assert torch.equal(layer.btt_l, l_before)
    w = layer.dense_weight().detach().double()
    assert max_rel_err(w, lin.weight) > 1e-3  # it did train
    r, b = layer.block_shape.r, layer.block_shape.b
    for j in range(layer.block_shape.n):
        u = layer.btt_l[0, j * r : (j + 1) * r, :].double().T  # (a, r), orthonormal columns
        block = w[:, j * b : (j + 1) * b]
        residual = block - u @ (u.T @ block)
        assert residual.norm() / block.norm() < 1e-5


def test_reference_forward_equals_dense_reconstruction():
    shape_l, shape_r, shape_s = (3, 4 * 5, 7), (4, 6, 3 * 5), (3, 4, 5)
    btt_l, btt_r, btt_s = (torch.randn(s, dtype=torch.float64) for s in (shape_l, shape_r, shape_s))
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    w = reference.dense_weight(btt_l, btt_r, btt_s)
    assert w.shape == (21, 24)
    assert max_rel_err(reference.forward(x, btt_l, btt_r, btt_s), x @ w.T) < 1e-13


def test_eager_calls_skip_the_custom_op_but_modes_still_see_it():
    """Eager calls on plain tensors run the op's body directly (no dispatcher round trip);
    FlopCounterMode and fake tensors still go through the registered op, with equal results."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fura_kernels.triton import block_diag_matmul, block_diag_matmul_backward

    x, w, g = torch.randn(5, 3, 16), torch.randn(3, 16, 8), torch.randn(5, 3, 8)
    s = torch.rand(3, 8) + 0.5
    assert torch.equal(block_diag_matmul(x, w, s), torch.ops.fura_kernels.block_diag_matmul(x, w, s, False))
    direct = block_diag_matmul_backward(g, x, w, s, True, True, True)
    via_op = torch.ops.fura_kernels.block_diag_backward(g, x, w, s, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op, strict=True))
    assert block_diag_matmul_backward(g, x, w, compute_grad_x=False)[0] is None
    with FlopCounterMode(display=False) as counter:
        block_diag_matmul(x, w)
        block_diag_matmul_backward(g, x, w)
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counted == {"fura_kernels.block_diag_matmul": 2 * 5 * 3 * 16 * 8,
                       "fura_kernels.block_diag_backward": 4 * 5 * 3 * 16 * 8}  # fmt: skip
    with FakeTensorMode() as fake_mode:
        fake = block_diag_matmul(fake_mode.from_tensor(x), fake_mode.from_tensor(w))
    assert fake.shape == (5, 3, 8)


EMPTY_CASES = {
    "blocks": (lambda: FusedBTTLinear.from_linear(nn.Linear(24, 16)), 24),
    "prime-in-one-block": (lambda: FusedBTTLinear.from_linear(nn.Linear(7, 16)), 7),
    "input-one-block": (lambda: FusedBTTLinear.from_linear(nn.Linear(24, 16), decomp_mode="input_one_block"), 24),
    "square": (lambda: FusedBTTLinear.from_linear(nn.Linear(24, 16), decomp_mode="square"), 24),
    "qfura-one-block": (lambda: QFusedBTTLinear.from_linear(nn.Linear(7, 128)), 7),
    "qfura-blocks": (lambda: QFusedBTTLinear.from_linear(nn.Linear(64, 128)), 64),
}


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
def test_empty_batch_behaves_like_nn_linear(case, lead):
    """nn.Linear returns an empty output for an empty batch; FuRA used to raise a reshape error."""
    build, in_f = case
    layer = build()
    x = torch.randn(*lead, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, layer.out_features)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any(), name
