"""TBO vs no TBO on the GPU: a DeepSeek-V3-shaped slice, every mode side by side in one run.

    python bench/tbo_bench.py --out $OUT                         # all GPUs of the machine, both links
    python bench/tbo_bench.py --out $OUT --links p2p_off --prefill 4096 --decode 512
    python bench/tbo_bench.py --out $OUT --slice gpt_oss         # the GPT-OSS-shaped slice instead

The model (`--slice deepseek_v3`, the default): 4 MoE layers of DeepSeek-V3's shapes (hidden 7168,
MLA with the real config's dims, 8 routed experts per rank, moe_inter 2048, top-8, 1 shared
expert), vocab 4096, random bf16 weights, EP = the number of GPUs (dispatch/combine all-to-all
over NCCL). `--slice gpt_oss`: 4 layers of GPT-OSS-20b's shapes (hidden 2880, GQA 64/8 heads of
64 with sinks, a 128-token window on alternating layers, 32 experts over the EP ranks, top-4,
expert ffn 2880 with biases and the clamped activation), vocab 4096; its result files are named
tbo_bench_gpt_oss_ep{N}.json, trace_gpt_oss_*.json. Each rank serves its own
requests: prefill in requests of 512 tokens, decode one token per request over a 512-token
context. Plans are compiled once here (`compile_model`, the same front as `tbo-compile`), read
back from disk, and run by the runtime (`PlanModule`) on every rank.

Modes, per bucket and link, timed with CUDA events (3 warm-ups, then the median of `--iters`
calls, ranks aligned by a barrier before each mode):
  eager     the model's own forward (same kernels, no graph)
  serial    the plan's one-ubatch program, CUDA graph          (the no-TBO baseline)
  tbo       the plan's two-ubatch program, CUDA graph          (TBO forced on)
  auto      what the runtime keeps after measuring both        (TBO where it pays)
  compute   the TBO program with no communication (CUDA graph), comm: its comm ops alone
  ideal     max(compute, comm): the bound no overlap can beat
Links: `nvlink` (NCCL default) and `p2p_off` (NCCL_P2P_DISABLE=1, ~29 GB/s: scale-out-like); each
link is a fresh set of processes (NCCL reads the variable at start).
Correctness of every benched bucket: bf16 greedy tokens of tbo and serial vs eager, and vs eager
run on the same two ubatches one after the other ("eager_halves": the row blocking TBO uses, so
eager_halves vs eager is the bf16 noise floor of the split itself); with --fp32-prefill/--fp32-decode,
fp32 (TF32 off) plans against the fp32 eager model, max |diff| / max |logit|.
TBO steps of --trace-prefill/--trace-decode buckets are profiled: their Perfetto traces are written
with GPU idle %, comm hidden %, kernels per forward; the predicted trace of the same bucket (per-op
times measured alone, the schedule simulated) is beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

SLICE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 4,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 0, "moe_layer_freq": 1, "n_group": 1,
    "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "vocab_size": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "tie_word_embeddings": False,
}
GPT_OSS_SLICE = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 4, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "attention_bias": True, "swiglu_limit": 7.0,
    "vocab_size": 4096, "rms_norm_eps": 1e-5, "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096},
    "tie_word_embeddings": False,
}
#: --slice -> (config, fields that depend on the EP size, prefix of the result files)
SLICES = {"deepseek_v3": (SLICE, lambda ep: {"n_routed_experts": 8 * ep}, ""),
          "gpt_oss": (GPT_OSS_SLICE, lambda ep: {}, "gpt_oss_")}
BLOCK, MAX_BLOCKS, REQ_LEN, CTX = 64, 16, 512, 512


# Step 1: plans (parent process) -------------------------------------------------------------

def write_slice(d: Path, ep: int, name: str = "deepseek_v3") -> Path:
    config, per_ep, _ = SLICES[name]
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**config, **per_ep(ep)}))
    return d


def compile_plans(model_dir: Path, ep: int, buckets: dict, out: Path, dump_dir=None) -> dict:
    """{(phase, dtype): plan path}; one plan per phase holds every bucket, TBO and serial programs.
    `buckets`: {dtype: {phase: token counts}}."""
    from tbo_compiler.compile import compile_model_dir

    paths = {}
    for dt, phases in buckets.items():
        for phase, counts in phases.items():
            if not counts:
                continue
            p = out / f"plan_{phase}_{dt}.pt"
            t0 = time.perf_counter()
            compile_model_dir(model_dir, p, ep=ep, moe_comm="a2a", mode=phase, token_counts=counts,
                              profile="h200", block_size=BLOCK, max_blocks=MAX_BLOCKS,
                              dtype=getattr(torch, dt),
                              dump_dir=(dump_dir / phase) if (dump_dir and dt == "bfloat16") else None)
            print(f"compiled {p.name} ({counts}) in {time.perf_counter() - t0:.1f} s", flush=True)
            paths[(phase, dt)] = str(p)
    return paths


# Step 2: a model with random weights and synthetic batches (each rank) -------------------------

def random_model(model_dir, rank: int, ep: int, dtype, device, block_size: int = BLOCK):
    """The model with random weights: norms 1, correction bias 0, embeddings N(0, 1), everything
    else N(0, 1) / sqrt(fan-in) (keeps activations O(1) through the layers and the router), drawn
    in place in the weights' dtype (no fp32 copy of the largest tensor); seeded per rank."""
    from tbo_compiler.models import ParallelConfig, build_model

    model = build_model(model_dir, parallel=ParallelConfig(ep, rank, "ep", "a2a"), block_size=block_size,
                        dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.zero_()
            else:
                p.normal_(generator=g)
                if not name.endswith("embed_tokens.weight"):
                    p.mul_(p.shape[-1] ** -0.5)
    return model


def synthetic_batch(phase: str, T: int, vocab: int, seed: int, device):
    """Flat engine-style batch over a cache whose blocks are shuffled. prefill: T/512 requests of
    512 new tokens; decode: T requests of one token after a 512-token context."""
    g = torch.Generator().manual_seed(seed)
    if phase == "prefill":
        n_req, new, start = T // REQ_LEN, REQ_LEN, 0
    else:
        n_req, new, start = T, 1, CTX
    nb = -(-(start + new) // BLOCK)
    perm = torch.randperm(n_req * nb, generator=g) + 1  # block 0 is the null block
    tables = perm.view(n_req, nb).int()
    pos = (start + torch.arange(new)).repeat(n_req)
    req = torch.arange(n_req).repeat_interleave(new)
    slots = tables[req, pos // BLOCK].long() * BLOCK + pos % BLOCK
    table = torch.zeros(n_req * new, MAX_BLOCKS, dtype=torch.int32)
    table[:, :nb] = tables[req]
    ids = torch.randint(1, vocab, (n_req * new,), generator=g)
    return [t.to(device) for t in (ids, pos, slots, table)], n_req * nb + 1


# Step 3: timing and trace metrics ------------------------------------------------------------

def timed(fn, iters: int, group=None) -> float:
    import torch.distributed as dist

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier(group=group)
    from tbo_compiler.runtime.kernels.moe_tuned import time_ms

    ms = [time_ms(fn, ()) for _ in range(iters)]
    return sorted(ms)[len(ms) // 2]


def trace_metrics(events: list) -> dict:
    """GPU idle %, comm hidden %, kernels per step, from the kernel events of one profiled step.
    NCCL kernels are the comm; every other kernel is compute (graph replays report kernels on the
    launch stream, so kernels are told apart by name, not by stream)."""
    ks = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not ks:
        return {}
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in ks if "nccl" in e["name"].lower()]
    comp = [(e["ts"], e["ts"] + e["dur"]) for e in ks if "nccl" not in e["name"].lower()]

    def union(iv):
        out = []
        for s, e in sorted(iv):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    def total(iv):
        return sum(e - s for s, e in iv)

    def inter(a, b):
        i = j = 0
        acc = 0.0
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            acc += max(0.0, hi - lo)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return acc

    uc, um, ua = union(comp), union(comm), union(comp + comm)
    span = ua[-1][1] - ua[0][0]
    hidden = inter(uc, um)
    return {"span_ms": round(span / 1e3, 3), "compute_busy_ms": round(total(uc) / 1e3, 3),
            "comm_busy_ms": round(total(um) / 1e3, 3), "overlap_ms": round(hidden / 1e3, 3),
            "gpu_idle_pct": round(100 * (1 - total(ua) / span), 2),
            "comm_hidden_pct": round(100 * hidden / total(um), 2) if um else None,
            "kernels": len(ks), "nccl_kernels": len(comm)}


# Step 4: one rank ----------------------------------------------------------------------------

def rank_main(rank, world, cfg):
    import torch.distributed as dist

    from tbo_compiler.load import programs_of
    from tbo_compiler.plan import read_plan
    from tbo_compiler.runtime.graphs import GraphedProgram
    from tbo_compiler.runtime.plan_module import PlanModule

    dev = torch.device("cuda", rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir, link = cfg["model_dir"], cfg["link"]
    rows = []
    for dt, phases in cfg["buckets"].items():
        dtype = getattr(torch, dt)
        model = random_model(model_dir, rank, world, dtype, dev)
        V = model.config.vocab_size
        for phase, counts in phases.items():
            key = f"{phase}|{dt}"
            if not counts or key not in cfg["plans"]:
                continue
            plan = read_plan(cfg["plans"][key])
            run = PlanModule(programs_of(plan, dev), model, dev, ep=world, group="ep", policy="auto")
            for T in counts:
                user, nblocks = synthetic_batch(phase, T, V, seed=100 * rank + T, device=dev)
                kv = model.new_kv_cache(max(nblocks, 2), device=dev)
                gcache = torch.Generator(device=dev).manual_seed(7 + rank)
                for c in kv.caches:  # a prior context's latents (prefill overwrites its own slots)
                    c.copy_(torch.randn(c.shape, generator=gcache, device=dev, dtype=torch.float32))
                args = (*user, kv.caches)
                row = {"link": link, "phase": phase, "tokens_per_rank": T, "dtype": dt, "ep": world}
                with torch.no_grad():
                    eager_out = model(*args)
                    tbo_out = run(*args, variant="tbo") if "tbo" in run.buckets[T] else None
                    serial_out = run(*args, variant="serial")
                    halves = None
                    if tbo_out is not None:  # eager on the two ubatches, one after the other
                        cut = run.buckets[T]["tbo"][0].cut
                        halves = torch.cat([model(*[u[:cut] for u in user], kv.caches),
                                            model(*[u[cut:] for u in user], kv.caches)])
                scale = float(eager_out.float().abs().max())

                def compare(name, out, ref, ref_name="eager"):
                    diff = float((out.float() - ref.float()).abs().max())
                    sfx = "" if ref_name == "eager" else f"_vs_{ref_name}"
                    row[f"{name}_max_abs_diff{sfx}"] = diff
                    row[f"{name}_rel_diff{sfx}"] = diff / max(scale, 1e-30)
                    row[f"{name}_greedy_agree{sfx}"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())

                for name, out in (("tbo", tbo_out), ("serial", serial_out)):
                    if out is not None:
                        compare(name, out, eager_out)
                if halves is not None:
                    # the same row blocking as TBO: what bf16 rounding alone changes (the noise floor)
                    compare("eager_halves", halves, eager_out)
                    compare("tbo", tbo_out, halves, "eager_halves")
                if dt == "bfloat16":
                    with torch.no_grad():
                        row["eager_ms"] = timed(lambda: model(*args), cfg["iters"])
                    row["serial_ms"] = timed(lambda: run(*args, variant="serial"), cfg["iters"])
                    if "tbo" in run.buckets[T]:
                        row["tbo_ms"] = timed(lambda: run(*args, variant="tbo"), cfg["iters"])
                        choice = run._choose(T, lambda v: run.args_for(T, v, list(user) + list(kv.caches)))
                        row["auto_choice"] = choice
                        row["auto_measured_ms"] = run.decisions[T].get("ms")
                        row["auto_ms"] = row["tbo_ms"] if choice == "tbo" else row["serial_ms"]
                        prog_args = run.args_for(T, "tbo", list(user) + list(kv.caches))
                        for mode in ("compute", "comm"):
                            g = GraphedProgram(run.run_mode(T, "tbo", mode), [], run.pool, f"{mode} {T}")
                            row[f"{mode}_ms"] = timed(lambda g=g: g(*prog_args), cfg["iters"])
                        row["ideal_ms"] = max(row["compute_ms"], row["comm_ms"])
                        traced = T in cfg["trace_tokens"].get(phase, ()) and link in cfg["trace_links"]
                        row["predicted"] = predict(run, T, list(user) + list(kv.caches), dev, row,
                                                   Path(cfg["out"]) / f"trace_predicted_{cfg['prefix']}{link}_{phase}{T}.json"
                                                   if traced and rank == 0 else None)
                        if traced:
                            row["trace"] = profile_step(lambda: run(*args, variant="tbo"), cfg, rank, link,
                                                        f"{phase}{T}")
                    else:
                        row["auto_choice"], row["auto_ms"] = "serial", row["serial_ms"]
                    dist.barrier()
                rows.append(row)
                if rank == 0:
                    print(json.dumps({k: v for k, v in row.items() if k != "auto_measured_ms"}), flush=True)
                del kv, args, eager_out, tbo_out, serial_out
            del run
        del model
        torch.cuda.empty_cache()
    return rows


def predict(run, T, user, dev, row, trace_path=None) -> dict:
    """The cost model fed by measurement: each op of both programs timed alone on this GPU
    (runtime/profile.py), then the two-stream schedule simulated with those times."""
    from tbo_compiler.passes.cost_model import simulate
    from tbo_compiler.runtime.profile import measure_ops

    from tbo_compiler.runtime.profile import event_floor_us

    out = {"event_floor_us": round(event_floor_us(dev), 3)}
    for v in ("tbo", "serial"):
        bp = run.buckets[T][v][0]
        costs = measure_ops(bp.gm, bp.instrs, run.args_for(T, v, user), dev)
        tl = simulate(bp.instrs, costs)
        out[f"{v}_ms"] = round(tl.makespan_us / 1e3, 3)
        out[f"{v}_error_pct"] = round(100 * (tl.makespan_us / 1e3 - row[f"{v}_ms"]) / row[f"{v}_ms"], 1)
        if v == "tbo":
            out["overlap_ms"] = round(tl.overlap_us() / 1e3, 3)
            out["comm_busy_ms"] = round(tl.busy_us.get("comm", 0.0) / 1e3, 3)
            if trace_path is not None:
                ev = [{"ph": "X", "pid": 1, "tid": 1 if st == "compute" else 2, "name": name,
                       "cat": f"ubatch{ub}", "ts": round(s, 3), "dur": round(e - s, 3)}
                      for name, ub, st, s, e in tl.spans]
                ev += [{"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": n}}
                       for t, n in ((1, "compute"), (2, "comm"))]
                trace_path.write_text(json.dumps({"traceEvents": ev, "otherData": {
                    "note": "predicted: per-op GPU times measured alone, schedule simulated"}}))
    return out


def profile_step(fn, cfg, rank, link, T) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = Path(cfg["out"]) / f"trace_{cfg['prefix']}{link}_{T}_rank{rank}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    m = trace_metrics(events)
    if rank != 0:
        path.unlink()
    else:
        m["file"] = path.name
    return m


# Step 5: driver ------------------------------------------------------------------------------

def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--links", default="nvlink,p2p_off")
    ap.add_argument("--prefill", type=_ints, default=[1024, 4096, 8192])
    ap.add_argument("--decode", type=_ints, default=[64, 128, 256, 512])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--fp32-prefill", type=_ints, default=[], help="buckets also checked in fp32 (TF32 off)")
    ap.add_argument("--fp32-decode", type=_ints, default=[])
    ap.add_argument("--trace-prefill", type=_ints, default=[4096])
    ap.add_argument("--trace-decode", type=_ints, default=[512])
    ap.add_argument("--trace-links", default="p2p_off")
    ap.add_argument("--dumps", action="store_true", help="also write the compiler dumps of every bucket")
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--slice", choices=sorted(SLICES), default="deepseek_v3", help="the model slice to bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from tbo_compiler.runtime.launch import run_ranks

    tmp = Path(tempfile.mkdtemp(prefix="tbo_bench_"))
    model_dir = write_slice(tmp / "slice", args.world, args.slice)
    prefix = SLICES[args.slice][2]
    buckets = {"bfloat16": {"prefill": args.prefill, "decode": args.decode}}
    if args.fp32_prefill or args.fp32_decode:
        buckets["float32"] = {"prefill": args.fp32_prefill, "decode": args.fp32_decode}
    t0 = time.perf_counter()
    plans = compile_plans(model_dir, args.world, buckets, tmp, dump_dir=(out / "dumps") if args.dumps else None)
    compile_s = time.perf_counter() - t0
    all_rows = []
    for link in args.links.split(","):
        # "nvlink" | "p2p_off", then optional "+VAR=VALUE" NCCL settings, e.g. p2p_off+NCCL_MAX_NCHANNELS=4
        base, *extra = link.split("+")
        env = {"NCCL_P2P_DISABLE": "1"} if base == "p2p_off" else {}
        env.update(dict(e.split("=", 1) for e in extra))
        cfg = {"model_dir": str(model_dir), "link": link, "buckets": buckets,
               "plans": {f"{k[0]}|{k[1]}": v for k, v in plans.items()}, "iters": args.iters,
               "trace_tokens": {"prefill": args.trace_prefill, "decode": args.trace_decode},
               "trace_links": args.trace_links.split(","), "out": str(out), "prefix": prefix}
        t1 = time.perf_counter()
        res = run_ranks(rank_main, args.world, cfg, backend="nccl", env=env, timeout=1500)
        for r, rows in enumerate(res):
            for row in rows:
                row["rank"] = r
        all_rows += [row for rows in res for row in rows]
        print(f"link {link}: {time.perf_counter() - t1:.0f} s", flush=True)
    meta = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "world": args.world,
            "python": platform.python_version(), "compile_s": round(compile_s, 1),
            "slice": SLICES[args.slice][0],
            "command": " ".join([sys.executable.split("/")[-1], *sys.argv])}
    (out / f"tbo_bench_{prefix}ep{args.world}.json").write_text(json.dumps({"meta": meta, "rows": all_rows}, indent=1))
    print(summary_table(all_rows))


def summary_table(rows) -> str:
    """Rank 0's bf16 rows as a markdown table (ratios measured side by side in this run)."""
    lines = ["| link | phase | tok/rank | eager | serial (graph) | TBO (graph) | TBO/serial | auto | ideal | "
             "greedy agree tbo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rank"] != 0 or r["dtype"] != "bfloat16":
            continue
        tbo = r.get("tbo_ms")
        ratio = f"{r['serial_ms'] / tbo:.2f}x" if tbo else "-"
        auto = f"{r['auto_ms']:.2f} ({r['auto_choice']})"
        lines.append(f"| {r['link']} | {r['phase']} | {r['tokens_per_rank']} | {r['eager_ms']:.2f} | "
                     f"{r['serial_ms']:.2f} | {tbo if tbo is None else f'{tbo:.2f}'} | {ratio} | {auto} | "
                     f"{r.get('ideal_ms', float('nan')):.2f} | {r.get('tbo_greedy_agree', float('nan')):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
