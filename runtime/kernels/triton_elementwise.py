"""Fused row-wise Triton kernels (RMSNorm, SiLU-and-mul, RoPE) that reproduce torch eager bit for bit,
and the KV-cache write as a row scatter (scatter_rows_, a copy: the bytes of index_put_).

Each kernel replaces a chain of small torch ops (one launch and one HBM round trip each) by one
launch that reads its input once and writes its output once. They exist to be swapped in for the
eager expressions in models/ without changing a single output bit, so every kernel reproduces
the *rounding sequence* of the torch code it replaces, not just its mathematical value:

  rms_norm(x, w, eps)      torch: xf = x.float(); xf = xf * rsqrt(xf.pow(2).mean(-1) + eps)
                                  out = w * xf.to(x.dtype)
      fp32 sum of squares; mean = sum * fp32(1/D) (CUDA's MeanOps multiplies by a factor; the CPU
      path divides, sum / D, and the kernel follows whichever device it runs on); rsqrt; the
      normalised row rounded to x.dtype *before* the weight product, which is then done in fp32
      and rounded once to the result dtype (torch's promotion of x and w).
  add_rms_norm(x, r, w, eps)  torch: h = x + r; (rms_norm(h, w, eps), h)   (the decoder's residual
      add and the norm after it; the sum is rounded to x's dtype first, as torch's add is)
  silu_mul(gu)             torch: F.silu(gu[..., :I]) * gu[..., I:]
      silu = g / (1 + exp(-g)) in fp32 (IEEE division, full-precision expf, like torch's CUDA
      kernel), rounded to the input dtype, then the product in fp32 rounded again.
  rope_interleaved(x, pos, inv_freq, mul)   (DeepSeek) pairs (x[2i], x[2i+1]) rotated by
      pos * inv_freq[i]; cos and sin each multiplied by `mul` in fp32 first.
  rope_half(x, pos, inv_freq)               (Qwen, rotate_half) pairs (x[i], x[i + R/2]).
      Both: angle = fp32(pos) * inv_freq, full-range-reduction cos/sin (libdevice, as torch's
      cosf/sinf; Triton's own tl.cos is an approximation that degrades for large angles), every
      product and sum rounded to fp32 separately, one rounding to x.dtype at the end.

Kernels launch with enable_fp_fusion=False: torch computes a*b - c*d in separate kernels, so
every product is rounded; letting the compiler contract it into an FMA would change last bits.

What "bit for bit" can and cannot mean: elementwise kernels (silu_mul, rope) match exactly when
the transcendental functions are the same implementation (libdevice on CUDA, which is what nvcc
uses for expf/cosf/sinf). rms_norm sums a row in a different order than torch's reduction, so the
fp32 mean can differ in its last bit; the 16-bit output then differs in about one element in 1e5
(one ulp, two after the weight product rounds again). With inputs whose sum of squares is exact
in fp32 in any order, it matches exactly.

On CPU (TRITON_INTERPRET=1, the tests) three interpreter shortcuts are worked around behind the
INTERP constexpr: fp32 -> bf16 casts there truncate instead of rounding to nearest even (so the
kernel rounds by hand), libdevice is unavailable (numpy's exp/cos/sin are used), and the reference
is torch's CPU code (mean = sum / D, rsqrt = 1 / sqrt).

All functions but scatter_rows_ (contiguous rows, see it): any leading dims (flattened into rows;
a row stride, or two nested ones, is taken as is, so slices of wider tensors are read in place),
last dim contiguous, outputs contiguous, no host sync (CUDA-graph capturable), zero rows -> empty
output without a launch.
"""
from __future__ import annotations


import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from tbo_compiler.runtime.env import flag

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_TILE = 4096  # elements per program: enough in flight per SM without spilling registers


def _interpreting() -> bool:
    return flag("TRITON_INTERPRET")


def supported(*tensors: Tensor) -> bool:
    """True when the kernels can take these tensors: on CUDA (or CPU under the interpreter),
    floating dtype bf16/fp16/fp32 (integer tensors, e.g. positions, pass if int32/int64), last
    dim contiguous."""
    for t in tensors:
        if not (t.is_cuda or (_interpreting() and t.device.type == "cpu")):
            return False
        if t.dtype not in _FLOATS and t.dtype not in (torch.int32, torch.int64):
            return False
        if t.dim() and t.size(-1) > 1 and t.stride(-1) != 1:
            return False
    return True


