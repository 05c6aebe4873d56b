"""Does `policy="auto"` measure what the bench measures? On EP=4 NVLink prefill 4096 the first-step
measurement, then single replays alternated between TBO and serial, found TBO 3-5 % faster than
serial, while the bench's steady-state timing of the same two CUDA graphs found it 1-3 % slower.
This times both graphs of one bucket several ways, in one process group, and writes JSON:

  decision      what PlanModule measured on the bucket's first step (runtime/graphs.py
                `time_replays`: blocks of back-to-back replays, A B B A)
  alternating   the earlier measurement: single replays alternated, a host sync after each
                (5 and 20 per variant)
  bench         the bench's `timed` (each step through PlanModule: agreement, copies, replay)
  blocks        10 replays back to back between two events, no host sync between them

    python3 bench/auto_check.py OUT.json [--tokens 4096,8192] [--link nvlink|p2p_off]
(run it with `nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv -lms 100` beside it to see
the clocks.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tbo_bench as tb  # noqa: E402


def _blocks(fn, n: int = 10) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def _alternating(fns: dict, reps: int = 5) -> dict[str, float]:
    """Median ms of single calls alternated between the callables, a host sync after each."""
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times[k].append(s.elapsed_time(e))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def rank_main(rank, world, cfg):
    import torch.distributed as dist

    from tbo_compiler.load import programs_of
    from tbo_compiler.plan import read_plan
    from tbo_compiler.runtime.plan_module import PlanModule

    dev = torch.device("cuda", rank)
    model = tb.random_model(cfg["model_dir"], rank, world, torch.bfloat16, dev)
    run = PlanModule(programs_of(read_plan(cfg["plan"]), dev), model, dev, ep=world, group="ep", policy="auto")
    out = []
    for T in cfg["tokens"]:
        user, nblocks = tb.synthetic_batch("prefill", T, model.config.vocab_size, seed=100 * rank + T, device=dev)
        kv = model.new_kv_cache(max(nblocks, 2), device=dev)
        args = (*user, kv.caches)
        full = list(user) + list(kv.caches)
        graphs = {v: (lambda v=v: run.buckets[T][v][3](*run.args_for(T, v, full))) for v in ("tbo", "serial")}
        row = {"tokens_per_rank": T, "t0": time.time()}
        with torch.no_grad():
            run(*args)  # first step: captures both, measures, decides
            row["decision"] = run.decisions[T]
            dist.barrier()
            row["alternating_5"] = _alternating(graphs)
            row["alternating_20"] = _alternating(graphs, reps=20)
            for i, order in enumerate((("serial", "tbo"), ("tbo", "serial"))):
                for v in order:
                    dist.barrier()
                    row[f"bench_{v}_{i}"] = tb.timed(lambda v=v: run(*args, variant=v), 10)
            for i in range(3):
                for v in ("serial", "tbo"):
                    dist.barrier()
                    row[f"blocks_{v}_{i}"] = _blocks(graphs[v])
            dist.barrier()
            row["alternating_5_after"] = _alternating(graphs)
        row["t1"] = time.time()
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=tb._ints, default=[4096, 8192])
    ap.add_argument("--link", default="nvlink", choices=["nvlink", "p2p_off"])
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from tbo_compiler.runtime.launch import run_ranks

    tmp = Path(tempfile.mkdtemp(prefix="tbo_auto_"))
    model_dir = tb.write_slice(tmp / "slice", a.world)
    plans = tb.compile_plans(model_dir, a.world, {"bfloat16": {"prefill": a.tokens}}, tmp)
    cfg = {"model_dir": str(model_dir), "plan": plans[("prefill", "bfloat16")], "tokens": a.tokens}
    env = {"NCCL_P2P_DISABLE": "1"} if a.link == "p2p_off" else {}
    res = run_ranks(rank_main, a.world, cfg, backend="nccl", env=env, timeout=500)
    Path(a.out).write_text(json.dumps({"world": a.world, "link": a.link, "ranks": res}, indent=1))
    for r, rows in enumerate(res):
        for row in rows:
            print(r, json.dumps({k: v for k, v in row.items() if k not in ("t0", "t1")}))


if __name__ == "__main__":
    main()
