"""triton_sort.sort_pairs against the torch routing prep it replaces (bitwise equal: a stable sort).

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

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


def check(ids, E):
    pairs, offs = ts.sort_pairs(ids, E)
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


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("E", [1, 8, 128, 130])
@pytest.mark.parametrize("P", [1, 7, 256, 2048 + 3])
def test_matches_torch(dtype, E, P):
    gen = torch.Generator().manual_seed(1000 * E + P)
    K = 8 if P % 8 == 0 else (7 if P % 7 == 0 else 1)
    ids = ids_of(P, E, dtype, gen).reshape(P // K, K).to(DEV)
    check(ids, E)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mostly_foreign_and_empty_experts(dtype):
    gen = torch.Generator().manual_seed(1)
    E = 16
    ids = ids_of(512, E, dtype, gen, foreign=0.9).reshape(64, 8)
    ids[ids == 3] = -1  # expert 3 gets nothing
    ids[ids == E - 1] = E  # nor does the last one
    check(ids.to(DEV), E)
    check(torch.full((5, 4), -1, dtype=dtype, device=DEV), E)  # nothing ours at all
    check(torch.full((5, 4), E + 7, dtype=dtype, device=DEV), E)
    check(torch.full((5, 4), 2, dtype=dtype, device=DEV), E)  # one expert has everything


def test_int64_ids_outside_int32():
    # ids that wrap into [0, E) when truncated to int32 must still count as not ours
    E = 8
    ids = torch.tensor([[2**32 + 1, 3], [-(2**32) + 2, 1], [5, 2**40]], dtype=torch.int64, device=DEV)
    check(ids, E)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_non_contiguous(dtype):
    gen = torch.Generator().manual_seed(2)
    E = 8
    wide = ids_of(40 * 12, E, dtype, gen).reshape(40, 12).to(DEV)
    check(wide[:, 2:8], E)        # column slice: row stride 12
    check(wide[::3, 1:9:2], E)    # strided both ways
    check(wide.t()[:, 5:30], E)   # transposed
    check(torch.tensor([[4]], dtype=dtype, device=DEV).expand(9, 6), E)  # stride 0


@pytest.mark.parametrize("P,E", [(1024, 130), (1025, 130), (1025, 8), (7, 1100), (300, 1023)])
def test_both_kernels_and_edges(P, E):
    # 1024 / 1025 pairs: either side of the bitonic kernel's limit; E = 1100: past it (counting sort)
    gen = torch.Generator().manual_seed(P + E)
    check(ids_of(P, E, torch.int64, gen).reshape(-1, 1).to(DEV), E)


def test_empty():
    for shape in ((0, 8), (4, 0)):
        ids = torch.empty(shape, dtype=torch.int32, device=DEV)
        pairs, offs = ts.sort_pairs(ids, 8)
        assert pairs.shape == (0,) and pairs.dtype == torch.int64
        assert torch.equal(offs, torch.zeros(9, dtype=torch.int32, device=DEV))
        check(ids, 8)


def test_small_enough():
    assert ts.small_enough(1, 1) and ts.small_enough(256, 8) and ts.small_enough(1024, 1023)
    assert ts.small_enough(4096, 8) and ts.small_enough(0, 8)
    assert not ts.small_enough(4096, 128) and not ts.small_enough(2048, 16)
    assert not ts.small_enough(1 << 20, 8)
    assert not ts.small_enough(8192, 1)
    assert not ts.small_enough(16, 4096)
    assert not ts.small_enough(16, 0)


def test_bad_input():
    with pytest.raises(ValueError):
        ts.sort_pairs(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(TypeError):
        ts.sort_pairs(torch.zeros(2, 4, dtype=torch.float32), 4)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=15, deadline=None)
    @given(N=st.integers(0, 40), K=st.integers(1, 9), E=st.integers(1, 70), seed=st.integers(0, 2**16),
           wide=st.booleans(), dtype=st.sampled_from([torch.int32, torch.int64]))
    def test_property(N, K, E, seed, wide, dtype):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(-2, E + 3, (N, K + 2 if wide else K), generator=gen).to(dtype).to(DEV)
        check(ids[:, 1:K + 1] if wide else ids, E)
