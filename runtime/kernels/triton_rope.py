"""The GQA attention's work before the cache write in one Triton launch: tbo.qk_rope_kv.

Dims: T tokens, H query heads, G kv heads, Dh head dim (a compile-time constant, even), P = Dh/2
rotation pairs; BLOCK_D, BLOCK_P the next powers of two of Dh and P; BH_Q, BH_KV heads per program.

Contract (the op tbo.qk_rope_kv, ops/kernels.py; torch reference torch_ref.qk_rope_kv, which is the
composition of the ops it replaces):
  qk_rope_kv(q_THD, k_TGD, v_TGD, positions_T, inv_freq_P, q_weight=None, k_weight=None, eps)
    -> (rope_half(rms_norm(q, q_weight, eps)), stack([rope_half(rms_norm(k, k_weight, eps)), v], 1))
  (no norm where the weight is None), outputs [T, H, Dh] and [T, 2, G, Dh], contiguous. Bit for bit
  the result of this backend's own rms_norm and rope_half kernels (triton_elementwise.py) followed
  by torch.stack: the same fp32 operations with the same rounding points, namely
    1. rms_norm: fp32 sum of squares of the head's row, r = rsqrt(sum * fp32(1/Dh) + eps) (CPU:
       1 / sqrt(sum / Dh + eps)); y = x * r rounded to x's dtype; w * y rounded again;
    2. rope_half: angle = fp32(position) * inv_freq, cos/sin as that kernel takes them (libdevice
       on CUDA, numpy under the interpreter); x1 * cos - x2 * sin and x2 * cos + x1 * sin with
       every product rounded to fp32 (no FMA: enable_fp_fusion=False), rounded once to the dtype;
    3. v copied into the entry's second half.
  The sum of squares is the one step whose bits depend on how the hardware reduces: the row is
  loaded as one [heads, BLOCK_D] tile, as the rms_norm kernel loads it, with at least a 16-byte
  vector per thread (`_tiles`), so each thread holds the same elements of the row and the same
  shuffles combine them. The column layout then does not depend on the tile's rows or warps
  while one warp spans a row (Dh * itemsize <= 512 bytes: Dh 128 in fp32, 256 in 16 bits), and
  the rms_norm kernel has it whenever its tile holds 256 elements (T * G * Dh >= 256).
  Against the torch reference that step can differ by an ulp (another summation order, as
  rms_norm's), and cos/sin by an fp32 ulp under the interpreter (numpy's, not torch's): the tests
  compare bits against the Triton ops, and against torch within those bounds.
  Dtypes: q, k and v of one dtype, the norm weights of it too (the models' case); other mixes
  are left to the torch reference (`supported` says no). Inputs: any token and head strides
  (views of one fused projection output are read in place), last dim contiguous (else copied).
  No host sync (CUDA-graph capturable); T == 0 launches nothing.

Grid (T, NQ + NKV), NQ = cdiv(H, BH_Q) blocks of query heads, NKV = cdiv(G, BH_KV) blocks of kv
heads. Program (t, b) computes token t's cos/sin once, then
    b <  NQ: q heads b*BH_Q.. : norm (when q_weight), rotate, store to q'[t, heads]
    b >= NQ: kv heads (b-NQ)*BH_KV.. : k norm and rotate -> kv[t, 0, heads]; v -> kv[t, 1, heads]
BH_Q = 16 q heads on 2 warps (measured, _BH_Q), BH_KV = all kv heads, both rounded up to a power
of two, at most 4096 / BLOCK_D, at least a 16-byte vector per thread (rows past the heads masked):
Qwen3-30B-A3B (H=32, G=4, Dh=128) is three programs per token (2 x 16 q heads, 4 kv heads in a
4-row tile), GPT-OSS (H=64, G=8, Dh=64) five. Each input
byte is read once from HBM (the norm's full-row tile and the halves the rotation uses are the
same lines: the second read hits L1) and each output byte written once: the ops' five launches
and four intermediate round trips become one.

Under Triton's interpreter (CPU tests) the workarounds are triton_elementwise's (INTERP constexpr).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from tbo_compiler.runtime.kernels.triton_elementwise import (_FLOATS, _cos_sin, _f32, _interpreting,
                                                             _num_warps, _round_to)

_TILE = 4096    # elements of one program's [heads, BLOCK_D] tile
_MAX_DH = 1024  # a head is one row of one tile


def supported(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor,
              q_weight: Tensor | None = None, k_weight: Tensor | None = None, eps: float = 0.0) -> bool:
    """Whether the kernel takes these arguments: CUDA (or CPU under the interpreter), q/k/v [T, heads,
    Dh] of one float dtype with Dh even, norm weights (if any) of that dtype, int positions."""
    tensors = [t for t in (q, k, v, positions, inv_freq, q_weight, k_weight) if t is not None]
    if not all(isinstance(t, Tensor) and (t.is_cuda or (_interpreting() and t.device.type == "cpu"))
               for t in tensors):
        return False
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if any(w is not None and w.dtype != q.dtype for w in (q_weight, k_weight)):
        return False
    if positions.dtype not in (torch.int32, torch.int64) or inv_freq.dtype not in _FLOATS:
        return False
    return q.dim() == k.dim() == v.dim() == 3 and q.shape[-1] % 2 == 0 and 0 < q.shape[-1] <= _MAX_DH


@triton.jit
def _norm_rope(x_ptr, s_tok, s_head, w_ptr, o_ptr, o_tok, t, heads, n_heads, cos, sin, eps, inv_d,
               DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
               NORM: tl.constexpr, INTERP: tl.constexpr):
    """o[t, heads] = rope_half(rms_norm(x[t, heads])) (no norm unless NORM); o's rows are DH wide."""
    P: tl.constexpr = DH // 2
    h_ok = (heads < n_heads)[:, None]
    x_row = x_ptr + t * s_tok + heads.to(tl.int64)[:, None] * s_head
    pairs = tl.arange(0, BLOCK_P)[None, :]
    p_ok = h_ok & (pairs < P)
    x1 = _f32(tl.load(x_row + pairs, mask=p_ok, other=0.0), INTERP)
    x2 = _f32(tl.load(x_row + pairs + P, mask=p_ok, other=0.0), INTERP)
    if NORM:
        # statistics from the whole row as one tile, as the rms_norm kernel loads it (its summation order)
        cols = tl.arange(0, BLOCK_D)[None, :]
        xx = _f32(tl.load(x_row + cols, mask=h_ok & (cols < DH), other=0.0), INTERP)
        ss = tl.sum(xx * xx, axis=1)
        if INTERP:  # torch CPU: sum / D, rsqrt as 1 / sqrt
            r = 1.0 / tl.sqrt_rn(ss / DH + eps)
        else:       # torch CUDA: sum * fp32(1/D), rsqrtf
            r = libdevice.rsqrt(ss * inv_d + eps)
        x_dtype: tl.constexpr = x_ptr.dtype.element_ty
        w1 = _f32(tl.load(w_ptr + pairs, mask=pairs < P, other=0.0), INTERP)
        w2 = _f32(tl.load(w_ptr + pairs + P, mask=pairs < P, other=0.0), INTERP)
        # rms_norm's two roundings: the normalised row to x's dtype, then the weight product
        x1 = _f32(_round_to(w1 * _f32(_round_to(x1 * r[:, None], x_dtype, INTERP), INTERP), x_dtype, INTERP),
                  INTERP)
        x2 = _f32(_round_to(w2 * _f32(_round_to(x2 * r[:, None], x_dtype, INTERP), INTERP), x_dtype, INTERP),
                  INTERP)
    o_row = o_ptr + t * o_tok + heads.to(tl.int64)[:, None] * DH
    dtype: tl.constexpr = o_ptr.dtype.element_ty
    tl.store(o_row + pairs, _round_to(x1 * cos - x2 * sin, dtype, INTERP), mask=p_ok)
    tl.store(o_row + pairs + P, _round_to(x2 * cos + x1 * sin, dtype, INTERP), mask=p_ok)


