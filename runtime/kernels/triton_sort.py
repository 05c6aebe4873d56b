"""MoE routing prep in one Triton launch (two at large P): (row, k) pairs grouped by expert.

Dims: N rows, K experts per row (top-k), P = N*K pairs (pair = n*K + k), E experts on this rank,
E_P2 = next_power_of_2(E + 1) histogram lanes, CHUNK pairs per loop step of the kernel (kernel C:
CHUNK queries per program, BJ pairs per loop step, Q = P + E + 1 queries; kernel D: CHUNK pairs
per program, NC = cdiv(P, CHUNK) chunks, H = next_power_of_2(E) lanes, SUB pairs per loop step).

Contract (bitwise the same as triton_moe._sort_pairs, the torch reference):
  sort_pairs(topk_ids_NK, num_experts) -> (pairs_P int64, offs_E+1 int32)
      key(pair) = ids[pair] if 0 <= ids[pair] < E else E  (-1 and ids >= E: not ours, sorted last)
      pairs = the pair indices stably sorted by key (ascending pair index inside each key);
      offs[e] = first sorted position of expert e, offs[E] = number of valid pairs.
  ids int32/int64, any strides (read in place through them: no copy kernel). No host sync, the
  outputs are torch.empty of shapes from the input's shape, so the call can be captured in a CUDA
  graph. P == 0 launches nothing (empty pairs, offs of zeros).
  small_enough(P, E) says when to use it; above that the torch sort is the better tool.
  sort_pairs(..., kernel="bitonic" | "counting" | "rank" | "chunked") forces one kernel (tests,
  bench).

Why: the torch reference is ~6 kernels (compares, radix sort, arange, searchsorted), ~32 us per MoE
layer on an H200 even as a CUDA graph replay (measured, P = 256..4096), almost all launch latency;
35-60 us at P = 16384..32768 (prefill: GPT-OSS 4096 tokens x top-4, Qwen3 4096 x top-8) and more
at 131072 (Qwen3 16384 x 8, DeepSeek-V3's slice with E = 256).

Four kernels, all deterministic; kernel_for(P, E) picks by size:
  A. Bitonic (one program, P <= 1024): all P_P2 = next_power_of_2(P) pairs in one tile. packed =
     key * P_P2 + pair (distinct values, so any sort of them is the stable order; < 2^31 for
     P <= 8192, E <= 1023), tl.sort, pairs = packed % P_P2. offs = exclusive cumsum of
     tl.histogram(key, E_P2) over lanes 0..E (lane E = not ours, so offs[E] = valid pairs). Cost
     hardly depends on E.
  B. Counting sort (one program, few experts): chunks of CHUNK pairs, twice.
     1. Histogram: a one-hot [CHUNK, E_P2] of the keys (padding rows match no lane) summed over the
        rows; counts accumulate over the chunks; offs = exclusive cumsum, as in A.
     2. Scatter, chunks again in order: the inclusive cumsum of the one-hot along the rows is each
        pair's rank among the same-key pairs of its chunk, so
            position = offs[key] + (pairs of that key in earlier chunks) + rank - 1
        is its place in the stable order; pairs[position] = pair. The positions are a permutation
        of 0..P-1, so every element of the torch.empty output is written.
     Work is P * E_P2 lane-ops per pass on one SM, so it only pays for very few experts.
  C. Rank sort (many programs, any E <= 1023): A and B run on one SM, and neither covers Qwen3
     decode (P = 2048 pairs of 256 tokens x top-8 over E = 128: A's tile no longer fits, B's lanes
     are too many). With packed = key * P + pair (distinct, so the stable order is the order of
     the packed values), the sorted position of pair i is
            pos_i = #{j : packed_j < packed_i}
     and offs[e] = #{j : key_j < e} = #{j : packed_j < e * P} (keys are whole multiples of P apart,
     pair < P), the same count for a "query" e * P. So there are Q = P + E + 1 queries: query t < P
     is pair t (stores pairs[count] = t), query P + e is lane e (stores offs[e] = count). Program c
     takes queries c*CHUNK .. c*CHUNK+CHUNK-1 and loops over all pairs j in NUM_J blocks of BJ,
     adding the [CHUNK, BJ] tile of (packed_j < query) into a [CHUNK, BJ] accumulator (summed over
     j once at the end: no cross-thread reduction in the loop); padding j gets packed (E + 1) * P,
     above every query, so it never counts; padding queries store nothing. Grid = cdiv(Q, CHUNK).
     Every program only reads ids (L2-resident, P * 8 bytes) and writes its own outputs: no
     atomics, no ordering between programs, the result does not depend on scheduling. Work is
     Q * P compares spread over Q / CHUNK programs (69..133 at P = 2048..8192 with CHUNK = 32..64,
     against an H200's 132 SMs), so the time grows like CHUNK * P compares plus P key loads (from
     L2) per program, almost independent of E; the grid is expected to run in one wave up to ~8K
     pairs, past which the P^2 work should lose to the torch radix sort (O(P)). The int32 packing
     holds while (E + 2) * P < 2^31 (P <= 2^20 at E = 1023).
  Measured on an H200 (CUDA graph replays, random ids, K = 8), against the torch reference's ~32 us
  (P <= 4096) and ~58 us (P = 8192):
     A: P = 256: 2.2-2.9 us, P = 1024: 6.5-8.0 us (num_warps 8) for E = 8..256; P = 4096: ~75 us
        (the 4096-wide sort no longer fits registers), so A stops at 1024.
     B: E = 8 (E_P2 = 16, 16K-element tiles, 8 warps): P = 4096: 29.5 us, P = 8192: 58 us (a tie);
        E = 32: P = 1024 already 17-40 us, E >= 128: 60-100 us at P = 1024. So B would be used for
        E_P2 <= 16 and P <= 4096 only, and C is expected to beat it there (all SMs, not one).
     C (bench/results/sort_h200/sort_bench.json, bitwise equal to torch in every case): 2.1-2.2 us
        at P = 256, 2.8-3.0 us at 1024 (CHUNK 16, BJ 128, 4 warps), 4.1-4.3 us at 2048, 7.9-10.2 us
        at 4096, 18.1 us at 8192 (CHUNK 32, BJ 256, 8 warps), for E = 8, 32 and 128 alike: 3.1-15x
        faster than torch, and faster than A (2.2x at 1024) and B everywhere. At 16384 it ties
        with torch (60 vs 58 us), so it stops at 8192. A and B are never chosen now; they stay as
        forced kernels (kernel="bitonic" / "counting") for the bench and the tests.
  D. Chunked counting sort (many programs, any E <= 1023, P past C's range): C's P^2 compares lose
     to torch's O(P) radix sort past 8192 pairs. D is a counting sort split over NC programs:
     program c owns the pairs of chunk c = [c*CHUNK, (c+1)*CHUNK), and the sorted position of its
     pair i (key k) is
            pos_i = offs[k] + before_c[k] + rank_i
     offs[k] = pairs of all chunks with a key below k (exclusive cumsum of the totals), before_c[k]
     = pairs with key k in chunks 0..c-1, rank_i = pairs with key k in chunk c before i. Two
     launches of NC programs each:
     1. Counts: program c stores counts[c, 0..H) = tl.histogram of its chunk's keys (row written
        whole, so the buffer is torch.empty).
     2. Scatter: program c reads all of counts, RB rows a step, into total[e] (all rows) and
        before[e] (rows < c); offs = exclusive cumsum(total), program 0 stores it. Then it walks
        its chunk SUB pairs at a time in pair order with running[e] = offs[e] + before[e]:
        rank = #{j earlier in the step with the same key} (a [SUB, SUB] compare, independent of
        E), position = running[key] (tl.gather) + rank, pairs[position] = pair, then running +=
        the step's histogram. The positions are a permutation of 0..P-1 (every element of the
        torch.empty output is written).
     Not-ours pairs (key E) get no lane: they sort after all n_ours = sum(total) valid pairs, so
     their bucket starts at n_ours + c*CHUNK - sum(before) for chunk c (chunks before c are
     full) and advances by the step's count of them; offs[E] = n_ours. That keeps H =
     next_power_of_2(E) lanes, half of E_P2 for the power-of-two E of the models (8, 32, 128,
     256): the histograms and the counts rows cost in proportion to H.
     Why two launches and not one: in one launch each program would have to histogram all P keys
     itself (no program may wait on another: no spin locks, no ordered atomics), NC * P key loads
     (8 bytes each from L2: 128 MB at P = 131072, NC = 128) and NC * P histogram inputs, whose
     cost grows with the lanes (tl.histogram takes log2(H) warp ballots plus H/32 popcounts per
     32 keys: an estimated ~45 us of issue per SM at P = 131072, H = 256). With the counts in
     between, the keys are read twice in all and each program reads NC * H counts instead
     (NC = 128, H = 256: 128 KB, 16 MB over all programs): O(P + NC^2 * H) work for the price of
     one more launch (estimated 1-2 us in a CUDA graph). tl.histogram's cross-warp sum uses
     shared-memory integer atomics, whose order cannot change a count; nothing else is atomic.
     CHUNK = next_power_of_2(cdiv(P, 128)) clamped to [128, 2048] (_chunked_config): 64..128
     programs for P = 8K..256K (the chunk grows, not the grid, past 256K), one wave on 132 SMs;
     per program NC * H counts plus CHUNK / SUB steps of SUB^2 compares, so the two sides balance
     near NC ~ sqrt(P * SUB / H). SUB = 128 (16K-element compare tiles; a [CHUNK, E_P2] one-hot
     as in B would be 256K elements at CHUNK 1024, E = 128, and B's row cumsum measured slow).
     bench/sort_bench.py times D at several (CHUNK, SUB, warps); on an H200 (2026-12-03) the best
     setting had 4 warps at every size, and D took 5.6-8.9 us at 16384 pairs, 9.3-12.0 us at
     32768 and 21-29 us at 131072 (E = 32..256) against torch's 55-60 us: 2.1-10x.
     int32 throughout: positions and pair indices < P + CHUNK, counts offsets < NC * H, both
     checked < 2^31 by sort_pairs (P = 2^20 at CHUNK 2048, H = 1024 is 2^19).
  small_enough(P, E) = kernel_for(P, E) is not None: P <= _CHUNKED_MAX_PAIRS (1 << 18 until
  measured) for any E <= 1023. Outside it sort_pairs is still correct (B), just slower than torch.

Loop bounds are compile-time constants (NUM_CHUNKS = cdiv(P, CHUNK), NUM_J = cdiv(P, BJ), NUM_RB =
cdiv(NC, RB), CHUNK / SUB): Triton 3.6's interpreter (CPU tests) cannot run a runtime loop bound
under NumPy >= 2.4. P itself is a runtime argument (it only masks the last chunk), so a recompile
happens when the chunk count changes, not for every P; in decode with CUDA graphs that is once per
captured batch size at most. D's grid is a runtime NC and its loop bound NUM_RB changes only every
RB chunks (RB = 8192 / H rows, at most next_power_of_2(NC)), so prefill's varying P compiles it a
few times per CHUNK, not once per batch.
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

# Kernel choice (kernel_for), measured on an H200 (the module docstring): kernel C up to 8192 pairs
# at any E, then kernel D (not yet measured) up to _CHUNKED_MAX_PAIRS; A and B would only be chosen
# below limits lowered to make C and D give way (none now).
_BITONIC_MAX_PAIRS = 0       # kernel A: 6.6-7.3 us at 1024 against C's 2.8-3.0 us
_RANK_MAX_PAIRS = 8192       # kernel C: 18.1 us at 8192 (torch 57 us); a tie with torch at 16384
_COUNTING_MAX_PAIRS = 4096   # kernel B for few experts: 30 us at 4096 (C: 8 us);
_COUNTING_MAX_LANES = 16     # E <= 15. Only reached where C and D are not (P > _CHUNKED_MAX_PAIRS).
_MAX_EXPERTS = 1023          # E + 1 buckets <= 1024 lanes; keeps kernel A's packed key < 2^31

# Kernel C's tiles: (max pairs, CHUNK queries per program, BJ pairs per loop step, num_warps), the
# first row whose max pairs >= P, the last row past them all; the fastest of the four measured
# settings (bench/results/sort_h200): 16x128 w4 up to 1024 pairs, 32x256 w8 above.
_RANK_CONFIGS = (
    (1024, 16, 128, 4),
    (8192, 32, 256, 8),
)

# Kernel D's tiles (_chunked_config): CHUNK = next_power_of_2(cdiv(P, _CHUNKED_PROGRAMS)) clamped to
# [_CHUNKED_MIN_CHUNK, _CHUNKED_MAX_CHUNK], so ~64-128 programs at P = 16K..256K; SUB pairs per step
# of a program's rank loop ([SUB, SUB] compares); _CHUNKED_ROW_TILE counts per step of its read of
# the [num_chunks, H] counts. bench/sort_bench.py sweeps them (D rows; bench/results/sort_h200).
_CHUNKED_MAX_PAIRS = 1 << 18     # kernel D above _RANK_MAX_PAIRS; the H200 run sets the real limit
_CHUNKED_PROGRAMS = 128
_CHUNKED_MIN_CHUNK = 128
_CHUNKED_MAX_CHUNK = 2048
_CHUNKED_SUB = 128
_CHUNKED_WARPS = 4   # measured on an H200 (sort_bench, 2026-12-03): every best D setting had 4 warps
_CHUNKED_ROW_TILE = 8192

KERNELS = ("bitonic", "counting", "rank", "chunked")


def _lanes(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts + 1))


def kernel_for(num_pairs: int, num_experts: int) -> str | None:
    """The kernel sort_pairs uses for P pairs over E experts ("bitonic", "rank", "chunked",
    "counting"), or None where the torch sort is expected to be faster (the limits above; the
    module docstring)."""
    P, E = num_pairs, num_experts
    if P < 0 or not 1 <= E <= _MAX_EXPERTS:
        return None
    if P <= _BITONIC_MAX_PAIRS:
        return "bitonic"
    if P <= _RANK_MAX_PAIRS:
        return "rank"
    if P <= _CHUNKED_MAX_PAIRS:
        return "chunked"
    if P <= _COUNTING_MAX_PAIRS and _lanes(E) <= _COUNTING_MAX_LANES:
        return "counting"
    return None


def small_enough(num_pairs: int, num_experts: int) -> bool:
    """Whether sort_pairs is the one to use for P pairs over E experts (see the limits above)."""
    return kernel_for(num_pairs, num_experts) is not None


def _rank_config(num_pairs: int) -> tuple[int, int, int]:
    """Kernel C's (CHUNK, BJ, num_warps) for P pairs (_RANK_CONFIGS)."""
    for most, chunk, bj, warps in _RANK_CONFIGS:
        if num_pairs <= most:
            break
    return chunk, bj, warps


