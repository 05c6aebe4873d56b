"""The ROCm backends on CPU, with fake `aiter` and `mori` (tests/fakes): argument contracts, the
fallback when the libraries are missing, per-ubatch op ownership, and whole programs against the
torch reference (fp32; EP=2 over gloo for mori).

No AMD GPU here: these tests check the argument plumbing and the semantics the backends rely on,
not the real kernels. The fakes check each call against the documented API and compute with the
torch reference; see tests/fakes/__init__.py.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import fakes
import fakes.ranks
from fakes import ContractError
from tbo_compiler import load_plan
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.runtime import comm, kernels
from tbo_compiler.runtime.comm import mori as mori_backend
from tbo_compiler.runtime.comm import select as comm_select
from tbo_compiler.runtime.kernels import aiter_backend, torch_ref

import tbo_scenarios as sc

ATOL = 2e-5
MLA_ARGS = {"q", "kv_buffer", "o", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_lens", "max_seqlen_q",
            "sm_scale"}


def _fresh_selector(monkeypatch):
    for name, empty in (("_LOADED", {}), ("_PREFER", {}), ("_CHOSEN", {}), ("_BROKEN", set()), ("_PROVEN", set())):
        monkeypatch.setattr(kernels, name, empty)
    for name, empty in (("_PROBE", []), ("_STATES", {}), ("_SHMEM", {})):
        monkeypatch.setattr(mori_backend, name, empty)
    monkeypatch.setattr(comm_select, "_LOGGED", set())


@pytest.fixture
def with_fakes(monkeypatch):
    """aiter and mori importable (the fakes), a selector and a mori backend that probe afresh."""
    for name, mod in fakes.modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    fakes.reset()
    _fresh_selector(monkeypatch)
    yield fakes.modules()
    fakes.reset()


@pytest.fixture
def without_rocm_libs(monkeypatch):
    """`import aiter` / `import mori` fail as on a machine without them."""
    for name in ("aiter", "aiter.mla", "aiter.fused_moe", "mori", "mori.ops", "mori.shmem"):
        monkeypatch.setitem(sys.modules, name, None)
    _fresh_selector(monkeypatch)


def _mla_inputs(T=6, H=4, V=16, R=8, NB=3, BS=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = 64
    q_lat = torch.randn(T, H, V, generator=g).to(dtype)
    q_pe = torch.randn(T, H, R, generator=g).to(dtype)
    cache = torch.randn(N, V + R, generator=g).to(dtype)
    bt = torch.randint(1, N // BS, (T, NB), generator=g, dtype=torch.int32)
    pos = torch.randint(0, NB * BS, (T,), generator=g)
    pos[0], pos[1] = 0, NB * BS - 1  # the first slot only, and the whole table
    return q_lat, q_pe, cache, bt, pos, BS


# aiter: each call's arguments ---------------------------------------------------------------

def test_mla_decode_arguments_follow_the_paged_contract(with_fakes):
    q_lat, q_pe, cache, bt, pos, BS = _mla_inputs()
    out = aiter_backend.latent_attention(q_lat, q_pe, cache, bt, pos, BS, 0.37)
    ref = torch_ref.latent_attention(q_lat, q_pe, cache, bt, pos, BS, 0.37)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    (call,) = with_fakes["aiter"].CALLS
    a = call["args"]
    assert call["fn"] == "mla_decode_fwd"
    T, H, V = q_lat.shape
    C = V + q_pe.shape[-1]
    assert tuple(a["q"].shape) == (T, H, C) and torch.equal(a["q"], torch.cat([q_lat, q_pe], -1))
    assert tuple(a["kv_buffer"].shape) == (cache.shape[0], 1, 1, C) and a["kv_buffer"].data_ptr() == cache.data_ptr()
    assert a["o"] is not None and tuple(a["o"].shape) == (T, H, V) and a["o"].dtype == q_lat.dtype
    assert all(a[k].dtype == torch.int32 for k in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_lens"))
    assert torch.equal(a["qo_indptr"], torch.arange(T + 1, dtype=torch.int32))          # a request per token
    lens = (pos + 1).tolist()
    assert a["kv_indptr"].tolist() == [sum(lens[:t]) for t in range(T + 1)]
    assert torch.equal(a["kv_last_page_lens"], torch.ones(T, dtype=torch.int32))
    assert (a["max_seqlen_q"], a["page_size"], a["nhead_kv"], a["sm_scale"]) == (1, 1, 1, 0.37)
    for t in range(T):  # token t's pages: its own request's slots 0..pos[t], in order
        seg = a["kv_indices"][a["kv_indptr"][t]:a["kv_indptr"][t + 1]].tolist()
        assert seg == [int(bt[t, j // BS]) * BS + j % BS for j in range(lens[t])]
    assert a["kv_indices"].numel() == T * bt.shape[1] * BS  # a bound from shapes, not from the data


def test_mla_prefill_kernel_for_large_bf16_batches(with_fakes, monkeypatch):
    """From PREFILL_TOKENS on, bf16 with 16 heads goes to mla_prefill_fwd (bf16-only, not causal:
    one query row per request keeps the mask exact); fp32 stays on the decode kernel."""
    monkeypatch.setattr(aiter_backend, "PREFILL_TOKENS", 4)
    args = _mla_inputs(T=6, H=16, dtype=torch.bfloat16)
    out = aiter_backend.latent_attention(*args, 0.2)
    ref = torch_ref.latent_attention(*args, 0.2)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-2)
    aiter_backend.latent_attention(*_mla_inputs(T=6, H=16), 0.2)                     # fp32
    aiter_backend.latent_attention(*_mla_inputs(T=3, H=16, dtype=torch.bfloat16), 0.2)  # small T
    calls = with_fakes["aiter"].CALLS
    assert [c["fn"] for c in calls] == ["mla_prefill_fwd", "mla_decode_fwd", "mla_decode_fwd"]
    assert set(calls[0]["args"]) >= MLA_ARGS and calls[0]["args"]["max_seqlen_q"] == 1


def test_fused_moe_arguments_mask_other_ranks_experts(with_fakes):
    g = torch.Generator().manual_seed(1)
    E, D, I, N, K = 4, 12, 5, 9, 3
    x = torch.randn(N, D, generator=g)
    ids = torch.randint(-1, E, (N, K), generator=g)
    ids[0] = -1  # a row with no expert here
    w = torch.rand(N, K, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    out = aiter_backend.moe_experts(x, ids, w, w13, w2)
    torch.testing.assert_close(out, torch_ref.moe_experts(x, ids, w, w13, w2), rtol=0, atol=1e-6)
    assert out[0].abs().max() == 0
    (call,) = with_fakes["aiter"].CALLS
    a = call["args"]
    assert a["hidden_states"] is x and a["w1"] is w13 and a["w2"] is w2   # no copies of the weights
    assert a["topk_ids"].dtype == torch.int32 and torch.equal(a["topk_ids"].long(), torch.where(ids >= 0, ids, E))
    assert a["topk_weight"].dtype == torch.float32 and torch.equal(a["topk_weight"], torch.where(ids >= 0, w, 0.0))
    assert a["expert_mask"].tolist() == [1] * E + [0] and a["expert_mask"].dtype == torch.int32
    aiter = with_fakes["aiter"]
    assert a["activation"] is aiter.ActivationType.Silu and a["quant_type"] is aiter.QuantType.No
    # biases or another activation are not aiter's here: supports() declines, a direct call refuses
    assert not aiter_backend.supports("moe_experts", (x, ids, w, w13, w2, None, None, "gpt_oss", 0.0))
    assert aiter_backend.supports("moe_experts", (x, ids, w, w13, w2))


def test_fakes_refuse_what_the_real_libraries_would(with_fakes):
    """The contract checks are live: a wrong dtype, a wrong indptr, or a misnamed keyword fails."""
    q_lat, q_pe, cache, bt, pos, BS = _mla_inputs(T=3)
    b = aiter_backend.paged_batch(bt, pos, BS)
    q, o = torch.cat([q_lat, q_pe], -1), q_lat.new_empty(q_lat.shape)
    mla = with_fakes["aiter.mla"]
    kw = dict(q=q, kv_buffer=cache.view(-1, 1, 1, cache.shape[1]), o=o, qo_indptr=b.qo_indptr, kv_indptr=b.kv_indptr,
              kv_indices=b.kv_indices, kv_last_page_lens=b.kv_last_page_lens, max_seqlen_q=1)
    mla.mla_decode_fwd(**kw)
    with pytest.raises(ContractError, match="int32"):
        mla.mla_decode_fwd(**{**kw, "kv_indptr": b.kv_indptr.long()})
    with pytest.raises(ContractError, match="qo_indptr"):
        mla.mla_decode_fwd(**{**kw, "qo_indptr": b.qo_indptr.flip(0)})
    with pytest.raises(ContractError, match="bf16"):
        mla.mla_prefill_fwd(**kw)
    with pytest.raises(TypeError):
        mla.mla_decode_fwd(**kw, scale=0.1)


def test_index_building_has_no_host_sync():
    """Every tensor the backends build for aiter and mori comes from shapes, not values: the same
    code runs on meta tensors (which have no values to read)."""
    T, NB, BS, W, K, D = 5, 3, 4, 2, 3, 8
    meta = torch.device("meta")
    b = aiter_backend.paged_batch(torch.empty(T, NB, dtype=torch.int32, device=meta),
                                  torch.empty(T, dtype=torch.int64, device=meta), BS)
    assert b.kv_indices.shape == (T * NB * BS,) and b.kv_indptr.shape == (T + 1,)
    ids, w = aiter_backend.moe_inputs(torch.empty(T, K, dtype=torch.int64, device=meta),
                                      torch.empty(T, K, device=meta), 4)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    x, w, lid, dest = mori_backend.mori_inputs(torch.empty(W * T, D, device=meta),
                                               torch.empty(W * T, 2 * K, dtype=torch.int32, device=meta), W, 0)
    assert [tuple(t.shape) for t in (x, w, lid, dest)] == [(T, D), (T, K), (T, K), (T, K)]
    rx, rmeta = mori_backend.received_slabs(torch.empty(W * 8, D, device=meta), torch.empty(W * 8, K, device=meta),
                                            torch.empty(W * 8, K, dtype=torch.int32, device=meta),
                                            torch.empty(W * 8, K, dtype=torch.int32, device=meta),
                                            torch.empty(1, dtype=torch.int32, device=meta), W * T, 1)
    assert (rx.shape, rmeta.shape, rmeta.dtype) == ((W * T, D), (W * T, 2 * K), torch.int32)


def test_slabs_to_mori_inputs_and_back():
    """mori_inputs recovers each token, its destination ranks and local ids from dispatch_pack's
    slabs; received_slabs keeps only live rows and this rank's slots."""
    W, T, K, E_loc = 2, 5, 3, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, 6, generator=g)
    ids = torch.stack([torch.randperm(W * E_loc, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    xs, ws, lid, dest = mori_backend.mori_inputs(*torch.ops.tbo.dispatch_pack(x, ids, w, W, E_loc), W, 1)
    assert torch.equal(xs, x) and torch.equal(ws, w)
    assert torch.equal(dest.long(), ids // E_loc) and torch.equal(lid.long(), ids % E_loc)
    assert dest.dtype == lid.dtype == torch.int32
    out = torch.full((W * 8, 6), float("nan"))
    out[:3] = torch.arange(18.0).view(3, 6)
    # 3 live rows; the stale ones claim "rank 1" and must still be dropped
    out_i = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 0]] + [[1, 1, 1]] * 13, dtype=torch.int32)
    out_s = torch.tensor([[5, 6, 7]] * 16, dtype=torch.int32)
    out_w = torch.full((16, 3), 0.5)
    rx, rmeta = mori_backend.received_slabs(out, out_w, out_s, out_i, torch.tensor([3], dtype=torch.int32), W * T, 1)
    rids, rw = rmeta[:, :K], rmeta[:, K:].view(torch.float32)
    assert torch.equal(rx[:3], out[:3]) and rx[3:].abs().sum() == 0
    assert rids[:3].tolist() == [[-1, 6, 7], [5, 6, 7], [-1, -1, -1]] and (rids[3:] == -1).all()
    assert rw[:3].tolist() == [[0, 0.5, 0.5], [0.5] * 3, [0] * 3] and (rw[3:] == 0).all()


# the probes ------------------------------------------------------------------------------------

def test_cpu_and_cuda_preference_lists_are_unchanged():
    assert torch.version.hip is None
    assert kernels.MODULES["aiter"] == ".aiter_backend"
    assert all("aiter" not in order for order in kernels.PREFERENCE.values())  # reached only when forced


def test_missing_aiter_falls_back_with_one_log_line(without_rocm_libs, caplog):
    kernels.prefer("latent_attention", "aiter")
    args = _mla_inputs(T=3)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        out = [torch.ops.tbo.latent_attention(*args, 0.5) for _ in range(3)]
    assert all(torch.equal(o, torch_ref.latent_attention(*args, 0.5)) for o in out)
    lines = [r.message for r in caplog.records if "aiter" in r.message]
    assert len(lines) == 1 and "kernel backend aiter is unavailable" in lines[0] and "aiter" in lines[0]
    assert kernels.select("latent_attention", args + (0.5,))[0] == "torch"


@pytest.fixture
def fake_pg_world2():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        comm.clear_groups()
        dist.destroy_process_group()


def test_missing_mori_falls_back_with_one_log_line(without_rocm_libs, fake_pg_world2, caplog, monkeypatch):
    """Asked for (backend="mori") or by default on ROCm: without mori the group keeps its other
    backend, and says so once."""
    with caplog.at_level(logging.INFO, logger=comm_select.__name__):
        grp = comm.register_group("g", fake_pg_world2, backend="mori")
        backends = [grp.backend() for _ in range(3)]
    assert [type(b).__name__ for b in backends] == ["TorchDistBackend"] * 3
    lines = [r.message for r in caplog.records if "mori" in r.message]
    assert len(lines) == 1 and "comm backend mori is unavailable" in lines[0] and "torch_dist" in lines[0]
    caplog.clear()
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "cpu:gloo,cuda:nccl")
    with caplog.at_level(logging.INFO, logger=comm_select.__name__):
        defaults = [comm_select.default_backend_name(fake_pg_world2) for _ in range(3)]
    assert defaults == ["nccl"] * 3
    lines = [r.message for r in caplog.records if "mori" in r.message]
    assert len(lines) == 1 and "falling back to nccl" in lines[0]


