"""Serving steps shared by the TBO correctness tests (importable by spawned ranks).

A sequence of engine steps against one paged KV cache, each with its token count T and the cut
the policy gives it:
  prefill  r0[:4]                                  T=4   cut 2
  prefill  r0[4:7] (cached prefix 4) + r1 + r2      T=14  cut 7: r1 straddles the cut
  decode   r0, r1, r2 one token each (odd count)    T=3   cut 2 (by request)
  decode   r1 alone                                 T=1   no split
  mtp      r0, r1, r2 two tokens each               T=6   cut 4 (requests kept whole)
"""
from __future__ import annotations

import torch

BLOCK_SIZE = 4
MAX_BLOCKS = 8
NUM_BLOCKS = 48
PLANS = {"prefill": dict(mode="prefill", token_counts=(4, 14), tokens_per_request=1),
         "decode": dict(mode="decode", token_counts=(1, 3), tokens_per_request=1),
         "mtp": dict(mode="decode", token_counts=(6,), tokens_per_request=2)}


def compile_plans(model_dir, out_dir, ep=1, moe_comm="a2a", names=tuple(PLANS)) -> dict:
    """tbo-compile one fp32 plan per scenario kind (prefill, decode, mtp) -> {kind: path}."""
    from tbo_compiler.compile import compile_model_dir

    paths = {}
    for name in names:
        p = out_dir / f"{name}_ep{ep}_{moe_comm}.pt"
        compile_model_dir(model_dir, p, ep=ep, moe_comm=moe_comm, dtype=torch.float32, block_size=BLOCK_SIZE,
                          max_blocks=MAX_BLOCKS, profile="cpu", **PLANS[name])
        paths[name] = p
    return paths


@torch.no_grad()
def serve(model, step_list, num_blocks=64, pad_to=None) -> dict:
    """Run steps ([(req, new_tokens)] each) eagerly on one cache -> {req: logits of all its tokens}."""
    kv = model.new_kv_cache(num_blocks)
    out = {}
    for step in step_list:
        b = kv.make_batch(step, pad_to=pad_to)
        logits = model(*b.args(), kv.caches)
        row = 0
        for req, toks in step:
            out.setdefault(req, []).append(logits[row:row + len(toks)])
            row += len(toks)
    return {r: torch.cat(v) for r, v in out.items()}