# Host-side helpers --------------------------------------------------------------------------

def _lead_dims(x: Tensor, skip: int = 0) -> list[tuple[int, int]] | None:
    """(size, stride) of x's leading dims after dims[:skip], merged where memory allows; None if
    more than two remain (the kernels index rows with at most two strides)."""
    dims = [(s, st) for s, st in zip(x.shape[skip:-1], x.stride()[skip:-1]) if s != 1]
    merged: list[tuple[int, int]] = []
    for s, st in dims:
        if merged and merged[-1][1] == s * st:
            merged[-1] = (merged[-1][0] * s, st)
        else:
            merged.append((s, st))
    return merged if len(merged) <= 2 else None


def _rows(x: Tensor) -> tuple[Tensor, int, int, int]:
    """-> (x, inner, outer_stride, inner_stride): row r of x starts at
    (r // inner) * outer_stride + (r % inner) * inner_stride."""
    dims = _lead_dims(x)
    if dims is None:  # three or more unmergeable strides: rare, pay for a copy
        x = x.contiguous()
        dims = _lead_dims(x)
    if not dims:
        return x, 1, 0, 0
    if len(dims) == 1:
        return x, 1, dims[0][1], 0
    return x, dims[1][0], dims[0][1], dims[1][1]


def _tokens_heads(x: Tensor) -> tuple[Tensor, int, int, int]:
    """x [T, ..., R] -> (x, heads, token_stride, head_stride), the dims between T and R merged."""
    dims = _lead_dims(x, skip=1)
    if dims is None or len(dims) > 1:
        x = x.contiguous()
        dims = _lead_dims(x, skip=1)
    heads, head_stride = dims[0] if dims else (1, 0)
    return x, heads, x.stride(0), head_stride


