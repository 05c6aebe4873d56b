"""Run a function on N processes joined by a real process group (tests, demo, GPU scripts).

    results = run_ranks(fn, world, *args)   # fn(rank, world, *args) -> picklable result
    run_ranks(fn, world, *args, backend="nccl")  # one GPU per rank
    run_ranks(fn, world, *args, env={"NCCL_P2P_DISABLE": "1"})  # set in each rank before init
    run_ranks(fn, world, *args, pg_timeout=30)   # the process group's own timeout (NCCL watchdog)
    outcomes = spawn_ranks(fn, world, *args)     # per rank: status, result or error, exit code, time

Each rank registers the group as "ep" for the tbo comm ops. Rendezvous through a file store,
results come back through files; `run_ranks` raises one RuntimeFailure with every failed rank's
error, `spawn_ranks` returns what each rank did. A rank writes its result before tearing its
process group down (after a barrier, so no peer is mid-collective). A rank that fails announces
it in the store (its peers' errors then quote it, see runtime/comm/faults.py) and exits without
teardown: collectives its peers still wait in must not turn one rank's error into another rank's
abort. Its peers then get `grace` seconds (default TBO_COMM_TIMEOUT_S + 10: what a peer stuck in
a collective needs to time out) to fail with their own errors before they are killed; nothing
runs past `timeout`.
"""
from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.runtime.env import COMM_TIMEOUT_ENV, FLAGS


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    status: str            # ok | error (fn raised) | died (ended without a result) | killed (by us, still running)
    value: Any             # fn's result when ok, else a message (an error with its traceback)
    exitcode: int | None   # the process's exit code; negative: the signal that ended it
    seconds: float         # from the start until the process ended

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _error_text(rank: int, e: BaseException) -> str:
    msg = str(e)  # runtime errors of a rank already start with "rank N:"
    head = msg if msg.startswith(f"rank {rank}:") else f"rank {rank}: {type(e).__name__}: {msg}"
    return f"{head}\n{traceback.format_exc().rstrip()}"


def _write(out: str, res) -> None:
    with open(out + ".tmp", "wb") as f:
        pickle.dump(res, f)
    os.replace(out + ".tmp", out)


def _entry(rank, world, fn, args, tmp, backend, env, pg_timeout):
    os.environ.update(env)  # before anything reads it (NCCL reads its variables at init)
    import torch
    import torch.distributed as dist

    from tbo_compiler.runtime import comm

    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        kw = {"timeout": timedelta(seconds=pg_timeout)} if pg_timeout else {}
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=rank, world_size=world, **kw)
        comm.register_group("ep", dist.group.WORLD)
        comm.faults.on_abort(lambda msg: _write(out, ("error", f"rank {rank}: PeerFailure: {msg}")))
        res = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - sent to the parent
        comm.announce_failure(e)  # first: our exit is what breaks the peers' collectives
        _write(out, ("error", _error_text(rank, e)))
        # exit inside the handler, no teardown: peers may sit in a collective with us, and freeing
        # the failed step's frames (CUDA graphs, their memory pool) can block behind a collective
        # left spinning on this GPU
        os._exit(1)
    _write(out, res)
    try:  # a barrier before teardown, bounded like every collective (a peer gone now is named)
        comm.agree_num_tokens(0, "ep")
    except BaseException as e:  # noqa: BLE001 - this rank finished; its peer did not
        _write(out, ("error", _error_text(rank, e)))
        os._exit(1)
    # end without the interpreter's finalisation: the result is written and every peer is past the
    # barrier. A process group still referenced then is freed during finalisation, where gloo's
    # worker threads can abort the process ("terminate called without an active exception", ~5 %
    # of the demo's runs before; comm's atexit hook guards other programs the same way)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _default_grace(env: dict) -> float:
    raw = str(env.get(COMM_TIMEOUT_ENV, os.environ.get(COMM_TIMEOUT_ENV, ""))).strip()
    default = FLAGS[COMM_TIMEOUT_ENV].default + 10.0
    try:
        return float(raw) + 10.0 if raw else default
    except ValueError:
        return default  # the ranks themselves report the bad value


