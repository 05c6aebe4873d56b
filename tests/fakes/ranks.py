"""What each rank of the EP=2 ROCm test runs (importable by spawned ranks as `fakes.ranks`).

On every rank, with the fakes installed: the same plans run twice over the same serving steps,
first with the torch reference kernels and the gloo all-to-all (torch_dist), then with aiter and
mori; plus mori's dispatch/combine alone on known inputs. Returns what the parent asserts.
"""
from __future__ import annotations

import os
import sys

import torch

import fakes

ops = torch.ops.tbo


def _serve(plan_paths, model_dir, rank, seed):
    import tbo_scenarios as sc
    from tbo_compiler import load_plan

    plans = {k: load_plan(p, model_dir, rank=rank, dtype=torch.float32, policy="tbo") for k, p in plan_paths.items()}
    vocab = plans["prefill"].model.config.vocab_size
    kv = plans["prefill"].new_kv_cache(sc.NUM_BLOCKS)
    steps = sc.steps(seed + 101 * rank, vocab)
    out = sc.run_steps(lambda p, b: plans[p](*b.args(), kv.caches), kv, steps)
    backends = {}
    for run in plans.values():
        for variants in run.buckets.values():
            for prog in variants.values():
                for op, names in prog[2].backends().items():
                    backends.setdefault(op, set()).update(names)
    return plans, [o for _, o in out], kv.caches, backends


def _ownership(plans, backend):
    """One TBO step of the prefill plan's 14-token bucket: (expected (kind, ubatch) per comm start in
    the schedule's order, the (kind, op slot) the mori backend recorded)."""
    import tbo_scenarios as sc

    run = plans["prefill"]
    bp = run.buckets[14]["tbo"][0]
    nodes = {n.name: n for n in bp.gm.graph.nodes}
    starts = {ops.dispatch_start.default: "dispatch", ops.combine_start.default: "combine"}
    expected = [(starts[nodes[i.node].target], i.ubatch) for i in bp.instrs
                if i.op == "run" and nodes[i.node].target in starts]
    kv = run.new_kv_cache(sc.NUM_BLOCKS)
    b = kv.make_batch([("a", list(range(1, 15)))], max_blocks=sc.MAX_BLOCKS)
    backend.state.history.clear()
    run(*b.args(), kv.caches)
    return expected, [(kind, slot) for kind, slot, _ in backend.state.history], bp.instrs


def _direct(group_world, rank):
    """mori's dispatch -> experts -> combine on known inputs (split phase, and whole in the start)
    against torch_dist's."""
    import ep_scenarios as es
    from tbo_compiler.ops.kernels import unpack_meta
    from tbo_compiler.runtime import comm

    W = group_world
    x, ids, w, w13, w2 = es.comm_inputs(rank)
    e_loc = es.NUM_EXPERTS // W
    lo = rank * e_loc
    send = ops.dispatch_pack(x, ids, w, W, e_loc)
    res = {}
    for name, kernel in (("torch_dist", None), ("mori", "AsyncLL"), ("mori", "IntraNode")):
        if kernel:
            os.environ["TBO_MORI_KERNEL"] = kernel
        b = comm.backend_for("ep", W, name)
        rx, rmeta = b.dispatch(*send).wait()
        rids, rw = unpack_meta(rmeta, ids.shape[1])
        ry = ops.moe_experts(rx, rids, rw, w13[lo:lo + e_loc], w2[lo:lo + e_loc])
        y = b.combine(ry).wait().view(W, es.COMM_T, -1).sum(0)
        res[kernel or name] = dict(rx=rx, rids=rids.clone(), rw=rw.clone(), y=y)
    os.environ.pop("TBO_MORI_KERNEL")
    return res


def rank_rocm(rank, world, model_dir, plan_paths, seed):
    import torch.distributed as dist

    from tbo_compiler.runtime import comm, kernels
    from tbo_compiler.runtime.comm import mori as mori_backend

    fakes.install(sys.modules)
    os.environ["TBO_MORI_MAX_TOKENS"] = "16"  # one pair of ops serves every bucket
    for op in kernels.AITER_OPS:
        kernels.prefer(op, "torch")
    _, ref, ref_caches, ref_backends = _serve(plan_paths, model_dir, rank, seed)   # "ep": torch_dist (gloo)

    comm.register_group("ep", dist.group.WORLD, backend="mori")
    for op in kernels.AITER_OPS:
        kernels.prefer(op, "aiter")
    plans, got, caches, backends = _serve(plan_paths, model_dir, rank, seed)
    mb = comm.backend_for("ep", world)
    expected, recorded, _ = _ownership(plans, mb)

    import aiter
    import mori
    mori_calls = [(c["op"], c["fn"], {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
                                      for k, v in c["args"].items()}) for c in mori.CALLS]
    aiter_fns = sorted({c["fn"] for c in aiter.CALLS})
    ops_used = [op.uid for op in mb.ops()]
    n_calls = len(mori.CALLS)
    direct = _direct(world, rank)  # makes its own ops (another hidden size)
    intranode_ops = {c["op"] for c in mori.CALLS[n_calls:]
                     if c["fn"] == "__init__" and c["args"]["config"].kernel_type.name == "IntraNode"}
    intranode_calls = [c["fn"] for c in mori.CALLS[n_calls:] if c["op"] in intranode_ops and c["fn"] != "__init__"]
    registered = torch._C._distributed_c10d._resolve_process_group(mori.shmem.STATE["name"])
    result = dict(
        logit_diff=[float((a - b).abs().max()) for a, b in zip(ref, got)],
        cache_diff=max(float((a - b).abs().max()) for a, b in zip(ref_caches, caches)),
        scale=max(float(a.abs().max()) for a in ref),
        ref_backends=ref_backends, backends=backends, backend_type=type(mb).__name__, layout=mb.layout,
        ops=ops_used, ownership=(expected, recorded),
        mori_calls=mori_calls, aiter_fns=aiter_fns, shmem_name=mori.shmem.STATE["name"],
        shmem_is_world=registered.size() == dist.get_world_size() and registered.rank() == rank,
        direct=direct, intranode_calls=intranode_calls)
    mori_backend.finalize()
    result["finalized"] = "pg" not in mori.shmem.STATE
    return result
