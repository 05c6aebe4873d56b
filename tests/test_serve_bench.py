"""bench/serve_bench.py: the continuous-batching loop on a tiny Qwen3-MoE (fp32, CPU).

Prompts of 10..12 tokens under a token budget of 8 per step, so every prefill is chunked and
mixed steps carry decode tokens beside prefill chunks; 4 KV-cache entries per block."""
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # spawned ranks inherit it
import serve_bench as sb  # noqa: E402

from tbo_compiler.models import load_model  # noqa: E402
from tbo_compiler.models.tiny import make_tiny  # noqa: E402

N, IN_LEN, OUT_LEN, BUDGET, BLOCK = 8, 12, 6, 8, 4


def _cfg(model_dir, work, **kw):
    cfg = {"model_dir": str(model_dir), "slice": None, "ep": 1, "modes": ["serial", "tbo", "auto"],
           "num_requests": N, "input_len": IN_LEN, "output_len": OUT_LEN, "concurrency": [2, 4],
           "request_rate": None, "token_budget": BUDGET, "prefill_buckets": [], "decode_buckets": [],
           "block_size": BLOCK, "num_blocks": None, "dtype": "float32", "seed": 3, "warmup": True,
           "work_dir": str(work), "plot": False}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _steady():
    """pytest's log capture enables every level, and torch's structured trace logger then spends
    seconds per plan compile formatting records nobody reads; and on a loaded 2-core machine
    torch's intra-op threads spin against other processes (seconds per step). Both set back after."""
    trace = logging.getLogger("torch.__trace")
    level, threads = trace.level, torch.get_num_threads()
    trace.setLevel(logging.INFO)
    torch.set_num_threads(1)
    yield
    trace.setLevel(level)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bench")
    d = make_tiny("qwen3_moe", root / "tiny_qwen3", seed=0)
    cfg = sb.setup(_cfg(d, root / "work"))
    return d, cfg


@pytest.fixture(scope="module")
def served(tiny):
    """Every (mode, concurrency) at EP=1, raw results."""
    _, cfg = tiny
    return sb.rank_serve(0, 1, cfg)


@torch.no_grad()
def _alone(model, req) -> list[int]:
    """The request served alone, eagerly: the whole prompt in one step, then one token per step."""
    kv = model.new_kv_cache(64)
    out, new = [], list(req.prompt)
    for _ in range(req.output_len):
        b = kv.make_batch([(req.rid, new)])
        new = [int(model(*b.args(), kv.caches)[-1].argmax())]
        out.append(new[0])
    return out


@pytest.fixture(scope="module")
def reference(tiny):
    d, cfg = tiny
    model = load_model(d, dtype=torch.float32, block_size=BLOCK)
    reqs = sb.make_workload(N, IN_LEN, OUT_LEN, model.config.vocab_size, seed=cfg["seed"])
    return reqs, {r.rid: _alone(model, r) for r in reqs}


def test_workload_is_seeded_and_in_range():
    a = sb.make_workload(64, 100, 50, 256, seed=1)
    assert a == sb.make_workload(64, 100, 50, 256, seed=1) != sb.make_workload(64, 100, 50, 256, seed=2)
    assert all(80 <= len(r.prompt) <= 100 and 40 <= r.output_len <= 50 and r.arrival == 0 for r in a)
    assert len({len(r.prompt) for r in a}) > 5  # lengths drawn, not constant
    p = sb.make_workload(64, 100, 50, 256, seed=1, request_rate=100.0)
    arr = [r.arrival for r in p]
    assert arr == sorted(arr) and 0 < arr[0] and 0.3 < arr[-1] < 1.3  # ~64 / 100 s


def test_scheduler_mixes_decode_with_chunked_prefill_under_the_budget():
    """The scheduler alone (no model: token 7 sampled every time): a step never exceeds the budget,
    decode tokens ride along with prefill chunks, a long prompt spans steps, every block comes back."""
    from tbo_compiler.models.batch import PagedKVCache

    reqs = sb.make_workload(5, 20, 4, 256, seed=9)
    kv = PagedKVCache([(1,)], num_blocks=64, block_size=BLOCK)
    sched = sb.Scheduler(reqs, kv, concurrency=3, token_budget=BUDGET, max_blocks=8)
    shapes, chunks = [], {}
    for step in range(200):
        sched.admit(0.0)
        dec, pre = sched.plan()
        if not sched.flag(dec, pre):
            break
        entries = dec + pre
        kv.make_batch([(s.req.rid, new) for s, new, _ in entries])
        assert sum(len(n) for _, n, _ in entries) <= BUDGET and len(sched.live) <= 3
        shapes.append((len(dec), len(pre)))
        for s, new, _ in pre:
            chunks.setdefault(s.req.rid, []).append(len(new))
        sched.finish_step(entries, [7] * sum(smp for _, _, smp in entries), float(step))
    assert sorted(r["rid"] for r in sched.done) == list(range(5))
    assert all(r["tokens"] == [7] * r["output_len"] for r in sched.done)
    assert any(d and p for d, p in shapes)  # mixed steps
    assert all(sum(c) == len(reqs[rid].prompt) and len(c) >= 2 for rid, c in chunks.items())  # chunked
    assert sb.free_blocks(kv) == kv.num_blocks - 1 and sched.committed == 0


