"""Paged GQA attention in Triton: flash-style online softmax over each token's own request's blocks.

Dims: T tokens, H query heads, G kv heads, R = H // G query heads per kv head, Dh head dim,
S cache slots (num_blocks * BS), BS block size, NB blocks per block-table row, SP kv splits.

Contract (same as the torch reference in runtime/kernels/__init__.py):
  paged_attention(q_THD, kv_cache_S2GD, block_table_TNB, positions_T, block_size, scale,
                  sinks_H=None, window=0) -> o_THD
      token t attends logical positions j = lo..positions[t] of its row of block_table, lo = 0, or
      positions[t] - window + 1 (clamped at 0) with a sliding window (window > 0):
      slot(t, j) = block_table[t, j // BS] * BS + j % BS; head h reads kv head h // R;
      o[t, h] = softmax_j(scale * q[t, h] . k[slot, g]) @ v[slot, g], fp32 accumulation, q's dtype.
      With sinks, sinks[h] is one more logit of the softmax, with a zero value (GPT-OSS).
  No host sync; allocations depend on shapes only (CUDA-graph capturable); the context length is
  read from positions inside the kernel.

Algorithm:
  0. Prefill: runs of TILE_T consecutive tokens of one request (consecutive positions, the same
     block-table row up to the run's last position; checked in the kernel, no host sync) are one
     program per (run, kv head): M = TILE_T x R rows (128 on Hopper), so each K/V tile is read
     once per run instead of once per token and the dots are MMA-sized; the causal (and window)
     mask is per row. Such a tile marks itself done; the per-token kernel below skips its tokens and
     takes every other one (decode tokens, runs that straddle two requests, padding).
  1. One program per (token, kv head, split). Its R query heads are the M rows of the tile (padded
     to 16 for tl.dot, padding rows masked), so K/V are read once per group, not once per head.
  2. The program walks its share of positions lo..positions[t] in BLOCK_N tiles (a window skips the
     positions before lo: the work is bounded by the window, not the context): block ids come from
     the token's block-table row, K and V rows are gathered by slot; scores use exp2 with
     scale * log2(e) folded in, and the online softmax keeps a running max m, sum l and fp32 acc.
     A sink starts the state at m = sink * log2(e), l = 1, acc = 0 (a key whose value is zero), in
     split 0 only, so the merge counts it once.
  3. Without splits (enough tokens to fill the GPU) the program writes acc / l. With SP splits
     (few tokens, e.g. small decode batches) the context is cut into SP equal tile-aligned chunks,
     computed from positions[t] in the kernel so they stay balanced for any length; each split
     writes (acc, m, l) and a second kernel merges them with weights exp2(m_s - max m).

The context loop is an scf.for over bounds read on the device, which Triton's software pipeliner
prefetches (the block-table load a stage ahead of the K/V gathers). Triton 3.6's interpreter cannot
take such a bound under NumPy >= 2.4; `_fix_interpreter_loop_bounds` repairs that in the
interpreter instead of giving the CPU tests a different loop than the GPU compiles.
"""
from __future__ import annotations


import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from tbo_compiler.runtime.env import flag

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30  # the window the kernel runs without one: longer than any context


def _interpreting() -> bool:
    return flag("TRITON_INTERPRET")


