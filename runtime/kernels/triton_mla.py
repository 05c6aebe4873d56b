"""Triton kernel for MLA's absorbed attention: every query head attends to one shared latent cache.

Legend: T tokens (flat batch: tokens of many requests), H query heads, C cache entry width
(kv_lora_rank + rope dim, 576 for DeepSeek-V3), V value width (= v_dim, a prefix of C; 512),
R = C - V (the rope part of a key, 64), S cache slots (num_blocks * BS), BS block size, NB blocks
per block-table row, P splits of the context (split-KV), BH heads per program, BN keys per tile.

Contract (the torch reference is `latent_attention` in runtime/kernels/torch_ref.py):

  latent_attention(q_lat[T,H,V], q_pe[T,H,R], cache[S,C], block_table[T,NB] int, positions[T] int,
                   BS, scale) -> out[T,H,V] in q's dtype;  q = [q_lat | q_pe] (two tensors: no concat)
  Token t attends to logical positions j = 0..positions[t] of its own block-table row:
      slot(t, j) = block_table[t, j // BS] * BS + j % BS
      s[h, j] = scale * <q[t, h, :], cache[slot, :C]>;  p = softmax_j(s)
      out[t, h, :] = sum_j p[h, j] * cache[slot, :V]
  Accumulation is fp32. No host synchronisation and no data-dependent shapes: the context length is
  read on the device, so the call can be captured in a CUDA graph.

Algorithm:
  1. Grid (T, ceil(H / BH), P). A program owns one token, BH heads and one context chunk. Heads sit
     on the M dimension of both dots (MQA: all heads share the keys), so a key tile is loaded once
     per BH heads instead of once per head.
  2. The program loads q[t, heads] once, split in the V part and the R part (C and V need not be
     powers of two: each part is padded to a power of two and masked).
  3. Its chunk is [split * L, (split + 1) * L) clipped to n = positions[t] + 1, with
     L = ceil(ceil(n / P) / BN) * BN, computed on the device; chunks past the context do no work.
  4. Per tile of BN keys: gather the slots through the block-table row, load K as a [BN, V] part
     and a [BN, R] part; S = Q_v K_v^T + Q_r K_r^T; online softmax (running max m, sum l, in
     log2 units); acc = acc * alpha + P K_v, reusing the first V columns of K as the values.
  5. P == 1: write acc / l to out. P > 1: write acc / l (fp32) and lse = m + log2(l) (-inf for an
     empty chunk) to scratch sized [T, H, P, V]; a second kernel merges the chunks of (t, h) with
     weights 2^(lse_i - max lse).
  P is picked on the host from T, the head-block count, the table width and the SM count only
  (`_num_splits`): split only when T * head-blocks cannot fill the GPU by itself.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbo_compiler.runtime.env import flag

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 128   # a split re-loads q (BH * C elements): give it at least this many keys
_MAX_SPLITS = 32
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return flag("TRITON_INTERPRET")


def supported(q: Tensor, q_pe: Tensor, cache: Tensor, *index_tensors: Tensor) -> bool:
    """True when this kernel can run `latent_attention` on these tensors (shape/dtype/device only).

    `index_tensors` (block_table, positions) are optional: the registry passes every tensor argument.
    """
    devs = {t.device for t in (q, q_pe, cache, *index_tensors)}
    on_device = len(devs) == 1 and (q.is_cuda or (_interpreting() and q.device.type == "cpu"))
    return (on_device and q.dtype in _DTYPES and cache.dtype == q.dtype == q_pe.dtype and q.dim() == 3
            and q_pe.dim() == 3 and cache.dim() == 2 and q.shape[2] + q_pe.shape[2] == cache.shape[1]
            and q.shape[1] > 0)


# Step 1: the attention kernel (one token x BH heads x one context chunk per program) -----------

@triton.jit
def _attend_tile(q_v, q_r, m_i, l_i, acc, cache_ptr, bt_row, j0, end, qk_scale, stride_cs,
                 BLOCK_SIZE: tl.constexpr, V_DIM: tl.constexpr, R_DIM: tl.constexpr,
                 V_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One online-softmax step over keys [j0, j0 + BN) (those >= end are masked out)."""
    dv = tl.arange(0, V_PAD)
    dr = tl.arange(0, R_PAD)
    idx = j0 + tl.arange(0, BLOCK_N)
    live = idx < end
    blk = tl.load(bt_row + idx // BLOCK_SIZE, mask=live, other=0)
    k_row = cache_ptr + (blk.to(tl.int64) * BLOCK_SIZE + idx % BLOCK_SIZE)[:, None] * stride_cs
    # one load of the V part serves as the keys' first V columns and as the values
    if V_DIM == V_PAD:   # no column mask: keeps the row loads fully vectorised
        k_v = tl.load(k_row + dv[None, :], mask=live[:, None], other=0.0)
    else:
        k_v = tl.load(k_row + dv[None, :], mask=live[:, None] & (dv < V_DIM)[None, :], other=0.0)
    s = tl.dot(q_v, tl.trans(k_v), input_precision=DOT_PREC)
    if R_DIM > 0:
        if R_DIM == R_PAD:
            k_r = tl.load(k_row + V_DIM + dr[None, :], mask=live[:, None], other=0.0)
        else:
            k_r = tl.load(k_row + V_DIM + dr[None, :], mask=live[:, None] & (dr < R_DIM)[None, :],
                          other=0.0)
        s = tl.dot(q_r, tl.trans(k_r), s, input_precision=DOT_PREC)
    # The tile starts below `end`, so >= 1 key is live and m_new is finite: no inf - inf.
    s = tl.where(live[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(k_v.dtype), k_v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _mla_fwd_kernel(
    qv_ptr, qr_ptr, cache_ptr, bt_ptr, pos_ptr, out_ptr, lse_ptr,
    T, H, num_splits, qk_scale,
    stride_qt, stride_qh, stride_rt, stride_rh, stride_cs, stride_bt,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    BLOCK_SIZE: tl.constexpr, V_DIM: tl.constexpr, R_DIM: tl.constexpr,
    V_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Reversed token order: in a causal prefill the last tokens of a request have the longest
    # contexts; starting them first leaves the short ones for the tail wave.
    t = (T - 1 - tl.program_id(0)).to(tl.int64)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    dv = tl.arange(0, V_PAD)
    dr = tl.arange(0, R_PAD)

    n = tl.load(pos_ptr + t).to(tl.int32) + 1
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    # q arrives as two tensors (the absorbed latent part and the rope part), so the model never
    # concatenates them: [T, H, 576] copies cost as much as the attention at prefill sizes
    q_v = tl.load(qv_ptr + t * stride_qt + heads[:, None] * stride_qh + dv[None, :],
                  mask=head_ok[:, None] & (dv < V_DIM)[None, :], other=0.0)
    if R_DIM > 0:
        q_r = tl.load(qr_ptr + t * stride_rt + heads[:, None] * stride_rh + dr[None, :],
                      mask=head_ok[:, None] & (dr < R_DIM)[None, :], other=0.0)
    else:
        q_r = q_v    # unused placeholder

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, V_PAD], tl.float32)
    bt_row = bt_ptr + t * stride_bt
    if INTERPRET:
        # Triton's interpreter under numpy 2 cannot run range() over a device-valued bound (it calls
        # int() on a 1-element array); a while loop does the same tiles. Never compiled for a GPU.
        j0 = start
        while j0 < end:
            m_i, l_i, acc = _attend_tile(q_v, q_r, m_i, l_i, acc, cache_ptr, bt_row, j0, end,
                                         qk_scale, stride_cs, BLOCK_SIZE, V_DIM, R_DIM, V_PAD, R_PAD,
                                         BLOCK_N, DOT_PREC)
            j0 += BLOCK_N
    else:
        # scf.for with device bounds: the software pipeliner prefetches the next tile's gather.
        for j0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q_v, q_r, m_i, l_i, acc, cache_ptr, bt_row, j0, end,
                                         qk_scale, stride_cs, BLOCK_SIZE, V_DIM, R_DIM, V_PAD, R_PAD,
                                         BLOCK_N, DOT_PREC)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]     # empty chunk: acc = 0 stays 0, never NaN
    o_ptrs = out_ptr + t * stride_ot + heads[:, None] * stride_oh + split * stride_os + dv[None, :]
    o_mask = head_ok[:, None] & (dv < V_DIM)[None, :]
    if PARTIAL:
        tl.store(o_ptrs, o, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + t * stride_lt + heads * stride_lh + split, lse, mask=head_ok)
    else:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)


