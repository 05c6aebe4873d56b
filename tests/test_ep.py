"""Expert parallelism over real gloo: EP=2 and EP=4 give the EP=1 logits.

Models: DeepSeek-V3 and Qwen3-MoE tiny checkpoints (8 routed experts, fp32). Modes: a2a and
allgather (DP attention: each rank serves its own requests, padded to a common token count) and
allreduce (every rank serves every request). Routings: natural, skewed onto experts 0-3 (some
ranks receive no token), skewed onto one expert. Steps: prefill (variable lengths, one request
after a cached prefix) and three decode steps; in DP modes one rank's batch is all padding in
two steps. See ep_scenarios.py for the schedule.

One spawn per EP size: each rank runs every scenario and returns its logits; the EP=1
references are computed here, unpadded, with all requests in one batch, so the comparison also
shows that padding rows and batch composition do not change real rows.
Tolerance: rtol = atol = 1e-5 on logits of magnitude ~1-10 (the ranks sum the same fp32
products in another order; the observed worst is ~1.2e-6 relative).
"""
from __future__ import annotations


import pytest
import torch

from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.runtime.launch import run_ranks

import ep_scenarios as sc

pytestmark = pytest.mark.slow
TOL = dict(rtol=1e-5, atol=1e-5)
WORLDS = (2, 4)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_tiny")
    return {"deepseek_v3": str(make_tiny("deepseek_v3", root / "dsv3", seed=0, n_routed_experts=sc.NUM_EXPERTS)),
            "qwen3_moe": str(make_tiny("qwen3_moe", root / "qwen3", seed=0, num_experts=sc.NUM_EXPERTS))}


@pytest.fixture(scope="module")
def references(model_dirs):
    """EP=1, no padding: {(arch, routing): ({req: logits}, routed ids of every MoE call)}."""
    refs = {}
    for arch in sc.ARCHS:
        for routing in sc.ROUTINGS:
            model = sc.load(model_dirs[arch], routing)
            ids = []
            hooks = [m.gate.register_forward_hook(lambda _m, _a, out: ids.append(out[0]))
                     for m in sc.moe_blocks(model)]
            logits, pads = sc.serve(model, sc.steps())
            for h in hooks:
                h.remove()
            assert all(p.shape[0] == 0 for p in pads)
            refs[(arch, routing)] = (logits, torch.cat(ids))
    return refs


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"ep{w}")
def ranks(request, model_dirs):
    """(world, [rank results]) from one run_ranks call per EP size."""
    world = request.param
    return world, run_ranks(sc.rank_main, world, model_dirs)


def _served_by(rank, world, mode):
    reqs = {r for step in sc.steps() for r, _ in step}
    return reqs if mode == "allreduce" else {r for r in reqs if sc.owner(r, world) == rank}


@pytest.mark.parametrize("routing", sc.ROUTINGS)
@pytest.mark.parametrize("mode", sc.MODES)
@pytest.mark.parametrize("arch", sc.ARCHS)
def test_ep_logits_equal_ep1(ranks, references, arch, mode, routing):
    world, results = ranks
    ref, _ = references[(arch, routing)]
    for rank, res in enumerate(results):
        got = res[(arch, mode, routing)]
        assert set(got["logits"]) == _served_by(rank, world, mode)
        for req, logits in got["logits"].items():
            assert logits.shape == ref[req].shape
            torch.testing.assert_close(logits, ref[req], **TOL, msg=lambda m: f"rank {rank} req {req}: {m}")
        # padding rows exist on every rank and every step, and attend only to the null block
        assert all(p.shape[0] >= sc.EXTRA_PAD for p in got["pads"])
        assert all(torch.isfinite(p).all() for p in got["pads"])


@pytest.mark.parametrize("arch", sc.ARCHS)
def test_skewed_routing_starves_ranks(ranks, references, arch):
    """The skewed scenarios do what they claim: in the reference every token picks the favoured
    experts, and on the ranks the experts that own none of them compute no (token, expert) pair."""
    world, results = ranks
    e_loc = sc.NUM_EXPERTS // world
    _, low_ids = references[(arch, "low_experts")]
    _, hot_ids = references[(arch, "one_expert")]
    assert low_ids.max() < len(sc.LOW_EXPERTS)
    assert (hot_ids == sc.HOT_EXPERT).any(-1).all()
    for mode in sc.MODES:
        for rank, res in enumerate(results):
            assert res[(arch, mode, "natural")]["expert_rows"] > 0, (mode, rank)
            starved = rank * e_loc >= len(sc.LOW_EXPERTS)
            assert (res[(arch, mode, "low_experts")]["expert_rows"] == 0) == starved, (mode, rank)
    # some rank is starved at every EP size, and the skew shows in the logits
    assert any(rank * e_loc >= len(sc.LOW_EXPERTS) for rank in range(world))
    natural, skewed = references[(arch, "natural")][0], references[(arch, "low_experts")][0]
    assert max(float((natural[r] - skewed[r]).abs().max()) for r in natural) > 0.1


def test_dp_schedule_has_idle_ranks_and_agreed_padding(ranks):
    world, results = ranks
    per_rank = [sc.rank_steps(r, world) for r in range(world)]
    counts = [[sum(len(t) for _, t in step) for step in steps] for steps in per_rank]
    assert counts[world - 1][:2] == [0, 0]              # the last rank's batch is all padding
    want = [max(c[s] for c in counts) for s in range(len(counts[0]))]
    for res in results:
        for mode in ("a2a", "allgather"):
            assert res[("deepseek_v3", mode, "natural")]["agreed"] == want


def test_comm_ops_values(ranks):
    """The tbo comm ops on their own, on known inputs (shapes and fakes: test_comm.py)."""
    world, results = ranks
    T, e_loc = sc.COMM_T, sc.NUM_EXPERTS // world
    inputs = [sc.comm_inputs(r) for r in range(world)]
    xs = [i[0] for i in inputs]
    for d, res in enumerate(r["comm"] for r in results):
        x, ids, w, w13, w2 = inputs[d]
        # dispatch + this rank's experts + combine == all experts locally
        torch.testing.assert_close(res["y"], torch.ops.tbo.moe_experts(x, ids, w, w13, w2), **TOL)
        # what rank d received from rank s: its tokens with a pick on d, ids made local, -1 else
        rx, rids, rw = res["recv"]
        assert rx.shape == (world * T, sc.COMM_D) and rids.shape == rw.shape == (world * T, sc.COMM_K)
        for s in range(world):
            x_s, ids_s, w_s = inputs[s][:3]
            rows = slice(s * T, (s + 1) * T)
            mine = ids_s // e_loc == d
            assert torch.equal(rids[rows], torch.where(mine, ids_s - d * e_loc, -1))
            assert torch.equal(rw[rows], torch.where(mine, w_s, 0.0))
            assert torch.equal(rx[rows], torch.where(mine.any(-1, keepdim=True), x_s, 0.0))
        torch.testing.assert_close(res["all_gather"], torch.cat(xs), rtol=0, atol=0)
        torch.testing.assert_close(res["all_reduce"], sum(xs), **TOL)
        base = torch.arange(world * T * 3, dtype=torch.float32).view(world * T, 3)
        want_rs = base[d * T:(d + 1) * T] * sum(range(1, world + 1))
        torch.testing.assert_close(res["reduce_scatter"], want_rs, **TOL)
        assert res["pending"] == 0
