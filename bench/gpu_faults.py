"""A rank that raises, is killed or hangs mid-step, on NCCL (issue "Reliability", item "a rank dies").

    python3 bench/gpu_faults.py OUT.json                    # 2 GPUs, NCCL (or --out OUT.json)
    python3 bench/gpu_faults.py OUT.json --backend gloo     # CPU dry run

EP=2, a tiny Qwen3-MoE plan (policy "tbo"), prefill steps through `spawn_ranks` (the fault
programs of tests/fault_ranks.py). Rank 1 breaks at step 2; what rank 0 reports, how long it took
and every exit code are recorded per scenario (in this order):
  kill-in-replay      CUDA graphs: rank 1 queues its replay behind ~1 s of GPU sleep and dies, so
                      the replay's collectives never start there (NCCL only)
  raise-in-dispatch   rank 1 raises right after starting its first dispatch (eager program)
  kill-in-dispatch    the same, SIGKILL
  hang-in-dispatch    the same, rank 1 sleeps (alive, never answers); killed after rank 0 fails
  kill-next-agree     as kill-in-dispatch, but no host sync after a step: the next step's
                      agree_num_tokens (a device all_reduce on NCCL) is where rank 0 notices
  kill-watchdog       as kill-in-dispatch, rank 0 syncs with a plain torch.cuda.synchronize():
                      only torch's NCCL watchdog (process-group timeout) can end it (NCCL only;
                      informational, not part of the record's "ok")
Each rank syncs after a step with comm.synchronize (bounded) unless said otherwise.
After step 0 (compile, capture) TBO_COMM_TIMEOUT_S drops to --comm-timeout; the process group
timeout is --pg-timeout. Every scenario is bounded (--limit, and --budget for the whole
run, after which the rest are recorded as skipped; the first scenario gets --first-limit, as its
ranks JIT-compile the Triton kernels); the JSON is written after every scenario and on any failure
of the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SCENARIOS = [  # name, fault, where, graphs, sync, NCCL only; the most telling first
    ("kill-in-replay", "kill", "replay", True, "bounded", True),
    ("raise-in-dispatch", "raise", "dispatch", False, "bounded", False),
    ("kill-in-dispatch", "kill", "dispatch", False, "bounded", False),
    ("hang-in-dispatch", "hang", "dispatch", False, "bounded", False),
    ("kill-next-agree", "kill", "dispatch", False, "none", False),
    ("kill-watchdog", "kill", "dispatch", False, "plain", True),
]


def _verdict(name: str, ranks: list[dict], wall: float, bound: float) -> dict:
    r0 = ranks[0] if ranks else {}
    first = (r0.get("message") or "").split("\n")[0]
    named = "peer rank 1" in first and first.startswith("rank 0:")
    ended = all(r["exitcode"] is not None for r in ranks)
    if name == "kill-watchdog":  # the backstop: did the watchdog end rank 0 (non-zero), or did we kill it
        ok = bool(r0) and r0["exitcode"] not in (0, None) and r0["status"] != "killed"
    else:
        ok = bool(r0) and r0["status"] == "error" and r0["exitcode"] == 1 and named
    return {"ok": ok and ended and wall < bound, "rank0_named_rank1": named, "within_limit": wall < bound,
            "informational": name == "kill-watchdog"}  # what torch does without the runtime's bounded waits


def run_scenario(spec, args, model_dir, plan, log_dir) -> dict:
    from tbo_compiler.runtime.launch import spawn_ranks

    import fault_ranks as fr

    name, fault, where, graphs, sync, _ = spec
    log = log_dir / f"{name}.log"
    opts = {"log_path": str(log), "device": "cuda" if args.backend == "nccl" else "cpu", "graphs": graphs,
            "where": where, "sync": sync, "timeout_s": args.comm_timeout, "steps": 4, "fault_step": 2}
    if name == "kill-watchdog":
        opts["timeout_s"] = 600  # out of the way: only the process group's timeout ends rank 0
    env = {"TBO_COMM_TIMEOUT_S": str(args.warm_timeout), "NCCL_NVLS_ENABLE": "0",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    pg_timeout = args.watchdog_pg_timeout if name == "kill-watchdog" else args.pg_timeout
    rec = {"scenario": name, "fault": fault, "where": where, "graphs": graphs, "sync": sync,
           "comm_timeout_s": opts["timeout_s"], "pg_timeout_s": pg_timeout, "limit_s": args.limit}
    t0 = time.monotonic()
    try:
        outcomes = spawn_ranks(fr.rank_steps, 2, model_dir, plan, fault, opts, backend=args.backend, env=env,
                               pg_timeout=pg_timeout, timeout=args.limit, grace=args.grace)
        rec["ranks"] = [{"rank": o.rank, "status": o.status, "exitcode": o.exitcode, "seconds": o.seconds,
                         "message": None if o.ok else str(o.value)[:4000], "result": o.value if o.ok else None}
                        for o in outcomes]
    except Exception as e:  # noqa: BLE001 - recorded, the next scenario still runs
        rec["ranks"] = []
        rec["launch_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    rec["wall_s"] = round(time.monotonic() - t0, 2)
    rec["steps_done"] = [line for line in log.read_text().splitlines() if line] if log.exists() else []
    rec.update(_verdict(name, rec["ranks"], rec["wall_s"], args.limit + 10))
    if rec["ranks"]:
        rec["rank0_says"] = (rec["ranks"][0]["message"] or "").split("\n")[0]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_path", nargs="?", help="JSON record to write (or --out)")
    ap.add_argument("--out", help="JSON record to write")
    ap.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    ap.add_argument("--comm-timeout", type=float, default=6.0, help="TBO_COMM_TIMEOUT_S after step 0")
    ap.add_argument("--warm-timeout", type=float, default=90.0, help="TBO_COMM_TIMEOUT_S for step 0")
    ap.add_argument("--pg-timeout", type=float, default=60.0, help="init_process_group(timeout=)")
    ap.add_argument("--watchdog-pg-timeout", type=float, default=12.0, help="kill-watchdog's process-group timeout")
    ap.add_argument("--grace", type=float, default=None,
                    help="seconds the other rank gets after the first failure (default: --comm-timeout + 8, "
                         "so the survivor's own timeout can fire before it is killed)")
    ap.add_argument("--limit", type=float, default=40.0, help="bound of one scenario (seconds)")
    ap.add_argument("--first-limit", type=float, default=80.0, help="bound of the first scenario (seconds)")
    ap.add_argument("--budget", type=float, default=175.0, help="bound of the whole run (seconds)")
    ap.add_argument("--only", nargs="*", help="run only these scenarios")
    args = ap.parse_args(argv)
    if not (args.out or args.out_path):
        ap.error("give the JSON path (OUT.json or --out OUT.json)")
    out = Path(args.out or args.out_path)
    if args.grace is None:
        args.grace = args.comm_timeout + 8.0
    out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer `timeout`: still write the record
    t_start = time.monotonic()
    record: dict = {"backend": args.backend, "args": vars(args), "scenarios": [], "ok": False}

    def write():
        record["wall_s"] = round(time.monotonic() - t_start, 2)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, out)

    try:
        import torch

        record["torch"] = torch.__version__
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        if args.backend == "nccl" and torch.cuda.device_count() < 2:
            raise SystemExit("--backend nccl needs 2 GPUs (use --backend gloo for a CPU dry run)")
        try:
            record["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if args.backend == "nccl" else None
        except Exception:  # noqa: BLE001
            record["nccl"] = None
        import fault_ranks as fr
        from tbo_compiler.models.tiny import make_tiny

        work = Path(tempfile.mkdtemp(prefix="tbo_faults_"))
        model_dir = make_tiny("qwen3_moe", work / "model", seed=1, num_experts=8)
        gpu = args.backend == "nccl"
        plan = fr.compile_plan(model_dir, work / "plan.pt", dtype=torch.bfloat16 if gpu else torch.float32,
                               profile="h200" if gpu else "cpu")
        record["setup_s"] = round(time.monotonic() - t_start, 2)
        write()
        for spec in SCENARIOS:
            name, nccl_only = spec[0], spec[5]
            if args.only and name not in args.only:
                continue
            left = args.budget - (time.monotonic() - t_start)
            if nccl_only and args.backend != "nccl":
                record["scenarios"].append({"scenario": name, "skipped": "needs NCCL on GPUs"})
            elif left < 20:
                record["scenarios"].append({"scenario": name, "skipped": f"budget spent ({args.budget:g} s)"})
            else:
                first = not any("skipped" not in r for r in record["scenarios"])
                a = argparse.Namespace(**{**vars(args), "limit": min(args.first_limit if first else args.limit,
                                                                     left - 5)})
                rec = run_scenario(spec, a, str(model_dir), str(plan), work)
                record["scenarios"].append(rec)
                print(f"{name}: ok={rec['ok']} wall={rec['wall_s']} s  rank 0: {rec.get('rank0_says', '')[:200]}",
                      flush=True)
            write()
        ran = [s for s in record["scenarios"] if "skipped" not in s and not s["informational"]]
        record["ok"] = bool(ran) and all(s["ok"] for s in ran)
    except BaseException as e:  # noqa: BLE001 - the record is written whatever happened
        record["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        write()
    print(f"wrote {out} (ok={record['ok']}, {record['wall_s']} s)")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
