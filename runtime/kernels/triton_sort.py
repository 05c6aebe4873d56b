"""MoE routing prep in one Triton launch: (row, k) pairs grouped by expert, for small batches.

Dims: N rows, K experts per row (top-k), P = N*K pairs (pair = n*K + k), E experts on this rank,
E_P2 = next_power_of_2(E + 1) histogram lanes, CHUNK pairs per loop step of the kernel.

Contract (bitwise the same as triton_moe._sort_pairs, the torch reference):
  sort_pairs(topk_ids_NK, num_experts) -> (pairs_P int64, offs_E+1 int32)
      key(pair) = ids[pair] if 0 <= ids[pair] < E else E  (-1 and ids >= E: not ours, sorted last)
      pairs = the pair indices stably sorted by key (ascending pair index inside each key);
      offs[e] = first sorted position of expert e, offs[E] = number of valid pairs.
  ids int32/int64, any strides (read in place through them: no copy kernel). No host sync, the
  outputs are torch.empty of shapes from the input's shape, so the call can be captured in a CUDA
  graph. P == 0 launches nothing (empty pairs, offs of zeros).
  small_enough(P, E) says when to use it; above that the torch sort is the better tool.

Why: the torch reference is ~6 kernels (compares, radix sort, arange, searchsorted), ~32 us per MoE
layer on an H200 even as a CUDA graph replay (measured, P = 256..4096), almost all launch latency.

Two single-program kernels, both deterministic; sort_pairs picks by size:
  A. Bitonic (P <= 1024): all P_P2 = next_power_of_2(P) pairs in one tile. packed = key * P_P2 +
     pair (distinct values, so any sort of them is the stable order; < 2^31 for P <= 8192, E <= 1023),
     tl.sort, pairs = packed % P_P2. offs = exclusive cumsum of tl.histogram(key, E_P2) over lanes
     0..E (lane E = not ours, so offs[E] = valid pairs). Cost hardly depends on E.
  B. Counting sort (larger P): chunks of CHUNK pairs, twice.
     1. Histogram: a one-hot [CHUNK, E_P2] of the keys (padding rows match no lane) summed over the
        rows; counts accumulate over the chunks; offs = exclusive cumsum, as in A.
     2. Scatter, chunks again in order: the inclusive cumsum of the one-hot along the rows is each
        pair's rank among the same-key pairs of its chunk, so
            position = offs[key] + (pairs of that key in earlier chunks) + rank - 1
        is its place in the stable order; pairs[position] = pair. The positions are a permutation
        of 0..P-1, so every element of the torch.empty output is written.
     Work is P * E_P2 lane-ops per pass on one SM, so it only pays for very few experts.
  Measured on an H200 (CUDA graph replays, random ids, K = 8), against the torch reference's ~32 us
  (P <= 4096) and ~58 us (P = 8192):
     A: P = 256: 2.2-2.9 us, P = 1024: 6.5-8.0 us (num_warps 8) for E = 8..256; P = 4096: ~75 us
        (the 4096-wide sort no longer fits registers), so A stops at 1024.
     B: E = 8 (E_P2 = 16, 16K-element tiles, 8 warps): P = 4096: 29.5 us, P = 8192: 58 us (a tie);
        E = 32: P = 1024 already 17-40 us, E >= 128: 60-100 us at P = 1024. So B is used for
        E_P2 <= 16 and P <= 4096 only.
  small_enough(P, E) = P <= 1024 (any E <= 1023), or P <= 4096 with E <= 15. Outside it sort_pairs
  is still correct (B), just slower than torch.

Loop bounds are compile-time constants (NUM_CHUNKS = cdiv(P, CHUNK)): Triton 3.6's interpreter (CPU
tests) cannot run a runtime loop bound under NumPy >= 2.4. P itself is a runtime argument (it only
masks the last chunk), so a recompile happens when the chunk count changes, not for every P; in
decode with CUDA graphs that is once per captured batch size at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Kernel B's tile: [CHUNK, E_P2] elements per chunk step; 16K over 8 warps was the fastest measured
# for E_P2 = 16 (the only E it is chosen for), 8 warps keep the three live tiles in registers.
_TILE = 16384
_MIN_CHUNK = 16
_NUM_WARPS = 8

_BITONIC_MAX_PAIRS = 1024    # kernel A: 6.5-8 us at 1024, ~75 us at 4096 (see the docstring)
_COUNTING_MAX_PAIRS = 4096   # kernel B for few experts: 29.5 us at 4096 vs ~35 us for torch
_COUNTING_MAX_LANES = 16     # E <= 15
_MAX_EXPERTS = 1023          # E + 1 buckets <= 1024 lanes; keeps kernel A's packed key < 2^31


def _lanes(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts + 1))


def small_enough(num_pairs: int, num_experts: int) -> bool:
    """Whether sort_pairs is the one to use for P pairs over E experts (see the limits above)."""
    if num_pairs < 0 or not 1 <= num_experts <= _MAX_EXPERTS:
        return False
    return num_pairs <= _BITONIC_MAX_PAIRS or (
        num_pairs <= _COUNTING_MAX_PAIRS and _lanes(num_experts) <= _COUNTING_MAX_LANES)


@triton.jit
def _chunk_keys(ids_ptr, c, P, E, s_n, s_k, K: tl.constexpr, CHUNK: tl.constexpr):
    """Pair indices of chunk c and their keys: expert id, E if not ours, -1 past P (no lane)."""
    pair = c * CHUNK + tl.arange(0, CHUNK)
    real = pair < P
    n = (pair // K).to(tl.int64)  # int64 addresses: a strided view may sit far into its storage
    k = (pair % K).to(tl.int64)
    v = tl.load(ids_ptr + n * s_n + k * s_k, mask=real, other=-1)
    ours = (v >= 0) & (v < E)  # compared in the ids' own dtype: int64 ids never wrap into [0, E)
    key = tl.where(ours, v, E).to(tl.int32)
    key = tl.where(real, key, -1)
    return pair, real, key


@triton.jit
def _sort_pairs_kernel(ids_ptr, pairs_ptr, offs_ptr, P, E, s_n, s_k,
                       K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                       E_P2: tl.constexpr):
    """Kernel B (module docstring): stable counting sort over chunks of CHUNK pairs."""
    lanes = tl.arange(0, E_P2)

    # pass 1: per-bucket counts -> each bucket's first sorted position
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for c in range(NUM_CHUNKS):
        pair, real, key = _chunk_keys(ids_ptr, c, P, E, s_n, s_k, K, CHUNK)
        onehot = (key[:, None] == lanes[None, :]).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    start = tl.cumsum(counts, 0) - counts
    tl.store(offs_ptr + lanes, start, mask=lanes <= E)

    # pass 2: stable scatter; `running` = next free position of each bucket after earlier chunks
    running = start
    for c in range(NUM_CHUNKS):
        pair, real, key = _chunk_keys(ids_ptr, c, P, E, s_n, s_k, K, CHUNK)
        onehot = (key[:, None] == lanes[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0)  # inclusive: 1 for a bucket's first pair in this chunk
        pos = tl.sum(tl.where(onehot != 0, running[None, :] + rank - 1, 0), axis=1)
        tl.store(pairs_ptr + pos, pair.to(tl.int64), mask=real)
        running += tl.sum(onehot, axis=0)


@triton.jit
def _sort_pairs_bitonic_kernel(ids_ptr, pairs_ptr, offs_ptr, P, E, s_n, s_k,
                               K: tl.constexpr, P_P2: tl.constexpr, E_P2: tl.constexpr):
    """Kernel A (module docstring): one tile, a sort of packed (key, pair), a histogram."""
    pair = tl.arange(0, P_P2)
    real = pair < P
    n = (pair // K).to(tl.int64)
    k = (pair % K).to(tl.int64)
    v = tl.load(ids_ptr + n * s_n + k * s_k, mask=real, other=-1)
    ours = (v >= 0) & (v < E)
    key = tl.where(ours, v, E).to(tl.int32)
    # distinct values, so the unstable tl.sort gives the stable order; padding sorts last (key E+1)
    packed = tl.where(real, key, E + 1) * P_P2 + pair
    s = tl.sort(packed)
    tl.store(pairs_ptr + pair, (s % P_P2).to(tl.int64), mask=real)
    counts = tl.histogram(key, E_P2, mask=real)  # padding masked: E + 1 may equal E_P2
    lanes = tl.arange(0, E_P2)
    tl.store(offs_ptr + lanes, tl.cumsum(counts, 0) - counts, mask=lanes <= E)


def sort_pairs(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Pairs sorted by expert (not-ours last) and each expert's first sorted position, in one
    launch; bitwise equal to triton_moe._sort_pairs. Fast for small_enough(P, E) sizes, correct
    for any (P <= 2^31 / (E + 2) for kernel A's packing, which its 1024-pair limit keeps)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [N, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    N, K = topk_ids.shape
    P, E = N * K, int(num_experts)
    dev = topk_ids.device
    pairs = torch.empty(P, dtype=torch.int64, device=dev)
    if P == 0:
        return pairs, torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offs = torch.empty(E + 1, dtype=torch.int32, device=dev)
    e_p2 = _lanes(E)
    args = (topk_ids, pairs, offs, P, E, topk_ids.stride(0), topk_ids.stride(1))
    if P <= _BITONIC_MAX_PAIRS and E <= _MAX_EXPERTS:
        # 8 warps measured faster than 4 at 1024 pairs (6.5 vs 9.9 us), 4 faster below (2.2 vs 2.5)
        _sort_pairs_bitonic_kernel[(1,)](*args, K=K, P_P2=max(2, triton.next_power_of_2(P)), E_P2=e_p2,
                                         num_warps=8 if P >= 1024 else 4)
        return pairs, offs
    # a small batch gets a chunk no longer than itself (less padding work, one chunk)
    chunk = min(max(_MIN_CHUNK, _TILE // e_p2), max(_MIN_CHUNK, triton.next_power_of_2(P)))
    _sort_pairs_kernel[(1,)](*args, K=K, CHUNK=chunk, NUM_CHUNKS=triton.cdiv(P, chunk), E_P2=e_p2,
                             num_warps=_NUM_WARPS)
    return pairs, offs
