"""moe_experts with TMA loads (Hopper and later): the routed rows gathered once (or, GATHER_A, loaded
by the gate/up GEMM itself), then both expert GEMMs read their tiles through tensor descriptors.

Same contract as triton_moe.moe_experts (see that module: dims N, D, K, E, I, P = N*K, BM), same
routing prep (pairs sorted by expert, each expert's first sorted position) and the same block
schedule (expert e owns cdiv(count_e, BM) consecutive blocks). What differs is how the GEMMs load:

  1. Gather: xs[p] = x[pairs[p] // K] for the sorted positions p < offs[E] (the valid pairs), one
     pass, so the gate/up GEMM reads a plain row-major matrix.
  2. Gate/up: per M-block x BN columns of I, three tensor descriptors (xs [P, D], w13 seen as
     [E*2I, D]) deliver [BM, BK] and two [BN, BK] tiles per step: the copy engine moves them into
     shared memory without address arithmetic in the warps, which is what lets the MMAs run at the
     tile rate. A block's tile may run past its expert's last row (the next expert's rows, or zeros
     past P): those rows are computed and never stored. Epilogue as in triton_moe (bias,
     activation in fp32), h stored in sorted order.
  3. Down: h [P, I] and w2 seen as [E*D, I] through descriptors; the epilogue adds the bias, scales
     each row by its routing weight and stores it at its pair's row of y_PD; triton_moe's sum over
     K (fixed order, fp32) makes the result.

HALF_TAIL (prefill): an expert's rows rarely fill its last BM-row block (Qwen3 prefill 4096: 256 +- 16
rows an expert, so half the experts compute a third 128-row block for a few rows, 25 % of the MMA
work wasted). With it, a last block holding at most BM/2 rows runs the same code at BM/2 rows
(a second descriptor with the half-height tile): the schedule is unchanged, only that tile shrinks.

SWAP (decode): with a handful of rows per expert, an MMA with the rows as its M dimension pads
them to 64; swapped, the weight tile is the M operand (BN = 64/128 rows of weights) and the BM = 16
or 32 routed rows are the N operand, so every MMA does useful work while the weights stream: the
accumulator is [BN, BM] and is transposed once for the epilogue.

QUARTER_TAIL (prefill): a last block of at most BM/4 rows (32 of 128) runs the swapped tile of
SWAP, the rows as the MMA's N (which may be as small as 8), not padded to a 64-row M: at Qwen3's
256 +- 16 rows an expert about half the experts end with such a block.

GATHER_A (prefill): no step 1. The gate/up GEMM loads its [BM, BK] A tiles straight from x with
pointer loads (row = pairs[p] // K, as triton_moe does), only the weight tiles through
descriptors: the gather's P x D write and read (134 MB a layer at Qwen3 prefill 4096, ~4 ms of a
60 ms step with the sum over K) are gone, at the price of address arithmetic in the warps for A.
A candidate the tuner measures against the gathered form; it combines with every other option (the
half and quarter tail tiles are the same loads at BM/2 and BM/4 rows).

PERSISTENT (prefill): one program per SM, each taking every SMs-th output tile (the same tiles in
the same swizzled order; blocks without an expert are skipped inside the loop), instead of one
program per tile: no tail wave of partly filled SMs and no program launch per tile. The trip count
is a constexpr (cdiv(tiles, SMs)), so each token count compiles its own kernel.

Descriptors need 16-byte aligned row strides (D and I multiples of 8 in 16-bit types) and
contiguous weights: `supported` says so, the tuner offers these candidates only then. Out-of-range
tile elements read as zero (descriptor padding). No host sync: capturable in a CUDA graph (the
descriptors hold addresses of buffers the graph owns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbo_compiler.runtime.kernels import triton_gqa as tg
from tbo_compiler.runtime.kernels import triton_moe as tm


@dataclass(frozen=True)
class TmaConfig:
    block_m: int
    gate_up: tm.GemmTile
    down: tm.GemmTile
    swap: bool = False
    half_tail: bool = False  # an expert's last block with <= block_m/2 rows runs a half-height tile
    quarter_tail: bool = False  # ... and one with <= block_m/4 rows a quarter-height swapped tile
    group_m: int = 8
    block_d: int = 1024
    persistent: bool = False  # one program per SM looping over the output tiles, not one per tile
    gather_a: bool = False  # the gate/up GEMM loads x's routed rows itself: no gather pass, no xs


def supported(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor, *rest) -> bool:
    """What triton_moe takes, 16-bit, with descriptor-friendly weights (contiguous, rows of a
    multiple of 16 bytes), on a GPU with TMA (compute capability 9+) or in the interpreter."""
    if not tm.supported(x, topk_ids, topk_w, w13, w2, *rest):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) and not tm._interpreting():
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    D, I = x.shape[1], w13.shape[1] // 2
    # x.stride(1) == 1: the gather pass reads its rows as contiguous (gather_a would not need it)
    return x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous() and D % 8 == 0 and I % 8 == 0


# Step 1: the gather ------------------------------------------------------------------------------

@triton.jit
def _gather_kernel(x_ptr, pairs_ptr, offs_ptr, xs_ptr, E, s_xn, D: tl.constexpr, K: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = p < tl.load(offs_ptr + E)  # pairs that are not ours are never computed: not copied either
    row = (tl.load(pairs_ptr + p, mask=ok, other=0) // K).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (d < D)[None, :]
        v = tl.load(x_ptr + row[:, None] * s_xn + d[None, :], mask=m)
        tl.store(xs_ptr + p.to(tl.int64)[:, None] * D + d[None, :], v, mask=m)


# Step 2: the GEMMs -------------------------------------------------------------------------------

@triton.jit
def _a_tile(a_desc, a_ptrs, start, k, s_xd, D: tl.constexpr, BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr):
    """The block's [BM, BK] tile of A at column k: through xs's descriptor, or (GATHER_A) from the x
    rows a_ptrs points at (column 0), the K tail past D masked to zero as the descriptor pads it."""
    if GATHER_A:
        if D % BLOCK_K == 0:
            a = tl.load(a_ptrs + k * s_xd)
        else:
            a = tl.load(a_ptrs + k * s_xd, mask=(k + tl.arange(0, BLOCK_K) < D)[None, :], other=0.0)
    else:
        a = a_desc.load([start, k])
    return a


@triton.jit
def _gate_up_tile(a_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, e, start, end, n0, limit, s_xn, s_xd, s_be,
                  D: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SWAP: tl.constexpr, GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr, CLAMP: tl.constexpr):
    g_row = e * (2 * I) + n0
    pos = start + tl.arange(0, BLOCK_M)
    a_ptrs = x_ptr  # unused unless GATHER_A: A comes through a_desc
    if GATHER_A:  # rows past the block's end read pair 0's row (it exists): computed, never stored
        row = (tl.load(pairs_ptr + pos, mask=pos < end, other=0) // K).to(tl.int64)  # N*D may pass 2^31
        a_ptrs = x_ptr + row[:, None] * s_xn + tl.arange(0, BLOCK_K)[None, :] * s_xd
    if SWAP:
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(D, BLOCK_K)):
        k = kb * BLOCK_K
        a = _a_tile(a_desc, a_ptrs, start, k, s_xd, D, BLOCK_K, GATHER_A)
        wg = w_desc.load([g_row, k])
        wu = w_desc.load([g_row + I, k])
        if SWAP:
            acc_g = tl.dot(wg, tl.trans(a), acc_g)
            acc_u = tl.dot(wu, tl.trans(a), acc_u)
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc_g)
            acc_u = tl.dot(a, tl.trans(wu), acc_u)
    if SWAP:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    if HAS_BIAS:
        b_row = b_ptr + e.to(tl.int64) * s_be
        acc_g += tl.load(b_row + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_row + I + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = tm._glu(acc_g, acc_u, limit, ACT, CLAMP)
    h_ptrs = h_ptr + pos.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(pos < end)[:, None] & n_ok[None, :])


@triton.jit
def _gate_up_block(a_desc, a_half_desc, a_quarter_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, offs_ptr, tile, E,
                   num_blocks, limit, s_xn, s_xd, s_be, D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, E_P2: tl.constexpr, SWAP: tl.constexpr, HALF_TAIL: tl.constexpr,
                   QUARTER_TAIL: tl.constexpr, GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   CLAMP: tl.constexpr):
    """Output tile `tile` of the gate/up GEMM (nothing when its block has no expert)."""
    pid_m, pid_n = tm._swizzle(tile, num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    e, start, end = tm._block_of(offs_ptr, pid_m, E, BLOCK_M, E_P2)
    if e < E:
        n0 = pid_n * BLOCK_N
        if QUARTER_TAIL and end - start <= BLOCK_M // 4:  # a last block of <= BM/4 rows: swapped MMA
            _gate_up_tile(a_quarter_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, e, start, end, n0, limit, s_xn,
                          s_xd, s_be, D, I, K, BLOCK_M // 4, BLOCK_N, BLOCK_K, True, GATHER_A, HAS_BIAS, ACT, CLAMP)
        elif HALF_TAIL and end - start <= BLOCK_M // 2:  # an expert's last block with at most half its rows
            _gate_up_tile(a_half_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, e, start, end, n0, limit, s_xn,
                          s_xd, s_be, D, I, K, BLOCK_M // 2, BLOCK_N, BLOCK_K, SWAP, GATHER_A, HAS_BIAS, ACT, CLAMP)
        else:
            _gate_up_tile(a_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, e, start, end, n0, limit, s_xn, s_xd,
                          s_be, D, I, K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, GATHER_A, HAS_BIAS, ACT, CLAMP)


@triton.jit
def _gate_up_tma_kernel(a_desc, a_half_desc, a_quarter_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, offs_ptr, E,
                        num_blocks, limit, s_xn, s_xd, s_be, D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, E_P2: tl.constexpr, SWAP: tl.constexpr, HALF_TAIL: tl.constexpr,
                        QUARTER_TAIL: tl.constexpr, GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        CLAMP: tl.constexpr, ITERS: tl.constexpr):
    """One program per output tile (ITERS = 0), or a persistent grid whose programs take ITERS
    tiles each, strided by the grid (a constexpr trip count: Triton's interpreter cannot loop to a
    runtime bound). GATHER_A: the A descriptors are None, A comes from x through pairs."""
    if ITERS > 0:
        tiles = num_blocks * tl.cdiv(I, BLOCK_N)
        for i in range(ITERS):
            tile = tl.program_id(0) + i * tl.num_programs(0)
            if tile < tiles:
                _gate_up_block(a_desc, a_half_desc, a_quarter_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, offs_ptr,
                               tile, E, num_blocks, limit, s_xn, s_xd, s_be, D, I, K, BLOCK_M, BLOCK_N, BLOCK_K,
                               GROUP_M, E_P2, SWAP, HALF_TAIL, QUARTER_TAIL, GATHER_A, HAS_BIAS, ACT, CLAMP)
    else:
        _gate_up_block(a_desc, a_half_desc, a_quarter_desc, x_ptr, pairs_ptr, w_desc, b_ptr, h_ptr, offs_ptr,
                       tl.program_id(0), E, num_blocks, limit, s_xn, s_xd, s_be, D, I, K, BLOCK_M, BLOCK_N, BLOCK_K,
                       GROUP_M, E_P2, SWAP, HALF_TAIL, QUARTER_TAIL, GATHER_A, HAS_BIAS, ACT, CLAMP)


@triton.jit
def _down_tile(a_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, e, start, end, n0, s_be, s_tn, s_tk,
               D: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    w_row = e * D + n0
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BLOCK_K)):
        k = kb * BLOCK_K
        a = a_desc.load([start, k])
        b = w_desc.load([w_row, k])
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SWAP:
        acc = tl.trans(acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    if HAS_BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * s_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    pos = start + tl.arange(0, BLOCK_M)
    m_ok = pos < end
    pair = tl.load(pairs_ptr + pos, mask=m_ok, other=0)
    w = tl.load(tw_ptr + (pair // K) * s_tn + (pair % K) * s_tk, mask=m_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_block(a_desc, a_half_desc, a_quarter_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, offs_ptr, tile,
                E, num_blocks, s_be, s_tn, s_tk,
                D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, E_P2: tl.constexpr, SWAP: tl.constexpr, HALF_TAIL: tl.constexpr,
                QUARTER_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Output tile `tile` of the down GEMM (nothing when its block has no expert)."""
    pid_m, pid_n = tm._swizzle(tile, num_blocks, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, start, end = tm._block_of(offs_ptr, pid_m, E, BLOCK_M, E_P2)
    if e < E:
        n0 = pid_n * BLOCK_N
        if QUARTER_TAIL and end - start <= BLOCK_M // 4:
            _down_tile(a_quarter_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, e, start, end, n0, s_be, s_tn, s_tk,
                       D, I, K, BLOCK_M // 4, BLOCK_N, BLOCK_K, True, HAS_BIAS)
        elif HALF_TAIL and end - start <= BLOCK_M // 2:
            _down_tile(a_half_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, e, start, end, n0, s_be, s_tn, s_tk,
                       D, I, K, BLOCK_M // 2, BLOCK_N, BLOCK_K, SWAP, HAS_BIAS)
        else:
            _down_tile(a_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, e, start, end, n0, s_be, s_tn, s_tk,
                       D, I, K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, HAS_BIAS)


@triton.jit
def _down_tma_kernel(a_desc, a_half_desc, a_quarter_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, offs_ptr,
                     E, num_blocks, s_be, s_tn, s_tk,
                     D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, E_P2: tl.constexpr, SWAP: tl.constexpr, HALF_TAIL: tl.constexpr,
                     QUARTER_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, ITERS: tl.constexpr):
    if ITERS > 0:
        tiles = num_blocks * tl.cdiv(D, BLOCK_N)
        for i in range(ITERS):
            tile = tl.program_id(0) + i * tl.num_programs(0)
            if tile < tiles:
                _down_block(a_desc, a_half_desc, a_quarter_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, offs_ptr,
                            tile, E, num_blocks, s_be, s_tn, s_tk, D, I, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                            E_P2, SWAP, HALF_TAIL, QUARTER_TAIL, HAS_BIAS)
    else:
        _down_block(a_desc, a_half_desc, a_quarter_desc, w_desc, b_ptr, tw_ptr, y_ptr, pairs_ptr, offs_ptr,
                    tl.program_id(0), E, num_blocks, s_be, s_tn, s_tk, D, I, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                    E_P2, SWAP, HALF_TAIL, QUARTER_TAIL, HAS_BIAS)


# Step 3: the op ----------------------------------------------------------------------------------

def _num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (CPU interpreter: a few, so the loop runs)."""
    return tg._sm_count(device) if device.type == "cuda" else 4


def _desc(t: Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def moe_experts_tma(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor,
                    w13_bias: Tensor | None = None, w2_bias: Tensor | None = None, activation: str = "silu",
                    limit: float = 0.0, *, config: TmaConfig) -> Tensor:
    """GLU experts over routed rows (triton_moe's contract) with TMA tile loads. No host sync."""
    N, D, K, E, I, P = tm.dims(x, topk_ids, w13)
    if P == 0:
        return x.new_zeros(N, D)
    cfg = config
    BM = cfg.block_m
    pairs, offs = tm._sort_pairs(topk_ids, E)
    num_blocks = triton.cdiv(P, BM) + E
    common = dict(BLOCK_M=BM, GROUP_M=cfg.group_m, E_P2=max(2, triton.next_power_of_2(E)), SWAP=cfg.swap,
                  HALF_TAIL=cfg.half_tail, QUARTER_TAIL=cfg.quarter_tail)
    sms = _num_sms(x.device) if cfg.persistent else 0

    def launch(tiles: int) -> dict:
        """Grid and trip count: one program per tile, or one per SM taking cdiv(tiles, SMs) each."""
        if not cfg.persistent:
            return dict(grid=(tiles,), ITERS=0)
        progs = min(tiles, sms)
        return dict(grid=(progs,), ITERS=triton.cdiv(tiles, progs))

    gu = cfg.gate_up
    if cfg.gather_a:  # the gate/up GEMM loads x's rows through pairs: no xs, no descriptors over it
        a_descs = (None, None, None)
    else:
        xs = x.new_empty(P, D)
        rows = 16
        _gather_kernel[(triton.cdiv(P, rows),)](x, pairs, offs, xs, E, x.stride(0), D=D, K=K, ROWS=rows,
                                                BLOCK_D=min(512, triton.next_power_of_2(D)), num_warps=4)
        a_desc = _desc(xs, [BM, gu.block_k])
        a_descs = (a_desc, _desc(xs, [BM // 2, gu.block_k]) if cfg.half_tail else a_desc,
                   _desc(xs, [BM // 4, gu.block_k]) if cfg.quarter_tail else a_desc)

    h = x.new_empty(P, I)
    b13 = None if w13_bias is None else w13_bias.contiguous()
    b2 = None if w2_bias is None else w2_bias.contiguous()
    gl = launch(num_blocks * triton.cdiv(I, gu.block_n))
    _gate_up_tma_kernel[gl.pop("grid")](
        *a_descs, x, pairs, _desc(w13.view(E * 2 * I, D), [gu.block_n, gu.block_k]),
        w13 if b13 is None else b13, h, offs, E, num_blocks, float(limit), x.stride(0), x.stride(1),
        0 if b13 is None else b13.stride(0),
        D=D, I=I, K=K, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, GATHER_A=cfg.gather_a, HAS_BIAS=b13 is not None,
        ACT=tm._ACTIVATIONS[activation], CLAMP=limit > 0,
        num_warps=gu.num_warps, num_stages=gu.num_stages, **gl, **common)

    dn = cfg.down
    y_pairs = x.new_empty(P, D)
    h_desc = _desc(h, [BM, dn.block_k])
    dl = launch(num_blocks * triton.cdiv(D, dn.block_n))
    _down_tma_kernel[dl.pop("grid")](
        h_desc, _desc(h, [BM // 2, dn.block_k]) if cfg.half_tail else h_desc,
        _desc(h, [BM // 4, dn.block_k]) if cfg.quarter_tail else h_desc,
        _desc(w2.view(E * D, I), [dn.block_n, dn.block_k]),
        w2 if b2 is None else b2, topk_w, y_pairs, pairs, offs, E, num_blocks,
        0 if b2 is None else b2.stride(0), topk_w.stride(0), topk_w.stride(1),
        D=D, I=I, K=K, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, HAS_BIAS=b2 is not None,
        num_warps=dn.num_warps, num_stages=dn.num_stages, **dl, **common)
    return tm.sum_over_k(y_pairs, topk_ids, E, cfg.block_d)


#: the tile configs the tuner tries (moe_tuned.py): prefill-sized (128-row blocks, two warpgroups)
#: and decode-sized swapped ones (the weights as the MMA's M operand, 16-64 routed rows as its N)
CONFIGS = {
    "tma_bm128_n128": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3)),
    "tma_bm128_n128_ht": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3), half_tail=True),
    # prefill candidates not yet measured on the GPU (the tuner decides): one program per SM over
    # the tiles (no tail wave, no launch per tile), and a fourth pipeline stage (4 x 48 KB of tiles)
    "tma_bm128_n128_ht_p": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3), half_tail=True,
                                     persistent=True),
    "tma_bm128_n128_ht_s4": TmaConfig(128, tm.GemmTile(128, 64, 8, 4), tm.GemmTile(256, 64, 8, 4), half_tail=True),
    "tma_bm128_n128_hq": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3), half_tail=True,
                                   quarter_tail=True),
    "tma_bm128_n128_hq_p": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3), half_tail=True,
                                     quarter_tail=True, persistent=True),
    # ... and the gate/up GEMM loading x's rows itself, no gather pass (GATHER_A)
    "tma_bm128_n128_ga": TmaConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3), gather_a=True),
    "tma_bm128_n128_ht_s4_ga": TmaConfig(128, tm.GemmTile(128, 64, 8, 4), tm.GemmTile(256, 64, 8, 4), half_tail=True,
                                         gather_a=True),
    "tma_bm64_n128_w8_ga": TmaConfig(64, tm.GemmTile(128, 64, 8, 4), tm.GemmTile(256, 64, 8, 3), gather_a=True),
    "tma_bm128_n128_ht_k128": TmaConfig(128, tm.GemmTile(128, 128, 8, 2), tm.GemmTile(256, 128, 8, 2), half_tail=True),
    "tma_bm64_n128_w8": TmaConfig(64, tm.GemmTile(128, 64, 8, 4), tm.GemmTile(256, 64, 8, 3)),
    "tma_bm128_n64": TmaConfig(128, tm.GemmTile(64, 64, 8, 4), tm.GemmTile(128, 64, 8, 4)),
    "tma_bm64_n128": TmaConfig(64, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(128, 64, 4, 4)),
    "tma_swap16": TmaConfig(16, tm.GemmTile(64, 128, 4, 4), tm.GemmTile(128, 128, 4, 4), swap=True),
    "tma_swap32": TmaConfig(32, tm.GemmTile(64, 128, 4, 4), tm.GemmTile(128, 128, 4, 4), swap=True),
    "tma_swap64": TmaConfig(64, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(128, 64, 4, 4), swap=True),
}