def test_every_request_gets_its_output_length_and_the_greedy_tokens_of_serving_it_alone(served, reference):
    reqs, ref = reference
    want = {r.rid: r.output_len for r in reqs}
    assert len(served) == 6  # 3 modes x 2 concurrencies
    for res in served:
        got = {r["rid"]: r["tokens"] for r in res["requests"]}
        assert {rid: len(t) for rid, t in got.items()} == want, (res["mode"], res["concurrency"])
        assert got == ref, (res["mode"], res["concurrency"])
        assert res["steps"]["mixed"] > N  # prompts longer than the budget: prefill was chunked
    ran = {res["mode"]: {(k, b): v for k, d in res["decisions"].items() for b, v in d.items()} for res in served}
    assert set(ran["serial"].values()) == {"serial"}  # the modes ran what they say (a 1-token bucket
    assert {v for (_, b), v in ran["tbo"].items() if b > 1} == {"tbo"}  # has no TBO program)


def test_summary_fields_are_consistent(served, reference):
    reqs, _ = reference
    for res in served:
        s = sb.summarize([res], 1)
        assert s["successful_requests"] == N
        assert s["total_input_tokens"] == sum(len(r.prompt) for r in reqs)
        assert s["total_generated_tokens"] == sum(r.output_len for r in reqs)
        # every prompt token once, every generated token but the last fed back once
        assert s["steps"]["real_tokens"] == s["total_input_tokens"] + s["total_generated_tokens"] - N
        d = s["duration_s"]
        assert s["request_throughput"] == pytest.approx(N / d)
        assert s["output_throughput"] == pytest.approx(s["total_generated_tokens"] / d)
        assert s["total_token_throughput"] == pytest.approx((s["total_input_tokens"] + s["total_generated_tokens"]) / d)
        assert s["output_throughput_per_gpu"] == pytest.approx(s["output_throughput"])
        assert 0 < s["padded_token_share"] < 1
        for m in ("ttft", "tpot", "itl", "e2e"):
            assert 0 < s[f"median_{m}_ms"] <= s[f"p99_{m}_ms"]
        assert s["mean_ttft_ms"] <= s["mean_e2e_ms"]
        assert 0 < s["host_share"] < 1 and s["steps"]["empty"] == 0  # one rank: never an empty step
        assert s["loop_cost"] is None  # CPU: no CUDA events, so no GPU step time to compare with
    table = sb.table([{"mode": r["mode"], "concurrency": r["concurrency"], **sb.summarize([r], 1)} for r in served])
    assert table.count("\n") == len(sb.TABLE) + 1 and "| Successful requests | 8 | 8 |" in table


def test_kv_blocks_are_freed_and_admission_respects_the_cache(tiny):
    """A cache holding two requests' contexts: never more than two in flight, all blocks back."""
    d, cfg = tiny
    from tbo_compiler import load_plan

    runs = {k: load_plan(p, d, policy="serial") for k, p in cfg["plans"].items()}
    model = runs["prefill"].model
    reqs = sb.make_workload(6, IN_LEN, OUT_LEN, model.config.vocab_size, seed=5)
    per_req = -(-(IN_LEN + OUT_LEN) // BLOCK)
    kv = model.new_kv_cache(2 * per_req + 1)
    res = sb.serve_loop(runs, kv, reqs, concurrency=4, token_budget=BUDGET, max_blocks=cfg["max_blocks"])
    assert sorted(len(r["tokens"]) for r in res["requests"]) == sorted(r.output_len for r in reqs)
    assert sb.free_blocks(kv) == kv.num_blocks - 1 and all(kv.num_cached(r.rid) == 0 for r in reqs)
    spans = [(r["admitted"], r["times"][-1]) for r in res["requests"]]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == res["max_running"] == 2  # the cache
    assert max(r["admitted"] - r["sent"] for r in res["requests"]) > 0  # bound it, not the 4 slots


def test_overlap_serves_the_same_tokens(tiny):
    """overlap=True (the host one step ahead, sampled ids patched into the next batch on the
    device): every request gets exactly the tokens of the plain loop, in the same number of steps,
    and every KV block comes back. Chunked prefill (budget < prompts) and decode steps mixed."""
    d, cfg = tiny
    from tbo_compiler import load_plan

    runs = {k: load_plan(p, d, policy="serial") for k, p in cfg["plans"].items()}
    model = runs["prefill"].model
    reqs = sb.make_workload(6, IN_LEN, OUT_LEN, model.config.vocab_size, seed=3)
    got = {}
    for overlap in (False, True):
        kv = model.new_kv_cache(64)
        res = sb.serve_loop(runs, kv, reqs, concurrency=4, token_budget=BUDGET, max_blocks=cfg["max_blocks"],
                            overlap=overlap)
        assert sb.free_blocks(kv) == kv.num_blocks - 1
        toks = {r["rid"]: r["tokens"] for r in res["requests"]}
        assert all(isinstance(t, int) for ts in toks.values() for t in ts)  # every placeholder resolved
        assert all(len(r["times"]) == len(r["tokens"]) and r["times"] == sorted(r["times"]) for r in res["requests"])
        got[overlap] = (toks, res["steps"]["mixed"], res["steps"]["decode"])
    assert got[True] == got[False]
    assert got[True][1] > 1 and got[True][2] > 1


def test_poisson_arrivals_wait_for_their_time(tiny):
    d, cfg = tiny
    from tbo_compiler import load_plan

    runs = {k: load_plan(p, d, policy="auto") for k, p in cfg["plans"].items()}
    model = runs["prefill"].model
    reqs = sb.make_workload(6, IN_LEN, OUT_LEN, model.config.vocab_size, seed=5, request_rate=200.0)
    kv = model.new_kv_cache(64)
    res = sb.serve_loop(runs, kv, reqs, concurrency=4, token_budget=BUDGET, max_blocks=cfg["max_blocks"])
    arrival = {r.rid: r.arrival for r in reqs}
    assert len(res["requests"]) == 6
    assert all(r["sent"] >= arrival[r["rid"]] and r["times"][0] > r["sent"] for r in res["requests"])
    assert res["duration"] >= max(arrival.values())
    assert sb.free_blocks(kv) == kv.num_blocks - 1


def test_cli_writes_json_and_table(tiny, tmp_path, capsys):
    d, _ = tiny
    rc = sb.main(["--model-dir", str(d), "--dtype", "float32", "--num-requests", "4", "--input-len", "10",
                  "--output-len", "3", "--concurrency", "2", "--token-budget", "8", "--block-size", "4",
                  "--modes", "serial,auto", "--out", str(tmp_path), "--plot"])
    assert rc == 0
    data = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [(r["mode"], r["concurrency"], r["successful_requests"]) for r in data["results"]] == \
        [("serial", 2, 4), ("auto", 2, 4)]
    assert "Output token throughput" in capsys.readouterr().out
    assert (tmp_path / "serve_bench.md").read_text().startswith("`python bench/serve_bench.py --model-dir")
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "serve_bench_throughput.png").exists() == has_mpl  # --plot skips without it


