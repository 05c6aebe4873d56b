"""triton_sort.sort_pairs against the torch routing prep it replaces (bitwise equal: a stable sort).

Each kernel (A bitonic, B counting, C rank, D chunked) forced in turn, and the default choice by
size. On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where time
goes by the number of tile steps and programs: kernel C runs with large tiles (FAST) except in the
tests of its default tiles, kernel A is forced only up to its own limit (its 4096-wide sort takes
seconds there), and kernel D gets many chunks from a small forced CHUNK at a few thousand pairs
(its default tiles give one 128-pair chunk per program). Kernel D at the prefill sizes it is
chosen for (16K..256K pairs) runs in the GPU-marked tests at the end.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

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


KERNELS = ("bitonic", "counting", "rank", "chunked")
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
                                       (1025, 128, torch.int64), (2048, 128, torch.int64),
                                       (8200, 256, torch.int64), (8200, 1023, torch.int32)])
def test_default_choice(P, E, dtype):
    # kernel_for's choice with its default tiles: C up to 8192 pairs (2048 x 128: Qwen3 decode, 256
    # tokens x top-8, at _rank_config's tiles), D above (8200: 65 chunks of 128, the last one short)
    gen = torch.Generator().manual_seed(P + E)
    assert ts.kernel_for(P, E) == ("rank" if P <= 8192 else "chunked")
    check(ids_of(P, E, dtype, gen).reshape(-1, 8 if P % 8 == 0 else 1).to(DEV), E)


def test_default_choice_gpt_oss_prefill():
    # GPT-OSS prefill: 4096 tokens x top-4 over 32 experts, kernel D at its default tiles (128 chunks)
    gen = torch.Generator().manual_seed(7)
    assert ts.kernel_for(16384, 32) == "chunked" and ts._chunked_config(16384) == (128, 128, 4)
    check(ids_of(16384, 32, torch.int64, gen).reshape(4096, 4).to(DEV), 32)


@pytest.mark.parametrize("chunk,block_j,P,E", [(16, 128, 300, 128), (32, 128, 300, 128), (32, 256, 300, 128),
                                               (64, 128, 300, 128), (128, 32, 300, 128), (4, 8, 37, 70)])
def test_rank_tiles(chunk, block_j, P, E):
    # kernel C at other tiles (bench/sort_bench.py's among them), P straddling both, E > CHUNK
    gen = torch.Generator().manual_seed(chunk + block_j)
    check(ids_of(P, E, torch.int64, gen).reshape(-1, 1).to(DEV), E, "rank", chunk=chunk, block_j=block_j)


# (P, E, K, CHUNK, SUB): P no multiple of CHUNK (1000, 777, 2051, 513), SUB < CHUNK (several rank
# steps a chunk), 128 chunks (4096 / 32), E = 1 / 8 / 128 / 256 / 1023, K = 7 (rows straddle chunks)
CHUNKED_CASES = [(4096, 8, 8, 32, 32), (1000, 128, 8, 64, 16), (777, 256, 7, 128, 32), (300, 1, 4, 16, 16),
                 (2051, 32, 1, 256, 64), (513, 1023, 1, 64, 64), (640, 256, 8, 16, 4)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("P,E,K,chunk,sub", CHUNKED_CASES)
def test_chunked_matches_torch(P, E, K, chunk, sub, dtype):
    # kernel D with many chunks: each program's before[] sums the chunks ahead of it
    gen = torch.Generator().manual_seed(P * E + chunk)
    ids = ids_of(P, E, dtype, gen).reshape(P // K, K).to(DEV)
    check(ids, E, "chunked", chunk=chunk, sub_block=sub)


@pytest.mark.parametrize("E", [1, 8, 256])
def test_chunked_one_bucket(E):
    # every pair in one bucket: the first expert, the last, all not ours (-1, >= E), across chunks
    kw = {"chunk": 32, "sub_block": 16}
    for value in {0, E - 1, -1, E, E + 100}:
        for dtype in (torch.int32, torch.int64):
            check(torch.full((75, 4), value, dtype=dtype, device=DEV), E, "chunked", **kw)


def test_chunked_foreign_runs():
    # runs of not-ours pairs spanning chunk boundaries: their bucket's start per chunk is derived
    # (n_ours + pairs before the chunk - ours before it), not counted in a lane
    gen = torch.Generator().manual_seed(5)
    E = 32
    ids = ids_of(1024, E, torch.int64, gen, foreign=0.2)
    ids[100:300] = -1
    ids[500:700] = E + 3
    check(ids.reshape(128, 8).to(DEV), E, "chunked", chunk=64, sub_block=32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_chunked_non_contiguous_many_chunks(dtype):
    gen = torch.Generator().manual_seed(6)
    E = 128
    wide = ids_of(300 * 10, E, dtype, gen).reshape(300, 10).to(DEV)
    check(wide[:, 1:9], E, "chunked", chunk=64, sub_block=32)        # row stride 10: 2400 pairs, 38 chunks
    check(wide.t()[2:6, 7:290], E, "chunked", chunk=64, sub_block=64)  # transposed: column stride 10


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
    # kernel D: every prefill bucket (GPT-OSS 16K / 64K x E = 32, Qwen3 32K / 128K x 128,
    # DeepSeek-V3 up to 128K x 256, Mixtral 8K..32K x 8) up to _CHUNKED_MAX_PAIRS = 1 << 18
    for P, E in ((8193, 8), (16384, 32), (32768, 128), (65536, 32), (131072, 128), (131072, 256),
                 (1 << 18, 1023)):
        assert ts.small_enough(P, E), (P, E)
    assert not ts.small_enough((1 << 18) + 1, 8) and not ts.small_enough(1 << 20, 8)
    assert not ts.small_enough(16, 4096) and not ts.small_enough(16384, 1024)
    assert not ts.small_enough(16, 0) and not ts.small_enough(-1, 8)


def test_kernel_for():
    # measured (bench/results/sort_h200): C wins at every size up to 8192 pairs; D above (unmeasured)
    assert ts.kernel_for(1, 8) == ts.kernel_for(1024, 1023) == "rank"
    assert ts.kernel_for(1025, 8) == ts.kernel_for(2048, 128) == ts.kernel_for(8192, 1023) == "rank"
    assert ts.kernel_for(8193, 8) == ts.kernel_for(131072, 256) == ts.kernel_for(1 << 18, 1023) == "chunked"
    assert ts.kernel_for((1 << 18) + 1, 8) is None and ts.kernel_for(16, 1024) is None
    assert ts._rank_config(1024) == (16, 128, 4) and ts._rank_config(2048) == ts._rank_config(8192) == (32, 256, 8)


def test_chunked_config():
    # CHUNK = next_power_of_2(cdiv(P, 128)) in [128, 2048]: 64..128 programs from 8K to 256K pairs
    cfg = {P: ts._chunked_config(P) for P in (1, 8193, 16384, 24576, 32768, 65536, 131072, 262144, 1 << 20)}
    assert {P: c[0] for P, c in cfg.items()} == {1: 128, 8193: 128, 16384: 128, 24576: 256, 32768: 256,
                                                 65536: 512, 131072: 1024, 262144: 2048, 1 << 20: 2048}
    assert all(c[1:] == (128, 4) for c in cfg.values())
    assert [-(-P // cfg[P][0]) for P in (8193, 16384, 24576, 131072, 262144)] == [65, 128, 96, 128, 128]
    # H = next_power_of_2(E) lanes (not-ours pairs get none): 256 for DeepSeek-V3's E = 256, not 512
    assert [ts._chunked_lanes(E) for E in (1, 8, 32, 128, 129, 256, 1023)] == [2, 8, 32, 128, 256, 256, 1024]
    # the counts are read in tiles of ~8K: RB = 8192 / H rows, no more than next_power_of_2(NC)
    assert ts._chunked_plan(131072, 256, None, None, None) == (1024, 128, 4, 256, 128, 32)
    assert ts._chunked_plan(16384, 8, None, None, None) == (128, 128, 4, 8, 128, 128)
    assert ts._chunked_plan(100, 8, 32, 64, 4) == (32, 32, 4, 8, 4, 4)  # SUB cut to CHUNK


def test_limits_are_module_level(monkeypatch):
    # the thresholds await bench/sort_bench.py: a revision changes one number, kernel_for follows
    monkeypatch.setattr(ts, "_RANK_MAX_PAIRS", 2048)
    assert ts.kernel_for(2048, 128) == "rank"
    assert ts.kernel_for(4096, 8) == ts.kernel_for(4096, 128) == "chunked"
    monkeypatch.setattr(ts, "_CHUNKED_MAX_PAIRS", 2048)
    assert ts.kernel_for(4096, 8) == "counting" and not ts.small_enough(4096, 128)
    monkeypatch.setattr(ts, "_CHUNKED_MAX_PAIRS", 65536)
    assert ts.kernel_for(65536, 256) == "chunked" and not ts.small_enough(65537, 256)
    monkeypatch.setattr(ts, "_BITONIC_MAX_PAIRS", 1024)
    assert ts.kernel_for(256, 128) == "bitonic" and ts.kernel_for(2048, 128) == "rank"
    monkeypatch.setattr(ts, "_CHUNKED_PROGRAMS", 64)
    monkeypatch.setattr(ts, "_CHUNKED_SUB", 64)
    assert ts._chunked_config(131072) == (2048, 64, 4)


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
    with pytest.raises(ValueError, match="tiles"):
        ts.sort_pairs(ids, 4, kernel="counting", sub_block=32)
    with pytest.raises(ValueError, match="sub_block is kernel D"):
        ts.sort_pairs(ids, 4, kernel="rank", sub_block=32)
    with pytest.raises(ValueError, match="block_j is kernel C"):
        ts.sort_pairs(ids, 4, kernel="chunked", block_j=32)
    with pytest.raises(ValueError, match="kernel D"):
        ts.sort_pairs(ids, 1100, kernel="chunked")
    with pytest.raises(ValueError, match="kernel D indexes in int32"):
        # 2^25 pairs (a zero-stride view: no memory) in 16-pair chunks over 1024 lanes: checked
        # before anything is allocated or launched
        huge = torch.zeros((1, 1), dtype=torch.int32).expand(2**25, 1)
        ts.sort_pairs(huge, 1023, kernel="chunked", chunk=16)
    with pytest.raises(ValueError, match="kernel A"):
        ts.sort_pairs(ids, 1100, kernel="bitonic")
    with pytest.raises(ValueError, match="int32"):
        ts.sort_pairs(ids, 2**28, kernel="rank")  # (E + 2) * P >= 2^31


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sort_bench", Path(__file__).resolve().parents[1] / "bench" / "sort_bench.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    return sb


def test_bench_without_gpu_exits_2(monkeypatch, capsys):
    sb = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sb.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA" in err and "\n" not in err


def test_bench_candidates():
    # the sweep: D at every size (at its default CHUNK and at CHUNKED_TILES' others, CHUNK past
    # triton_sort's clamp too), C only up to 16384 pairs (P^2), B only where it has a chance, torch
    # and auto always
    sb = load_bench()
    big = sb.candidates(131072, 256)
    assert {"torch", "auto"} <= set(big) and not any(n.startswith(("A", "B", "C")) for n in big)
    d = {n: desc for n, desc in ((n, c[1]) for n, c in big.items()) if n.startswith("D ")}
    assert len(d) == len(sb.CHUNKED_TILES) and sum(desc["default_tiles"] for desc in d.values()) == 1
    assert "D 1024x128 w4" in d and d["D 1024x128 w4"]["default_tiles"]
    assert {"D 64x64 w8", "D 128x128 w8"} <= set(sb.candidates(16384, 32))  # 256 and 128 programs
    assert "D 4096x128 w8" in sb.candidates(262144, 8)  # 64 programs
    assert big["auto"][1]["chosen"] == "chunked"
    small = sb.candidates(2048, 8)
    assert {"A", "B"} <= set(small) and any(n.startswith("C ") for n in small)
    assert any(n.startswith("D ") for n in small)
    assert set(sb.PAIRS) >= {8192, 16384, 32768, 65536, 131072, 262144}
    assert set(sb.EXPERTS) >= {8, 32, 128, 256}


def test_bench_dry_run(tmp_path, capsys):
    # --dry-run: every candidate once, checked against torch, untimed; it runs without a GPU (here
    # in the interpreter) and writes the same JSON, so the bench's code path is exercised on CPU
    sb = load_bench()
    assert sb.main(["--dry-run", "--pairs", "64", "--experts", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "P=    64 E=   8 D 128x128 w4" in out and "(default tiles)" in out
    assert "MISMATCH" not in out and "FAILED" not in out
    import json
    data = json.loads((tmp_path / "sort_bench.json").read_text())
    rows = data["results"]
    assert data["meta"]["dry_run"] and all(r["ok"] and "us" not in r for r in rows)
    assert {r["kernel"] for r in rows} >= {"torch", "bitonic", "counting", "rank", "chunked", "auto"}
    assert data["meta"]["limits"]["chunked_max_pairs"] == ts._CHUNKED_MAX_PAIRS


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
        # kernel D: block_j // 8 = SUB of 2..32, cut to CHUNK where larger
        kw = ({"chunk": chunk, "block_j": block_j} if kernel == "rank" else
              {"chunk": chunk, "sub_block": block_j // 8} if kernel == "chunked" else {})
        check(ids[:, 1:K + 1] if wide else ids, E, kernel, **kw)


# GPU only: kernel D at the prefill sizes it is chosen for (run on an H200 by the GPU suite) ---------

GPU = torch.cuda.is_available()


def router_ids(N, K, E, seed, p_foreign=0.0, dtype=torch.int64):
    """[N, K] ids as a router draws them (K distinct experts a row), a p_foreign share set to -1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(N, E, device="cuda", generator=gen).topk(K, dim=1).indices
    drop = torch.rand(N, K, device="cuda", generator=gen) < p_foreign
    return torch.where(drop, torch.full_like(ids, -1), ids).to(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("P", [16384, 32768, 131072])
@pytest.mark.parametrize("E", [32, 128, 256])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_chunked_prefill_sizes_gpu(P, E, dtype):
    K = 4 if E == 32 else 8  # GPT-OSS top-4 over 32; Qwen3 / DeepSeek-V3 top-8
    assert ts.kernel_for(P, E) == "chunked"
    ids = router_ids(P // K, K, E, seed=P + E, p_foreign=0.1, dtype=dtype)
    check(ids, E)
    check(ids, E, "chunked")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("P,E", [(8192, 8), (32768, 8), (65536, 32), (262144, 256), ((1 << 20), 1023)])
def test_chunked_other_sizes_gpu(P, E):
    # Mixtral (E = 8, top-2), GPT-OSS 16K tokens x 4, the top of D's range, and past it at E = 1023
    # (CHUNK 2048, 512 chunks, H = 1024: forced, correct though not chosen)
    K = 2 if E == 8 else (4 if E == 32 else 8)
    check(router_ids(P // K, K, E, seed=P, p_foreign=0.2), E, "chunked")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk,sub,warps", [(1024, 128, 8), (2048, 128, 8), (512, 128, 8), (1024, 64, 8),
                                             (512, 64, 4), (1024, 128, 4), (128, 128, 4), (4096, 256, 8)])
def test_chunked_tiles_gpu(chunk, sub, warps):
    # bench/sort_bench.py's CHUNKED_TILES at this P (and two extremes) compile and sort right (Qwen3
    # 16K tokens x 8 over 128, a strided view)
    wide = router_ids(16384, 10, 128, seed=chunk + sub)
    check(wide[:, 1:9], 128, "chunked", chunk=chunk, sub_block=sub, num_warps=warps)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_chunked_cuda_graph_replay():
    # kernel D (two launches, a torch.empty counts buffer) captured through triton_moe._sort_pairs,
    # the runtime's entry, and replayed on new routing: no host sync, nothing stale between replays
    from tbo_compiler.runtime.kernels import triton_moe as tm

    N, K, E = 4096, 8, 128
    assert ts.kernel_for(N * K, E) == "chunked"
    ids = router_ids(N, K, E, seed=0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compiles outside the capture
        tm._sort_pairs(ids, E)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pairs, offs = tm._sort_pairs(ids, E)
    for seed in (1, 2, 3):
        ids.copy_(router_ids(N, K, E, seed=seed, p_foreign=0.3 * seed))
        graph.replay()
        want_pairs, want_offs = reference(ids, E)
        assert torch.equal(pairs, want_pairs) and torch.equal(offs, want_offs)
