"""Routed experts alone, at the real models' expert shapes, every implementation the tuner may pick
and the parts each one is made of, timed as CUDA graphs (issue 24: where the MoE layer's time goes).

    python bench/moe_bench.py --out DIR                 # on a GPU: moe_bench.json, moe_bench.md
    python bench/moe_bench.py --models qwen3_30b_a3b --tokens 4096,256 --out DIR

Per model (expert dims from its config: hidden D, expert width I, experts E, top-k K) and number of
tokens N (N = 4096: a prefill of 4096 tokens; N = 256: a decode step of 256 requests), routing drawn
as the router does with random weights (top-k of softmax scores: every expert about equally
loaded), bf16:

- every candidate of runtime/kernels/moe_tuned.py (fused Triton at each tile config, its TMA
  variant, the grouped-GEMM path), each checked against the grouped-GEMM path;
- the parts: the routing prep (sort by expert), the row gather, each grouped GEMM, the activation,
  the weighted combine; the fused kernel's gate/up, down and sum-over-K kernels alone;
- floors: the GEMMs' FLOPs at 790 TFLOP/s, the active experts' weight bytes at 4.8 TB/s.

`--peak`: an 8192^3 bf16 GEMM (normal and all-ones operands) once after a second of idle and back
to back for 2 s, with the SM clock and board power: the compute peak as a burst and as a prefill
step sustains it.

`--route`: the routing kernel (scores, top-k, weights) alone per router (E, K) and token count, at
each (rows a program, warps), the ids checked against the torch reference: what sets
triton_route.tiles.

Timing: each function captured R times in one CUDA graph, the graph replayed (after a warm-up
replay) `--replays` times, the median replay divided by R; no launch overhead, as in the plan's
graph.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS, PEAK_BYTES = 790e12, 4.8e12
#: expert dims of the models' configs (models/configs, shared/reference/MODELS.md)
MODELS = {
    "qwen3_30b_a3b": dict(D=2048, I=768, E=128, K=8, act="silu", limit=0.0, bias=False),
    "gpt_oss_20b": dict(D=2880, I=2880, E=32, K=4, act="gpt_oss", limit=7.0, bias=True),
    "mixtral_8x7b": dict(D=4096, I=14336, E=8, K=2, act="silu", limit=0.0, bias=False),
}


def graph_ms(fn, reps: int, replays: int) -> float:
    from tbo_compiler.runtime.kernels.moe_tuned import graph_ms as timed

    return timed(fn, reps, replays)


def inputs(m: dict, N: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    D, I, E, K = m["D"], m["I"], m["E"], m["K"]
    kw = dict(device="cuda", generator=g)
    x = torch.randn(N, D, **kw).bfloat16()
    scores = torch.randn(N, E, **kw).softmax(-1)
    w, ids = scores.topk(K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    w13 = (torch.randn(E, 2 * I, D, **kw) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, I, **kw) / I ** 0.5).bfloat16()
    args = [x, ids, w, w13, w2]
    if m["bias"]:
        args += [(torch.randn(E, 2 * I, **kw) * 0.1).bfloat16(), (torch.randn(E, D, **kw) * 0.1).bfloat16()]
    else:
        args += [None, None]
    return tuple(args + [m["act"], m["limit"]])


def parts(args) -> dict:
    """The pieces of the grouped-GEMM path and of the fused Triton path, each alone."""
    import triton

    from tbo_compiler.runtime.kernels import triton_moe as tm
    from tbo_compiler.runtime.kernels import triton_moe_tma as tt
    from tbo_compiler.runtime.kernels.triton_elementwise import silu_mul

    x, ids, w, w13, w2 = args[:5]
    N, D = x.shape
    K = ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    P = N * K
    pairs, offs = tm._sort_pairs(ids, E)
    xs = x[pairs // K]
    h2 = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs[1:])
    act = silu_mul(h2)
    y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs[1:])
    inv = torch.empty_like(pairs).scatter_(0, pairs, torch.arange(P, device=x.device, dtype=pairs.dtype))
    out = x.new_empty(N, D)

    def combine():
        tm._combine_sorted_kernel[(N, triton.cdiv(D, 1024))](
            y, inv, ids, w, y, out, E, ids.stride(0), ids.stride(1), w.stride(0), w.stride(1), 0, out.stride(0),
            D=D, K=K, BLOCK_D=1024, HAS_BIAS=False, num_warps=4)

    def tma_gather():
        tt._gather_kernel[(triton.cdiv(P, 16),)](x, pairs, offs, xs, E, x.stride(0), D=D, K=K, ROWS=16,
                                                 BLOCK_D=min(512, triton.next_power_of_2(D)), num_warps=4)

    res = {
        "sort_pairs": lambda: tm._sort_pairs(ids, E),
        "sort_pairs_torch": lambda: tm.sort_pairs_torch(ids, E),
        "gather_torch": lambda: x[pairs // K],
        "gather_triton": tma_gather,
        "grouped_mm_gate_up": lambda: torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs[1:]),
        "silu_mul": lambda: silu_mul(h2),
        "grouped_mm_down": lambda: torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs[1:]),
        "inverse_perm": lambda: torch.empty_like(pairs).scatter_(0, pairs, torch.arange(P, device=x.device,
                                                                                         dtype=pairs.dtype)),
        "combine": combine,
    }
    # the fused kernel's three launches at its default tiles
    cfg = tm.default_config(P, E, 2)
    BM = cfg.block_m
    nb = triton.cdiv(P, BM) + E
    common = dict(BLOCK_M=BM, GROUP_M=cfg.group_m, E_P2=max(2, triton.next_power_of_2(E)), PREC=None)
    h = x.new_empty(P, I)
    yp = x.new_empty(P, D)
    gu, dn = cfg.gate_up, cfg.down

    def gate_up():
        tm._gate_up_kernel[(nb * triton.cdiv(I, gu.block_n),)](
            x, w13, w13, h, pairs, offs, E, nb, 0.0, x.stride(0), x.stride(1), w13.stride(0), w13.stride(1),
            w13.stride(2), 0, D=D, I=I, K=K, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, HAS_BIAS=False, ACT=0,
            CLAMP=False, num_warps=gu.num_warps, num_stages=gu.num_stages, **common)

    def down():
        tm._down_kernel[(nb * triton.cdiv(D, dn.block_n),)](
            h, w2, w2, w, yp, pairs, offs, E, nb, w2.stride(0), w2.stride(1), w2.stride(2), 0, w.stride(0),
            w.stride(1), D=D, I=I, K=K, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, HAS_BIAS=False,
            num_warps=dn.num_warps, num_stages=dn.num_stages, **common)

    def sum_k():
        tm._sum_pairs_kernel[(N, triton.cdiv(D, cfg.block_d))](
            yp, ids, out, E, ids.stride(0), ids.stride(1), out.stride(0), D=D, K=K, BLOCK_D=cfg.block_d, num_warps=4)

    res.update({"fused_gate_up": gate_up, "fused_down": down, "fused_sum_k": sum_k})
    from tbo_compiler.runtime.kernels import triton_sort as ts
    res["sort_pairs_counting"] = lambda: ts.sort_pairs(ids, E)  # whatever small_enough says: timed anyway
    if hasattr(ts, "sort_pairs_bitonic"):
        res["sort_pairs_bitonic"] = lambda: ts.sort_pairs_bitonic(ids, E)
    for name in ("sort_pairs_counting", "sort_pairs_bitonic"):
        if name in res:
            got, want = res[name](), tm.sort_pairs_torch(ids, E)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                res[name + "_MISMATCH"] = res.pop(name)
    return res


def floors(args) -> dict:
    x, ids, _, w13, w2 = args[:5]
    E, I = w13.shape[0], w13.shape[1] // 2
    D = x.shape[1]
    pairs = int(((ids >= 0) & (ids < E)).sum())
    active = int(torch.unique(ids[(ids >= 0) & (ids < E)]).numel())
    flops = 2 * pairs * D * 3 * I
    wbytes = active * 3 * D * I * 2
    return dict(pairs=pairs, active_experts=active, gemm_flops=flops, weight_bytes=wbytes,
                floor_ms=max(flops / PEAK_FLOPS, wbytes / PEAK_BYTES) * 1e3,
                gemm_floor_ms=flops / PEAK_FLOPS * 1e3, weight_floor_ms=wbytes / PEAK_BYTES * 1e3)


def run(models: list[str], tokens: list[int], reps: int, replays: int) -> list[dict]:
    from tbo_compiler.runtime.kernels import moe_tuned as mt

    rows = []
    for name in models:
        m = MODELS[name]
        for N in tokens:
            args = inputs(m, N)
            row = dict(model=name, tokens=N, **{k: m[k] for k in ("D", "I", "E", "K")}, **floors(args))
            ref = mt.candidates(args)["grouped_mm"](*args).float() if "grouped_mm" in mt.candidates(args) else None
            cands, errs = {}, {}
            for cname, fn in mt.candidates(args).items():
                try:
                    out = fn(*args).float()
                    if ref is not None:
                        errs[cname] = float((out - ref).norm() / ref.norm())
                    cands[cname] = round(graph_ms(lambda fn=fn: fn(*args), reps, replays), 4)
                except Exception as e:  # noqa: BLE001 - a config that does not fit must not hide the rest
                    cands[cname] = None
                    errs[cname] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                print(f"{name} N={N} {cname:22s} {cands[cname]} ms  rel err {errs.get(cname)}", flush=True)
            row["candidates_ms"], row["rel_err_vs_grouped_mm"] = cands, errs
            pms = {}
            for pname, fn in parts(args).items():
                try:
                    pms[pname] = round(graph_ms(fn, reps, replays), 4)
                except Exception as e:  # noqa: BLE001
                    pms[pname] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                print(f"{name} N={N} part {pname:20s} {pms[pname]}", flush=True)
            row["parts_ms"] = pms
            ok = {k: v for k, v in cands.items() if isinstance(v, float)}
            if ok:
                best = min(ok, key=ok.get)
                row["best"], row["best_ms"] = best, ok[best]
                row["best_pct_of_floor"] = round(100 * row["floor_ms"] / ok[best], 1)
            rows.append(row)
            del args
            torch.cuda.empty_cache()
    return rows


def timed_config(fn, ref, reps: int, replays: int, rate: str, per_ms: float) -> tuple[dict, object]:
    """One attention config: its output against the first config's (`ref`, None for the first),
    its CUDA-graph time and `rate` = per_ms / ms; an error entry when it does not run. -> (entry, ref)."""
    try:
        out = fn().float()
        ref = out if ref is None else ref
        ms = round(graph_ms(fn, reps, replays), 4)
        return dict(ms=ms, max_diff_vs_default=float((out - ref).abs().max()), **{rate: round(per_ms / ms, 2)}), ref
    except Exception as e:  # noqa: BLE001 - a config that does not fit must not hide the rest
        return dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"), ref


def keep_best(row: dict, skip: str | None = None) -> None:
    """row["best"] and row["best_ms"]: the fastest config that ran (names ending in `skip` aside)."""
    ok = {k: v["ms"] for k, v in row["configs"].items() if "ms" in v and not (skip and k.endswith(skip))}
    if ok:
        row["best"] = min(ok, key=ok.get)
        row["best_ms"] = ok[row["best"]]


#: decode attention of the roofline's decode buckets: heads, kv heads, head dim, sinks, window
ATTN = {
    "qwen3_30b_a3b": dict(H=32, G=4, Dh=128, sinks=False, window=0),
    "gpt_oss_20b": dict(H=64, G=8, Dh=64, sinks=True, window=0),
    "gpt_oss_20b_window": dict(H=64, G=8, Dh=64, sinks=True, window=128),
    "mixtral_8x7b": dict(H=32, G=8, Dh=128, sinks=False, window=0),
}
#: (block_n, num_warps, num_stages, splits, head first) tried for the per-token (decode) kernel; the
#: first is the kernel's default; "_hf": the programs ordered kv head first (TBO_GQA_HEAD_FIRST)
ATTN_CONFIGS = [(64, 4, 3, 1, False), (64, 4, 3, 1, True), (64, 4, 4, 1, True), (32, 2, 3, 1, True),
                (128, 4, 2, 1, True), (64, 4, 4, 1, False), (32, 2, 3, 1, False), (64, 4, 3, 2, True)]


def attention_rows(T: int, ctx: int, reps: int, replays: int, block: int = 64) -> list[dict]:
    """The decode attention kernel (triton_gqa.paged_attention, per-token path) at each config of
    ATTN_CONFIGS on T requests of `ctx` cached positions, shuffled cache blocks; KV bytes read at
    4.8 TB/s is the floor. Every config is checked against the default's output."""
    from tbo_compiler.runtime.kernels import triton_gqa as tg

    rows = []
    for name, a in ATTN.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        nb = -(-(ctx + 1) // block)
        nblocks = T * nb + 1
        kv = (torch.randn(nblocks * block, 2, a["G"], a["Dh"], device="cuda", generator=g) * 0.5).bfloat16()
        table = (torch.randperm(T * nb, device="cuda", generator=g) + 1).view(T, nb).int()
        pos = torch.full((T,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(T, a["H"], a["Dh"], device="cuda", generator=g).bfloat16()
        sinks = torch.randn(a["H"], device="cuda", generator=g) if a["sinks"] else None
        span = min(ctx + 1, a["window"]) if a["window"] else ctx + 1
        kv_bytes = T * span * 2 * a["G"] * a["Dh"] * 2
        row = dict(case=name, tokens=T, ctx=ctx, kv_bytes=kv_bytes, floor_ms=kv_bytes / PEAK_BYTES * 1e3, configs={})
        ref = None
        for bn, nw, ns, sp, hf in ATTN_CONFIGS:
            key = f"bn{bn}_w{nw}_s{ns}_sp{sp}" + ("_hf" if hf else "")

            def fn(bn=bn, nw=nw, ns=ns, sp=sp, hf=hf):
                return tg.paged_attention(q, kv, table, pos, block, a["Dh"] ** -0.5, sinks, a["window"],
                                          block_n=bn, num_splits=sp, num_warps=nw, num_stages=ns, head_first=hf)
            row["configs"][key], ref = timed_config(fn, ref, reps, replays, "tb_s", kv_bytes / 1e9)
            print(f"attention {name} T={T} {key:18s} {row['configs'][key]}", flush=True)
        keep_best(row)
        rows.append(row)
        del kv
        torch.cuda.empty_cache()
    return rows


#: (tile rows, tile block_n, tile warps, tile stages) tried for the prefill run kernel; the first is
#: the kernel's default (128 rows = tokens x the R heads of a kv head); "tiles only" drops the
#: per-token kernel (whose programs all exit at once when every tile was a run) to show its cost
PREFILL_ATTN_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                        (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 2)]


def prefill_attention_rows(n_req: int, new: int, reps: int, replays: int, block: int = 64) -> list[dict]:
    """The prefill attention (run kernel + per-token kernel) of n_req requests of `new` tokens at
    positions 0..new-1 (the roofline's prefill buckets) at each PREFILL_ATTN_CONFIGS entry, checked
    against the default's output; rate = causal score + value FLOPs / time."""
    from tbo_compiler.runtime.kernels import triton_gqa as tg

    rows = []
    for name, a in ATTN.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        nb = -(-new // block)
        T = n_req * new
        kv = (torch.randn(n_req * nb * block + block, 2, a["G"], a["Dh"], device="cuda", generator=g) * 0.5).bfloat16()
        table = (torch.randperm(n_req * nb, device="cuda", generator=g) + 1).view(n_req, nb).int()
        bt = table.repeat_interleave(new, 0)
        pos = torch.arange(new, device="cuda", dtype=torch.int32).repeat(n_req)
        q = torch.randn(T, a["H"], a["Dh"], device="cuda", generator=g).bfloat16()
        sinks = torch.randn(a["H"], device="cuda", generator=g) if a["sinks"] else None
        keys = (pos.clamp(max=a["window"] - 1) + 1) if a["window"] else pos + 1
        flops = 4.0 * float(keys.sum()) * a["H"] * a["Dh"]
        row = dict(case=name, tokens=T, requests=n_req, flops=flops, configs={})
        R = a["H"] // a["G"]
        ref = None
        for rows_, bn, nw, ns in PREFILL_ATTN_CONFIGS:
            for tiles_only in (False, True):
                if tiles_only and (rows_, bn, nw, ns) != PREFILL_ATTN_CONFIGS[0]:
                    continue
                key = f"m{rows_}_bn{bn}_w{nw}_s{ns}" + ("_tiles_only" if tiles_only else "")
                tt = rows_ // R

                def fn(tt=tt, bn=bn, nw=nw, ns=ns, tiles_only=tiles_only):
                    return tg.paged_attention(q, kv, bt, pos, block, a["Dh"] ** -0.5, sinks, a["window"],
                                              tile_tokens=tt, tile_block_n=bn, tile_warps=nw, tile_stages=ns,
                                              per_token=not tiles_only)
                if tt < 2 or R * tt != rows_:
                    row["configs"][key] = dict(error=f"{rows_} rows is not whole tokens of {R} heads")
                else:
                    row["configs"][key], ref = timed_config(fn, ref, reps, replays, "tflops", flops / 1e9)
                print(f"prefill attention {name} T={T} {key:30s} {row['configs'][key]}", flush=True)
        keep_best(row, skip="tiles_only")
        rows.append(row)
        del kv
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | N | floor ms (GEMM / weights) | best | best ms | % of floor | grouped_mm ms | "
             "fused default ms | parts (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts_s = ", ".join(f"{k} {v:.3f}" for k, v in r["parts_ms"].items() if isinstance(v, float))
        c = r["candidates_ms"]
        lines.append(f"| {r['model']} | {r['tokens']} | {r['floor_ms']:.3f} ({r['gemm_floor_ms']:.3f} / "
                     f"{r['weight_floor_ms']:.3f}) | {r.get('best')} | {r.get('best_ms')} | "
                     f"{r.get('best_pct_of_floor')} % | {c.get('grouped_mm')} | {c.get('triton_default')} | {parts_s} |")
    return "\n".join(lines) + "\n"


def hbm_rows(gib: float = 4.0, reps: int = 4, replays: int = 5) -> dict:
    """What the GPU's memory delivers to a plain stream, the ceiling a weight-streaming decode
    kernel can hope for (the floors use the 4.8 TB/s of the data sheet): a read-only pass (an
    fp32 sum over bf16 rows, a few KB written) and a copy (read + write), each over `gib` GiB, far
    past L2, timed as CUDA graphs."""
    n = int(gib * 2**30) // 2
    a = torch.randn(n // 4096, 4096, device="cuda").bfloat16()
    b = torch.empty_like(a)
    out = {}
    read_ms = graph_ms(lambda: a.sum(dim=0, dtype=torch.float32), reps, replays)
    copy_ms = graph_ms(lambda: b.copy_(a), reps, replays)
    nbytes = a.numel() * 2
    out["read"] = dict(bytes=nbytes, ms=round(read_ms, 4), tb_s=round(nbytes / read_ms / 1e9, 3))
    out["copy"] = dict(bytes=2 * nbytes, ms=round(copy_ms, 4), tb_s=round(2 * nbytes / copy_ms / 1e9, 3))
    print(f"hbm {out}", flush=True)
    del a, b
    torch.cuda.empty_cache()
    return out


def peak_rows(n: int = 8192, seconds: float = 2.0) -> dict:
    """peak_row for operands drawn from a normal distribution (what weights and activations look
    like) and for all-ones operands (few bits toggle: less power at the same FLOPs)."""
    return {"randn": peak_row("randn", n, seconds), "ones": peak_row("ones", n, seconds)}


def peak_row(data: str, n: int = 8192, seconds: float = 2.0) -> dict:
    """The dense bf16 GEMM rate the floors' 790 TFLOP/s stands for, two ways, with the SM clock and
    board power nvidia-smi reads meanwhile (bench/roofline.py SmClock; nothing is set): `burst`, one
    n^3 GEMM after a second of idle (median of 5), as the peak was first measured; `sustained`, the
    same GEMM back to back for `seconds`, the last half timed, as in a prefill step of 50-700 ms."""
    import statistics
    import time

    from roofline import SmClock

    from tbo_compiler.runtime.kernels.moe_tuned import time_ms

    make = torch.randn if data == "randn" else torch.ones
    a = make(n, n, device="cuda").bfloat16()
    b = make(n, n, device="cuda").bfloat16()
    flop = 2 * n ** 3
    for _ in range(3):
        a @ b  # cuBLAS warm
    torch.cuda.synchronize()
    burst = []
    with SmClock(torch.device("cuda")) as c1:
        for _ in range(5):
            time.sleep(1.0)
            burst.append(time_ms(lambda: a @ b, ()))
    ms1 = statistics.median(burst)
    one = time_ms(lambda: a @ b, ())
    reps = max(2, int(seconds / 2 * 1e3 / one))
    for _ in range(reps):  # the first half: the GPU reaches its steady state under load
        a @ b
    with SmClock(torch.device("cuda")) as c2:
        ms2 = time_ms(lambda: [a @ b for _ in range(reps)], ()) / reps
    out = dict(n=n, data=data, burst=dict(ms=round(ms1, 4), tflop_s=round(flop / ms1 / 1e9, 1), clock=c1.result),
               sustained=dict(ms=round(ms2, 4), tflop_s=round(flop / ms2 / 1e9, 1), calls=reps, clock=c2.result))
    print(f"peak {out}", flush=True)
    del a, b
    torch.cuda.empty_cache()
    return out


#: the routers of the models (experts E, top-k K, scoring, renormalize) for --route
ROUTERS = {"qwen3_30b_a3b": (128, 8, "softmax", True), "gpt_oss_20b": (32, 4, "topk_softmax", False),
           "mixtral_8x7b": (8, 2, "softmax", True), "e256_k8": (256, 8, "softmax", True)}


def route_rows(tokens: tuple[int, ...] = (64, 256, 1024, 4096, 16384), reps: int = 20, replays: int = 5) -> list[dict]:
    """The routing kernel (runtime/kernels/triton_route.py) at each (rows a program, warps) it may
    take, per router and token count: median ms (CUDA graphs of `reps` calls), the ids checked
    against the torch reference; which tile `tiles` picks now and which the first rule picked."""
    import os

    from tbo_compiler.runtime.kernels import torch_ref
    from tbo_compiler.runtime.kernels import triton_route as tr

    rows = []
    for name, (E, K, scoring, renorm) in ROUTERS.items():
        e_p2 = max(2, 1 << (E - 1).bit_length())
        for T in tokens:
            logits = torch.randn(T, E, device="cuda")
            want = torch_ref.route_topk(logits.double(), K, scoring, renorm)[0]
            times, bad = {}, []
            for bt in (1, 2, 4, 8, 16, 32):
                if bt * e_p2 > tr._TILE or bt > max(1, T):
                    continue
                for nw in (1, 2, 4):
                    tag = f"bt{bt}_w{nw}"
                    try:
                        ids = tr.route_topk(logits, K, scoring, renorm, tile=(bt, nw))[0]
                        if not torch.equal(ids, want):
                            bad.append(tag)
                        times[tag] = round(graph_ms(lambda bt=bt, nw=nw: tr.route_topk(
                            logits, K, scoring, renorm, tile=(bt, nw)), reps, replays) * 1e3, 2)
                    except Exception as e:  # noqa: BLE001 - one tile that does not build must not stop the sweep
                        times[tag] = f"{type(e).__name__}: {' '.join(str(e).split())[:100]}"
            saved = os.environ.pop("TBO_ROUTE_TILES", None)
            auto = "bt%d_w%d" % tr.tiles(T, E)
            os.environ["TBO_ROUTE_TILES"] = "legacy"
            legacy = "bt%d_w%d" % tr.tiles(T, E)
            os.environ.pop("TBO_ROUTE_TILES")
            if saved is not None:
                os.environ["TBO_ROUTE_TILES"] = saved
            ok = {k: v for k, v in times.items() if isinstance(v, float)}
            best = min(ok, key=ok.get) if ok else None
            row = dict(router=name, E=E, K=K, T=T, us=times, best=best, best_us=ok.get(best), auto=auto,
                       auto_us=ok.get(auto), legacy=legacy, legacy_us=ok.get(legacy), wrong_ids=bad)
            print(f"route {name} T={T}: best {best} {ok.get(best)} us, auto {auto} {ok.get(auto)}, "
                  f"legacy {legacy} {ok.get(legacy)}{'  WRONG ' + str(bad) if bad else ''}", flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="4096,256")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--attention", action="store_true", help="also the decode attention configs (T = 256, ctx 512)")
    ap.add_argument("--prefill-attention", action="store_true",
                    help="also the prefill attention configs (8 requests x 512 new tokens)")
    ap.add_argument("--no-moe", dest="moe", action="store_false", help="skip the expert candidates")
    ap.add_argument("--hbm", action="store_true", help="also a read and a copy over 4 GiB: the memory's own rate")
    ap.add_argument("--peak", action="store_true",
                    help="also an 8192^3 bf16 GEMM after idle and back to back, with the SM clock and power")
    ap.add_argument("--route", action="store_true", help="also the routing kernel's tiles (rows a program, warps)")
    ap.add_argument("--out", default="out/moe_bench")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_bench: needs a CUDA GPU (the candidates are timed as CUDA graphs)", file=sys.stderr)
        return 2
    import triton
    rows = run(a.models.split(","), [int(t) for t in a.tokens.split(",")], a.reps, a.replays) if a.moe else []
    attn = attention_rows(256, 512, a.reps, a.replays) if a.attention else []
    pattn = prefill_attention_rows(8, 512, a.reps, a.replays) if a.prefill_attention else []
    hbm = hbm_rows() if a.hbm else {}
    route = route_rows() if a.route else []
    peak = peak_rows() if a.peak else {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), reps=a.reps, replays=a.replays)
    (out / "moe_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows, attention=attn, prefill_attention=pattn, hbm=hbm,
                                                  route=route, peak=peak),
                                                  indent=1))
    (out / "moe_bench.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
