"""Fused MoE experts (SwiGLU) in Triton: routed rows are gathered inside the GEMMs, no copies of x.

Dims: N rows (tokens as the experts see them), D hidden, K experts per row (top-k), E experts on
this rank, I expert ffn width, P = N*K (row, k) pairs, BM rows per block of the schedule.

Contract (same as the torch reference in runtime/kernels/__init__.py):
  moe_experts(x_ND, topk_ids_NK, topk_w_NK, w13_E2ID, w2_EDI, w13_bias_E2I=None, w2_bias_ED=None,
              activation="silu", limit=0.0) -> y_ND
      y[n] = sum_k [0 <= ids[n,k] < E] * w[n,k] * (w2[e] @ act(g, u) + b2[e]),
      g = w13[e,:I] @ x[n] + b13[e,:I], u = w13[e,I:] @ x[n] + b13[e,I:] (biases optional),
      act = silu(g) * u, or (u + 1) * g * sigmoid(1.702 g) ("gpt_oss"); limit > 0 clamps g <= limit
      and u to [-limit, limit] first (ops/kernels.py).
  ids int32/int64, -1 = expert not on this rank (contributes nothing); GEMMs accumulate in fp32;
  the result has x's dtype. No host sync, every allocation's shape comes from input shapes, so the
  whole call can be captured in a CUDA graph and replayed with new routing in the same buffers.

Algorithm:
  1. Routing prep (torch, static shapes): key = expert id, or E for pairs that are not ours; a stable
     sort by key gives the pairs grouped by expert (`pairs_P`, pair = n*K + k) and a searchsorted of
     0..E gives each expert's first sorted position (`offs_E+1`; offs[E] = number of valid pairs).
  2. Block schedule (in-kernel, from offs only): expert e owns cdiv(count_e, BM) consecutive blocks,
     so each M-block has a single expert. Statically there are at most cdiv(P, BM) + E blocks; the
     grid is sized by that bound and programs past the real schedule return at once.
  3. Kernel 1 (gate/up): per M-block x BN columns of I, rows of x are loaded through pairs_P
     (row = pair // K), multiplied by the gate and the up rows of w13[e] in two fp32 accumulators;
     the epilogue adds the expert's biases, applies the activation in fp32 and writes h_PI in
     sorted order.
  4. Kernel 2 (down): h @ w2[e]^T (+ the expert's bias) per M-block x BN columns of D, scaled by
     the pair's routing weight, written to y_PD in pair order (row n*K + k).
  5. Kernel 3 (sum over K): y[n] = sum_k y_PD[n*K+k] over valid k, in fp32, in the fixed order
     k = 0..K-1, so the result is deterministic.

Why 4+5 rather than fp32 atomics into a zeroed [N, D] buffer: it is deterministic and costs about the
same memory traffic (atomics need a memset of N*D fp32, the read-modify-writes and a cast pass; here
y_PD is written and read once, valid pairs only, in x's dtype). Per pair it is ~2*D bytes against
~6*D*I FLOPs, a few percent of the GEMM time. The price is memory: y_PD holds P*D elements (1.9 GB
bf16 for N = 16384, K = 8, D = 7168), as in vLLM's fused MoE; the per-pair terms are rounded to x's
dtype before the fp32 sum, as torch._grouped_mm's bf16 output is in the grouped_mm backend.

D, I and K are compile-time constants (model constants: a recompile per model, not per batch): the
GEMM loops get static trip counts, the even-K test folds away, and Triton 3.6's interpreter (CPU
tests) can run them under NumPy >= 2.4, which it cannot for a runtime loop bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.kernels import triton_sort

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATIONS = {"silu": 0, "gpt_oss": 1}  # -> the ACT constexpr of the gate/up kernel


# Step 1: configs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmTile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    block_m: int          # rows per schedule block, shared by both GEMMs (the schedule is one)
    gate_up: GemmTile     # block_n counts columns of I per accumulator (gate and up: 2x that)
    down: GemmTile
    group_m: int = 8      # M-blocks that sweep the N tiles together, so their x rows stay in L2
    block_d: int = 1024   # columns per program of the sum over K


def _interpreting() -> bool:
    return flag("TRITON_INTERPRET")


def default_config(num_pairs: int, num_experts: int, elem_bytes: int = 2) -> MoeConfig:
    """Tiles for Hopper (H200: 228 KB smem per SM, wgmma needs 64-row multiples per warpgroup).

    Large batches (>= ~512 pairs per expert on average) are compute-bound: 128-row blocks with 8
    warps (two warpgroups of 64 rows), a 128-wide output tile (gate 64 + up 64 for kernel 1) and
    BK = 64 (one 128-byte swizzle line of bf16); 4 stages of 32 KB each leave room for the epilogue.
    Decode batches (tens of pairs per expert) are bound by reading the weights once: 64-row blocks
    waste less padding, 4 warps, 64-wide tiles give enough CTAs (I/64 = 32 or D/64 = 112 per block)
    to keep all 132 SMs streaming, and 5 stages keep more loads in flight.
    fp32 (tests, fp32 models on the GPU) has twice the bytes per tile: half the stages.
    """
    if _interpreting():  # numpy executes each program: few, small programs; dims stay >= 16 for tl.dot
        return MoeConfig(16, GemmTile(32, 32, 4, 1), GemmTile(32, 32, 4, 1), group_m=4, block_d=64)
    big = num_pairs // max(num_experts, 1) >= 1024
    if elem_bytes > 2:
        return MoeConfig(128 if big else 64, GemmTile(32, 32, 8 if big else 4, 2), GemmTile(64, 32, 4, 3))
    # measured on H200 (bench/results/kernels_h200.log): the widest tiles won at N = 1024 and 8192
    # rows (0.81 / 5.21 ms against 0.96 / 5.75 ms for 64/128-wide tiles)
    if big:
        return MoeConfig(128, GemmTile(128, 64, 8, 3), GemmTile(256, 64, 8, 3))
    return MoeConfig(64, GemmTile(128, 64, 4, 4), GemmTile(128, 64, 4, 4))


def supported(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor,
              w13_bias: Tensor | None = None, w2_bias: Tensor | None = None, activation: str = "silu",
              limit: float = 0.0) -> bool:
    """Whether moe_experts can run these inputs (CUDA, or CPU under Triton's interpreter)."""
    if not all(isinstance(t, Tensor) for t in (x, topk_ids, topk_w, w13, w2)):
        return False
    if activation not in _ACTIVATIONS or not isinstance(limit, (int, float)):
        return False
    for b, want in ((w13_bias, w13.shape[:2]), (w2_bias, w2.shape[:2])):
        if b is not None and (not isinstance(b, Tensor) or b.dtype not in _DTYPES or tuple(b.shape) != tuple(want)
                              or b.device != x.device):
            return False
    on_gpu = all(t.is_cuda for t in (x, topk_ids, topk_w, w13, w2))
    on_cpu = _interpreting() and all(t.device.type == "cpu" for t in (x, topk_ids, topk_w, w13, w2))
    if not (on_gpu or on_cpu):
        return False
    if x.dtype not in _DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return False
    if on_cpu and x.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong (Triton 3.6)
        return False
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_w.is_floating_point():
        return False
    if x.dim() != 2 or topk_ids.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        return False
    N, D = x.shape
    E, I2, D1 = w13.shape
    return (tuple(topk_ids.shape) == tuple(topk_w.shape) and topk_ids.shape[0] == N and D1 == D
            and I2 % 2 == 0 and tuple(w2.shape) == (E, D, I2 // 2) and E > 0)


# Step 2: routing prep (torch, static shapes) -------------------------------------------------------

def _sort_pairs(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Pairs sorted by expert (invalid ones last) and each expert's first sorted position.
    On CUDA, up to 8192 pairs take triton_sort's one-launch rank sort, which returns the same
    tensors bit for bit (tests/test_triton_sort.py); in the torch form below this is ~6 kernels
    (radix sort, searchsorted, ...), 32 us a layer as a graph replay on an H200 against 2-18 us
    (bench/results/sort_h200)."""
    if topk_ids.is_cuda and topk_ids.dim() == 2 and triton_sort.small_enough(topk_ids.numel(), num_experts):
        return triton_sort.sort_pairs(topk_ids, num_experts)
    return sort_pairs_torch(topk_ids, num_experts)


def sort_pairs_torch(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """_sort_pairs in torch ops: a stable sort of the keys and a searchsorted of 0..E."""
    flat = topk_ids.reshape(-1)
    ours = (flat >= 0) & (flat < num_experts)
    key = torch.where(ours, flat, num_experts).to(torch.int32)
    sorted_key, pairs = torch.sort(key, stable=True)  # stable: rows ascending within an expert
    bounds = torch.arange(num_experts + 1, dtype=torch.int32, device=flat.device)
    offs = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return pairs, offs


# Step 3: kernels ---------------------------------------------------------------------------------

@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M M-blocks share each weight tile while it is in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    return pid_m, pid_n


@triton.jit
def _block_of(offs_ptr, pid_m, E, BLOCK_M: tl.constexpr, E_P2: tl.constexpr):
    """Expert of schedule block pid_m and its sorted row range; expert E (>= E) means no work."""
    ex = tl.arange(0, E_P2)
    lo = tl.load(offs_ptr + ex, mask=ex < E, other=0)
    hi = tl.load(offs_ptr + ex + 1, mask=ex < E, other=0)
    nblk = (hi - lo + BLOCK_M - 1) // BLOCK_M
    # experts whose blocks all come before pid_m; padded lanes count only past the last block
    e = tl.sum((tl.cumsum(nblk, 0) <= pid_m).to(tl.int32), 0)
    first_blk = tl.sum(tl.where(ex < e, nblk, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    start = tl.load(offs_ptr + e_safe) + (pid_m - first_blk) * BLOCK_M
    end = tl.load(offs_ptr + e_safe + 1)
    return e, start, end


@triton.jit
def _block_rows(pairs_ptr, offs_ptr, pid_m, E, BLOCK_M: tl.constexpr, E_P2: tl.constexpr):
    """Expert of block pid_m, its rows' positions in sorted order, which are real, and their pairs.
    Rows past the block's end read pair 0 (it exists: the block has work) and are never stored;
    a block with no expert (e >= E) has every row masked."""
    e, start, end = _block_of(offs_ptr, pid_m, E, BLOCK_M, E_P2)
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    pair = tl.load(pairs_ptr + pos, mask=m_mask, other=0)
    return e, pos, m_mask, pair


@triton.jit
def _glu(acc_g, acc_u, limit, ACT: tl.constexpr, CLAMP: tl.constexpr):
    """The GLU activation of the gate/up epilogue, in fp32 (shared with triton_moe_tma)."""
    if CLAMP:
        acc_g = tl.minimum(acc_g, limit)
        acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    if ACT == 1:  # GPT-OSS: (u + 1) * g * sigmoid(1.702 g)
        h = (acc_u + 1.0) * (acc_g * tl.sigmoid(1.702 * acc_g))
    else:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    return h


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, b_ptr, h_ptr, pairs_ptr, offs_ptr,
                    E, num_blocks, limit, s_xn, s_xd, s_we, s_wi, s_wd, s_be,
                    D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    e, pos, m_mask, pair = _block_rows(pairs_ptr, offs_ptr, pid_m, E, BLOCK_M, E_P2)
    if e >= E:
        return
    row = (pair // K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ld = offs_n % I  # columns past I wrap onto real rows: unmasked weight loads, dropped at the store
    a_ptrs = x_ptr + row[:, None] * s_xn + offs_k[None, :] * s_xd
    g_ptrs = w_ptr + e.to(tl.int64) * s_we + n_ld[None, :] * s_wi + offs_k[:, None] * s_wd
    u_ptrs = g_ptrs + I * s_wi
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(D, BLOCK_K)):
        if D % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            k_ok = offs_k < D - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K * s_xd
        g_ptrs += BLOCK_K * s_wd
        u_ptrs += BLOCK_K * s_wd
    if HAS_BIAS:
        b_row = b_ptr + e.to(tl.int64) * s_be
        acc_g += tl.load(b_row + n_ld).to(tl.float32)[None, :]
        acc_u += tl.load(b_row + I + n_ld).to(tl.float32)[None, :]
    h = _glu(acc_g, acc_u, limit, ACT, CLAMP)
    h_ptrs = h_ptr + pos.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < I)[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, b_ptr, tw_ptr, y_ptr, pairs_ptr, offs_ptr,
                 E, num_blocks, s_we, s_wd, s_wi, s_be, s_tn, s_tk,
                 D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, pos, m_mask, pair = _block_rows(pairs_ptr, offs_ptr, pid_m, E, BLOCK_M, E_P2)
    if e >= E:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + tl.where(m_mask, pos, 0).to(tl.int64)[:, None] * I + offs_k[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * s_we + (offs_n % D)[None, :] * s_wd + offs_k[:, None] * s_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BLOCK_K)):
        if I % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < I - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * s_wi
    if HAS_BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * s_be + offs_n % D).to(tl.float32)[None, :]
    w = tl.load(tw_ptr + (pair // K) * s_tn + (pair % K) * s_tk, mask=m_mask, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < D)[None, :])


@triton.jit
def _sum_pairs_kernel(y_ptr, ids_ptr, out_ptr, E, s_in, s_ik, s_on,
                      D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, K):
        pair = n.to(tl.int64) * K + k
        e = tl.load(ids_ptr + n.to(tl.int64) * s_in + k * s_ik)
        ours = (e >= 0) & (e < E)  # pairs not ours were never written: never read them
        v = tl.load(y_ptr + pair * D + offs_d, mask=d_ok & ours, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * s_on + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def dims(x: Tensor, topk_ids: Tensor, w13: Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, D, K, E, I, P) of a moe_experts call (the module docstring's names)."""
    N, D = x.shape
    K = topk_ids.shape[1]
    return N, D, K, w13.shape[0], w13.shape[1] // 2, N * K


# Step 4: the op ----------------------------------------------------------------------------------

def moe_experts(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor,
                w13_bias: Tensor | None = None, w2_bias: Tensor | None = None, activation: str = "silu",
                limit: float = 0.0, *, config: MoeConfig | None = None) -> Tensor:
    """GLU experts over routed rows; see the module docstring. No host sync."""
    N, D, K, E, I, P = dims(x, topk_ids, w13)
    if P == 0:
        return x.new_zeros(N, D)
    cfg = config or default_config(P, E, x.element_size())
    BM = cfg.block_m
    pairs, offs = _sort_pairs(topk_ids, E)
    num_blocks = triton.cdiv(P, BM) + E  # each expert pads at most BM-1 rows: one block each
    prec = "ieee" if x.dtype == torch.float32 else None  # fp32 stays fp32 (no TF32) on the GPU
    common = dict(BLOCK_M=BM, GROUP_M=cfg.group_m, E_P2=max(2, triton.next_power_of_2(E)), PREC=prec)

    h = x.new_empty(P, I)
    gu = cfg.gate_up
    b13 = None if w13_bias is None else w13_bias.contiguous()
    b2 = None if w2_bias is None else w2_bias.contiguous()
    _gate_up_kernel[(num_blocks * triton.cdiv(I, gu.block_n),)](
        x, w13, w13 if b13 is None else b13, h, pairs, offs, E, num_blocks, float(limit),
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), 0 if b13 is None else b13.stride(0),
        D=D, I=I, K=K, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, HAS_BIAS=b13 is not None,
        ACT=_ACTIVATIONS[activation], CLAMP=limit > 0,
        num_warps=gu.num_warps, num_stages=gu.num_stages, **common)

    y_pairs = x.new_empty(P, D)
    dn = cfg.down
    _down_kernel[(num_blocks * triton.cdiv(D, dn.block_n),)](
        h, w2, w2 if b2 is None else b2, topk_w, y_pairs, pairs, offs, E, num_blocks,
        w2.stride(0), w2.stride(1), w2.stride(2), 0 if b2 is None else b2.stride(0),
        topk_w.stride(0), topk_w.stride(1),
        D=D, I=I, K=K, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, HAS_BIAS=b2 is not None,
        num_warps=dn.num_warps, num_stages=dn.num_stages, **common)
    return sum_over_k(y_pairs, topk_ids, E, cfg.block_d)


def sum_over_k(y_pairs: Tensor, topk_ids: Tensor, num_experts: int, block_d: int) -> Tensor:
    """Step 5: out[n] = sum over valid k of y_pairs[n*K + k], fp32, in the order k = 0..K-1."""
    N, K = topk_ids.shape
    D = y_pairs.shape[1]
    out = y_pairs.new_empty(N, D)
    _sum_pairs_kernel[(N, triton.cdiv(D, block_d))](
        y_pairs, topk_ids, out, num_experts, topk_ids.stride(0), topk_ids.stride(1), out.stride(0),
        D=D, K=K, BLOCK_D=block_d, num_warps=4)
    return out


# Step 4b: the same op over torch._grouped_mm (CUTLASS grouped GEMM), for the shapes where it wins -----

@triton.jit
def _combine_sorted_kernel(y_ptr, inv_ptr, ids_ptr, tw_ptr, b_ptr, out_ptr, E, s_in, s_ik, s_tn, s_tk, s_be,
                           s_on, D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
    """out[n] = sum_k [pair ours] * w[n,k] * (y_sorted[inv[n*K+k]] + b2[e]), in fp32, k = 0..K-1."""
    n = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, K):
        e = tl.load(ids_ptr + n.to(tl.int64) * s_in + k * s_ik)
        ours = (e >= 0) & (e < E)
        pos = tl.load(inv_ptr + n.to(tl.int64) * K + k).to(tl.int64)
        v = tl.load(y_ptr + pos * D + offs_d, mask=d_ok & ours, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(b_ptr + tl.where(ours, e, 0).to(tl.int64) * s_be + offs_d, mask=d_ok & ours,
                         other=0.0).to(tl.float32)
        w = tl.load(tw_ptr + n.to(tl.int64) * s_tn + k * s_tk).to(tl.float32)
        acc += tl.where(ours, w, 0.0) * v
    tl.store(out_ptr + n.to(tl.int64) * s_on + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def grouped_mm_supported(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor, *rest) -> bool:
    """moe_experts_grouped takes these: what `supported` takes, on CUDA, bf16 (CUTLASS grouped GEMM)."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and supported(x, topk_ids, topk_w, w13, w2, *rest))


def moe_experts_grouped(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor,
                        w13_bias: Tensor | None = None, w2_bias: Tensor | None = None, activation: str = "silu",
                        limit: float = 0.0) -> Tensor:
    """moe_experts as: the pairs sorted by expert (step 2), x's rows gathered in that order, two
    torch._grouped_mm (gate/up, down) over the experts' offsets with the activation between, and
    one deterministic pass that sums each row's K results weighted by its routing weights (the
    down bias added there). Rows past the valid pairs are never written by the grouped GEMMs and
    never read. No host sync."""
    N, D, K, E, I, P = dims(x, topk_ids, w13)
    if P == 0:
        return x.new_zeros(N, D)
    pairs, offs = _sort_pairs(topk_ids, E)
    ends = offs[1:]
    h = torch._grouped_mm(x[pairs // K], w13.transpose(-2, -1), offs=ends)
    if w13_bias is not None:  # each sorted row's expert: the pairs past offs[E] take expert E-1 (never read)
        expert_of = torch.searchsorted(ends, torch.arange(P, device=x.device, dtype=torch.int32), right=True)
        h = h + w13_bias[expert_of.clamp(max=E - 1)]
    if activation == "silu" and limit <= 0:
        from tbo_compiler.runtime.kernels.triton_elementwise import silu_mul
        act = silu_mul(h)
    else:
        from tbo_compiler.runtime.kernels.torch_ref import glu_activation
        gate, up = h.chunk(2, dim=-1)
        act = glu_activation(gate, up, activation, limit).contiguous()
    y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=ends)
    inv = torch.empty_like(pairs).scatter_(0, pairs, torch.arange(P, device=x.device, dtype=pairs.dtype))
    out = x.new_empty(N, D)
    b2 = None if w2_bias is None else w2_bias.contiguous()
    block_d = 1024
    _combine_sorted_kernel[(N, triton.cdiv(D, block_d))](
        y, inv, topk_ids, topk_w, y if b2 is None else b2, out, E, topk_ids.stride(0), topk_ids.stride(1),
        topk_w.stride(0), topk_w.stride(1), 0 if b2 is None else b2.stride(0), out.stride(0),
        D=D, K=K, BLOCK_D=block_d, HAS_BIAS=b2 is not None, num_warps=4)
    return out


# Step 5: GPU micro-benchmark (python -m tbo_compiler.runtime.kernels.triton_moe, on an H200) ------

def _grouped_mm_baseline(x, topk_ids, topk_w, w13, w2):
    """Sort + gather + torch._grouped_mm + index_add, as the grouped_mm backend does it."""
    N, K = topk_ids.shape
    E = w13.shape[0]
    pairs, offs = _sort_pairs(topk_ids, E)  # searchsorted, not bincount: no sync in either timing
    rows = pairs // K
    hh = torch._grouped_mm(x[rows], w13.transpose(-2, -1), offs=offs[1:])
    gate, up = hh.chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).contiguous()
    y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs[1:])
    keep = (torch.arange(rows.numel(), device=x.device) < offs[E]).unsqueeze(-1)
    y = torch.where(keep, y.float() * topk_w.reshape(-1)[pairs].unsqueeze(-1), 0.0)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, rows, y).to(x.dtype)


_SWEEP = [MoeConfig(64, GemmTile(64, 64, 4, 5), GemmTile(64, 64, 4, 5)),
          MoeConfig(64, GemmTile(128, 64, 4, 4), GemmTile(128, 64, 4, 4)),
          MoeConfig(128, GemmTile(64, 64, 8, 4), GemmTile(128, 64, 8, 4)),
          MoeConfig(128, GemmTile(128, 64, 8, 3), GemmTile(256, 64, 8, 3))]


def _bench(tokens: int, D=7168, I=2048, E=8, K=8) -> None:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    N = 2 * tokens
    x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    ids = torch.randint(0, E, (N, K), device="cuda", generator=g, dtype=torch.int32)
    ids = torch.where(torch.rand(N, K, device="cuda", generator=g) < 0.5, -1, ids)  # half not ours
    w = torch.rand(N, K, device="cuda", generator=g)
    w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda", generator=g) * 0.02).bfloat16()
    flop = 2 * int((ids >= 0).sum()) * D * 3 * I
    runs = {"triton default": lambda: moe_experts(x, ids, w, w13, w2)}
    for c in _SWEEP:
        name = f"triton BM={c.block_m} gu={tuple(vars(c.gate_up).values())} dn={tuple(vars(c.down).values())}"
        runs[name] = lambda c=c: moe_experts(x, ids, w, w13, w2, config=c)
    ref = None
    if hasattr(torch, "_grouped_mm"):
        runs["torch._grouped_mm"] = lambda: _grouped_mm_baseline(x, ids, w, w13, w2)
        ref = _grouped_mm_baseline(x, ids, w, w13, w2).float()
    for name, fn in runs.items():
        try:
            out = fn().float()
            rel = None if ref is None else float((out - ref).norm() / ref.norm())
            err = "" if rel is None else f" rel err vs grouped_mm {rel:.1e}"
            ms = do_bench(fn, warmup=25, rep=100)
            print(f"T={tokens:5d} N={N:5d} {name:60s} {ms:8.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s{err}")
        except Exception as exc:  # a config that does not fit (smem, registers) must not hide the rest
            print(f"T={tokens:5d} {name}: failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    for _t in (64, 512, 4096):
        _bench(_t)
