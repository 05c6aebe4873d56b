"""Run a function on N CPU processes joined by a real gloo process group (tests, demo).

    results = run_ranks(fn, world, *args)   # fn(rank, world, *args) -> picklable result
    run_ranks(fn, world, *args, backend="nccl")  # one GPU per rank
    run_ranks(fn, world, *args, env={"NCCL_P2P_DISABLE": "1"})  # set in each rank before init

Each rank registers the group as "ep" for the tbo comm ops. Rendezvous through a file store,
results come back through files, a rank's exception is re-raised in the caller with its rank.
A rank writes its result before tearing its process group down (after a barrier, so no peer is
mid-collective), and a rank that failed exits without teardown: collectives its peers still wait
in must not turn one rank's error into another rank's abort.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch.multiprocessing as mp

from tbo_compiler.ops.errors import RuntimeFailure


def _entry(rank, world, fn, args, tmp, backend, env):
    os.environ.update(env)  # before anything reads it (NCCL reads its variables at init)
    import torch
    import torch.distributed as dist

    from tbo_compiler.runtime import comm

    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=rank, world_size=world)
        comm.register_group("ep", dist.group.WORLD)
        res = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - sent to the parent
        res = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(out + ".tmp", "wb") as f:
        pickle.dump(res, f)
    os.replace(out + ".tmp", out)
    if res[0] != "ok":
        os._exit(1)  # peers may sit in a collective with us: no teardown that could wait or abort
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 600.0, backend: str = "gloo", env: dict | None = None):
    with tempfile.TemporaryDirectory(prefix="tbo_ranks_") as tmp:
        deadline = time.monotonic() + timeout
        ctx = mp.start_processes(_entry, args=(world, fn, args, tmp, backend, dict(env or {})), nprocs=world,
                                 join=False, start_method="spawn")
        died = None
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"ranks did not finish in {timeout} s")
        except mp.ProcessExitedException as e:  # join has stopped the other ranks
            died = e
        loaded = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    loaded.append(pickle.load(f))
            else:
                loaded.append(("error", f"rank {r}: exited without a result ({died or 'no result file'})"))
        # every rank's error: the first rank's is often only "connection closed" by the real culprit
        errors = [val for status, val in loaded if status != "ok"]
        if errors:
            raise RuntimeFailure("\n\n".join(errors))
        if died is not None:
            raise RuntimeFailure(f"every rank returned its result, then one died tearing down: {died}")
        return [val for _, val in loaded]