@triton.jit
def _qk_rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, f_ptr, qw_ptr, kw_ptr, qo_ptr, kv_ptr,
                       H, G, sq_tok, sq_head, sk_tok, sk_head, sv_tok, sv_head, eps, inv_d,
                       DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                       BH_Q: tl.constexpr, BH_KV: tl.constexpr,
                       Q_NORM: tl.constexpr, K_NORM: tl.constexpr, INTERP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    nq = tl.cdiv(H, BH_Q)
    # token t's angles, as the rope kernel computes them
    pairs = tl.arange(0, BLOCK_P)
    freq = tl.load(f_ptr + pairs, mask=pairs < DH // 2, other=0.0).to(tl.float32)
    cos, sin = _cos_sin(tl.load(pos_ptr + t).to(tl.float32) * freq, INTERP)
    cos, sin = cos[None, :], sin[None, :]
    if b < nq:  # (the branches' names differ: Triton wants one type per name across an if)
        q_heads = b * BH_Q + tl.arange(0, BH_Q)
        _norm_rope(q_ptr, sq_tok, sq_head, qw_ptr, qo_ptr, H * DH, t, q_heads, H, cos, sin, eps, inv_d,
                   DH, BLOCK_D, BLOCK_P, Q_NORM, INTERP)
    else:
        kv_heads = (b - nq) * BH_KV + tl.arange(0, BH_KV)
        _norm_rope(k_ptr, sk_tok, sk_head, kw_ptr, kv_ptr, 2 * G * DH, t, kv_heads, G, cos, sin, eps, inv_d,
                   DH, BLOCK_D, BLOCK_P, K_NORM, INTERP)
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (kv_heads < G)[:, None] & (cols < DH)
        rows = kv_heads.to(tl.int64)[:, None]
        v = tl.load(v_ptr + t * sv_tok + rows * sv_head + cols, mask=mask)
        tl.store(kv_ptr + t * (2 * G * DH) + G * DH + rows * DH + cols, v, mask=mask)


#: q heads a program and warps: measured on an H200 (bench/rope_bench.py, 2026-12-03) over the
#: heads a program can take with 1-8 warps, 16 heads on 2 warps was the fastest or within 10 % of it
#: at every model and token count (Qwen3 4096 tokens: 35 us against 67 us with all 32 heads on 8
#: warps, and 60 us for the separate ops). One token a program: programs taking 2-16 tokens in turn
#: were slower at every size (the tokens' loads wait on each other's stores; prefill 4096 in the
#: graph: GPT-OSS 1.15 -> 3.86 ms a step with 8, Qwen3 1.48 -> 2.18; H200, 2026-12-04,
#: bench/results/roofline_h200/v7/roofline_rope_tokens.json)
_BH_Q, _WARPS = 16, 2


def _tiles(H: int, G: int, block_d: int) -> tuple[int, int, int]:
    """-> (BH_Q, BH_KV, num_warps). A norm tile gives each thread at least one whole 16-byte vector
    of each row it reads, as the rms_norm kernel's tiles do (its warps are sized to its tile):
    Triton's coalescing gives a thread at most tile / threads elements of a row, and fewer would
    spread a row over more lanes, i.e. sum it in another order. Rows past the heads are masked."""
    cap = max(1, _TILE // block_d)
    warps = _WARPS
    least = min(cap, triton.next_power_of_2(triton.cdiv(8 * 32 * warps, block_d)))  # 8 = 16 B of bf16
    bh_q, bh_kv = min(triton.next_power_of_2(H), _BH_Q, cap), min(triton.next_power_of_2(G), cap)
    return max(bh_q, least), max(bh_kv, least), warps


def qk_rope_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor,
               q_weight: Tensor | None = None, k_weight: Tensor | None = None,
               eps: float = 0.0, *, bh_q: int | None = None, num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """(rope_half(rms_norm(q)), stack([rope_half(rms_norm(k)), v], 1)) in one launch; see the module
    docstring for the contract. bh_q / num_warps: the q heads of a program and its warps instead of
    _tiles' (benches; a thread must still hold a whole 16-byte vector of each row it reads)."""
    T, H, Dh = q.shape
    G = k.shape[1]
    if not (k.shape == v.shape == (T, G, Dh) and Dh % 2 == 0):
        raise ValueError(f"qk_rope_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "need [T, H, Dh], [T, G, Dh] twice, Dh even")
    if positions.shape != (T,) or inv_freq.shape != (Dh // 2,):
        raise ValueError(f"qk_rope_kv: positions {tuple(positions.shape)}, inv_freq {tuple(inv_freq.shape)} "
                         f"for T={T}, Dh={Dh}")
    for w in (q_weight, k_weight):
        if w is not None and w.shape != (Dh,):
            raise ValueError(f"qk_rope_kv: norm weight {tuple(w.shape)} for heads of {Dh}")
    if not supported(q, k, v, positions, inv_freq, q_weight, k_weight, eps):
        raise ValueError(f"qk_rope_kv: the Triton kernel does not take q/k/v {q.dtype}/{k.dtype}/{v.dtype} "
                         f"with weights {None if q_weight is None else q_weight.dtype}/"
                         f"{None if k_weight is None else k_weight.dtype} on {q.device}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kv = torch.empty(T, 2, G, Dh, dtype=k.dtype, device=k.device)
    if T == 0 or H + G == 0:
        return q_out, kv
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    block_d, block_p = triton.next_power_of_2(Dh), triton.next_power_of_2(Dh // 2)
    bh_q_, bh_kv, warps = _tiles(H, G, block_d)
    bh_q, warps = bh_q or bh_q_, num_warps or warps
    grid = (T, triton.cdiv(H, bh_q) + triton.cdiv(G, bh_kv))
    inv_d = float(np.float32(1.0) / np.float32(Dh))
    _qk_rope_kv_kernel[grid](
        q, k, v, positions.contiguous(), inv_freq.contiguous(),
        q if q_weight is None else q_weight.contiguous(), k if k_weight is None else k_weight.contiguous(),
        q_out, kv, H, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(eps), inv_d, DH=Dh, BLOCK_D=block_d, BLOCK_P=block_p, BH_Q=bh_q, BH_KV=bh_kv,
        Q_NORM=q_weight is not None, K_NORM=k_weight is not None, INTERP=_interpreting(),
        num_warps=warps, enable_fp_fusion=False)  # no FMA: the ops round every product
    return q_out, kv
