"""TBO correctness: the compiled two-ubatch program equals the model without TBO.

fp32 on CPU; tolerance: max |TBO - eager| <= 2e-5 on logits of magnitude ~1-10 (the split only
changes which rows each op sees, so differences are float reassociation in the row-blocked
GEMMs), and the KV caches the two write agree to 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from tbo_compiler import load_plan
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.models import load_model
from tbo_compiler.models.tiny import make_tiny

import tbo_scenarios as sc

ATOL = 2e-5
ARCHS = ["deepseek_v3", "kimi_k25", "qwen3_moe"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tbo_tiny")
    return {a: make_tiny(a, root / a, seed=1, n_routed_experts=8) if a != "qwen3_moe"
            else make_tiny(a, root / a, seed=1, num_experts=8) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tbo_equals_eager_single_rank(tiny, arch, tmp_path):
    paths = sc.compile_plans(tiny[arch], tmp_path)
    model = load_model(tiny[arch], dtype=torch.float32, block_size=sc.BLOCK_SIZE)
    for policy in ("tbo", "serial"):  # both programs of every bucket
        plans = {k: load_plan(p, tiny[arch], dtype=torch.float32, policy=policy) for k, p in paths.items()}
        # the policy cut every bucket as documented in tbo_scenarios
        cuts = {k: sc.cuts(v) for k, v in plans.items()}
        assert cuts == {"prefill": [(4, 2), (14, 7)], "decode": [(1, 0), (3, 2)], "mtp": [(6, 4)]}
        logit_diff, cache_diff, scale = sc.compare(model, plans, seed=3, vocab=model.config.vocab_size)
        assert scale > 0.5  # the logits are not trivially small
        assert max(logit_diff) <= ATOL, (policy, logit_diff)
        assert cache_diff <= 1e-5
        ran = {v["variant"] for p in plans.values() for v in p.decisions.values()}
        assert ran == ({"tbo", "serial"} if policy == "tbo" else {"serial"})  # 1-token buckets: serial


@pytest.mark.slow
def test_tbo_equals_eager_ep2_gloo(tiny, tmp_path):
    """EP=2 over real gloo: a2a (own requests per rank) for DeepSeek-V3 and Qwen3-MoE,
    allgather (DP attention) for Kimi K2.5. Each rank compares its eager EP model with the plan."""
    from tbo_compiler.runtime.launch import run_ranks

    jobs = [("deepseek_v3", "a2a"), ("qwen3_moe", "a2a"), ("kimi_k25", "allgather")]
    for arch, mode in jobs:
        paths = sc.compile_plans(tiny[arch], tmp_path, ep=2, moe_comm=mode)
        res = run_ranks(sc.rank_compare, 2, str(tiny[arch]), {k: str(p) for k, p in paths.items()}, mode, 5)
        for rank, (logit_diff, cache_diff, scale, cuts) in enumerate(res):
            assert scale > 0.5
            assert max(logit_diff) <= ATOL, (arch, mode, rank, logit_diff)
            assert cache_diff <= 1e-5, (arch, mode, rank, cache_diff)
            assert cuts["prefill"] == [(4, 2), (14, 7)]


@pytest.mark.slow
def test_ranks_with_uneven_tokens_agree_on_one_bucket(tiny, tmp_path):
    from tbo_compiler.runtime.launch import run_ranks

    d = tiny["deepseek_v3"]
    p = tmp_path / "uneven.pt"
    compile_model_dir(d, p, ep=2, dtype=torch.float32, block_size=sc.BLOCK_SIZE, max_blocks=sc.MAX_BLOCKS,
                      mode="prefill", token_counts=(4, 10), profile="cpu")
    (shape0, diff0), (shape1, diff1) = run_ranks(sc.rank_uneven, 2, str(d), str(p))
    V = load_model(d, dtype=torch.float32).config.vocab_size
    assert shape0 == (8, V) and shape1 == (0, V)  # rank 1 had no tokens and still ran the step
    assert diff0 <= ATOL


@pytest.mark.parametrize("wide", ["0", "1"])
def test_cache_updates_run_in_place(tiny, tmp_path, monkeypatch, wide):
    """The program writes KV-cache updates into the caller's cache (no per-layer cache copies);
    outputs and caches equal those of the functional program, with the writes bound to ATen's
    index_put_ or to the row write (TBO_KV_WRITE_WIDE, the default: the row-scatter kernel on CUDA
    tensors, ATen's on these CPU ones)."""
    from tbo_compiler.runtime.program import Program, _index_put_rows_

    monkeypatch.setenv("TBO_KV_WRITE_WIDE", wide)

    d = tiny["qwen3_moe"]
    p = tmp_path / "p.pt"
    compile_model_dir(d, p, dtype=torch.float32, block_size=sc.BLOCK_SIZE, max_blocks=sc.MAX_BLOCKS,
                      mode="prefill", token_counts=(14,), profile="cpu")
    run = load_plan(p, d, dtype=torch.float32, policy="tbo")
    bp, bound, ex, _ = run.buckets[14]["tbo"]
    assert len(ex.inplace) == 2 * run.model.config.num_hidden_layers  # each layer's write, both ubatches
    assert (_index_put_rows_ in ex.glob.values()) == (wide == "1")
    functional = Program(bp.gm, bp.instrs, inplace=False)
    reqs = [("a", list(range(1, 9))), ("b", list(range(9, 15)))]
    kv, kv_f = run.new_kv_cache(sc.NUM_BLOCKS), run.new_kv_cache(sc.NUM_BLOCKS)
    ptrs = [c.data_ptr() for c in kv.caches]
    out = run(*kv.make_batch(reqs, max_blocks=sc.MAX_BLOCKS).args(), kv.caches)
    assert [c.data_ptr() for c in kv.caches] == ptrs and all(c.abs().sum() > 0 for c in kv.caches)
    user = [*kv_f.make_batch(reqs, max_blocks=sc.MAX_BLOCKS).args(), *kv_f.caches]
    (out_f,) = functional(*[user[x] if isinstance(x, int) else x for x in bound])
    assert torch.equal(out, out_f)
    assert all(torch.equal(a, c) for a, c in zip(kv.caches, kv_f.caches))
