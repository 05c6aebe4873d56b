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

Why: the torch reference is ~6 kernels (compares, radix sort, arange, searchsorted), ~20 us per MoE
layer in decode, almost all launch latency; a single program of a stable counting sort does it in
one launch, and for decode sizes its arithmetic is smaller than those launches.

Algorithm (one program, grid (1,); deterministic):
  1. Histogram: for each chunk of CHUNK pairs, a one-hot [CHUNK, E_P2] of the keys (padding rows
     match no lane) summed over the rows; counts accumulate over the chunks. offs = exclusive
     cumsum of counts, stored for lanes 0..E (lane E = not ours, so offs[E] = valid pairs).
  2. Scatter: the chunks again, in order. The inclusive cumsum of the one-hot along the rows is
     each pair's rank among the same-key pairs of its chunk, so
         position = offs[key] + (pairs of that key in earlier chunks) + rank - 1
     is its place in the stable order; pairs[position] = pair. The positions are a permutation of
     0..P-1, so every element of the torch.empty output is written.
  Work is P * E_P2 lane-ops per pass (the one-hot), done by one SM: that is why the kernel is for
  small P * E only (see small_enough).

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

# Elements of one [CHUNK, E_P2] one-hot tile: 8K int32 over 8 warps is 32 registers per thread per
# live tile (the one-hot, its cumsum and the positions are live together), which stays clear of
# spills; bigger tiles do not make the serial chunk loop shorter per unit of work.
_TILE = 8192
_MIN_CHUNK = 16
_NUM_WARPS = 8

# Where the single program stops paying off: both passes do P * E_P2 lane-ops on one SM. At
# 2^20 lane-ops per pass (e.g. P = 4096 pairs with E <= 255, or P = 8192 with E <= 127) that is
# ~128 chunk steps of 8K elements each pass, a few tens of us, about what the 6 torch kernels
# cost; past that the torch radix sort (many SMs) wins. P and E are also capped outright so that
# the packed int32 arithmetic and the tile never grow with inputs we did not reason about.
_MAX_PAIRS = 8192
_MAX_EXPERTS = 1023          # E + 1 buckets <= 1024 lanes
_MAX_WORK = 1 << 20          # P * E_P2 per pass


def _lanes(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts + 1))


def small_enough(num_pairs: int, num_experts: int) -> bool:
    """Whether sort_pairs is the one to use for P pairs over E experts (see the limits above)."""
    if num_pairs < 0 or num_experts < 1:
        return False
    return (num_pairs <= _MAX_PAIRS and num_experts <= _MAX_EXPERTS
            and num_pairs * _lanes(num_experts) <= _MAX_WORK)


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


def sort_pairs(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Pairs sorted by expert (not-ours last) and each expert's first sorted position, in one
    launch; bitwise equal to triton_moe._sort_pairs. Meant for small_enough(P, E) sizes."""
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
    # a small batch gets a chunk no longer than itself (less padding work, one chunk)
    chunk = min(max(_MIN_CHUNK, _TILE // e_p2), max(_MIN_CHUNK, triton.next_power_of_2(P)))
    _sort_pairs_kernel[(1,)](
        topk_ids, pairs, offs, P, E, topk_ids.stride(0), topk_ids.stride(1),
        K=K, CHUNK=chunk, NUM_CHUNKS=triton.cdiv(P, chunk), E_P2=e_p2, num_warps=_NUM_WARPS)
    return pairs, offs
