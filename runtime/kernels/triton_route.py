"""MoE routing in one Triton launch: scores, top-k and the weights of the k chosen experts.

Dims: T tokens (rows), E experts (router logits per row), K experts chosen per row,
E_P2 / K_P2 the next powers of two (tile widths), BT rows per program.

Contract (the op tbo.route_topk, ops/kernels.py; torch reference in torch_ref.route_topk):
  route_topk(logits_TE fp32, k, scoring, renormalize) -> (ids_TK int64, w_TK fp32)
    scoring "softmax"       p = softmax(logits) over E; (w, ids) = top-k of p, largest first;
                            renormalize: w = w / sum(w)            (Qwen3-MoE, Mixtral, DeepSeek-V2)
    scoring "topk_softmax"  (l, ids) = top-k of logits, largest first; w = softmax(l) over the k
                            (GPT-OSS; renormalize is then a no-op: the weights already sum to 1)
  Equal scores: the lower expert id first (torch.topk leaves that order unspecified). Weights agree
  with the torch ops to fp32 rounding (a few ulp: the sums run in another order), not bit for bit;
  eager programs and compiled plans call this same op, so they agree with each other exactly.
  Last dim contiguous, any row stride; outputs contiguous; no host sync (CUDA-graph capturable);
  T == 0 launches nothing. A row holding NaN gets ids >= E for the k it cannot rank (the experts
  kernels skip ids outside 0..E-1), not an out-of-bounds read.

Why: the torch form is five kernels a layer (softmax, topk's gather and its bitonic sort, the
sum, the division), 15 us a layer at Qwen3 decode 256 and 38 us at prefill 4096 on an H200
(bench/results/roofline_h200/roofline_v2.json, trace), plus a launch gap each in decode.

Algorithm, one program per BT rows, the [BT, E_P2] tile in registers:
  1. Load the logits (padding columns -inf). "softmax": m = row max, e = exp(x - m) (libdevice
     expf, as torch's CUDA softmax), p = e / sum(e) with IEEE division.
  2. K rounds of selection: v = row max of the remaining scores, its column = the smallest column
     holding v, then that column is set to -inf; v and the column go to column j of a [BT, K_P2]
     tile. K is a compile-time constant (the rounds unroll; K <= 32 in every model here).
  3. "softmax" + renormalize: w = v / sum(v); "topk_softmax": w = softmax(v) over the k columns.
     One store of the [BT, K] ids (int64) and weights.
Cost: the tile is read once; 2K row reductions over E_P2 lanes, a few us at any batch size here.

Under Triton's interpreter (CPU tests) libdevice is unavailable: tl.exp stands in
(triton_elementwise._exp; the tests compare to fp32 rounding, not bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.kernels.triton_elementwise import _exp

SCORINGS = ("softmax", "topk_softmax")
_MAX_EXPERTS = 1024   # one row of logits is one tile of at most this many lanes
_MAX_K = 32           # the selection rounds unroll: K of them in the kernel's code
_TILE = 4096          # elements of the [BT, E_P2] tile per program


def _interpreting() -> bool:
    return flag("TRITON_INTERPRET")


def supported(logits: Tensor, k: int = 1, scoring: str = "softmax", renormalize: bool = False) -> bool:
    """Whether route_topk can take these arguments (CUDA, or CPU under the interpreter)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.dtype != torch.float32:
        return False
    if not (logits.is_cuda or (_interpreting() and logits.device.type == "cpu")):
        return False
    E = logits.shape[1]
    return (scoring in SCORINGS and isinstance(k, int) and 1 <= k <= min(E, _MAX_K)
            and E <= _MAX_EXPERTS and (logits.stride(1) == 1 or E == 1))