def supported(q: Tensor, kv_cache: Tensor, block_table: Tensor, positions: Tensor,
              block_size: int = 1, scale: float = 1.0, sinks: Tensor | None = None, window: int = 0) -> bool:
    """Whether paged_attention can run these inputs (CUDA, or CPU under Triton's interpreter)."""
    ts = (q, kv_cache, block_table, positions) + (() if sinks is None else (sinks,))
    if not all(isinstance(t, Tensor) for t in ts):
        return False
    if not isinstance(window, int) or window < 0 or window >= _NO_WINDOW:
        return False
    on_gpu = all(t.is_cuda for t in ts)
    on_cpu = _interpreting() and all(t.device.type == "cpu" for t in ts)
    if not (on_gpu or on_cpu):
        return False
    if q.dtype not in _DTYPES or kv_cache.dtype != q.dtype:
        return False
    if on_cpu and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong (Triton 3.6)
        return False
    ints = (torch.int32, torch.int64)
    if block_table.dtype not in ints or positions.dtype not in ints:
        return False
    if q.dim() != 3 or kv_cache.dim() != 4 or block_table.dim() != 2 or positions.dim() != 1:
        return False
    T, H, Dh = q.shape
    S, two, G, Dk = kv_cache.shape
    if sinks is not None and (sinks.dtype not in _DTYPES or tuple(sinks.shape) != (H,)):
        return False
    return (two == 2 and Dk == Dh and G > 0 and H % G == 0 and H // G <= 128 and Dh <= 256
            and block_table.shape[0] == T and positions.shape[0] == T and block_size > 0
            and S % block_size == 0)