def steps(seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    r0, r1, r2 = toks(7), toks(5), toks(6)
    return [
        ("prefill", [("r0", r0[:4])]),
        ("prefill", [("r0", r0[4:]), ("r1", r1), ("r2", r2)]),
        ("decode", [("r0", toks(1)), ("r1", toks(1)), ("r2", toks(1))]),
        ("decode", [("r1", toks(1))]),
        ("mtp", [("r0", toks(2)), ("r1", toks(2)), ("r2", toks(2))]),
    ]


def run_steps(forward, kv, step_list, device=None):
    """Logits of every step: forward(input_ids, positions, slot_mapping, block_table, caches)."""
    out = []
    for plan, reqs in step_list:
        b = kv.make_batch(reqs, max_blocks=MAX_BLOCKS, device=device)
        with torch.no_grad():
            out.append((plan, forward(plan, b)))
    return out


def compare(model, plans: dict, seed: int, vocab: int, device=None):
    """Run the steps eagerly (no TBO) and through the plans (TBO); return max abs differences."""
    s = steps(seed, vocab)
    kv_ref = model.new_kv_cache(NUM_BLOCKS, device=device)
    kv_tbo = model.new_kv_cache(NUM_BLOCKS, device=device)
    ref = run_steps(lambda p, b: model(*b.args(), kv_ref.caches), kv_ref, s, device)
    tbo = run_steps(lambda p, b: plans[p](*b.args(), kv_tbo.caches), kv_tbo, s, device)
    logit_diff = [float((a - b).abs().max()) for (_, a), (_, b) in zip(ref, tbo)]
    cache_diff = max(float((a - b).abs().max()) for a, b in zip(kv_ref.caches, kv_tbo.caches))
    scale = max(float(a.abs().max()) for _, a in ref)
    return logit_diff, cache_diff, scale


def cuts(plan) -> list[tuple[int, int]]:
    """(bucket, cut of its TBO program, 0 where the bucket has only the serial one)."""
    return [(t, v["tbo"][0].cut if "tbo" in v else 0) for t, v in sorted(plan.buckets.items())]


def rank_compare(rank, world, model_dir, plan_paths, moe_comm, seed):
    """On one rank of an EP group: the eager EP model vs the loaded plans, own requests per rank."""
    from tbo_compiler import load_plan
    from tbo_compiler.models import ParallelConfig, load_model

    model = load_model(model_dir, dtype=torch.float32, block_size=BLOCK_SIZE,
                       parallel=ParallelConfig(world, rank, "ep", moe_comm))
    plans = {k: load_plan(p, model_dir, rank=rank, dtype=torch.float32, policy="tbo") for k, p in plan_paths.items()}
    vocab = model.config.vocab_size
    same_batch = moe_comm == "allreduce"  # every rank holds the same tokens there
    logit_diff, cache_diff, scale = compare(model, plans, seed if same_batch else seed + 101 * rank, vocab)
    return logit_diff, cache_diff, scale, {k: cuts(v) for k, v in plans.items()}


def rank_uneven(rank, world, model_dir, plan_path):
    """Ranks with different token counts (rank 1: none at all) agree on one bucket; the plan's
    rows equal the eager EP model run on batches padded to the agreed count."""
    from tbo_compiler import load_plan
    from tbo_compiler.models import ParallelConfig, load_model
    from tbo_compiler.runtime.comm import agree_num_tokens

    model = load_model(model_dir, dtype=torch.float32, block_size=BLOCK_SIZE,
                       parallel=ParallelConfig(world, rank, "ep", "a2a"))
    run = load_plan(plan_path, model_dir, rank=rank, dtype=torch.float32, policy="tbo")
    reqs = [("a", [3, 4, 5, 6, 7]), ("b", [8, 9, 10])] if rank == 0 else []
    kv_ref, kv_tbo = model.new_kv_cache(NUM_BLOCKS), model.new_kv_cache(NUM_BLOCKS)
    T = sum(len(r) for _, r in reqs)
    b_ref = kv_ref.make_batch(reqs, max_blocks=MAX_BLOCKS, pad_to=agree_num_tokens(T, "ep"))
    b_tbo = kv_tbo.make_batch(reqs, max_blocks=MAX_BLOCKS)
    with torch.no_grad():
        ref = model(*b_ref.args(), kv_ref.caches)[:T]
    out = run(*b_tbo.args(), kv_tbo.caches)
    return tuple(out.shape), float((out - ref).abs().max()) if T else 0.0


def eager_logits(model, seed: int, vocab: int, device=None) -> list:
    """The model's own logits of every step (no plan), on a fresh cache."""
    kv = model.new_kv_cache(NUM_BLOCKS, device=device)
    return [out for _, out in run_steps(lambda p, b: model(*b.args(), kv.caches), kv, steps(seed, vocab), device)]


def rank_compare_many(rank, world, jobs, seed):
    """`rank_compare` for several (model_dir, plan_paths, moe_comm) jobs in one spawn; each result
    also carries the eager EP model's logits of every step, for the parent's EP=1 comparison."""
    from tbo_compiler.models import ParallelConfig, load_model

    out = []
    for model_dir, plan_paths, moe_comm in jobs:
        res = rank_compare(rank, world, model_dir, plan_paths, moe_comm, seed)
        model = load_model(model_dir, dtype=torch.float32, block_size=BLOCK_SIZE,
                           parallel=ParallelConfig(world, rank, "ep", moe_comm))
        own = seed if moe_comm == "allreduce" else seed + 101 * rank
        out.append((*res, eager_logits(model, own, model.config.vocab_size)))
    return out