# Step 2: the merge of split-KV partials (one (token, head) per program) -----------------------

@triton.jit
def _mla_merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    V_DIM: tl.constexpr, V_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dv = tl.arange(0, V_PAD)
    sp = tl.arange(0, S_PAD)
    lse_row = lse_ptr + t * stride_lt + h * stride_lh
    lse_all = tl.load(lse_row + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m = tl.where(m == float("-inf"), 0.0, m)            # no live chunk at all: weights all 0
    w_all = tl.exp2(lse_all - m)                         # empty chunk: lse = -inf -> weight 0
    acc = tl.zeros([V_PAD], tl.float32)
    for i in tl.static_range(NUM_SPLITS):
        w = tl.sum(tl.where(sp == i, w_all, 0.0), 0)
        o_i = tl.load(part_ptr + t * stride_pt + h * stride_ph + i * stride_ps + dv,
                      mask=dv < V_DIM, other=0.0)
        acc += w * o_i
    denom = tl.sum(w_all, 0)
    o = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dv, o.to(out_ptr.dtype.element_ty),
             mask=dv < V_DIM)


# Step 3: launch configuration (from shapes and dtype only) -------------------------------------

def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))   # tl.dot needs every dimension >= 16


def _config(dtype: torch.dtype, H: int, v_pad: int) -> dict:
    """Block sizes and launch options.

    16-bit inputs (tensor cores): BH = 64 heads is one wgmma M tile, so 128 heads take 2 programs
    per token (all 128 would need a [128, 512] fp32 accumulator = the whole register file; BH = 128
    with 16 warps fails ptxas). Warps are sized so the accumulator costs <= 128 fp32 registers per
    thread ([64, 512] over 8 warps). BN = 64 keys per tile: measured on H200 (bench/results/
    mla_sweep_h200.log) it beat BN = 32 by 20-30% (prefill 4096: 1.56 vs 1.91 ms; decode 512: 0.37
    vs 0.48 ms) and BN = 16 by 2x; a third pipeline stage changed nothing.
    fp32 inputs (exact `ieee` dots run on FMA units, a correctness path only): small tiles, one
    stage, to bound registers and shared memory.
    """
    if dtype == torch.float32:
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, DOT_PREC="ieee")
    block_h = min(64, _pow2(H))
    num_warps = min(8, max(4, block_h * v_pad // (32 * 128)))
    block_n = 64
    return dict(BLOCK_H=block_h, BLOCK_N=block_n, num_warps=num_warps, num_stages=2, DOT_PREC="tf32")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(T: int, head_blocks: int, table_keys: int, sms: int) -> int:
    """Context chunks per token: fill one wave of `sms` programs when T * head_blocks alone can't.

    Never more than one wave (a second, partial wave costs as much as the first), never chunks
    shorter than _MIN_KEYS_PER_SPLIT keys of the table width, never more than _MAX_SPLITS.
    """
    programs = max(1, T * head_blocks)
    if programs * 2 > sms:
        return 1
    return max(1, min(sms // programs, table_keys // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


# Step 4: the entry point ------------------------------------------------------------------------

def latent_attention(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, positions: Tensor,
                     block_size: int, scale: float, *,
                     num_splits: int | None = None, out: Tensor | None = None,
                     config: dict | None = None) -> Tensor:
    """MQA of q = [q_lat | q_pe] ([T,H,V] and [T,H,R], any strides with a unit last one) over the
    paged latent cache[S, V+R]; returns out[T,H,V] (see module doc).

    `num_splits` forces the split-KV count (tests); `out` is an optional preallocated output;
    `config` replaces the block sizes of `_config` (the micro-benchmark's sweep).
    """
    q = q_lat
    T, H, v_dim = q_lat.shape
    C = v_dim + q_pe.shape[2]
    assert q_pe.shape[:2] == (T, H) and q_pe.dtype == q_lat.dtype, (q_lat.shape, q_pe.shape)
    assert cache.shape[1] == C and 0 < v_dim <= C and cache.dtype == q.dtype, (q.shape, cache.shape)
    assert block_table.shape[0] == T and positions.shape[0] == T
    if out is None:
        out = q.new_empty(T, H, v_dim)
    assert out.shape == (T, H, v_dim) and out.stride(2) == 1, (out.shape, out.stride())
    if T == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    q_pe = q_pe if q_pe.stride(2) == 1 or q_pe.shape[2] == 0 else q_pe.contiguous()
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    positions = positions.contiguous()

    v_pad, r_dim = _pow2(v_dim), C - v_dim
    r_pad = _pow2(r_dim)
    cfg = {**_config(q.dtype, H, v_pad), **(config or {})}
    head_blocks = triton.cdiv(H, cfg["BLOCK_H"])
    if num_splits is None:
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 1                      # interpreter: splitting only costs time
        num_splits = _num_splits(T, head_blocks, block_table.shape[1] * block_size, sms)
    consts = dict(BLOCK_SIZE=block_size, V_DIM=v_dim, R_DIM=r_dim, V_PAD=v_pad, R_PAD=r_pad,
                  INTERPRET=_interpreting(), **cfg)
    grid = (T, head_blocks, num_splits)
    head = (q, q_pe if r_dim else q, cache, block_table, positions)
    tail = (T, H, num_splits, float(scale) * _LOG2E, q.stride(0), q.stride(1),
            q_pe.stride(0) if r_dim else 0, q_pe.stride(1) if r_dim else 0, cache.stride(0), block_table.stride(0))
    if num_splits == 1:
        _mla_fwd_kernel[grid](*head, out, out, *tail, out.stride(0), out.stride(1), 0, 0, 0,
                              PARTIAL=False, **consts)
        return out
    # partials are written for every (t, h, split), empty chunks included: torch.empty is safe
    part = torch.empty(T, H, num_splits, v_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(T, H, num_splits, device=q.device, dtype=torch.float32)
    _mla_fwd_kernel[grid](*head, part, lse, *tail, part.stride(0), part.stride(1), part.stride(2),
                          lse.stride(0), lse.stride(1), PARTIAL=True, **consts)
    _mla_merge_kernel[(T, H)](part, lse, out, part.stride(0), part.stride(1), part.stride(2),
                              lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                              V_DIM=v_dim, V_PAD=v_pad, NUM_SPLITS=num_splits,
                              S_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out


# Step 5: micro-benchmark on the DeepSeek-V3 shapes (GPU; `python -m ...triton_mla`) ------------

def _bench_case(T: int, req_len: int, causal: bool, block_size: int = 64, table_blocks: int = 256,
                dev: str = "cuda"):
    """Inputs for T tokens in requests of req_len tokens; decode = each token at position req_len-1."""
    H, C, V = 128, 576, 512
    dt = torch.bfloat16
    reqs = T // req_len if causal else T
    per_req = triton.cdiv(req_len, block_size)
    num_blocks = reqs * per_req + 1
    perm = torch.randperm(num_blocks - 1, device=dev)[: reqs * per_req].view(reqs, per_req) + 1
    table = torch.zeros(reqs, table_blocks, dtype=torch.int32, device=dev)
    table[:, :per_req] = perm.to(torch.int32)
    if causal:
        block_table = table.repeat_interleave(req_len, 0)
        positions = torch.arange(req_len, device=dev).repeat(reqs)
    else:
        block_table, positions = table, torch.full((T,), req_len - 1, device=dev)
    q = torch.randn(T, H, C, device=dev, dtype=dt)
    cache = torch.randn(num_blocks * block_size, C, device=dev, dtype=dt)
    pairs = int(positions.sum().item()) + T          # (token, key) pairs; host-side, bench only
    unique_keys = reqs * req_len
    return (q[..., :V], q[..., V:], cache, block_table, positions, block_size, 1.0 / math.sqrt(C)), pairs, unique_keys


def _bench() -> None:
    from triton.testing import do_bench
    H, C, V = 128, 576, 512
    cases = [(f"decode T={T} ctx=512", T, 512, False) for T in (64, 128, 256, 512)]
    cases.append(("prefill T=4096 (8 x 512, causal)", 4096, 512, True))
    sms = _sm_count(torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; H={H} C={C} V={V} bf16, block_size 64")
    print(f"{'case':36s} {'splits':>6s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>8s}")
    sweep = [None, dict(BLOCK_N=16), dict(BLOCK_N=16, num_stages=3), dict(BLOCK_N=32, num_stages=3),
             dict(BLOCK_N=64), dict(BLOCK_H=128, BLOCK_N=32, num_warps=16),
             dict(BLOCK_H=128, BLOCK_N=16, num_warps=16, num_stages=3)]
    for name, T, L, causal in cases:
        args, pairs, unique_keys = _bench_case(T, L, causal)
        for cfg in sweep:
            bh = (cfg or {}).get("BLOCK_H", 64)
            splits = _num_splits(T, triton.cdiv(H, bh), args[3].shape[1] * args[5], sms)
            try:
                ms = do_bench(lambda: latent_attention(*args, config=cfg))
            except Exception as e:  # a config that does not fit must not hide the others
                print(f"{name:36s} {str(cfg):44s} failed: {type(e).__name__}")
                continue
            tflops = 2 * H * (C + V) * pairs / (ms * 1e-3) / 1e12
            gbs = unique_keys * C * 2 / (ms * 1e-3) / 1e9    # distinct cache bytes the call must read
            print(f"{name:36s} {str(cfg or 'default'):44s} {splits:6d} {ms:8.3f} {tflops:8.1f} {gbs:8.1f}")


if __name__ == "__main__":
    _bench()