def _num_warps(elems: int) -> int:
    # about 16 elements per thread: 16-byte vector accesses for 2-byte dtypes, few registers
    return min(8, max(1, elems // 512))


def _launch_opts(elems: int) -> dict:
    return dict(num_warps=_num_warps(elems), enable_fp_fusion=False)


# Device-side helpers ------------------------------------------------------------------------

@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16, round to nearest even, in integer ops (the interpreter's cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _f32(v, INTERP: tl.constexpr):
    """Exact upcast to fp32 (the interpreter mangles bf16 subnormals, so shift the bits there)."""
    if INTERP and v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_to(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dtype, round to nearest even (what torch's .to() does)."""
    if INTERP and dtype == tl.bfloat16:
        return _bf16_rne(v)
    else:
        return v.to(dtype)


@triton.jit
def _row_offsets(rows, inner, s_outer, s_inner):
    r = rows.to(tl.int64)  # rows * stride can pass 2^31 on large batches
    return (r // inner) * s_outer + (r % inner) * s_inner


@triton.jit
def _exp(v, INTERP: tl.constexpr):
    if INTERP:
        return tl.exp(v)
    else:
        return libdevice.exp(v)  # = CUDA expf; tl.exp is ex2.approx, a different last bit


@triton.jit
def _cos_sin(ang, INTERP: tl.constexpr):
    if INTERP:
        return tl.cos(ang), tl.sin(ang)
    else:
        return libdevice.cos(ang), libdevice.sin(ang)


# 1. RMSNorm ---------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, r_ptr, s_ptr, n_rows, D, inner, s_outer, s_inner,
                     r_inner, r_outer, r_inner_s, eps, inv_d,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    x_off = _row_offsets(rows, inner, s_outer, s_inner)
    x = _f32(tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0), INTERP)
    o_off = rows.to(tl.int64) * D
    if HAS_RES:  # the residual add first, rounded to x's dtype as torch's x + residual is
        r_off = _row_offsets(rows, r_inner, r_outer, r_inner_s)
        res = _f32(tl.load(r_ptr + r_off[:, None] + cols[None, :], mask=mask, other=0.0), INTERP)
        h = _round_to(x + res, x_ptr.dtype.element_ty, INTERP)
        tl.store(s_ptr + o_off[:, None] + cols[None, :], h, mask=mask)
        x = _f32(h, INTERP)
    ss = tl.sum(x * x, axis=1)
    if INTERP:  # torch CPU: sum(...).div_(D), rsqrt as 1 / sqrt
        r = 1.0 / tl.sqrt_rn(ss / D + eps)
    else:       # torch CUDA: MeanOps multiplies by fp32(1/D); rsqrt is rsqrtf
        r = libdevice.rsqrt(ss * inv_d + eps)
    y = _f32(_round_to(x * r[:, None], x_ptr.dtype.element_ty, INTERP), INTERP)
    w = _f32(tl.load(w_ptr + cols, mask=cmask, other=0.0), INTERP)
    out = _round_to(w[None, :] * y, o_ptr.dtype.element_ty, INTERP)
    tl.store(o_ptr + o_off[:, None] + cols[None, :], out, mask=mask)


def _rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor | None]:
    D = x.shape[-1]
    assert weight.shape == (D,), f"weight {tuple(weight.shape)} for rows of {D}"
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return out, h
    x, inner, s_outer, s_inner = _rows(x)
    res, r_inner, r_outer, r_inner_s = (x, 1, 0, 0) if residual is None else _rows(residual)
    block_d = triton.next_power_of_2(D)
    rows = min(max(1, _TILE // block_d), triton.next_power_of_2(n_rows))
    inv_d = float(np.float32(1.0) / np.float32(D))
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, weight.contiguous(), out, res, out if h is None else h, n_rows, D, inner, s_outer, s_inner,
        r_inner, r_outer, r_inner_s, eps, inv_d, ROWS=rows, BLOCK_D=block_d, HAS_RES=residual is not None,
        INTERP=_interpreting(), **_launch_opts(rows * block_d))
    return out, h


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * normalise(x) over the last dim; result dtype = torch.promote_types(x, weight)."""
    return _rms_norm(x, weight, eps, None)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(h), h) with h = x + residual in x's dtype: the residual add and the norm after it
    in one launch (one read of each input, one write of each output)."""
    assert residual.shape == x.shape and residual.dtype == x.dtype, \
        f"residual {tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} {x.dtype}"
    return _rms_norm(x, weight, eps, residual)


# 2. SiLU(gate) * up -------------------------------------------------------------------------

@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, n_rows, I, inner, s_outer, s_inner,
                     ROWS: tl.constexpr, BLOCK_I: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < n_rows)[:, None] & (cols < I)[None, :]
    g_ptrs = gu_ptr + _row_offsets(rows, inner, s_outer, s_inner)[:, None] + cols[None, :]
    g = _f32(tl.load(g_ptrs, mask=mask, other=0.0), INTERP)
    u = _f32(tl.load(g_ptrs + I, mask=mask, other=0.0), INTERP)
    silu = tl.div_rn(g, 1.0 + _exp(-g, INTERP))
    silu = _f32(_round_to(silu, gu_ptr.dtype.element_ty, INTERP), INTERP)  # F.silu returns x.dtype
    out = _round_to(silu * u, o_ptr.dtype.element_ty, INTERP)
    o_off = rows.to(tl.int64) * I
    tl.store(o_ptr + o_off[:, None] + cols[None, :], out, mask=mask)


def silu_mul(gu: Tensor) -> Tensor:
    """gu [..., 2I] -> silu(gu[..., :I]) * gu[..., I:], [..., I] in gu's dtype."""
    two_i = gu.shape[-1]
    assert two_i % 2 == 0, f"last dim {two_i} is not gate|up"
    I = two_i // 2
    out = torch.empty(*gu.shape[:-1], I, dtype=gu.dtype, device=gu.device)
    n_rows = gu.numel() // two_i if two_i else 0
    if n_rows == 0:
        return out
    gu, inner, s_outer, s_inner = _rows(gu)
    block_i = min(triton.next_power_of_2(I), _TILE)
    rows = min(max(1, _TILE // block_i), triton.next_power_of_2(n_rows))
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(I, block_i))
    _silu_mul_kernel[grid](gu, out, n_rows, I, inner, s_outer, s_inner,
                           ROWS=rows, BLOCK_I=block_i, INTERP=_interpreting(),
                           **_launch_opts(rows * block_i))
    return out


# 3./4. Rotary embeddings --------------------------------------------------------------------

@triton.jit
def _rotate_interleaved(x_row, o_row, row_mask, cos, sin, R,
                        BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, INTERP: tl.constexpr):
    # one contiguous [heads, R] load, split into even/odd in registers (16-byte accesses)
    cols = tl.arange(0, 2 * BLOCK_P)[None, :]
    mask = row_mask & (cols < R)
    xx = _f32(tl.load(x_row + cols, mask=mask, other=0.0), INTERP)
    x0, x1 = tl.split(tl.reshape(xx, (BLOCK_H, BLOCK_P, 2)))
    o0, o1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    oo = tl.reshape(tl.join(o0, o1), (BLOCK_H, 2 * BLOCK_P))
    tl.store(o_row + cols, _round_to(oo, o_row.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _rotate_half(x_row, o_row, row_mask, cos, sin, R, BLOCK_P: tl.constexpr, INTERP: tl.constexpr):
    cols = tl.arange(0, BLOCK_P)[None, :]
    P = R // 2
    mask = row_mask & (cols < P)
    x1 = _f32(tl.load(x_row + cols, mask=mask, other=0.0), INTERP)
    x2 = _f32(tl.load(x_row + cols + P, mask=mask, other=0.0), INTERP)
    dtype: tl.constexpr = o_row.dtype.element_ty
    tl.store(o_row + cols, _round_to(x1 * cos - x2 * sin, dtype, INTERP), mask=mask)
    tl.store(o_row + cols + P, _round_to(x2 * cos + x1 * sin, dtype, INTERP), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, f_ptr, o_ptr, H, R, s_tok, s_head, mul,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr, INTERP: tl.constexpr):
    """One token, BLOCK_H heads: cos/sin of the token's R/2 angles once, applied to all heads."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    freq = tl.load(f_ptr + pairs, mask=pairs < R // 2, other=0.0).to(tl.float32)
    cos, sin = _cos_sin(tl.load(pos_ptr + t).to(tl.float32) * freq, INTERP)
    cos, sin = (cos * mul)[None, :], (sin * mul)[None, :]
    x_row = x_ptr + t * s_tok + heads.to(tl.int64)[:, None] * s_head
    o_row = o_ptr + (t * H + heads[:, None]) * R
    row_mask = (heads < H)[:, None]
    if INTERLEAVED:
        _rotate_interleaved(x_row, o_row, row_mask, cos, sin, R, BLOCK_H, BLOCK_P, INTERP)
    else:
        _rotate_half(x_row, o_row, row_mask, cos, sin, R, BLOCK_P, INTERP)


def _rope(x: Tensor, positions: Tensor, inv_freq: Tensor, mul: float, interleaved: bool) -> Tensor:
    T, R = x.shape[0], x.shape[-1]
    assert x.dim() >= 2 and R % 2 == 0, f"x {tuple(x.shape)}: need [T, ..., R] with R even"
    assert positions.shape == (T,) and inv_freq.shape == (R // 2,)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, heads, s_tok, s_head = _tokens_heads(x)
    block_p = triton.next_power_of_2(R // 2)
    block_h = min(max(1, _TILE // (2 * block_p)), triton.next_power_of_2(heads))
    grid = (T, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, positions.contiguous(), inv_freq.contiguous(), out, heads, R, s_tok, s_head,
                       float(mul), BLOCK_H=block_h, BLOCK_P=block_p, INTERLEAVED=interleaved,
                       INTERP=_interpreting(), **_launch_opts(block_h * 2 * block_p))
    return out


def rope_interleaved(x: Tensor, positions: Tensor, inv_freq: Tensor, mul: float) -> Tensor:
    """x [T, ..., R]: rotate (x[2i], x[2i+1]) by positions[t] * inv_freq[i], cos/sin scaled by mul."""
    return _rope(x, positions, inv_freq, mul, interleaved=True)


def rope_half(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """x [T, ..., R]: rotate (x[i], x[i + R/2]) by positions[t] * inv_freq[i] (rotate_half)."""
    return _rope(x, positions, inv_freq, 1.0, interleaved=False)


# 5. Row scatter: the KV-cache write ---------------------------------------------------------

@triton.jit
def _scatter_rows_kernel(src_ptr, idx_ptr, dst_ptr, n_rows, n_slots, W: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_W: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = r < n_rows
    slot = tl.load(idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
    slot = tl.where(slot < 0, slot + n_slots, slot)  # index_put_'s negative indices count from the end
    ok = r_ok & (slot >= 0) & (slot < n_slots)
    src_row = r.to(tl.int64) * W
    dst_row = slot * W
    for w0 in tl.static_range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        m = ok[:, None] & (w < W)[None, :]
        v = tl.load(src_ptr + src_row[:, None] + w[None, :], mask=m)
        tl.store(dst_ptr + dst_row[:, None] + w[None, :], v, mask=m)


_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def scatter_rows_(base: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    """base[idx[r]] = values[r] for every row r (aten.index_put_((idx,), values) of whole rows, a
    KV-cache write), in place, returns base. The rows move as 8-byte words (4, 2 or 1 where a row's
    bytes or the addresses do not allow 8), 16 KB a program, instead of ATen's one element per
    index computation. base and values contiguous, the same dtype, values [len(idx), *base[1:]];
    idx int32/int64, 1-D; a negative index counts from the end; an index past either end writes
    nothing (ATen asserts on the device; a copy inside a CUDA graph cannot raise). Repeated indices:
    one of their rows lands, as with index_put_. No host sync."""
    n_rows, n_slots = idx.shape[0], base.shape[0]
    if not (base.is_contiguous() and values.is_contiguous() and values.dtype == base.dtype
            and tuple(values.shape) == (n_rows, *base.shape[1:]) and idx.dim() == 1
            and idx.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"scatter_rows_: base {tuple(base.shape)} {base.dtype}, values {tuple(values.shape)} "
                         f"{values.dtype}, idx {tuple(idx.shape)} {idx.dtype}: need contiguous rows of one dtype")
    row_bytes = base[0].numel() * base.element_size() if n_slots else 0
    if n_rows == 0 or row_bytes == 0:
        return base
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and base.data_ptr() % w == 0
                and values.data_ptr() % w == 0)
    W = row_bytes // word
    dst = base.view(torch.uint8).view(n_slots, row_bytes).view(_WORDS[word])
    src = values.view(torch.uint8).view(n_rows, row_bytes).view(_WORDS[word])
    block_w = min(triton.next_power_of_2(W), 1024)
    rows = min(max(1, 2048 // block_w), triton.next_power_of_2(n_rows))
    _scatter_rows_kernel[(triton.cdiv(n_rows, rows),)](src, idx.contiguous(), dst, n_rows, n_slots, W=W, ROWS=rows,
                                                       BLOCK_W=block_w, num_warps=4)
    return base


# Micro-benchmark (GPU only) -----------------------------------------------------------------

def _bench() -> None:
    """Kernel vs torch eager on DeepSeek-V3 shapes (H200 target); bytes = one read + one write."""
    from triton.testing import do_bench

    from tbo_compiler.runtime.kernels import torch_ref

    if not torch.cuda.is_available() or _interpreting():
        raise SystemExit("the benchmark needs a CUDA GPU (and TRITON_INTERPRET unset)")
    dev, bf = "cuda", torch.bfloat16
    x, w = torch.randn(4096, 7168, device=dev, dtype=bf), torch.randn(7168, device=dev, dtype=bf)
    gu = torch.randn(32768, 4096, device=dev, dtype=bf)
    q = torch.randn(4096, 128, 192, device=dev, dtype=bf)[..., 128:]   # q_pe, a strided view
    pos = torch.randint(0, 32768, (4096,), device=dev)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, device=dev, dtype=torch.float32) / 64)
    cases = [
        ("rms_norm [4096, 7168]", 4 * x.numel(),
         lambda: rms_norm(x, w, 1e-6), lambda: torch_ref.rms_norm(x, w, 1e-6)),
        ("silu_mul [32768, 4096]", 3 * gu.numel(),
         lambda: silu_mul(gu), lambda: torch_ref.silu_mul(gu)),
        ("rope_interleaved [4096, 128, 64] strided", 4 * q.numel(),
         lambda: rope_interleaved(q, pos, inv_freq, 1.0),
         lambda: torch_ref.rope_interleaved(q, pos, inv_freq, 1.0)),
    ]
    for name, nbytes, ours, ref in cases:
        a, b = ours(), ref()
        same = f"{(a != b).float().mean().item():.2e} of outputs differ from torch"
        for label, fn in (("triton", ours), ("torch", ref)):
            ms = do_bench(fn)
            print(f"{name:42s} {label:6s} {ms * 1e3:8.1f} us {nbytes / ms / 1e6:6.0f} GB/s")
        print(f"{'':42s} {same}")


if __name__ == "__main__":
    _bench()