def test_mori_is_the_rocm_default_and_tbo_comm_overrides(with_fakes, fake_pg_world2, monkeypatch):
    assert comm_select.default_backend_name(fake_pg_world2) == "torch_dist"      # CPU torch: unchanged
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert comm_select.default_backend_name(fake_pg_world2) == "torch_dist"      # gloo: no mori
    monkeypatch.setattr(dist, "get_backend", lambda pg=None: "cpu:gloo,cuda:nccl")
    assert comm_select.default_backend_name(fake_pg_world2) == "mori"
    monkeypatch.setenv("TBO_COMM", "nccl")
    assert comm_select.default_backend_name(fake_pg_world2) == "nccl"


# whole programs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rocm")
    return make_tiny("deepseek_v3", root / "m", seed=4, num_hidden_layers=3, n_routed_experts=8)


def _run(paths, model_dir, steps):
    plans = {k: load_plan(p, model_dir, dtype=torch.float32, policy="tbo") for k, p in paths.items()}
    kv = plans["prefill"].new_kv_cache(sc.NUM_BLOCKS)
    out = [o for _, o in sc.run_steps(lambda p, b: plans[p](*b.args(), kv.caches), kv, steps)]
    chosen: dict[str, set] = {}
    for run in plans.values():
        for variants in run.buckets.values():
            for prog in variants.values():
                for op, names in prog[2].backends().items():
                    chosen.setdefault(op, set()).update(names)
    return out, kv.caches, chosen