def _ended_text(rank: int, code: int | None, seconds: float) -> str:
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"ended by signal {-code}"
    else:
        how = f"exited with code {code}"
    return f"rank {rank}: {how} after {seconds:.1f} s, without a result"


def spawn_ranks(fn, world: int, *args, timeout: float = 600.0, backend: str = "gloo", env: dict | None = None,
                pg_timeout: float | None = None, grace: float | None = None) -> list[RankOutcome]:
    """Run fn(rank, world, *args) on `world` spawned ranks; what each rank did, never a hang."""
    env = dict(env or {})
    grace = _default_grace(env) if grace is None else grace
    with tempfile.TemporaryDirectory(prefix="tbo_ranks_") as tmp:
        t0 = time.monotonic()
        ctx = mp.start_processes(_entry, args=(world, fn, args, tmp, backend, env, pg_timeout), nprocs=world,
                                 join=False, start_method="spawn")
        procs = ctx.processes
        # Step 1: wait for every rank; after the first failure the rest get `grace` seconds
        running = {p.sentinel: r for r, p in enumerate(procs)}
        ended: dict[int, float] = {}
        first_failure: tuple[int, float] | None = None
        try:
            while running:
                limit = t0 + timeout
                if first_failure is not None:
                    limit = min(limit, first_failure[1] + grace)
                ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, limit - time.monotonic()))
                if not ready:
                    break
                for s in ready:
                    r = running.pop(s)
                    procs[r].join()
                    ended[r] = time.monotonic()
                    if procs[r].exitcode != 0 and first_failure is None:
                        first_failure = (r, ended[r])
        except BaseException:  # interrupted (Ctrl-C, SIGTERM as SystemExit): leave no rank behind
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise
        # Step 2: kill what is still running (a rank stuck in a collective or a hung peer)
        killed = {}
        for s, r in running.items():
            procs[r].kill()
            procs[r].join()
            now = time.monotonic()
            why = (f"{now - first_failure[1]:.1f} s after rank {first_failure[0]} failed" if first_failure
                   else f"its {timeout:g} s limit")
            killed[r] = (now, f"rank {r}: still running after {now - t0:.1f} s ({why}); killed")
        # Step 3: each rank's outcome
        outcomes = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pkl")
            loaded = None
            if os.path.exists(path):
                with open(path, "rb") as f:
                    loaded = pickle.load(f)
            end = killed[r][0] if r in killed else ended[r]
            if loaded is not None:
                status, value = loaded
            elif r in killed:
                status, value = "killed", killed[r][1]
            else:
                status, value = "died", _ended_text(r, p.exitcode, end - t0)
            outcomes.append(RankOutcome(r, status, value, p.exitcode, round(end - t0, 3)))
        return outcomes


def run_ranks(fn, world: int, *args, timeout: float = 600.0, backend: str = "gloo", env: dict | None = None,
              pg_timeout: float | None = None, grace: float | None = None) -> list:
    """`spawn_ranks`, returning the ranks' results, or raising one RuntimeFailure with every
    failed rank's error (the first rank's is often only "connection closed" by the real culprit)."""
    outcomes = spawn_ranks(fn, world, *args, timeout=timeout, backend=backend, env=env, pg_timeout=pg_timeout,
                           grace=grace)
    errors = [o.value for o in outcomes if not o.ok]
    if errors:
        raise RuntimeFailure("\n\n".join(errors))
    if any(o.exitcode != 0 for o in outcomes):
        codes = ", ".join(f"rank {o.rank}: {o.exitcode}" for o in outcomes)
        raise RuntimeFailure(f"every rank returned its result, then one died tearing down (exit codes {codes})")
    return [o.value for o in outcomes]
