"""The MoE pair sort (routing prep) alone: each kernel of runtime/kernels/triton_sort.py against the
torch reference, timed as CUDA graphs, to set triton_sort's kernel thresholds (kernel_for) and
kernel C's and D's tiles (_RANK_CONFIGS, _CHUNKED_*); its H200 run is bench/results/sort_h200.

    python bench/sort_bench.py --out DIR                      # on a GPU: DIR/sort_bench.json
    python bench/sort_bench.py --pairs 2048 --experts 128     # one case, printed only
    python bench/sort_bench.py --dry-run --pairs 64 --experts 8   # no GPU needed: checks, no timing

Per case (P pairs = N tokens x top-K, K = 8; E experts; default P = 256..262144, E = 8, 32, 128,
256), ids as a router draws them (the top-K of random scores per token: K distinct experts a row,
int64):

- torch: triton_moe.sort_pairs_torch, the reference (~6 kernels);
- A (bitonic, one program) where P <= 4096; B (counting sort, one program) where P <= 16384 and
  E_P2 <= 16, or P <= 1024; C (rank sort, many programs, P^2 compares) where P <= 16384 (it ties
  with torch there), at each tile setting of RANK_TILES (CHUNK x BJ, warps);
- D (chunked counting sort, two launches of many programs) at every P, at each setting of
  CHUNKED_TILES (target programs -> CHUNK, SUB, warps), named by the CHUNK it gives at that P;
- auto: triton_moe._sort_pairs, what the runtime calls (triton_sort where small_enough, with
  kernel_for's kernel, else torch); its line names the choice.

Each result is checked bitwise equal to the torch reference (the contract: a stable sort); a
mismatch is reported (ok: false) and the exit status is 1. A kernel that fails (compile, launch) is
reported with its error and the others still run.

Timing: each call captured REPS times in one CUDA graph (moe_tuned.capture), the graph replayed
(after the warm-up replay capture does) `--replays` times, each replay timed by CUDA events
(moe_tuned.time_ms); the median replay divided by REPS. No launch latency between the calls, as in
the runtime's graphs. Exit 2 without a CUDA GPU, except with --dry-run: every candidate runs once
and is checked, nothing is timed (on CPU in Triton's interpreter: keep --pairs small there), so the
bench's own code is exercised without a GPU (tests/test_triton_sort.py does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
EXPERTS = (8, 32, 128, 256)
TOP_K = 8
#: kernel C's (CHUNK, BJ, num_warps) settings tried at every size (_RANK_CONFIGS' rows among them)
RANK_TILES = ((16, 128, 4), (32, 128, 4), (64, 128, 4), (32, 256, 8))
#: kernel D's (target programs, SUB, num_warps): CHUNK = next_power_of_2(cdiv(P, programs)) within
#: CHUNKED_CHUNKS (wider than triton_sort's [128, 2048] clamp, to show where that clamp belongs);
#: the first row is _chunked_config's rule (128 programs, SUB 128, 8 warps)
CHUNKED_TILES = ((128, 128, 8), (64, 128, 8), (256, 128, 8), (128, 64, 8), (256, 64, 4), (128, 128, 4))
CHUNKED_CHUNKS = (32, 4096)
BITONIC_MAX = 4096  # A is timed up to here (its own limit is 1024: this shows the cliff past it)
COUNTING_LANES = 16  # B is timed for E_P2 <= 16 up to COUNTING_MAX, for any E at P <= 1024
COUNTING_MAX = 16384  # B: 120 us at 16384, E = 8 (one program, O(P * E_P2)); hopeless past it
RANK_MAX = 16384  # C: P^2 compares, a tie with torch at 16384 (bench/results/sort_h200); 4x that past it


def graph_us(fn, reps: int, replays: int) -> float:
    """us per call of fn: REPS calls in one CUDA graph, the median of `replays` replays / REPS."""
    from tbo_compiler.runtime.kernels.moe_tuned import graph_ms

    return 1000.0 * graph_ms(fn, reps, replays)


def router_ids(P: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """[P / K, K] int64 ids, K distinct experts a row (top-K of random scores), K = min(8, E), on
    the generator's device."""
    K = min(TOP_K, E)
    scores = torch.rand(P // K, E, device=gen.device, generator=gen)
    return scores.topk(K, dim=1).indices


def candidates(P: int, E: int, on_cuda: bool = True) -> dict[str, tuple[Callable, dict]]:
    """{name: (fn(ids, E) -> (pairs, offs), description)} timed for this case (on_cuda False: the
    CPU dry run, where auto is the torch sort)."""
    from tbo_compiler.runtime.kernels import triton_moe as tm
    from tbo_compiler.runtime.kernels import triton_sort as ts

    out = {"torch": (tm.sort_pairs_torch, {"kernel": "torch"})}
    if P <= BITONIC_MAX:
        out["A"] = (lambda ids, e: ts.sort_pairs(ids, e, kernel="bitonic"), {"kernel": "bitonic"})
    if (ts._lanes(E) <= COUNTING_LANES and P <= COUNTING_MAX) or P <= 1024:
        out["B"] = (lambda ids, e: ts.sort_pairs(ids, e, kernel="counting"), {"kernel": "counting"})
    if P <= RANK_MAX:
        default = ts._rank_config(P)
        for c, bj, w in RANK_TILES:
            def fn(ids, e, c=c, bj=bj, w=w):
                return ts.sort_pairs(ids, e, kernel="rank", chunk=c, block_j=bj, num_warps=w)
            out[f"C {c}x{bj} w{w}"] = (fn, {"kernel": "rank", "chunk": c, "block_j": bj, "num_warps": w,
                                            "default_tiles": (c, bj, w) == default})
    default = ts._chunked_config(P)
    tiles = [default]  # always timed, also where CHUNKED_TILES' first row is clamped differently
    for programs, sub, w in CHUNKED_TILES:
        c = min(max(1 << (-(-P // programs) - 1).bit_length(), CHUNKED_CHUNKS[0]), CHUNKED_CHUNKS[1])
        tiles.append((c, min(sub, c), w))
    for c, sub, w in dict.fromkeys(tiles):  # settings that meet at this P are one kernel: one row
        def fn(ids, e, c=c, sub=sub, w=w):
            return ts.sort_pairs(ids, e, kernel="chunked", chunk=c, sub_block=sub, num_warps=w)
        out[f"D {c}x{sub} w{w}"] = (fn, {"kernel": "chunked", "chunk": c, "sub_block": sub, "num_warps": w,
                                         "programs": -(-P // c), "default_tiles": (c, sub, w) == default})
    # _sort_pairs: triton_sort where small_enough, on CUDA only
    chosen = (ts.kernel_for(P, E) if on_cuda else None) or "torch"
    out["auto"] = (tm._sort_pairs, {"kernel": "auto", "chosen": chosen})
    return out


def run_case(P: int, E: int, reps: int, replays: int, seed: int, timed: bool = True) -> list[dict]:
    """One case's rows (and lines); timed False: each candidate once, checked, not timed (the dry
    run, on the GPU if there is one, else on CPU)."""
    on_cuda = torch.cuda.is_available()
    gen = torch.Generator(device="cuda" if on_cuda else "cpu").manual_seed(seed)
    ids = router_ids(P, E, gen)
    from tbo_compiler.runtime.kernels import triton_moe as tm

    want_pairs, want_offs = tm.sort_pairs_torch(ids, E)
    rows = []
    for name, (fn, desc) in candidates(P, E, on_cuda).items():
        row = {"P": ids.numel(), "E": E, "K": ids.shape[1], "name": name, **desc}
        try:
            pairs, offs = fn(ids, E)  # also the compile, outside the graph
            row["ok"] = bool(torch.equal(pairs, want_pairs) and torch.equal(offs, want_offs))
            if timed:
                row["us"] = graph_us(lambda: fn(ids, E), reps, replays)
        except Exception as e:  # noqa: BLE001 - one failing kernel must not hide the others
            row["ok"], row["error"] = False, " ".join(str(e).split())[:300]
        rows.append(row)
        us = f"{row['us']:9.2f} us" if "us" in row else f"{'-':>9s}   "
        note = "ok" if row["ok"] else ("FAILED: " + row["error"] if "error" in row else "MISMATCH")
        extra = f" -> {desc['chosen']}" if name == "auto" else ""
        extra += " (default tiles)" if desc.get("default_tiles") else ""
        print(f"P={row['P']:6d} E={E:4d} {name:<14s}{us}  {note}{extra}", flush=True)
    timed = [r for r in rows if r["ok"] and "us" in r and r["name"] not in ("torch", "auto")]
    ref = next((r["us"] for r in rows if r["name"] == "torch" and "us" in r), None)
    if timed and ref:
        best = min(timed, key=lambda r: r["us"])
        print(f"P={P:6d} E={E:4d} best {best['name']} {best['us']:.2f} us = {ref / best['us']:.1f}x torch "
              f"({ref:.2f} us)", flush=True)
    return rows


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=parse_ints, default=PAIRS, help="P values, comma-separated")
    ap.add_argument("--experts", type=parse_ints, default=EXPERTS, help="E values, comma-separated")
    ap.add_argument("--reps", type=int, default=20, help="calls captured in one graph")
    ap.add_argument("--replays", type=int, default=15, help="timed replays (the median is taken)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for sort_bench.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="run and check every candidate once, time nothing (works without a GPU: "
                         "Triton's interpreter on CPU, so keep --pairs small)")
    args = ap.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not args.dry_run:
        print("sort_bench: no CUDA GPU (it times CUDA graph replays); nothing measured", file=sys.stderr)
        return 2
    if not on_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton_sort's kernels are defined

    import triton

    from tbo_compiler.runtime.kernels import triton_sort as ts

    rows = []
    for P in args.pairs:
        for E in args.experts:
            rows += run_case(P, E, args.reps, args.replays, args.seed, timed=not args.dry_run)
    meta = {
        "gpu": torch.cuda.get_device_name() if on_cuda else None, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda,
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "reps": args.reps,
        "replays": args.replays, "seed": args.seed, "top_k": TOP_K, "dry_run": args.dry_run,
        "limits": {"bitonic_max_pairs": ts._BITONIC_MAX_PAIRS, "rank_max_pairs": ts._RANK_MAX_PAIRS,
                   "counting_max_pairs": ts._COUNTING_MAX_PAIRS, "counting_max_lanes": ts._COUNTING_MAX_LANES,
                   "rank_configs": [list(r) for r in ts._RANK_CONFIGS],
                   "chunked_max_pairs": ts._CHUNKED_MAX_PAIRS, "chunked_programs": ts._CHUNKED_PROGRAMS,
                   "chunked_chunk_range": [ts._CHUNKED_MIN_CHUNK, ts._CHUNKED_MAX_CHUNK],
                   "chunked_sub": ts._CHUNKED_SUB, "chunked_warps": ts._CHUNKED_WARPS,
                   "chunked_row_tile": ts._CHUNKED_ROW_TILE},
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "sort_bench.json"
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"wrote {path}")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"sort_bench: {len(bad)} result(s) failed or differ from the torch reference", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
