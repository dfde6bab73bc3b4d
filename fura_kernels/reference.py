"""Einsum reference of the FuRA block factorisation: the oracle for every test.

Plain, unfused PyTorch, general in `(m, n, a, b, r)`, and exact in whatever dtype it is given
(tests run it in float64). Nothing here is fast; everything here is obviously right.

Layout (the reference implementation's, FURA_SPEC.md §3-4), for `W` of shape `out x in` cut
into an `m x n` grid of `a x b` blocks, `W[i, j] = U_ij · diag(S_ij) · Vh_ij`:

    btt_l  (m, n*r, a)   btt_l[i, j*r + k, c] = U_ij[c, k]      the "L" (output-side) core
    btt_r  (n, b, m*r)   btt_r[j, d, i*r + k] = Vh_ij[k, d]     the "R" (input-side) core
    btt_s  (m, n, r)     btt_s[i, j, k]       = S_ij[k]         or None when merged into a core

so that  W[i*a + c, j*b + d] = sum_k btt_l[i, j*r+k, c] · btt_s[i, j, k] · btt_r[j, d, i*r+k].
"""

from __future__ import annotations

import torch


def core_dims(btt_l: torch.Tensor, btt_r: torch.Tensor) -> tuple[int, int, int, int, int]:
    """`(m, n, a, b, r)` read off the two cores' shapes."""
    m, nr, a = btt_l.shape
    n, b, mr = btt_r.shape
    r = nr // n
    if nr != n * r or mr != m * r:
        raise ValueError(
            f"inconsistent FuRA cores: btt_l {tuple(btt_l.shape)} and btt_r {tuple(btt_r.shape)} "
            "do not share one (m, n, r)"
        )
    return m, n, a, b, r


def _s_or_ones(btt_s: torch.Tensor | None, m: int, n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    if btt_s is None:
        return torch.ones(m, n, r, dtype=like.dtype, device=like.device)
    return btt_s


def dense_weight(btt_l: torch.Tensor, btt_r: torch.Tensor, btt_s: torch.Tensor | None = None) -> torch.Tensor:
    """The dense `out x in` weight the cores represent (differentiable)."""
    m, n, a, b, r = core_dims(btt_l, btt_r)
    s = _s_or_ones(btt_s, m, n, r, btt_l)
    w = torch.einsum(
        "ijkc,ijk,jdik->icjd",
        btt_l.reshape(m, n, r, a),
        s,
        btt_r.reshape(n, b, m, r),
    )
    return w.reshape(m * a, n * b)


def forward(
    x: torch.Tensor,
    btt_l: torch.Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = x · W^T + bias` computed block by block, never forming `W`. `x`: (..., in)."""
    m, n, a, b, r = core_dims(btt_l, btt_r)
    s = _s_or_ones(btt_s, m, n, r, btt_l)
    xb = x.reshape(*x.shape[:-1], n, b)
    z = torch.einsum("...jd,jdik->...ijk", xb, btt_r.reshape(n, b, m, r))
    y = torch.einsum("...ijk,ijk,ijkc->...ic", z, s, btt_l.reshape(m, n, r, a))
    y = y.reshape(*x.shape[:-1], m * a)
    return y if bias is None else y + bias


def transform_blocks(btt_r: torch.Tensor, btt_s: torch.Tensor, v0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """The transform form's per-block input maps (FURA_SPEC.md §11), `M_j = T_j^T` (n, b, b):

        M_j = R_j · diag(S_j / S0_j) · V0_j          btt_r (n, b, r), btt_s and s0 (n, r), v0 (n, r, b)

    so that `x · W'^T = base(x')` with `x'_j = x_j · M_j` and `W'[:, j] = W[:, j] · M_j^T`."""
    return (btt_r * (btt_s / s0).unsqueeze(1)) @ v0


def transform_forward(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """`x'_j = x_j · M_j` for every input block `j`; `x` (..., n*b), `maps` (n, b, b)."""
    n, b, _ = maps.shape
    xb = x.reshape(*x.shape[:-1], n, b)
    return torch.einsum("...jd,jde->...je", xb, maps).reshape(x.shape)
