"""Triton paged GQA attention against a float64 gather + softmax reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16
only (the interpreter's bf16 tl.dot is wrong). bf16 at Qwen3-MoE dims and CUDA-graph replay: GPU only.
"""
from __future__ import annotations

import pytest
import torch

from tbo_compiler.runtime.kernels import triton_gqa as tg

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def reference(q, kv_cache, block_table, positions, block_size, scale, sinks=None, window=0):
    """Per token: gather its slots 0..positions[t] (the last `window` of them with a window),
    float64 softmax attention per head; a sink adds exp(sinks[h]) to the softmax's denominator."""
    T, H, Dh = q.shape
    G = kv_cache.shape[2]
    out = torch.empty(T, H, Dh, dtype=torch.float64, device=q.device)
    for t in range(T):
        p_t = int(positions[t])
        j = torch.arange(max(0, p_t - window + 1) if window else 0, p_t + 1, device=q.device)
        slots = block_table[t, j // block_size].long() * block_size + j % block_size
        k = kv_cache[slots, 0].double().repeat_interleave(H // G, dim=1)  # [j, H, Dh]
        v = kv_cache[slots, 1].double().repeat_interleave(H // G, dim=1)
        e = (torch.einsum("hd,jhd->hj", q[t].double(), k) * scale).exp()
        denom = e.sum(-1, keepdim=True) + (0.0 if sinks is None else sinks.double().exp()[:, None])
        out[t] = torch.einsum("hj,jhd->hd", e / denom, v)
    return out


def make_batch(requests, *, H=4, G=2, Dh=32, BS=4, NB=12, num_blocks=40, dtype=torch.float32,
               pad=0, seed=0, device=DEV):
    """requests: (cached, new) per request -> q, cache, block_table, positions.

    Each request gets shuffled, non-contiguous blocks (block 0 is the null block); its `new`
    tokens sit at positions cached .. cached + new - 1. `pad` padding tokens follow: position 0,
    all-zero block-table row (they attend slot 0)."""
    g = torch.Generator().manual_seed(seed)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    rows, pos = [], []
    for cached, new in requests:
        need = -(-(cached + new) // BS)
        assert need <= NB and len(perm) >= need
        row = [perm.pop() for _ in range(need)] + [0] * (NB - need)
        for p in range(cached, cached + new):
            rows.append(row)
            pos.append(p)
    rows += [[0] * NB] * pad
    pos += [0] * pad
    T = len(pos)
    q = torch.randn(T, H, Dh, generator=g)
    kv = torch.randn(num_blocks * BS, 2, G, Dh, generator=g)
    return (q.to(device, dtype), kv.to(device, dtype), torch.tensor(rows, dtype=torch.int32, device=device),
            torch.tensor(pos, dtype=torch.int64, device=device))


def check(batch, BS=4, scale=0.3, sinks=None, window=0, **kw):
    q = batch[0]
    out = tg.paged_attention(*batch, BS, scale, sinks, window, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(*batch, BS, scale, sinks, window)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_shuffled_blocks_and_padding(dtype):
    batch = make_batch([(4, 1), (12, 1), (0, 1), (37, 1), (22, 1)], pad=2, dtype=dtype)
    assert tg.supported(*batch, 4, 0.3)
    check(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_with_cached_prefix(dtype):
    batch = make_batch([(6, 7), (0, 5), (20, 1)], pad=1, dtype=dtype, seed=1)
    check(batch)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_matches(splits):
    """Splits: balanced chunks of each token's own length, empty splits for short contexts."""
    batch = make_batch([(40, 1), (3, 1), (17, 2), (0, 1)], pad=1, seed=2)
    check(batch, num_splits=splits)


def test_group_of_one_and_wide_head():
    """R = 1 (MHA) and a head dim that is not a power of two (masked D)."""
    batch = make_batch([(9, 2), (30, 1)], H=3, G=3, Dh=48, seed=3)
    check(batch, block_n=32)


def test_no_tokens_and_supported():
    q, kv, bt, pos = make_batch([(3, 1)])
    assert tg.paged_attention(q[:0], kv, bt[:0], pos[:0], 4, 0.3).shape == (0, 4, 32)
    assert not tg.supported(q.double(), kv.double(), bt, pos, 4)
    assert not tg.supported(q, kv[:, :, :1].expand(-1, -1, 3, -1), bt, pos, 4)  # H % G != 0
    assert not tg.supported(q, kv, bt.float(), pos, 4)
    if not GPU:
        assert not tg.supported(q.bfloat16(), kv.bfloat16(), bt, pos, 4)


# Sliding window and attention sinks (GPT-OSS) ----------------------------------------------------

def _sinks(H, seed=0, device=DEV):
    return torch.randn(H, generator=torch.Generator().manual_seed(seed)).mul(2).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 5, 16])
def test_sinks_and_window(dtype, window):
    """Prefill after a cached prefix, decode, and padding; windows shorter and longer than a tile
    (16 positions in the interpreter) and than the contexts; the sinks are O(1) logits."""
    batch = make_batch([(6, 7), (0, 5), (37, 1), (20, 2)], pad=1, dtype=dtype, seed=5)
    sinks = _sinks(4)
    assert tg.supported(*batch, 4, 0.3, sinks, window)
    check(batch, sinks=sinks, window=window)
    if window:
        check(batch, window=window)  # a window alone
    # each part changes the result, so the test would see it missing
    q, kv, bt, pos = batch
    full = tg.paged_attention(q, kv, bt, pos, 4, 0.3)
    assert (tg.paged_attention(q, kv, bt, pos, 4, 0.3, sinks, window).float() - full.float()).abs().max() > 1e-2


@pytest.mark.parametrize("splits", [2, 4])
def test_sinks_and_window_with_split_kv(splits):
    """The sink counts once (split 0) and the window's positions are shared by the splits."""
    batch = make_batch([(40, 1), (3, 1), (17, 2), (0, 1)], pad=1, seed=6)
    check(batch, sinks=_sinks(4, 1), window=9, num_splits=splits)
    check(batch, sinks=_sinks(4, 1), num_splits=splits)


def test_torch_reference_sinks_and_window():
    """The torch reference backend (CPU models) against the same float64 reference."""
    from tbo_compiler.runtime.kernels import torch_ref

    batch = make_batch([(6, 7), (0, 5), (37, 1)], pad=2, seed=7, device="cpu")
    for sinks, window in ((_sinks(4, 2, "cpu"), 0), (None, 6), (_sinks(4, 3, "cpu"), 6)):
        out = torch_ref.paged_attention(*batch, 4, 0.3, sinks, window)
        torch.testing.assert_close(out.double(), reference(*batch, 4, 0.3, sinks, window), rtol=1e-5, atol=1e-5)


def test_sinks_and_window_supported():
    q, kv, bt, pos = make_batch([(3, 1)])
    assert tg.supported(q, kv, bt, pos, 4, 0.3, _sinks(4), 128)
    assert not tg.supported(q, kv, bt, pos, 4, 0.3, _sinks(3), 0)      # one sink per query head
    assert not tg.supported(q, kv, bt, pos, 4, 0.3, None, -1)
    assert not tg.supported(q, kv, bt, pos, 4, 0.3, _sinks(4).long(), 0)


# GPU only ----------------------------------------------------------------------------------------

QWEN = dict(H=64, G=4, Dh=128, BS=16, NB=160, num_blocks=8192)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("requests", [[(0, 1)], [(2000, 1), (5, 1), (511, 1)], [(100, 300), (0, 200)],
                                      [(1000 + 7 * i, 1) for i in range(64)]])
def test_qwen3_dims_bf16(requests):
    batch = make_batch(requests, pad=3, dtype=torch.bfloat16, seed=4, **QWEN)
    check(batch, BS=16, scale=128 ** -0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [None, 1, 8])
def test_cuda_graph_replay_with_new_positions(splits):
    q, kv, bt, pos = make_batch([(500, 1), (30, 1), (0, 1), (1200, 1)], dtype=torch.bfloat16, **QWEN)
    kw = {"num_splits": splits}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile outside the capture
        tg.paged_attention(q, kv, bt, pos, 16, 0.1, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tg.paged_attention(q, kv, bt, pos, 16, 0.1, **kw)
    new_batches = [(5, [(2400, 1), (1, 1), (77, 1), (0, 1)]), (6, [(10, 1), (900, 1), (64, 1), (2000, 1)])]
    for seed, reqs in new_batches:
        nq, _, nbt, npos = make_batch(reqs, dtype=torch.bfloat16, seed=seed, **QWEN)
        q.copy_(nq), bt.copy_(nbt), pos.copy_(npos)
        graph.replay()
        ref = reference(q, kv, bt, pos, 16, 0.1)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [None, 1, 8])
def test_gpt_oss_dims_bf16_sinks_and_window(splits):
    """GPT-OSS's attention shape (64 heads, 8 kv heads, Dh 64) with its window of 128 and sinks."""
    dims = dict(H=64, G=8, Dh=64, BS=16, NB=160, num_blocks=8192)
    batch = make_batch([(2000, 1), (5, 1), (100, 300), (700, 2)], pad=3, dtype=torch.bfloat16, seed=8, **dims)
    sinks = _sinks(64, 4, "cuda")
    for window in (0, 128):
        check(batch, BS=16, scale=64 ** -0.5, sinks=sinks, window=window, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_mixtral_dims_bf16_prefill_tiles():
    """Mixtral's shape (32 heads, 8 kv heads: R = 4, 32-token tiles): runs after a cached prefix,
    a run that ends mid-tile, decode tokens and padding."""
    dims = dict(H=32, G=8, Dh=128, BS=16, NB=160, num_blocks=8192)
    batch = make_batch([(0, 512), (37, 100), (900, 1), (0, 64)], pad=5, dtype=torch.bfloat16, seed=11, **dims)
    assert len(_run_rows(batch, 32)) >= 512
    check(batch, BS=16, scale=128 ** -0.5)


# Runs of one request's tokens as MMA-sized tiles (prefill) -----------------------------------------

def _run_rows(batch, tile):
    """Tokens whose tile of `tile` consecutive tokens is one request's run (the tile kernel's)."""
    _, _, bt, pos = batch
    rows = []
    for t0 in range(0, pos.numel() - tile + 1, tile):
        p = pos[t0:t0 + tile]
        if bool((p == p[0] + torch.arange(tile, device=p.device)).all()) and bool((bt[t0:t0 + tile] == bt[t0]).all()):
            rows += range(t0, t0 + tile)
    return rows


@pytest.mark.parametrize("window,sinks", [(0, False), (5, True), (16, False)])
def test_prefill_runs_as_tiles(window, sinks):
    """Requests of 16 and 11 new tokens after cached prefixes, a 1-token request and padding:
    tiles of 8 tokens (R = 2, 16 rows) that are one request's run go to the tile kernel, which alone
    gives those rows right (windows shorter and longer than a tile, sinks); the whole op (tiles +
    per-token kernel for the rest) equals the reference, as with tiles off."""
    batch = make_batch([(5, 16), (0, 11), (3, 1), (30, 8)], pad=3, seed=7)
    s = _sinks(4, 2) if sinks else None
    rows = _run_rows(batch, 8)
    assert len(rows) >= 24  # the 16-token request's two tiles and the last request's tile at least
    ref = reference(*batch, 4, 0.3, s, window)
    tiles_only = tg.paged_attention(*batch, 4, 0.3, s, window, tile_tokens=8, per_token=False)
    torch.testing.assert_close(tiles_only[rows].double(), ref[rows], rtol=1e-5, atol=1e-5)
    check(batch, sinks=s, window=window, tile_tokens=8)
    check(batch, sinks=s, window=window, tile_tokens=0)


def test_tiles_with_split_kv_and_decode_batches():
    """Split-KV (small batches) skips the tokens the tiles did in both of its kernels; a decode
    batch (no runs) goes wholly to the per-token kernel."""
    batch = make_batch([(20, 8), (3, 1), (0, 8)], pad=0, seed=8)
    assert len(_run_rows(batch, 8)) == 8  # the first request's run; the last one straddles a tile
    check(batch, num_splits=2, tile_tokens=8)
    check(make_batch([(4, 1), (12, 1), (0, 1), (37, 1), (22, 1), (9, 1), (1, 1), (2, 1)], seed=9), tile_tokens=8)


@pytest.mark.parametrize("iters", [2, 4, 8])
def test_per_token_programs_take_several_tokens(iters):
    """After the tile kernel, each per-token program takes tokens pid, pid + P, ...: tokens left by
    the tiles (a run straddling two requests, decode tokens, padding) among ones the tiles did, with
    a grid that does not divide T, with and without split-KV."""
    batch = make_batch([(5, 16), (0, 11), (3, 1), (30, 8), (2, 1)], pad=3, seed=12)
    check(batch, tile_tokens=8, token_iters=iters)
    check(batch, sinks=_sinks(4, 2), window=5, tile_tokens=8, token_iters=iters, num_splits=2)


def test_tokens_per_program_choice():
    """Several tokens a program only while >= 8 programs an SM remain: a 4096-token prefill with
    4-8 kv heads on an H200 (132 SMs) takes 8; decode batches keep one token a program."""
    assert tg._token_iters(4096, 4, 132) == 8 and tg._token_iters(4096, 8, 132) == 16
    assert tg._token_iters(256, 4, 132) == 1 and tg._token_iters(512, 8, 132) == 2
    assert tg._token_iters(1 << 20, 8, 132) == 32


def test_tile_size_choice():
    assert tg._tile_tokens(4096, 8, torch.bfloat16, 128) == (16 if not tg._interpreting() else 2)
    assert tg._tile_tokens(4096, 3, torch.bfloat16, 128) == 0      # R not a power of two
    assert tg._tile_tokens(1, 8, torch.bfloat16, 128) == 0         # fewer tokens than a tile


@pytest.mark.parametrize("splits", [1, 2])
def test_head_first_program_order(splits, monkeypatch):
    """TBO_GQA_HEAD_FIRST (the default): the per-token programs laid out kv head first (grid axes
    swapped) compute the same attention as token first, decode and after the prefill tiles, with
    sinks, a window and split-KV."""
    monkeypatch.setenv("TBO_GQA_HEAD_FIRST", "0")
    check(make_batch([(4, 1), (12, 1), (0, 1), (37, 1)], seed=15), num_splits=splits)  # token first
    monkeypatch.setenv("TBO_GQA_HEAD_FIRST", "1")
    check(make_batch([(4, 1), (12, 1), (0, 1), (37, 1), (22, 1)], pad=2, seed=13), num_splits=splits)
    batch = make_batch([(5, 16), (0, 11), (3, 1), (30, 8), (2, 1)], pad=3, seed=14)
    check(batch, sinks=_sinks(4, 2), window=5, tile_tokens=8, token_iters=2, num_splits=splits)
    check(batch, head_first=False, num_splits=splits)  # the keyword wins over the flag