def test_tbo_program_with_aiter_equals_torch_reference(with_fakes, tiny_dir, tmp_path, caplog):
    """One rank: the TBO plans (prefill, decode, MTP buckets) with aiter's MLA and fused MoE give
    the logits and KV caches of the same plans on the torch reference kernels."""
    paths = sc.compile_plans(tiny_dir, tmp_path, 1)
    steps = sc.steps(3, 256)
    for op in kernels.AITER_OPS:
        kernels.prefer(op, "torch")
    ref, ref_caches, ref_chosen = _run(paths, tiny_dir, steps)
    assert with_fakes["aiter"].CALLS == []
    for op in kernels.AITER_OPS:
        kernels.prefer(op, "aiter")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        got, caches, chosen = _run(paths, tiny_dir, steps)
    assert ref_chosen["latent_attention"] == ref_chosen["moe_experts"] == {"torch"}
    assert chosen["latent_attention"] == chosen["moe_experts"] == {"aiter"}
    assert not [r for r in caplog.records if "failed on first use" in r.message]   # no silent fallback
    assert [r.message for r in caplog.records if "backend aiter for" in r.message]   # the choice is logged
    fns = [c["fn"] for c in with_fakes["aiter"].CALLS]
    assert "mla_decode_fwd" in fns and "fused_moe" in fns
    assert max(float(a.abs().max()) for a in ref) > 0.5
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= ATOL
    assert max(float((a - b).abs().max()) for a, b in zip(ref_caches, caches)) <= 1e-5