def test_cli_overlap_both_side_by_side(tiny, tmp_path):
    """--overlap both: each concurrency served without and with the host a step ahead, one process,
    the same requests and tokens counted."""
    d, _ = tiny
    rc = sb.main(["--model-dir", str(d), "--dtype", "float32", "--num-requests", "4", "--input-len", "10",
                  "--output-len", "3", "--concurrency", "2", "--token-budget", "8", "--block-size", "4",
                  "--modes", "serial", "--overlap", "both", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "serve_bench.json").read_text())["results"]
    assert [(r["mode"], r["concurrency"], r["successful_requests"]) for r in rows] == \
        [("serial", 2, 4), ("serial+overlap", 2, 4)]
    assert rows[0]["total_generated_tokens"] == rows[1]["total_generated_tokens"] == 4 * 3


@pytest.mark.slow
def test_ep2_ranks_serve_their_own_requests(tiny, reference, tmp_path):
    """EP=2 over gloo: request i on rank i % 2, ranks with different loads (the one that finishes
    first keeps stepping with padding only) agree every step; every request's tokens equal it
    served alone at EP=1, and the merged summary adds up."""
    d, _ = tiny
    reqs, ref = reference
    from tbo_compiler.runtime.launch import run_ranks

    cfg = sb.setup(_cfg(d, tmp_path, ep=2, modes=["tbo"], concurrency=[3]))
    per_rank = run_ranks(sb.rank_serve, 2, cfg)
    assert [sorted(r["rid"] for r in pr[0]["requests"]) for pr in per_rank] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    got = {r["rid"]: r["tokens"] for pr in per_rank for r in pr[0]["requests"]}
    assert got == ref
    steps = [pr[0]["steps"] for pr in per_rank]
    assert [s["mixed"] + s["decode"] for s in steps] == [steps[0]["mixed"] + steps[0]["decode"]] * 2  # in step
    s = sb.merge(per_rank, 2)[0]
    assert s["successful_requests"] == N and s["num_gpus"] == 2
    assert s["total_generated_tokens"] == sum(r.output_len for r in reqs)
    assert s["steps"]["real_tokens"] == sum(len(r.prompt) + r.output_len - 1 for r in reqs)
    assert s["output_throughput_per_gpu"] == pytest.approx(s["output_throughput"] / 2)
    assert set(s["decisions"]["prefill"].values()) == {"tbo"}
    assert s["steps"]["empty"] > 0  # a rank with nothing to do took part in steps, padding only


def test_host_cost_script_runs_the_loop_over_a_no_op_plan():
    """bench/serve_host.py: the loop's host time per step with no model, both loop kinds."""
    import serve_host

    for overlap in (False, True):
        ms, steps = serve_host.host_ms_per_step(num_requests=8, input_len=64, output_len=8, concurrency=8,
                                                token_budget=128, block_size=16, repeat=1, overlap=overlap)
        assert ms > 0 and steps > 8
