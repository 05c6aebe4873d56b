"""Serve an MoE model with TBO on N ranks (expert parallelism), started by torchrun.

    tbo-compile MODEL_DIR -o prefill.pt --ep 2 --tokens 16,64
    tbo-compile MODEL_DIR -o decode.pt --ep 2 --decode-batch 4
    torchrun --nproc-per-node 2 examples/serve_ep.py MODEL_DIR --plan prefill.pt --decode-plan decode.pt --check
    torchrun --nproc-per-node 2 examples/serve_ep.py MODEL_DIR --compile --check    # torch.compile path

Each rank (one process per GPU; gloo on CPU):
  1. initialises torch.distributed from torchrun's environment (NCCL on CUDA, gloo on CPU);
  2. `load_plan(plan, MODEL_DIR, rank=rank)`: this rank's experts only; the plan's comm group is
     torch.distributed's default group, registered by `load_plan` itself (or, with --compile,
     `torch.compile(model, backend="tbo")` of the model loaded for this rank);
  3. serves its own requests: one prefill step, then decode steps. Ranks may hold different numbers
     of tokens (one may hold none): the plan agrees on one padded bucket per step by itself; the
     torch.compile path pads to an agreed bucket here (`bucket()`), since every distinct shape is a
     compile and every rank must compile the same shape;
  4. with --check, runs the same steps through the model without TBO and prints the largest
     difference (rank 0 prints a line per rank).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from tbo_compiler.runtime.comm import agree_num_tokens


def bucket(num_tokens: int, buckets=(4, 16, 64, 256)) -> int:
    """The smallest bucket holding every rank's batch (ranks must run the same shapes)."""
    most = agree_num_tokens(num_tokens, "ep")
    return next(b for b in buckets if b >= most)


def steps(rank: int, vocab: int, decode_steps: int):
    """This rank's requests: a prefill of several prompts, then decode steps (rank 1 prefills none
    of its own in the first step, to show ranks with different batches working together)."""
    g = torch.Generator().manual_seed(1234 + rank)
    prompts = {f"r{rank}.{i}": torch.randint(1, vocab, (n,), generator=g).tolist()
               for i, n in enumerate((7, 3, 5)[: 3 - rank])}
    out = [("prefill", list(prompts.items()))]
    for _ in range(decode_steps):
        out.append(("decode", [(r, torch.randint(1, vocab, (1,), generator=g).tolist()) for r in prompts]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="serve_ep.py")
    ap.add_argument("model_dir")
    ap.add_argument("--plan", help="prefill plan (tbo-compile --ep N)")
    ap.add_argument("--decode-plan", help="decode plan (tbo-compile --ep N --decode-batch B)")
    ap.add_argument("--compile", action="store_true", help='torch.compile(model, backend="tbo") instead of plans')
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="the plan's dtype by default; float32 for --compile")
    ap.add_argument("--policy", default="auto", choices=("auto", "tbo", "serial"),
                    help="plan: keep the faster of TBO and serial per bucket (auto), or force one")
    ap.add_argument("--check", action="store_true", help="compare with the model without TBO")
    args = ap.parse_args(argv)
    if not args.plan and not args.compile:
        ap.error("give --plan PLAN or --compile")

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    import tbo_compiler
    from tbo_compiler.models import ParallelConfig, load_model
    from tbo_compiler.runtime.comm import register_group

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.compile:
        register_group("ep", dist.group.WORLD)  # the tbo comm ops' group (load_plan does this itself)
        model = load_model(args.model_dir, dtype=dtype or torch.float32, device=device,
                           parallel=ParallelConfig(world, rank, "ep", "a2a"))
        graphs = []  # what the backend did with each graph it compiled (one per bucket)
        fast = torch.compile(model, backend="tbo", dynamic=False, options={
            "mode": "prefill", "on_compile": lambda st: graphs.append((st.T, st.cut, len(st.comm_before.ops)))})
        serve = {"prefill": fast, "decode": fast}
    else:
        kw = dict(rank=rank, device=device, dtype=dtype, policy=args.policy)
        serve = {"prefill": tbo_compiler.load_plan(args.plan, args.model_dir, **kw)}
        serve["decode"] = tbo_compiler.load_plan(args.decode_plan, args.model_dir, **kw) if args.decode_plan \
            else serve["prefill"]
        model = serve["prefill"].model
    vocab, block_size = model.config.vocab_size, model.block_size
    max_blocks = 8
    kv = model.new_kv_cache(num_blocks=64)
    if args.check:  # the same model without TBO, on its own cache
        ref_model = load_model(args.model_dir, dtype=model.dtype, device=device, block_size=block_size,
                               parallel=ParallelConfig(world, rank, "ep", model.parallel.moe_comm))
        ref_kv = ref_model.new_kv_cache(num_blocks=64)
    worst = 0.0
    for kind, reqs in steps(rank, vocab, args.decode_steps):
        T = sum(len(t) for _, t in reqs)
        pad = bucket(T) if args.compile else None  # a plan pads to its buckets itself
        batch = kv.make_batch(reqs, pad_to=pad, max_blocks=max_blocks, device=device)
        with torch.no_grad():
            logits = serve[kind](*batch.args(), kv.caches)[:T]
        if args.check:  # the reference runs the padded shape every rank agreed on (its all-to-all needs it)
            ref_b = ref_kv.make_batch(reqs, pad_to=pad or agree_num_tokens(T, "ep"), max_blocks=max_blocks, device=device)
            with torch.no_grad():
                ref = ref_model(*ref_b.args(), ref_kv.caches)[:T]
            if T:
                worst = max(worst, float((logits.float() - ref.float()).abs().max()))
    if args.check:
        worsts = [None] * world
        dist.all_gather_object(worsts, worst)
        if rank == 0:
            for r, w in enumerate(worsts):
                print(f"rank {r}: max |TBO - no TBO| = {w:.3e}")
    if rank == 0 and not args.compile:
        for kind, run in serve.items():
            for tokens, d in sorted(run.decisions.items()):
                print(f"{kind} bucket {tokens}: ran {d['variant']} (chosen by {d['by']})")
    if rank == 0 and args.compile:
        for T, cut, n_comm in graphs:
            print(f"torch.compile graph of {T} tokens: " + (f"TBO, split {cut}+{T - cut}" if cut else "not split")
                  + f", {n_comm} comm ops")
    if rank == 0:
        print(f"served {len(steps(0, vocab, args.decode_steps))} steps on {world} ranks "
              f"({'torch.compile' if args.compile else 'plan'}, {device.type})")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run(argv=None) -> int:
    """main(), with the project's errors (a bad checkpoint, a plan for another model, a peer that
    died) as one line per rank naming it, instead of a traceback from every rank."""
    from tbo_compiler import TboError
    from tbo_compiler.ops.errors import one_line

    try:
        return main(argv)
    except TboError as e:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        print(f"serve_ep.py: rank {rank}: {one_line(e)}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1


if __name__ == "__main__":
    raise SystemExit(run())