@triton.jit
def _route_kernel(x_ptr, ids_ptr, w_ptr, T, E, s_t,
                  K: tl.constexpr, K_P2: tl.constexpr, E_P2: tl.constexpr, BT: tl.constexpr,
                  SOFTMAX_FIRST: tl.constexpr, RENORM: tl.constexpr, INTERP: tl.constexpr):
    r = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = r < T
    c = tl.arange(0, E_P2)
    c_ok = c < E
    # step 1: scores
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * s_t + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=float("-inf"))
    if SOFTMAX_FIRST:
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding rows: no NaN from -inf - -inf
        e = _exp(x - m[:, None], INTERP)
        s = tl.sum(e, 1)
        cur = tl.div_rn(e, tl.where(s == 0.0, 1.0, s)[:, None])  # padding rows: 0, not 0 / 0
        cur = tl.where(c_ok[None, :], cur, float("-inf"))
    else:
        cur = x
    # step 2: K rounds of (max, its first column, remove it)
    kc = tl.arange(0, K_P2)
    sel_v = tl.zeros([BT, K_P2], dtype=tl.float32)
    sel_i = tl.zeros([BT, K_P2], dtype=tl.int32)
    for j in tl.static_range(K):
        v = tl.max(cur, 1)
        col = tl.min(tl.where(cur == v[:, None], c[None, :], E_P2), 1)
        sel_v = tl.where(kc[None, :] == j, v[:, None], sel_v)
        sel_i = tl.where(kc[None, :] == j, col[:, None], sel_i)
        cur = tl.where(c[None, :] == col[:, None], float("-inf"), cur)
    # step 3: the weights of the k chosen
    k_ok = kc < K
    if SOFTMAX_FIRST:
        w = sel_v
        if RENORM:
            s = tl.sum(tl.where(k_ok[None, :], w, 0.0), 1)
            w = tl.div_rn(w, tl.where(s == 0.0, 1.0, s)[:, None])
    else:
        top = tl.max(tl.where(k_ok[None, :], sel_v, float("-inf")), 1)  # column 0: the largest
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.where(k_ok[None, :], _exp(sel_v - top[:, None], INTERP), 0.0)
        s = tl.sum(e, 1)
        w = tl.div_rn(e, tl.where(s == 0.0, 1.0, s)[:, None])
    out = r.to(tl.int64)[:, None] * K + kc[None, :]
    ok = r_ok[:, None] & k_ok[None, :]
    tl.store(ids_ptr + out, sel_i.to(tl.int64), mask=ok)
    tl.store(w_ptr + out, w, mask=ok)


#: (T at most, rows a program, warps) by E_P2, the fastest of bench/moe_bench.py --route on an H200
#: (bench/results/moe_h200/route_sweep.json; T = 64..16384, ids checked against torch). What counts
#: is a row's reductions staying inside one warp, and enough programs: the first rule's 32-row
#: programs were 3.5x slower at Qwen3's decode 256 (9.81 against 2.81 us: 8 programs, each
#: selecting over 32 rows in turn)
_TILES: dict[int, tuple[tuple[int, int, int], ...]] = {
    8: ((256, 4, 1), (1024, 8, 2), (4096, 16, 4), (1 << 62, 32, 4)),
    32: ((64, 1, 1), (256, 2, 4), (1024, 4, 4), (4096, 16, 4), (1 << 62, 8, 2)),
    128: ((64, 1, 1), (1 << 62, 4, 4)),
    256: ((1 << 62, 1, 1),),
}


def tiles(T: int, E: int) -> tuple[int, int]:
    """(rows a program, warps) for T rows of E logits: `_TILES` where measured, else a warp a row
    where a row fills a warp (128 // E_P2 rows a warp, at most 8, below that), one warp for rows of
    256 and more (wider rows split over warps measured slower). TBO_ROUTE_TILES=legacy gives the
    first rule: as many rows as fill a 4096-element tile, at most 64, 4 warps."""
    e_p2 = max(2, triton.next_power_of_2(E))
    if flag("TBO_ROUTE_TILES") == "legacy":
        return max(1, min(_TILE // e_p2, triton.next_power_of_2(T), 64)), 4
    for t_max, bt, nw in _TILES.get(e_p2, ()):
        if T <= t_max:
            return bt, nw
    if e_p2 >= 256:
        return 1, 1
    nw = 1 if T <= 64 else 4
    return max(1, min(8, 128 // e_p2)) * nw, nw


def route_topk(logits: Tensor, k: int, scoring: str = "softmax", renormalize: bool = False,
               tile: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(ids [T, k] int64, weights [T, k] fp32) of the k best experts per row (module docstring);
    `tile` = (rows a program, warps) overrides `tiles` (the bench's sweep)."""
    if scoring not in SCORINGS:
        raise ValueError(f"route_topk: scoring must be one of {SCORINGS}, got {scoring!r}")
    T, E = logits.shape
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, w
    e_p2 = max(2, triton.next_power_of_2(E))
    bt, nw = tile or tiles(T, E)
    _route_kernel[(triton.cdiv(T, bt),)](
        logits, ids, w, T, E, logits.stride(0), K=k, K_P2=max(2, triton.next_power_of_2(k)), E_P2=e_p2,
        BT=bt, SOFTMAX_FIRST=scoring == "softmax", RENORM=bool(renormalize), INTERP=_interpreting(),
        num_warps=nw)
    return ids, w