# Step 1: launch parameters -----------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:  # host-side property, cached: nothing touches the stream
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _num_splits(programs: int, max_ctx: int, device: torch.device) -> int:
    """Splits per (token, kv head): enough programs for ~2 per SM, each split >= 256 positions.

    Decided from shapes only (max_ctx = NB * BS, the block table's capacity), so it is fixed for a
    captured graph; the split boundaries themselves follow the real length inside the kernel.
    """
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    want = min(triton.cdiv(2 * sms, programs), max(max_ctx // 256, 1), 32)
    return 1 << (want.bit_length() - 1)  # a power of two: the merge kernel aranges over splits


def _tile_tokens(T: int, R: int, dtype: torch.dtype, head_dim: int) -> int:
    """Tokens per tile of the run kernel (0: per-token kernel only). The tile's rows are tokens x
    the R heads of one kv head: 128 on Hopper (two warpgroups' MMA rows), 64 for fp32 or wide heads
    (registers) and for Dh <= 64 (measured, _tile_launch), 16 in the interpreter; R and the tile must be powers of two (tl.arange), and the
    tile must hold at least 2 tokens and 16 rows (tl.dot)."""
    if _interpreting():
        rows = 16
    elif dtype == torch.float32 or head_dim > 128 or head_dim <= 64:
        rows = 64  # Dh 64 (GPT-OSS): 64 rows measured 7 % faster than 128 (bench/results/moe_h200)
    else:
        rows = 128
    if R & (R - 1) or R > rows // 2:
        return 0
    tile = rows // R
    return tile if T >= tile else 0


def _token_iters(T: int, programs_per_token: int, sms: int) -> int:
    """Tokens per program of the per-token kernel when the tile kernel ran first: a power of two,
    as large as keeps >= 8 programs per SM. In a prefill every tile is usually one request's run and
    the per-token kernel has nothing to do; one program per (token, kv head) that reads a flag and
    exits cost 11-21 us a layer at 4096 tokens on an H200 (bench/moe_bench.py --prefill-attention,
    2026-12-03). Decode batches (T * kv heads below that) keep one token a program."""
    iters = 1
    while iters < 32 and triton.cdiv(T, 2 * iters) * programs_per_token >= 8 * sms:
        iters *= 2
    return iters


def _tile_launch(dtype: torch.dtype, head_dim: int, rows: int, block_n: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the run kernel. Measured on an H200 at the roofline's
    prefill (8 requests x 512 tokens, bench/moe_bench.py --prefill-attention, 2026-12-03): Dh 128
    in 16 bits with 32 positions a tile, 11-12 % faster than 64 (Qwen3, Mixtral); Dh 64 at 64 rows,
    4 warps, 2 stages, 7 % faster than 128 rows, 8 warps, 3 stages (GPT-OSS, with and without its
    window)."""
    if _interpreting() or dtype == torch.float32:
        return block_n, (8 if rows >= 128 else 4), 3
    if head_dim == 128:
        return 32, 8, 3
    return block_n, (8 if rows >= 128 else 4), (2 if head_dim <= 64 else 3)


def _block_n(dtype: torch.dtype, head_dim: int) -> int:
    """Positions per tile. Hopper, Dh = 128 bf16: 64 rows of K and of V are 32 KB per stage, so 3
    stages fit easily and 4 warps keep enough loads in flight with several CTAs per SM."""
    if _interpreting():
        return 16  # small tiles: the tests' short contexts still span several tiles
    if dtype == torch.float32 or head_dim > 128:
        return 32
    return 64


# Step 2: kernels ---------------------------------------------------------------------------------

@triton.jit
def _attn_kernel(q_ptr, kv_ptr, bt_ptr, pos_ptr, sink_ptr, o_ptr, part_ptr, ml_ptr, done_ptr,
                 qk_scale, T, H, window, s_qt, s_qh, s_ks, s_kv, s_kg, s_bt, s_ot, s_oh,
                 R: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr, HAS_SINKS: tl.constexpr, TILE_T: tl.constexpr, ITERS: tl.constexpr,
                 HEAD_FIRST: tl.constexpr):
    """Tokens pid, pid + P, ... (P programs on the token axis, ITERS tokens each: 1 unless the tile
    kernel ran first, see _token_iters) for kv head g, split sp. The token axis is the grid's axis 0
    (neighbouring programs are tokens of one request, sharing K/V in L2), or with HEAD_FIRST its
    axis 1 behind the kv heads (a token's G programs run side by side and read the same cache
    slots, each its head's part of them)."""
    if HEAD_FIRST:
        pid = tl.program_id(1)
        g = tl.program_id(0)
        P = tl.num_programs(1)
    else:
        pid = tl.program_id(0)
        g = tl.program_id(1)
        P = tl.num_programs(0)
    sp = tl.program_id(2)
    if TILE_T > 0 and ITERS > 1:  # one load of all its tokens' flags: in a prefill they are all done
        ts = pid + tl.arange(0, ITERS) * P
        todo = tl.sum((tl.load(done_ptr + ts // TILE_T, mask=ts < T, other=1) == 0).to(tl.int32), 0)
        if todo == 0:
            return
    for it in range(ITERS):
        t = pid + it * P
        if t < T:
            skip = False
            if TILE_T > 0:
                skip = tl.load(done_ptr + t // TILE_T) != 0
            if not skip:
                _attn_token(q_ptr, kv_ptr, bt_ptr, pos_ptr, sink_ptr, o_ptr, part_ptr, ml_ptr, t, g, sp,
                            qk_scale, H, window, s_qt, s_qh, s_ks, s_kv, s_kg, s_bt, s_ot, s_oh,
                            R, DH, BS, SPLITS, BLOCK_M, BLOCK_N, BLOCK_D, PREC, HAS_SINKS)


@triton.jit
def _attn_token(q_ptr, kv_ptr, bt_ptr, pos_ptr, sink_ptr, o_ptr, part_ptr, ml_ptr, t, g, sp,
                qk_scale, H, window, s_qt, s_qh, s_ks, s_kv, s_kg, s_bt, s_ot, s_oh,
                R: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, HAS_SINKS: tl.constexpr):
    """One token's R query heads of kv head g over its split sp of the context (steps 1-3)."""
    ctx = tl.load(pos_ptr + t).to(tl.int32) + 1
    start = tl.maximum(ctx - window, 0)  # the sliding window's first position (0 without one)
    if SPLITS == 1:
        lo = start
        hi = ctx
    else:
        chunk = tl.cdiv(tl.cdiv(ctx - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + sp * chunk
        hi = tl.minimum(lo + chunk, ctx)  # lo >= hi: empty split, writes m = -inf, l = 0

    i = tl.arange(0, BLOCK_M)
    heads = g * R + i
    m_ok = i < R
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    q = tl.load(q_ptr + t.to(tl.int64) * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = kv_ptr + g * s_kg
    bt_row = bt_ptr + t.to(tl.int64) * s_bt

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_SINKS:  # the sink: a key of logit sinks[h] and value 0, counted by split 0 alone
        sink = tl.load(sink_ptr + heads, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(sp == 0, sink, m_i)
        l_i = tl.where(sp == 0, 1.0, l_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        blk = tl.load(bt_row + j // BS, mask=j_ok, other=0)
        rows = (blk.to(tl.int64) * BS + j % BS) * s_ks
        kv_ok = j_ok[:, None] & d_ok[None, :]  # never read past the context: slots there may hold NaN
        k = tl.load(k_base + rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(k_base + s_kv + rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds position j0 < hi
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    if SPLITS == 1:
        o = acc / l_i[:, None]
        o_ptrs = o_ptr + t.to(tl.int64) * s_ot + heads[:, None] * s_oh + d[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    else:
        row = (t.to(tl.int64) * H + heads) * SPLITS + sp  # partials [T, H, SP, Dh] and [T, H, SP, 2]
        tl.store(part_ptr + row[:, None] * DH + d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(ml_ptr + row * 2, m_i, mask=m_ok)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=m_ok)


@triton.jit
def _attn_tile_kernel(q_ptr, kv_ptr, bt_ptr, pos_ptr, sink_ptr, o_ptr, done_ptr,
                      qk_scale, T, window, s_qt, s_qh, s_ks, s_kv, s_kg, s_bt, s_ot, s_oh, NB,
                      R: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr, TILE_T: tl.constexpr,
                      NB_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """TILE_T consecutive tokens x the R query heads of kv head g as one M = TILE_T * R tile, when
    the tokens are one request's run (consecutive positions, the same block-table row up to the
    last position): K/V tiles are read once for the whole run and the dots are MMA-sized. A tile
    that is not such a run writes done = 0 and is left to the per-token kernel."""
    tile = tl.program_id(0)
    g = tl.program_id(1)
    tt = tile * TILE_T + tl.arange(0, TILE_T)
    t_ok = tt < T
    pos_t = tl.load(pos_ptr + tt, mask=t_ok, other=0).to(tl.int32)
    first = tl.load(pos_ptr + tile * TILE_T).to(tl.int32)
    last = first + TILE_T - 1
    run = tl.sum((t_ok & (pos_t == first + tl.arange(0, TILE_T))).to(tl.int32), 0) == TILE_T
    b = tl.arange(0, NB_P2)
    b_ok = (b <= last // BS) & (b < NB)
    bt0 = tl.load(bt_ptr + (tile * TILE_T).to(tl.int64) * s_bt + b, mask=b_ok, other=0)
    bts = tl.load(bt_ptr + tt.to(tl.int64)[:, None] * s_bt + b[None, :], mask=t_ok[:, None] & b_ok[None, :],
                  other=0)
    same = tl.sum(tl.sum((bts == bt0[None, :]).to(tl.int32), 1), 0) == TILE_T * NB_P2
    uniform = run & same & (last // BS < NB)
    if g == 0:
        tl.store(done_ptr + tile, uniform.to(tl.int8))
    if uniform:
        r = tl.arange(0, BLOCK_M)  # BLOCK_M = TILE_T * R
        tok = tile * TILE_T + r // R
        head = g * R + r % R
        row_pos = first + r // R
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DH
        q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * s_qt + head[:, None] * s_qh + d[None, :],
                    mask=d_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_SINKS:
            m_i = tl.load(sink_ptr + head).to(tl.float32) * 1.4426950408889634
            l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        lo = tl.maximum(first - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        k_base = kv_ptr + g * s_kg
        bt_row = bt_ptr + (tile * TILE_T).to(tl.int64) * s_bt
        for j0 in range(lo, last + 1, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j <= last
            blk = tl.load(bt_row + j // BS, mask=j_ok, other=0)
            rows = (blk.to(tl.int64) * BS + j % BS) * s_ks
            kv_ok = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(k_base + s_kv + rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            keep = (j[None, :] <= row_pos[:, None]) & (j[None, :] > row_pos[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays empty
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(o_ptr + tok.to(tl.int64)[:, None] * s_ot + head[:, None] * s_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _merge_kernel(part_ptr, ml_ptr, o_ptr, done_ptr, H, s_ot, s_oh,
                  DH: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, TILE_T: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if TILE_T > 0:
        if tl.load(done_ptr + t // TILE_T) != 0:
            return
    row = (t.to(tl.int64) * H + h) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(ml_ptr + row * 2)
    l = tl.load(ml_ptr + row * 2 + 1)
    w = tl.exp2(m - tl.max(m, 0))  # split 0 always holds the first position, so max m is finite
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    part = tl.load(part_ptr + row[:, None] * DH + d[None, :], mask=d_ok[None, :], other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + t.to(tl.int64) * s_ot + h * s_oh + d, o.to(o_ptr.dtype.element_ty), mask=d_ok)


# Step 3: the op ----------------------------------------------------------------------------------

def paged_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, positions: Tensor,
                    block_size: int, scale: float, sinks: Tensor | None = None, window: int = 0, *,
                    block_n: int | None = None, num_splits: int | None = None,
                    tile_tokens: int | None = None, per_token: bool = True,
                    num_warps: int | None = None, num_stages: int | None = None,
                    tile_block_n: int | None = None, tile_warps: int | None = None,
                    tile_stages: int | None = None, token_iters: int | None = None,
                    head_first: bool | None = None) -> Tensor:
    """GQA over a paged cache; see the module docstring. No host sync. The keyword-only knobs
    (tiles of the per-token kernel, then of the run kernel) are for tests and benches."""
    T, H, Dh = q.shape
    G = kv_cache.shape[2]
    R = H // G
    out = q.new_empty(T, H, Dh)
    if T == 0:
        return out
    if _interpreting():
        _fix_interpreter_loop_bounds()
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv_cache = kv_cache if kv_cache.stride(-1) == 1 else kv_cache.contiguous()
    block_table = block_table.contiguous()
    max_ctx = block_table.shape[1] * block_size
    splits = num_splits or _num_splits(T * G, min(max_ctx, window) if window > 0 else max_ctx, q.device)
    assert splits & (splits - 1) == 0, "num_splits must be a power of two"
    bn = block_n or _block_n(q.dtype, Dh)
    block_d = max(16, triton.next_power_of_2(Dh))
    prec = "ieee" if q.dtype == torch.float32 else None
    win = window if window > 0 else _NO_WINDOW
    sink_arg = q if sinks is None else sinks.contiguous()
    if tile_tokens is None:
        tile_t = _tile_tokens(T, R, q.dtype, Dh) if flag("TBO_GQA_TILES") else 0
    else:
        tile_t = tile_tokens
    done = out  # unused without tiles
    if tile_t:  # runs of one request's tokens (prefill) as MMA-sized tiles; the rest per token
        NB = block_table.shape[1]
        done = torch.empty(triton.cdiv(T, tile_t), dtype=torch.int8, device=q.device)
        t_bn, t_warps, t_stages = _tile_launch(q.dtype, Dh, tile_t * R, bn)
        _attn_tile_kernel[(triton.cdiv(T, tile_t), G)](
            q, kv_cache, block_table, positions, sink_arg, out, done, scale * _LOG2E, T, win,
            q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            block_table.stride(0), out.stride(0), out.stride(1), NB,
            R=R, DH=Dh, BS=block_size, TILE_T=tile_t, NB_P2=triton.next_power_of_2(NB), BLOCK_N=tile_block_n or t_bn,
            BLOCK_D=block_d, PREC=prec, HAS_SINKS=sinks is not None, BLOCK_M=tile_t * R,
            num_warps=tile_warps or t_warps, num_stages=tile_stages or t_stages)
    sms = _sm_count(q.device) if q.is_cuda else 4  # interpreter: a few, so tests take several tokens
    loop = tile_t and flag("TBO_GQA_TOKEN_LOOP")
    iters = (token_iters or _token_iters(T, G * splits, sms)) if loop else 1
    head_first = flag("TBO_GQA_HEAD_FIRST") if head_first is None else head_first
    head_first = head_first and triton.cdiv(T, iters) < 65536  # the grid's axis 1 holds at most 65535
    meta = dict(R=R, DH=Dh, BS=block_size, SPLITS=splits, BLOCK_M=max(16, triton.next_power_of_2(R)),
                BLOCK_N=bn, BLOCK_D=block_d, PREC=prec, HAS_SINKS=sinks is not None, TILE_T=tile_t, ITERS=iters,
                HEAD_FIRST=head_first, num_warps=num_warps or 4, num_stages=num_stages or 3)
    if splits == 1:
        part = ml = out  # unused: the kernel writes the output itself
    else:
        part = torch.empty(T, H, splits, Dh, dtype=torch.float32, device=q.device)
        ml = torch.empty(T, H, splits, 2, dtype=torch.float32, device=q.device)
    if not per_token:  # tests: the tiles' rows alone (the others are left unwritten)
        return out
    grid = (G, triton.cdiv(T, iters), splits) if head_first else (triton.cdiv(T, iters), G, splits)
    _attn_kernel[grid](
        q, kv_cache, block_table, positions, sink_arg, out, part, ml, done,
        scale * _LOG2E, T, H, win,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), **meta)
    if splits > 1:
        _merge_kernel[(T, H)](part, ml, out, done, H, out.stride(0), out.stride(1),
                              DH=Dh, SPLITS=splits, BLOCK_D=block_d, TILE_T=tile_t, num_warps=4)
    return out


_INTERP_FIXED = False


def _fix_interpreter_loop_bounds() -> None:
    """Make Triton 3.6's interpreter accept runtime loop bounds under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns a `range` bound into an int with
    int(array), which NumPy 2.4 refuses for arrays of ndim > 0. Its patch of tl.tensor.__index__ is
    wrapped to use .item() instead. Interpreter only; compiled kernels never see this.
    """
    global _INTERP_FIXED
    if _INTERP_FIXED:
        return
    _INTERP_FIXED = True
    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts size-1 arrays: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor


# Step 4: GPU micro-benchmark (python -m tbo_compiler.runtime.kernels.triton_gqa, on an H200) ------

def _bench_case(n_req: int, new: int, ctx: int, H=64, G=4, Dh=128, BS=16) -> None:
    """n_req requests, each with `new` tokens at positions ctx - new .. ctx - 1 (new = 1: decode)."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    per_req = triton.cdiv(ctx, BS)
    num_blocks = n_req * per_req + 1  # block 0: the null block
    kv = torch.randn(num_blocks * BS, 2, G, Dh, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=g) + 1  # scattered blocks
    tables = perm.view(n_req, per_req).int()
    T = n_req * new
    req = torch.arange(T, device="cuda") // new
    bt = tables[req]
    pos = ctx - new + torch.arange(T, device="cuda") % new
    q = torch.randn(T, H, Dh, device="cuda", generator=g).bfloat16()
    fn = lambda: paged_attention(q, kv, bt, pos, BS, Dh ** -0.5)  # noqa: E731
    fn()
    ms = do_bench(fn, warmup=25, rep=100)
    n_pairs = float((pos + 1).sum())
    flop = 4 * n_pairs * H * Dh
    kv_gb = n_pairs * 2 * G * Dh * 2 / 1e9  # K/V bytes as each token reads them (L2 serves repeats)
    splits = _num_splits(T * G, bt.shape[1] * BS, q.device)
    print(f"reqs={n_req:4d} new={new:5d} ctx={ctx:6d} T={T:5d} splits={splits:2d} {ms:8.3f} ms "
          f"{flop / ms / 1e9:7.2f} TFLOP/s {kv_gb / ms * 1e3:8.1f} GB/s K/V read per token")


if __name__ == "__main__":
    for _args in [(1, 1, 4096), (8, 1, 4096), (64, 1, 2048), (64, 1, 8192), (256, 1, 4096),
                  (1, 2048, 2048), (2, 4096, 8192)]:
        _bench_case(*_args)
