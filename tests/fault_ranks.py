"""Rank programs of the fault tests (importable by spawned ranks; bench/gpu_faults.py uses them too).

`rank_steps` serves a few prefill steps of a tiny EP=2 plan; at step `fault_step` the `faulty`
rank breaks in the middle of it, right after starting its first dispatch (the start is issued, the
program never waits for it):
    raise   a Python exception (an error in the rank's own code)
    kill    SIGKILL of its own process (an OOM kill, a crashed node)
    hang    sleeps far longer than any timeout (a stuck rank that is still alive)
Each rank appends "rank R step S" to `log_path` after each finished step, so a test can see that
the steps before the fault ran.

`rank_agree` runs steps where one rank has no tokens, through a plan and through torch.compile,
and returns what each rank decided (bucket, program, cut, shapes), for the parent to compare.
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from tbo_compiler.ops.errors import RuntimeFailure

BLOCK_SIZE, MAX_BLOCKS, NUM_BLOCKS = 4, 8, 48
PLAN = dict(mode="prefill", token_counts=(4, 10))
FAULTS = ("raise", "kill", "hang")


def compile_plan(model_dir, path, dtype=torch.float32, profile="cpu"):
    """The tiny EP=2 plan the fault and agreement programs run (buckets of 4 and 10 tokens)."""
    from tbo_compiler.compile import compile_model_dir

    compile_model_dir(model_dir, path, ep=2, dtype=dtype, block_size=BLOCK_SIZE, max_blocks=MAX_BLOCKS,
                      profile=profile, **PLAN)
    return path


def _load(rank, model_dir, plan_path, policy, device="cpu", graphs=None):
    from tbo_compiler import load_plan

    return load_plan(plan_path, model_dir, rank=rank, policy=policy, device=device, graphs=graphs)


def fail(fault: str):
    if fault == "raise":
        raise RuntimeError("injected fault: this rank's own code raised mid-step")
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    raise RuntimeFailure(f"unknown fault {fault!r} ({', '.join(FAULTS)})")


def arm(fault: str, backend_cls):
    """The next `dispatch` of `backend_cls` starts its collective, then does `fault`."""
    orig = backend_cls.dispatch

    def dispatch(self, *a):
        pending = orig(self, *a)
        backend_cls.dispatch = orig
        fail(fault)
        return pending

    backend_cls.dispatch = dispatch


def arm_replay(fault: str, run):
    """CUDA graphs: the next step's replay is queued behind ~1 s of GPU sleep, then `fault`
    (the replay's collectives never run on this rank, its peers' wait in them)."""
    args_for = run.args_for

    def delayed(*a):
        run.args_for = args_for
        torch.cuda._sleep(2_000_000_000)
        return args_for(*a)

    run.args_for = delayed


def rank_steps(rank, world, model_dir, plan_path, fault, opts=None):
    """Prefill steps of the plan; the fault on rank `faulty` at step `fault_step`. opts:
    faulty (1), fault_step (2), steps (4), log_path, device ("cpu"), graphs (False), dtype-free;
    where: "dispatch" (after its first dispatch started; eager programs), "between" (before the
    step), "replay" (right after queuing a CUDA-graph replay that cannot start yet);
    sync: after each step "bounded" (comm.synchronize), "plain" (torch.cuda.synchronize, only
    NCCL's watchdog bounds it) or "none" (the next step's agreement notices);
    timeout_s: TBO_COMM_TIMEOUT_S from step 1 on (step 0 compiles and captures under the
    environment's, then the ranks agree once, so a slow first step is no false alarm)."""
    from tbo_compiler.runtime import comm

    o = {"faulty": 1, "fault_step": 2, "steps": 4, "log_path": None, "device": "cpu", "graphs": False,
         "where": "dispatch", "sync": "bounded", "timeout_s": None, **(opts or {})}
    run = _load(rank, model_dir, plan_path, "tbo", o["device"], o["graphs"])
    kv = run.new_kv_cache(NUM_BLOCKS)
    for step in range(o["steps"]):
        n = 5 if rank == 0 else 3  # uneven: the ranks pad to one bucket
        reqs = [(f"s{step}", [1 + (7 * step + i) % 50 for i in range(n)])]
        armed = rank == o["faulty"] and step == o["fault_step"]
        if step == o["fault_step"] and os.environ.get("TBO_FAULT_STACKS"):  # where a survivor blocks
            import faulthandler
            faulthandler.dump_traceback_later(float(o["timeout_s"] or 6) + 3, exit=False)
        if armed and o["where"] == "between":
            fail(fault)
        if armed and o["where"] == "dispatch":
            arm(fault, type(comm.backend_for("ep", world)))
        if armed and o["where"] == "replay":
            arm_replay(fault, run)
        with torch.no_grad():
            run(*kv.make_batch(reqs, max_blocks=MAX_BLOCKS, device=o["device"]).args(), kv.caches)
        if armed and o["where"] == "replay":
            fail(fault)
        if o["sync"] == "bounded":
            comm.synchronize("ep")
        elif o["sync"] == "plain" and torch.cuda.is_available():
            torch.cuda.synchronize()
        if step == 0 and o["timeout_s"]:
            comm.agree_num_tokens(0, "ep")  # both ranks are past their first step
            os.environ["TBO_COMM_TIMEOUT_S"] = str(o["timeout_s"])
        if o["log_path"]:
            with open(o["log_path"], "a") as f:
                f.write(f"rank {rank} step {step}\n")
    return o["steps"]


def rank_fails_before_agreeing(rank, world, faulty=0):
    """The smallest failing step: rank `faulty` raises before the step's one agreement, the
    others wait in it."""
    from tbo_compiler.runtime.comm import agree_num_tokens

    dist.barrier()  # every pair connected first: gloo connects lazily, and a rank that exits while
    if rank == faulty:  # its peer still connects fails that peer in gloo's connect, not in the step
        fail("raise")
    return agree_num_tokens(3, "ep")


# ranks that agree --------------------------------------------------------------------------------

class EmptyRankA2A(nn.Module):
    """Ranks hold different token counts (`sizes`, known to all, one may be 0): each sends its rows
    to every rank with all_to_all_single split sizes and sums what comes back (shape-safe at 0)."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = list(sizes)
        self.w = nn.Parameter(torch.eye(16) * 0.5)

    def forward(self, x_TD):
        W, T, D = len(self.sizes), x_TD.shape[0], x_TD.shape[1]
        import torch.distributed._functional_collectives as funcol

        recv = funcol.all_to_all_single((x_TD @ self.w).repeat(W, 1), self.sizes, [T] * W, dist.group.WORLD)
        back = funcol.all_to_all_single(torch.tanh(recv), [T] * W, self.sizes, dist.group.WORLD)
        return x_TD + back.reshape(W, T, D).sum(0)


def rank_agree(rank, world, model_dir, plan_path, token_counts, policies=("auto", "tbo")):
    """Plan path: per policy, one step per entry of `token_counts` ([per-rank counts], one may
    be 0); torch.compile path: the first entry through EmptyRankA2A. Returns per policy and step
    the bucket, the program run, its cut and the padded input shapes as the plan ran them, and
    the compile path's report."""
    import any_models

    plan_steps = {}
    for policy in policies:
        run = _load(rank, model_dir, plan_path, policy)
        ran = []  # what the plan actually ran: (bucket, program, padded token-input shapes)
        args_for = run.args_for
        run.args_for = lambda tokens, v, user, args_for=args_for: (
            ran.append((tokens, v, [list(t.shape) for t in user[:4]])), args_for(tokens, v, user))[1]
        kv = run.new_kv_cache(NUM_BLOCKS)
        plan_steps[policy] = []
        for step, counts in enumerate(token_counts):
            reqs = [(f"s{step}", list(range(1, 1 + counts[rank])))] if counts[rank] else []
            with torch.no_grad():
                out = run(*kv.make_batch(reqs, max_blocks=MAX_BLOCKS).args(), kv.caches)
            bucket, variant, shapes = ran[-1]
            plan_steps[policy].append({"bucket": bucket, "variant": variant, "by": run.decisions[bucket]["by"],
                                       "cut": run.buckets[bucket][variant][0].cut, "inputs": shapes,
                                       "out": list(out.shape)})
    torch.manual_seed(3 + rank)
    sizes = token_counts[0]
    m = EmptyRankA2A(sizes)
    x = torch.randn(sizes[rank], 16)
    fn, seen, warned = any_models.compile_tbo(m)
    with torch.no_grad():
        y, ref = fn(x), m(x)
    return {"plan": plan_steps, "compiled": any_models.report(seen), "diff": float((y - ref).abs().max()) if
            y.numel() else 0.0, "shape": list(y.shape)}


def rank_dies_while_compiling(rank, world):
    """torch.compile(backend="tbo") of a comm model: rank 1 dies before its compile agreement;
    rank 0's compile must fail naming it, not wait in the agreement."""
    from funcol_moe import FuncolMoE

    if rank == 1:
        os._exit(3)
    m = FuncolMoE(world, rank)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend="tbo", dynamic=False, fullgraph=True)(torch.randn(4, 16))
    return "compiled"