@pytest.mark.slow
def test_ep2_gloo_tbo_program_with_mori_and_aiter(tiny_dir, tmp_path):
    """EP=2 over gloo: on each rank the TBO plans with mori's dispatch/combine and aiter's kernels
    give the logits and caches of the same plans with gloo's all-to-all and the torch kernels; each
    ubatch's exchanges take its own op; mori's calls follow the split-phase order."""
    from tbo_compiler.runtime.launch import run_ranks

    paths = sc.compile_plans(tiny_dir, tmp_path, 2)
    res = run_ranks(fakes.ranks.rank_rocm, 2, str(tiny_dir), {k: str(p) for k, p in paths.items()}, 5)
    for rank, r in enumerate(res):
        assert r["scale"] > 0.5
        assert max(r["logit_diff"]) <= ATOL, (rank, r["logit_diff"])
        assert r["cache_diff"] <= 1e-5
        assert r["ref_backends"]["moe_experts"] == {"torch"}
        assert r["backends"]["latent_attention"] == r["backends"]["moe_experts"] == {"aiter"}
        assert r["aiter_fns"] == ["fused_moe", "mla_decode_fwd"]
        assert (r["backend_type"], r["layout"]) == ("MoriBackend", "compact")
        # shmem from the torch process group, under the group's name; finalize undoes it
        assert r["shmem_name"] == "tbo_ep" and r["shmem_is_world"] and r["finalized"]
        # two ops in all (TBO_MORI_MAX_TOKENS sizes one pair for every bucket), one per ubatch
        assert len(r["ops"]) == 2
        expected, recorded = r["ownership"]
        assert len(expected) == 2 * 2 * 2  # 2 MoE layers x 2 ubatches x (dispatch, combine)
        assert recorded == expected, (expected, recorded)
        _check_mori_calls(r["mori_calls"], r["ops"], rank)
        d = r["direct"]
        for kernel in ("AsyncLL", "IntraNode"):
            torch.testing.assert_close(d[kernel]["y"], d["torch_dist"]["y"], rtol=0, atol=1e-6)
            _check_compact_receive(d[kernel], d["torch_dist"])
        assert r["intranode_calls"] == ["dispatch", "combine", "reset"]


