"""The demo (`make demo`): a tiny DeepSeek-V3 checkpoint, compiled with TBO for expert parallelism
over 2 CPU processes (gloo), checked against the model without TBO.

    python -m tbo_compiler.demo [--out out/demo]

1. writes a tiny DeepSeek-V3 checkpoint (real format: fp8 block-quantized weights, sharded);
2. `tbo-compile`s it for EP=2 (dispatch/combine all-to-all), a prefill and a decode plan, with dumps;
3. starts 2 processes joined by gloo; each loads the plans for its rank and runs its own requests
   (prefill, then decode steps) through the TBO program and through the eager model;
4. prints the largest difference, the compiler's summary and where the dumps are.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

TOL = 2e-5


def _rank(rank, world, model_dir, plans, seed):
    from tbo_compiler import load_plan
    from tbo_compiler.models import ParallelConfig, load_model

    model = load_model(model_dir, dtype=torch.float32, block_size=4,
                       parallel=ParallelConfig(world, rank, "ep", "a2a"))
    run = {k: load_plan(p, model_dir, rank=rank, dtype=torch.float32, policy="tbo") for k, p in plans.items()}
    g = torch.Generator().manual_seed(seed + rank)
    V = model.config.vocab_size
    reqs = {f"r{rank}.{i}": torch.randint(1, V, (n,), generator=g).tolist() for i, n in enumerate((5, 7, 4))}
    kv_ref, kv_tbo = model.new_kv_cache(32), model.new_kv_cache(32)
    steps = [("prefill", list(reqs.items()))]
    steps += [("decode", [(r, torch.randint(1, V, (1,), generator=g).tolist()) for r in reqs]) for _ in range(3)]
    worst = 0.0
    for plan, batch in steps:
        b_ref = kv_ref.make_batch(batch, max_blocks=8)
        b_tbo = kv_tbo.make_batch(batch, max_blocks=8)
        with torch.no_grad():
            ref = model(*b_ref.args(), kv_ref.caches)
        out = run[plan](*b_tbo.args(), kv_tbo.caches)
        worst = max(worst, float((out - ref).abs().max()))
    return worst, [len(s[1]) for s in steps]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbo_compiler.demo")
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from tbo_compiler.compile import compile_model_dir
    from tbo_compiler.models.tiny import make_tiny
    from tbo_compiler.runtime.launch import run_ranks

    t0 = time.perf_counter()
    model_dir = make_tiny("deepseek_v3", out / "tiny_deepseek_v3", seed=0, n_routed_experts=8)
    print(f"[1/4] tiny DeepSeek-V3 checkpoint: {model_dir}")
    plans = {}
    for name, kw in {"prefill": dict(mode="prefill", token_counts=(16,)),
                     "decode": dict(mode="decode", token_counts=(3,))}.items():
        plans[name] = str(out / f"plan_{name}.pt")
        compile_model_dir(model_dir, plans[name], ep=2, moe_comm="a2a", dtype=torch.float32, block_size=4,
                          max_blocks=8, profile="h200", dump_dir=out / "dumps" / name, **kw)
    print(f"[2/4] compiled for EP=2: {', '.join(plans.values())}")
    results = run_ranks(_rank, 2, str(model_dir), plans, 7)
    worst = max(r[0] for r in results)
    ok = worst <= TOL
    print(f"[3/4] 2 ranks (gloo), prefill of 3 requests + 3 decode steps each: "
          f"max |TBO - no TBO| = {worst:.2e} (tolerance {TOL:g}, fp32) -> {'OK' if ok else 'MISMATCH'}")
    summary = (out / "dumps" / "prefill" / "T16" / "summary.txt").read_text()
    print("[4/4] compiler summary (prefill plan, T=16 tokens per rank):\n")
    print("    " + summary.replace("\n", "\n    "))
    print(f"dumps (graph SVG/DOT by ubatch and stream, Perfetto trace, summary): {out / 'dumps'}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
