"""The serving loop's host cost alone: bench/serve_bench.py's loop over a no-op plan (logits of
zeros, no model), so every second measured is the host's (admission, planning, building batches,
bookkeeping), outside the plan's call and the sampling. Prints host ms per step, best of --repeat
runs.

    python bench/serve_host.py                       # 64 requests of ~512 in / ~128 out, 64 in flight
    python bench/serve_host.py --num-requests 256 --concurrency 256
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # noqa: E402

from tbo_compiler.models.batch import PagedKVCache  # noqa: E402


class NoOpPlan:
    """A plan's interface (buckets, call) and nothing else."""

    def __init__(self, buckets):
        self.buckets = {b: {} for b in buckets}

    def __call__(self, input_ids, positions, slot_mapping, block_table, caches, copy_output=True):
        return torch.zeros(input_ids.shape[0], 8)


def host_ms_per_step(num_requests=64, input_len=512, output_len=128, concurrency=64, token_budget=4096,
                     block_size=64, repeat=5, overlap=False) -> tuple[float, int]:
    max_blocks = -(-(input_len + output_len) // block_size)
    best, steps = float("inf"), 0
    for _ in range(repeat):
        runs = {"prefill": NoOpPlan([64 << i for i in range(12) if 64 << i <= token_budget]),
                "decode": NoOpPlan([1 << i for i in range(12) if 1 << i <= concurrency])}
        kv = PagedKVCache([(2, 8, 64)], num_blocks=concurrency * max_blocks + 2, block_size=block_size)
        reqs = sb.make_workload(num_requests, input_len, output_len, 1000, seed=0)
        res = sb.serve_loop(runs, kv, reqs, concurrency=concurrency, token_budget=token_budget,
                            max_blocks=max_blocks, overlap=overlap)
        st = res["steps"]
        steps = st["mixed"] + st["decode"]
        best = min(best, 1e3 * st["host_s"] / steps)  # the no-op call and sampling are forward_s
    return best, steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("num-requests", 64), ("input-len", 512), ("output-len", 128), ("concurrency", 64),
                          ("token-budget", 4096), ("block-size", 64), ("repeat", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args(argv)
    ms, steps = host_ms_per_step(a.num_requests, a.input_len, a.output_len, a.concurrency, a.token_budget,
                                 a.block_size, a.repeat)
    print(f"host ms per step: {ms:.3f} over {steps} steps (best of {a.repeat})")


if __name__ == "__main__":
    main()