def _check_mori_calls(calls, op_uids, rank):
    inits = [c for c in calls if c[1] == "__init__"]
    assert [c[0] for c in inits] == op_uids
    for _, _, a in inits:
        cfg = a["config"]
        assert (cfg.rank, cfg.world_size, cfg.num_experts_per_rank, cfg.max_num_inp_token_per_rank) == (rank, 2, 1, 16)
        assert cfg.scale_dim == cfg.num_experts_per_token == 3 and cfg.scale_type_size == 4
        assert cfg.hidden_dim == 64 and cfg.data_type == torch.float32 and cfg.max_token_type_size == 4
        assert cfg.kernel_type.name == "AsyncLL"
    phase = ["dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "reset"]
    for uid in op_uids:
        seq = [c[1] for c in calls if c[0] == uid and c[1] != "__init__"]
        assert seq and seq == phase * (len(seq) // len(phase)), seq
    for _, fn, a in calls:
        if fn == "dispatch_send":
            (T, D), K = a["input"][0], 3
            assert a["weights"] == ((T, K), torch.float32) and a["scales"] == ((T, K), torch.int32)
            assert a["indices"] == ((T, K), torch.int32) and a["input"][1] == torch.float32 and D == 64
        if fn == "combine_send":
            assert a["weights"] is None and a["indices"][1] == torch.int32 and a["input"][0][1] == 64


def _check_compact_receive(m, ref):
    """The same (token, local ids, weights) arrive as with the slab all-to-all, compacted to the
    front in mori's order; the rest are zero rows with ids -1."""
    def rows(r):
        live = (r["rids"] >= 0).any(1)
        return live, sorted(zip(r["rx"][live].tolist(), r["rids"][live].tolist(), r["rw"][live].tolist()))
    live_m, got = rows(m)
    _, want = rows(ref)
    assert got == want and len(got) > 0
    n = int(live_m.sum())
    assert live_m[:n].all() and not live_m[n:].any() and m["rx"][n:].abs().sum() == 0