def _chunked_lanes(num_experts: int) -> int:
    """Kernel D's H histogram lanes: experts 0..E-1 only (not-ours pairs are counted apart)."""
    return max(2, triton.next_power_of_2(num_experts))


def _chunked_chunk(num_pairs: int, programs: int | None = None) -> int:
    """Kernel D's CHUNK for P pairs: about `programs` (default _CHUNKED_PROGRAMS) programs, CHUNK a
    power of two in [_CHUNKED_MIN_CHUNK, _CHUNKED_MAX_CHUNK]."""
    chunk = triton.next_power_of_2(max(1, triton.cdiv(num_pairs, programs or _CHUNKED_PROGRAMS)))
    return min(max(chunk, _CHUNKED_MIN_CHUNK), _CHUNKED_MAX_CHUNK)


def _chunked_config(num_pairs: int) -> tuple[int, int, int]:
    """Kernel D's (CHUNK, SUB, num_warps) for P pairs (the rule above _CHUNKED_PROGRAMS)."""
    chunk = _chunked_chunk(num_pairs)
    return chunk, min(_CHUNKED_SUB, chunk), _CHUNKED_WARPS


@triton.jit
def _keys(ids_ptr, pair, P, E, s_n, s_k, K: tl.constexpr):
    """Whether each `pair` (any shape) is real (< P), and its key: expert id, E if not ours."""
    real = pair < P
    n = (pair // K).to(tl.int64)  # int64 addresses: a strided view may sit far into its storage
    k = (pair % K).to(tl.int64)
    v = tl.load(ids_ptr + n * s_n + k * s_k, mask=real, other=-1)
    ours = (v >= 0) & (v < E)  # compared in the ids' own dtype: int64 ids never wrap into [0, E)
    return real, tl.where(ours, v, E).to(tl.int32)


@triton.jit
def _chunk_keys(ids_ptr, c, P, E, s_n, s_k, K: tl.constexpr, CHUNK: tl.constexpr):
    """Pair indices of chunk c and their keys: expert id, E if not ours, -1 past P (no lane)."""
    pair = c * CHUNK + tl.arange(0, CHUNK)
    real, key = _keys(ids_ptr, pair, P, E, s_n, s_k, K)
    return pair, real, tl.where(real, key, -1)


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
    real, key = _keys(ids_ptr, pair, P, E, s_n, s_k, K)
    # distinct values, so the unstable tl.sort gives the stable order; padding sorts last (key E+1)
    packed = tl.where(real, key, E + 1) * P_P2 + pair
    s = tl.sort(packed)
    tl.store(pairs_ptr + pair, (s % P_P2).to(tl.int64), mask=real)
    counts = tl.histogram(key, E_P2, mask=real)  # padding masked: E + 1 may equal E_P2
    lanes = tl.arange(0, E_P2)
    tl.store(offs_ptr + lanes, tl.cumsum(counts, 0) - counts, mask=lanes <= E)


@triton.jit
def _packed_keys(ids_ptr, pair, P, E, s_n, s_k, K: tl.constexpr):
    """Kernel C's sort values of `pair` (any shape): key * P + pair, (E + 1) * P past P (above every
    query, so padding never counts)."""
    real, key = _keys(ids_ptr, pair, P, E, s_n, s_k, K)
    return tl.where(real, key, E + 1) * P + tl.where(real, pair, 0)


@triton.jit
def _sort_pairs_rank_kernel(ids_ptr, pairs_ptr, offs_ptr, P, E, s_n, s_k,
                            K: tl.constexpr, CHUNK: tl.constexpr, BJ: tl.constexpr,
                            NUM_J: tl.constexpr):
    """Kernel C (module docstring): each program counts, for CHUNK queries (pairs, then lanes
    0..E), the pairs whose packed value is below the query's, and stores pairs[count] or offs."""
    # this program's queries: t < P is pair t (its own packed value), t = P + e is lane e (e * P)
    t = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    is_pair = t < P
    lane = t - P
    is_lane = (~is_pair) & (lane <= E)
    q = tl.where(is_pair, _packed_keys(ids_ptr, t, P, E, s_n, s_k, K), tl.where(is_lane, lane, 0) * P)

    # count packed_j < q over all pairs j, BJ at a time; the accumulator is reduced once, at the end
    acc = tl.zeros([CHUNK, BJ], dtype=tl.int32)
    for jb in range(NUM_J):
        pj = _packed_keys(ids_ptr, jb * BJ + tl.arange(0, BJ), P, E, s_n, s_k, K)
        acc += (pj[None, :] < q[:, None]).to(tl.int32)
    count = tl.sum(acc, axis=1)

    # a pair's count is its sorted position (a permutation of 0..P-1), a lane's is offs[e]
    tl.store(pairs_ptr + count, t.to(tl.int64), mask=is_pair)
    tl.store(offs_ptr + lane, count, mask=is_lane)


@triton.jit
def _chunk_counts_kernel(ids_ptr, counts_ptr, P, E, s_n, s_k,
                         K: tl.constexpr, CHUNK: tl.constexpr, H: tl.constexpr):
    """Kernel D, launch 1 (module docstring): counts[c, e] = pairs of expert e in chunk c (row c
    written whole, lanes >= E are 0; not-ours pairs are not counted)."""
    c = tl.program_id(0)
    real, key = _keys(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), P, E, s_n, s_k, K)
    ours = real & (key < E)
    lanes = tl.arange(0, H)
    tl.store(counts_ptr + c * H + lanes, tl.histogram(tl.where(ours, key, 0), H, mask=ours))


