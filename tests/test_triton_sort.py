"""triton_sort.sort_pairs against the torch routing prep it replaces (bitwise equal: a stable sort).

Each kernel (A bitonic, B counting, C rank) forced in turn, and the default choice by size. On CPU
the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where time goes by
the number of tile steps: kernel C runs with large tiles (FAST) except in the tests of its default
tiles, and kernel A is forced only up to its own limit (its 4096-wide sort takes seconds there).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tbo_compiler.runtime.kernels import triton_sort as ts

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(topk_ids, num_experts):
    """Copy of triton_moe._sort_pairs (kept here so a change there cannot hide a change here)."""
    flat = topk_ids.reshape(-1)
    ours = (flat >= 0) & (flat < num_experts)
    key = torch.where(ours, flat, num_experts).to(torch.int32)
    sorted_key, pairs = torch.sort(key, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=torch.int32, device=flat.device)
    offs = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return pairs, offs


def check(ids, E, kernel=None, **tiles):
    pairs, offs = ts.sort_pairs(ids, E, kernel=kernel, **tiles)
    want_pairs, want_offs = reference(ids, E)
    assert pairs.dtype == torch.int64 and offs.dtype == torch.int32
    assert torch.equal(pairs, want_pairs), (pairs, want_pairs)
    assert torch.equal(offs, want_offs), (offs, want_offs)


def ids_of(P, E, dtype, gen, foreign=0.3):
    """P ids (the caller shapes them [N, K]); a `foreign` share of them is -1 or >= E (not ours)."""
    ids = torch.randint(0, E, (P,), generator=gen)
    r = torch.rand(P, generator=gen)
    ids = torch.where(r < foreign / 2, torch.full_like(ids, -1), ids)
    ids = torch.where((r >= foreign / 2) & (r < foreign), ids + E + torch.randint(0, 5, (P,), generator=gen), ids)
    return ids.to(dtype)


KERNELS = ("bitonic", "counting", "rank")
FAST = {"chunk": 64, "block_j": 512}  # kernel C's tiles in the interpreter: few, large steps


def tiles(kernel):
    return FAST if kernel == "rank" else {}


def forced_cases(sizes):
    """(kernel, P) for each kernel at each P it is tested at (A up to 1024 pairs: wider sorts are
    slow in the interpreter)."""
    return [(k, P) for k in KERNELS for P in sizes if not (k == "bitonic" and P > 1024)]


# 33 and 2051: no multiple of CHUNK (16..64) or BJ (128..512); E = 1023: the most experts, 130: just
# past a power of two (E + 1 lanes), 1: one expert
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("E", [1, 8, 128, 130, 1023])
@pytest.mark.parametrize("kernel,P", forced_cases([1, 7, 33, 256, 2048 + 3]))
def test_matches_torch(kernel, P, E, dtype):
    gen = torch.Generator().manual_seed(1000 * E + P)
    K = 8 if P % 8 == 0 else (7 if P % 7 == 0 else 1)
    ids = ids_of(P, E, dtype, gen).reshape(P // K, K).to(DEV)
    check(ids, E, kernel, **tiles(kernel))


@pytest.mark.parametrize("P,E,dtype", [(1, 8, torch.int32), (256, 130, torch.int64), (1024, 128, torch.int32),
                                       (1025, 128, torch.int64), (2048, 128, torch.int64)])
def test_default_choice(P, E, dtype):
    # kernel_for's choice with its default tiles: A up to 1024 pairs, C above (2048 x 128: Qwen3
    # decode, 256 tokens x top-8, kernel C at _rank_config's tiles)
    gen = torch.Generator().manual_seed(P + E)
    check(ids_of(P, E, dtype, gen).reshape(-1, 8 if P % 8 == 0 else 1).to(DEV), E)


@pytest.mark.parametrize("chunk,block_j,P,E", [(16, 128, 300, 128), (32, 128, 300, 128), (32, 256, 300, 128),
                                               (64, 128, 300, 128), (128, 32, 300, 128), (4, 8, 37, 70)])
def test_rank_tiles(chunk, block_j, P, E):
    # kernel C at other tiles (bench/sort_bench.py's among them), P straddling both, E > CHUNK
    gen = torch.Generator().manual_seed(chunk + block_j)
    check(ids_of(P, E, torch.int64, gen).reshape(-1, 1).to(DEV), E, "rank", chunk=chunk, block_j=block_j)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mostly_foreign_and_empty_experts(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    E = 16
    ids = ids_of(512, E, dtype, gen, foreign=0.9).reshape(64, 8)
    ids[ids == 3] = -1  # expert 3 gets nothing
    ids[ids == E - 1] = E  # nor does the last one
    kw = tiles(kernel)
    check(ids.to(DEV), E, kernel, **kw)
    check(torch.full((5, 4), -1, dtype=dtype, device=DEV), E, kernel, **kw)  # nothing ours at all
    check(torch.full((5, 4), E + 7, dtype=dtype, device=DEV), E, kernel, **kw)
    check(torch.full((5, 4), 2, dtype=dtype, device=DEV), E, kernel, **kw)  # one expert has everything
    check(torch.full((5, 4), 0, dtype=dtype, device=DEV), E, kernel, **kw)
    check(torch.full((5, 4), E - 1, dtype=dtype, device=DEV), E, kernel, **kw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_int64_ids_outside_int32(kernel):
    # ids that wrap into [0, E) when truncated to int32 must still count as not ours
    E = 8
    ids = torch.tensor([[2**32 + 1, 3], [-(2**32) + 2, 1], [5, 2**40]], dtype=torch.int64, device=DEV)
    check(ids, E, kernel, **tiles(kernel))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_non_contiguous(kernel, dtype):
    gen = torch.Generator().manual_seed(2)
    E = 8
    kw = tiles(kernel)
    wide = ids_of(40 * 12, E, dtype, gen).reshape(40, 12).to(DEV)
    check(wide[:, 2:8], E, kernel, **kw)        # column slice: row stride 12
    check(wide[::3, 1:9:2], E, kernel, **kw)    # strided both ways
    check(wide.t()[:, 5:30], E, kernel, **kw)   # transposed
    check(torch.tensor([[4]], dtype=dtype, device=DEV).expand(9, 6), E, kernel, **kw)  # stride 0


def test_non_contiguous_rank_default_tiles():
    # the Qwen3 decode shape read through a strided view (row stride 10, column stride 1)
    gen = torch.Generator().manual_seed(3)
    wide = ids_of(256 * 10, 128, torch.int64, gen).reshape(256, 10).to(DEV)
    check(wide[:, 1:9], 128)


@pytest.mark.parametrize("P,E", [(1024, 130), (1025, 130), (1025, 8), (7, 1100), (300, 1023)])
def test_edges(P, E):
    # 1024 / 1025 pairs: either side of C's change of tiles (the default ones);
    # E = 1100: past every limit (counting sort, correct but slower than torch); E = 1023: the most
    gen = torch.Generator().manual_seed(P + E)
    check(ids_of(P, E, torch.int64, gen).reshape(-1, 1).to(DEV), E)


@pytest.mark.parametrize("kernel", [None, *KERNELS])
def test_empty(kernel):
    for shape in ((0, 8), (4, 0)):
        ids = torch.empty(shape, dtype=torch.int32, device=DEV)
        pairs, offs = ts.sort_pairs(ids, 8, kernel=kernel)
        assert pairs.shape == (0,) and pairs.dtype == torch.int64
        assert torch.equal(offs, torch.zeros(9, dtype=torch.int32, device=DEV))
        check(ids, 8, kernel)


def test_small_enough():
    assert ts.small_enough(1, 1) and ts.small_enough(256, 8) and ts.small_enough(1024, 1023)
    assert ts.small_enough(4096, 8) and ts.small_enough(0, 8)
    assert ts.small_enough(2048, 128) and ts.small_enough(4096, 128) and ts.small_enough(8192, 1023)
    assert ts.small_enough(8192, 1)
    assert not ts.small_enough(8193, 8) and not ts.small_enough(1 << 20, 8)
    assert not ts.small_enough(16, 4096)
    assert not ts.small_enough(16, 0) and not ts.small_enough(-1, 8)


def test_kernel_for():
    # measured (bench/results/sort_h200): C wins at every size up to 8192 pairs
    assert ts.kernel_for(1, 8) == ts.kernel_for(1024, 1023) == "rank"
    assert ts.kernel_for(1025, 8) == ts.kernel_for(2048, 128) == ts.kernel_for(8192, 1023) == "rank"
    assert ts.kernel_for(8193, 8) is None and ts.kernel_for(16, 1024) is None
    assert ts._rank_config(1024) == (16, 128, 4) and ts._rank_config(2048) == ts._rank_config(8192) == (32, 256, 8)


def test_limits_are_module_level(monkeypatch):
    # the thresholds await bench/sort_bench.py: a revision changes one number, kernel_for follows
    monkeypatch.setattr(ts, "_RANK_MAX_PAIRS", 2048)
    assert ts.kernel_for(2048, 128) == "rank" and ts.kernel_for(4096, 8) == "counting"
    assert not ts.small_enough(4096, 128)
    monkeypatch.setattr(ts, "_BITONIC_MAX_PAIRS", 1024)
    assert ts.kernel_for(256, 128) == "bitonic" and ts.kernel_for(2048, 128) == "rank"


def test_bad_input():
    with pytest.raises(ValueError):
        ts.sort_pairs(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(TypeError):
        ts.sort_pairs(torch.zeros(2, 4, dtype=torch.float32), 4)
    ids = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel must be"):
        ts.sort_pairs(ids, 4, kernel="radix")
    with pytest.raises(ValueError, match="tiles"):
        ts.sort_pairs(ids, 4, kernel="bitonic", chunk=32)
    with pytest.raises(ValueError, match="kernel A"):
        ts.sort_pairs(ids, 1100, kernel="bitonic")
    with pytest.raises(ValueError, match="int32"):
        ts.sort_pairs(ids, 2**28, kernel="rank")  # (E + 2) * P >= 2^31


def test_bench_without_gpu_exits_2(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "sort_bench", Path(__file__).resolve().parents[1] / "bench" / "sort_bench.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sb.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA" in err and "\n" not in err


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(N=st.integers(0, 40), K=st.integers(1, 9), E=st.integers(1, 70), seed=st.integers(0, 2**16),
           wide=st.booleans(), dtype=st.sampled_from([torch.int32, torch.int64]),
           kernel=st.sampled_from([None, *KERNELS]), chunk=st.sampled_from([8, 32, 64]),
           block_j=st.sampled_from([16, 64, 256]))
    def test_property(N, K, E, seed, wide, dtype, kernel, chunk, block_j):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(-2, E + 3, (N, K + 2 if wide else K), generator=gen).to(dtype).to(DEV)
        kw = {"chunk": chunk, "block_j": block_j} if kernel == "rank" else {}
        check(ids[:, 1:K + 1] if wide else ids, E, kernel, **kw)