@triton.jit
def _chunk_scatter_kernel(ids_ptr, counts_ptr, pairs_ptr, offs_ptr, P, E, s_n, s_k, NC,
                          K: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, H: tl.constexpr,
                          RB: tl.constexpr, NUM_RB: tl.constexpr):
    """Kernel D, launch 2 (module docstring): program c sums the counts of all chunks and of the
    chunks before its own, then places its CHUNK pairs SUB at a time."""
    c = tl.program_id(0)
    lanes = tl.arange(0, H)

    # Step 1: per expert, the pairs in all chunks (total) and in chunks 0..c-1 (before), RB rows a step
    total = tl.zeros([H], dtype=tl.int32)
    before = tl.zeros([H], dtype=tl.int32)
    for rb in range(NUM_RB):
        rows = rb * RB + tl.arange(0, RB)
        tile = tl.load(counts_ptr + rows[:, None] * H + lanes[None, :], mask=rows[:, None] < NC, other=0)
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where(rows[:, None] < c, tile, 0), axis=0)

    # Step 2: offs (every program derives them, program 0 stores them)
    offs = tl.cumsum(total, 0) - total
    n_ours = tl.sum(total, axis=0)  # offs[E]: lanes >= E hold no pairs
    first = c == 0
    tl.store(offs_ptr + lanes, offs, mask=(lanes < E) & first)
    tl.store(offs_ptr + E, n_ours, mask=first)

    # Step 3: the next free position of each expert for this chunk's pairs, and of the not-ours
    # bucket (after all ours, behind the not-ours pairs of earlier chunks: all full chunks)
    running = offs + before
    running_out = n_ours + c * CHUNK - tl.sum(before, axis=0)

    # Step 4: SUB pairs at a time, in order: position = running[key] + rank among the same key in
    # this step (a [SUB, SUB] compare); then running advances by the step's histogram
    i = tl.arange(0, SUB)
    earlier = i[None, :] < i[:, None]
    for s in range(CHUNK // SUB):
        pair = c * CHUNK + s * SUB + i
        real, key = _keys(ids_ptr, pair, P, E, s_n, s_k, K)
        key = tl.where(real, key, -1)  # padding matches no real pair
        rank = tl.sum(((key[None, :] == key[:, None]) & earlier).to(tl.int32), axis=1)
        ours = real & (key < E)
        lane = tl.where(ours, key, 0)
        start = tl.where(ours, tl.gather(running, lane, 0), running_out)
        tl.store(pairs_ptr + start + rank, pair.to(tl.int64), mask=real)
        running += tl.histogram(lane, H, mask=ours)
        running_out += tl.sum((real & (key >= E)).to(tl.int32), axis=0)


def sort_pairs(topk_ids: Tensor, num_experts: int, *, kernel: str | None = None,
               chunk: int | None = None, block_j: int | None = None, sub_block: int | None = None,
               num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Pairs sorted by expert (not-ours last) and each expert's first sorted position, in one
    launch (kernel D: two); bitwise equal to triton_moe._sort_pairs. Fast for small_enough(P, E)
    sizes, correct for any (outside them kernel B, whose only limit is its E_P2-lane tile).

    kernel: None = kernel_for(P, E) (B where that is None), or "bitonic" / "counting" / "rank" /
    "chunked" to force one (tests, bench/sort_bench.py) at any P it can take: A and D need
    E <= 1023 (A's P_P2-wide tile is slow past 1024 pairs but correct), C needs
    (E + 2) * P < 2^31, B takes anything.
    chunk / block_j / num_warps: kernel C's tiles (powers of two) instead of _rank_config's;
    chunk / sub_block / num_warps: kernel D's (powers of two, sub_block <= chunk) instead of
    _chunked_config's."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [N, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    N, K = topk_ids.shape
    P, E = N * K, int(num_experts)
    kernel = kernel or kernel_for(P, E) or "counting"
    if kernel not in ("rank", "chunked") and (chunk, block_j, sub_block, num_warps) != (None,) * 4:
        raise ValueError("chunk / block_j / sub_block / num_warps are the tiles of kernel C "
                         "(kernel=\"rank\") and D (kernel=\"chunked\")")
    if kernel == "rank" and sub_block is not None:
        raise ValueError("sub_block is kernel D's (kernel=\"chunked\") tile, not kernel C's")
    if kernel == "chunked" and block_j is not None:
        raise ValueError("block_j is kernel C's (kernel=\"rank\") tile, not kernel D's")
    if kernel in ("bitonic", "chunked") and not 1 <= E <= _MAX_EXPERTS:
        name = "A" if kernel == "bitonic" else "D"
        raise ValueError(f"kernel {name} takes 1 <= E <= {_MAX_EXPERTS}, got {E}")
    if kernel == "rank" and not (1 <= E and (E + 2) * max(P, 1) < 2**31):
        raise ValueError(f"kernel C packs key * P + pair in int32: (E + 2) * P < 2^31, got E={E} P={P}")
    plan = _chunked_plan(P, E, chunk, sub_block, num_warps) if kernel == "chunked" and P else None
    dev = topk_ids.device
    pairs = torch.empty(P, dtype=torch.int64, device=dev)
    if P == 0:
        return pairs, torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offs = torch.empty(E + 1, dtype=torch.int32, device=dev)
    e_p2 = _lanes(E)
    args = (topk_ids, pairs, offs, P, E, topk_ids.stride(0), topk_ids.stride(1))
    if kernel == "bitonic":
        # 8 warps measured faster than 4 at 1024 pairs (6.5 vs 9.9 us), 4 faster below (2.2 vs 2.5)
        _sort_pairs_bitonic_kernel[(1,)](*args, K=K, P_P2=max(2, triton.next_power_of_2(P)), E_P2=e_p2,
                                         num_warps=8 if P >= 1024 else 4)
    elif kernel == "rank":
        tiles = (chunk, block_j, num_warps)
        c, bj, w = (t if t is not None else d for t, d in zip(tiles, _rank_config(P)))
        _sort_pairs_rank_kernel[(triton.cdiv(P + E + 1, c),)](*args, K=K, CHUNK=c, BJ=bj,
                                                             NUM_J=triton.cdiv(P, bj), num_warps=w)
    elif kernel == "chunked":
        _sort_pairs_chunked(topk_ids, pairs, offs, E, plan)
    else:
        # a small batch gets a chunk no longer than itself (less padding work, one chunk)
        chunk = min(max(_MIN_CHUNK, _TILE // e_p2), max(_MIN_CHUNK, triton.next_power_of_2(P)))
        _sort_pairs_kernel[(1,)](*args, K=K, CHUNK=chunk, NUM_CHUNKS=triton.cdiv(P, chunk), E_P2=e_p2,
                                 num_warps=_NUM_WARPS)
    return pairs, offs


def _chunked_plan(P: int, E: int, chunk: int | None, sub_block: int | None,
                  num_warps: int | None) -> tuple[int, int, int, int, int, int]:
    """Kernel D's (CHUNK, SUB, num_warps, H, NC, RB) for P > 0 pairs: the given tiles or
    _chunked_config's, SUB cut to CHUNK; raises if its int32 indices could overflow."""
    tiles = (chunk, sub_block, num_warps)
    c, sub, w = (t if t is not None else d for t, d in zip(tiles, _chunked_config(P)))
    sub = min(sub, c)
    H = _chunked_lanes(E)
    nc = triton.cdiv(P, c)
    if (nc + 1) * max(c, H) >= 2**31:  # pair indices (padding included) and counts offsets in int32
        raise ValueError(f"kernel D indexes in int32: P={P} with CHUNK={c}, H={H} lanes is too large")
    # the counts are read RB rows a step; the loop bound cdiv(NC, RB) only changes every RB chunks
    # (few compiles across prefill's batch sizes)
    rb = min(triton.next_power_of_2(nc), max(1, _CHUNKED_ROW_TILE // H))
    return c, sub, w, H, nc, rb


def _sort_pairs_chunked(topk_ids: Tensor, pairs: Tensor, offs: Tensor, E: int,
                        plan: tuple[int, int, int, int, int, int]) -> None:
    """Kernel D's two launches (module docstring) into `pairs` and `offs`, tiles from _chunked_plan."""
    c, sub, w, H, nc, rb = plan
    P, K = topk_ids.numel(), topk_ids.shape[1]
    s_n, s_k = topk_ids.stride(0), topk_ids.stride(1)
    # every row is written by launch 1 before launch 2 reads it: torch.empty, no memset
    counts = torch.empty((nc, H), dtype=torch.int32, device=topk_ids.device)
    _chunk_counts_kernel[(nc,)](topk_ids, counts, P, E, s_n, s_k, K=K, CHUNK=c, H=H, num_warps=w)
    _chunk_scatter_kernel[(nc,)](topk_ids, counts, pairs, offs, P, E, s_n, s_k, nc, K=K, CHUNK=c, SUB=sub,
                                 H=H, RB=rb, NUM_RB=triton.cdiv(nc, rb), num_warps=w)
