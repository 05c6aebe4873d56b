"""A model nobody here wrote, expert parallel over NCCL: `transformers` Qwen3-MoE (Qwen3-30B-A3B
dims) with its experts sharded over the ranks, under `torch.compile(backend="inductor")` and
`torch.compile(backend="tbo")` (issue 23, item 2).

    NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 bench/hf_ep_bench.py --out $OUT/hf_ep --link p2p_off
    torchrun --nproc-per-node 2 bench/hf_ep_bench.py --out $OUT/hf_ep --link nvlink
    python bench/hf_ep_bench.py --device cpu --tiny --world 2 --out /tmp/hf_ep     # CPU smoke test (gloo ranks)

(bench/multi_gpu.sh runs it per machine kind; NCCL reads NCCL_P2P_DISABLE at start, so each link
is a fresh torchrun, and --link only labels the rows.)

The model: Qwen3MoeForCausalLM, hidden 2048, 128 experts top-8, moe_intermediate 768, 32 heads /
4 KV heads of 128, `--layers` (default 4) decoder layers, vocab 8192 (bench/any_model_bench.py's
config; `--tiny`: its tiny dims, 8 experts), random weights (bf16 on GPU, fp32 on CPU). Rank 0
writes it once with `save_pretrained` to `--ckpt-dir` (default under /tmp, reused when the config
matches); every rank loads it with `from_pretrained(..., distributed_config=...)`:
  --style ep       DistributedConfig(ep_size=N, tp_size=N, ep_implementation="all_reduce", tp_plan=every
                   dense rule "replicate" (transformers refuses tp_size > 1 with an empty plan)):
                   transformers' own EP alone. Every rank holds the batch (attention replicated), runs
                   its 128/N experts on every token (other routes masked) and an all-reduce sums.
                   One graph, no data-dependent shape: the tbo backend can split it.
  --style ep_tp    the same with transformers' TP plan for attention/embedding/lm_head (tp_size=N:
                   needs N | 4 KV heads, so not at N=8)
  --style funcol   no DistributedConfig (for a transformers without it): the experts of each layer
                   cut to this rank's N-th, masked routes, a _functional_collectives all_reduce.
(The all-to-all styles read split sizes back with .tolist(): dynamo breaks the graph there and
those pieces cannot split, tests/test_hf_ep.py; they are not benched.)

Modes, each compiled afresh with dynamic=False (first call timed with its compile):
  inductor   torch.compile(model)                                  (the baseline)
  tbo        torch.compile(model, backend="tbo")                   (split="auto": TBO where it pays)
  tbo-split  torch.compile(model, backend="tbo", options={"split": True})
`--shapes 8x512,256x1`: B x S per rank (every rank of the all-reduce styles holds the same batch,
so tokens per rank = B*S: 8x512 is prefill 4096 tok/rank, 256x1 one decode step of 256).
Timing (GPU): 3 warm-up calls, then per block: synchronize, barrier (ranks aligned), `--iters` calls
back to back between two CUDA events; ms = median of 3 blocks, the row's `ms` the slowest rank's.
Correctness: max |out - eager| / max |eager| on each rank's logits (eager = the same sharded model
without compile; bf16 on GPU, fp32 on CPU where tbo must match within 1e-5). For tbo modes the
backend's `on_compile` report per compiled graph: tokens T, cut, comm ops found, fallback reason.
Output (--out): hf_ep_{link}_ep{N}.json (rewritten after each row) and .md (the command and a
table with a "tbo vs inductor" column = inductor ms / tbo ms).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
import any_model_bench  # noqa: E402
from any_model_bench import HF_MODELS, TINY, VOCAB  # noqa: E402

# the multicast switches, in every process (ranks spawned here inherit them; torchrun's are set by
# the caller, bench/multi_gpu.sh; set here too, before any process group exists)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in MULTICAST_OFF.items():
    os.environ.setdefault(_k, _v)

MODES = {
    "inductor": dict(backend="inductor"),
    "tbo": dict(backend="tbo", options={}),
    "tbo-split": dict(backend="tbo", options={"split": True}),
}
STYLES = {
    "ep": dict(tp_plan="replicate", ep_implementation="all_reduce"),
    "ep_tp": dict(ep_implementation="all_reduce"),
    "funcol": None,
}


# Step 1: the model ---------------------------------------------------------------------------

def model_config(layers: int, tiny: bool) -> dict:
    """Qwen3-30B-A3B's MoE dims (any_model_bench.HF_MODELS), `layers` layers, vocab cut."""
    fields = dict(HF_MODELS["qwen3_moe"][1])
    if tiny:
        fields.update({k: v for k, v in TINY.items() if k in fields or k == "hidden_size"})
        fields["num_experts"] = 8
    return dict(fields, num_hidden_layers=layers, vocab_size=256 if tiny else VOCAB)


def write_checkpoint(ckpt: Path, fields: dict, dtype, device) -> None:
    """Random weights saved with save_pretrained, unless a checkpoint of the same config is there."""
    import transformers as tf

    tag = hashlib.sha1(json.dumps([fields, str(dtype)], sort_keys=True).encode()).hexdigest()[:12]
    stamp = ckpt / "hf_ep_bench.tag"
    if stamp.exists() and stamp.read_text() == tag:
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**fields)).to(dtype)
    model.save_pretrained(ckpt)
    del model
    stamp.write_text(tag)


def load_sharded(ckpt: Path, style: str, rank: int, world: int, dtype, device):
    """This rank's model: transformers' own EP (DistributedConfig) or the funcol cut."""
    import transformers as tf

    if STYLES[style] is not None:
        from transformers.distributed import DistributedConfig

        kw = dict(STYLES[style])
        if kw.get("tp_plan") == "replicate":
            kw["tp_plan"] = dense_replicated(tf)
        cfg = DistributedConfig(ep_size=world, tp_size=world, **kw)
        return tf.AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=cfg, dtype=dtype).eval()
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    for layer in model.model.layers:
        layer.mlp.experts = FuncolExperts(layer.mlp.experts, rank, world)
    return model


def dense_replicated(tf) -> dict:
    """A TP plan that keeps every dense module whole on every rank. all_reduce EP needs
    tp_size == ep_size, and transformers (5.23) refuses tp_size > 1 with an empty plan, so each
    rule of the model's plan is overridden with "replicate" (the expert rules give way to EP)."""
    base = tf.Qwen3MoeConfig.base_model_tp_plan
    plan = {"lm_head": "replicate", "model.embed_tokens": "replicate"}
    plan.update({f"model.{k}": "replicate" for k in base if ".experts" not in k})
    return plan


class FuncolExperts(torch.nn.Module):
    """A transformers experts module cut to this rank's experts: routes to other ranks' experts
    get the out-of-range local id and weight 0 (as transformers' AllReduceEP masks them), and a
    functional all_reduce sums the ranks' partial outputs."""

    def __init__(self, experts, rank: int, world: int):
        super().__init__()
        n = experts.num_experts // world
        self.lo, self.n = rank * n, n
        with torch.no_grad():
            for name, p in list(experts.named_parameters(recurse=False)):
                if p.shape[0] == experts.num_experts:
                    setattr(experts, name, torch.nn.Parameter(p[self.lo:self.lo + n].clone(), requires_grad=False))
        experts.num_experts = n
        experts._is_expert_parallel = True  # transformers' experts then drop the out-of-range ids' rows
        self.inner = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        off = (top_k_index < self.lo) | (top_k_index >= self.lo + self.n)
        local = torch.where(off, self.n, top_k_index - self.lo)
        out = self.inner(hidden_states, local, top_k_weights.masked_fill(off, 0.0))
        return funcol.all_reduce(out, "sum", dist.group.WORLD)


# Step 2: one mode on one batch ----------------------------------------------------------------

def timed(fn, iters: int, device) -> float:
    """ms per call: any_model_bench's blocks of back-to-back calls, each block started with the
    ranks aligned by a barrier."""
    import torch.distributed as dist

    def align():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    return any_model_bench.timed(fn, iters, device, before_block=align)


def run_mode(model, mode: str, ids, ref, device, iters: int) -> dict:
    """Compile (first call timed), warm up, time, compare with eager; the tbo report per graph."""
    import torch.distributed as dist

    torch._dynamo.reset()
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MODES[mode].items()}
    seen: list = []
    if spec["backend"] == "tbo":
        spec["options"]["on_compile"] = seen.append
    fn = torch.compile(model, dynamic=False, **spec)

    def call():
        return fn(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        for _ in range(3):
            call()
        ms = timed(call, iters, device)
        out = call().float()
    d = float((out - ref).abs().max())
    row = {"mode": mode, "ms_rank": round(ms, 4), "first_call_s": round(first_s, 2),
           "max_abs_diff": d, "rel_diff": d / max(float(ref.abs().max()), 1e-30)}
    if spec["backend"] == "tbo":
        row["graphs"] = [{"T": c.T, "cut": c.cut, "did_split": bool(c.did_split), "comm": len(c.comm_before.ops),
                          "fallback": c.fallback} for c in seen]
        row["split"] = any(g["did_split"] for g in row["graphs"])
    return row


# Step 3: one rank -------------------------------------------------------------------------------

def rank_main(rank: int, world: int, cfg: dict) -> list[dict]:
    """Every shape and mode on this rank; rank 0 writes the results after each row."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if cfg["device"] == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    ckpt = Path(cfg["ckpt_dir"])
    fields = model_config(cfg["layers"], cfg["tiny"])
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        write_checkpoint(ckpt, fields, dtype, device)
    dist.barrier()
    model = load_sharded(ckpt, cfg["style"], rank, world, dtype, device)
    rows: list[dict] = []
    for B, S in cfg["shapes"]:
        g = torch.Generator().manual_seed(B * 1000 + S)  # the same batch on every rank (shared-batch EP)
        ids = torch.randint(1, fields["vocab_size"], (B, S), generator=g).to(device)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
        for mode in cfg["modes"]:
            labels = {"link": cfg["link"], "style": cfg["style"], "ep": world, "layers": cfg["layers"],
                      "shape": f"{B}x{S}", "tokens_per_rank": B * S}
            try:
                row = run_mode(model, mode, ids, ref, device, cfg["iters"])
            except Exception as e:  # noqa: BLE001 - a mode that fails is a row saying why
                row = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                       "traceback": traceback.format_exc()[-2000:]}
            row = {**labels, **row}
            per_rank = [None] * world
            dist.all_gather_object(per_rank, row)
            merged = dict(row)
            oks = [r for r in per_rank if "ms_rank" in r]
            if len(oks) == world:
                merged["ms"] = max(r["ms_rank"] for r in oks)  # the group's step: the slowest rank
                merged["ms_per_rank"] = [r["ms_rank"] for r in oks]
                merged["rel_diff"] = max(r["rel_diff"] for r in oks)
                merged["max_abs_diff"] = max(r["max_abs_diff"] for r in oks)
            errors = [f"rank {i}: {r['error']}" for i, r in enumerate(per_rank) if "error" in r]
            if errors:
                merged["error"] = "; ".join(errors)
            merged.pop("ms_rank", None)
            rows.append(merged)
            if rank == 0:
                emit(cfg, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# Step 4: output ---------------------------------------------------------------------------------

def emit(cfg: dict, rows: list[dict]) -> None:
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"hf_ep_{cfg['link']}_ep{cfg['world']}"
    meta = {k: cfg[k] for k in ("command", "link", "style", "world", "layers", "tiny", "iters", "device")}
    meta.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), model=model_config(cfg["layers"], cfg["tiny"]))
    if cfg["device"] == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(f"`{cfg['command']}`\n\n{summary(rows)}\n")
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "traceback"}), flush=True)


def summary(rows: list[dict]) -> str:
    """Markdown: ms per mode per (link, shape), tbo modes against inductor (inductor ms / tbo ms)."""
    keys = list(dict.fromkeys((r["link"], r["shape"], r["tokens_per_rank"]) for r in rows))
    lines = ["| link | B x S | tok/rank | inductor ms | tbo ms | tbo-split ms | tbo vs inductor | "
             "tbo-split vs inductor | tbo split? | rel diff tbo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        by = {r["mode"]: r for r in rows if (r["link"], r["shape"], r["tokens_per_rank"]) == k}

        def ms(m):
            return by[m]["ms"] if m in by and "ms" in by[m] else None

        def cell(m):
            return f"{ms(m):.3f}" if ms(m) is not None else ("err" if m in by else "")

        def ratio(m):
            return f"{ms('inductor') / ms(m):.2f}x" if ms("inductor") and ms(m) else ""
        split = ""
        if "tbo" in by and "graphs" in by["tbo"]:
            gs = by["tbo"]["graphs"]
            split = "yes" if by["tbo"]["split"] else (next((g["fallback"] for g in gs if g["fallback"]), "no") or "no")
        rel = f"{by['tbo']['rel_diff']:.1e}" if "tbo" in by and "rel_diff" in by["tbo"] else ""
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {cell('inductor')} | {cell('tbo')} | {cell('tbo-split')} | "
                     f"{ratio('tbo')} | {ratio('tbo-split')} | {split} | {rel} |")
    return "\n".join(lines)


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="hf_ep_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/hf_ep"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny dims, 8 experts (CPU smoke test)")
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shapes", default="8x512,256x1", help="B x S per rank, comma-separated")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--style", default="ep", choices=sorted(STYLES))
    ap.add_argument("--link", default=None, help="label of the rows (default: p2p_off if NCCL_P2P_DISABLE=1, "
                                                  "else nvlink; gloo on CPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ckpt-dir", default=None, help="where rank 0 writes the random checkpoint (default /tmp)")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    link = a.link or ("gloo" if a.device == "cpu" else
                      "p2p_off" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "nvlink")
    ckpt = a.ckpt_dir or str(Path(tempfile.gettempdir()) / f"hf_ep_bench_qwen3_{'tiny' if a.tiny else 'a3b'}_l{a.layers}")
    ws = os.environ.get("WORLD_SIZE")
    head = f"torchrun --nproc-per-node {ws} bench/hf_ep_bench.py" if ws else "python bench/hf_ep_bench.py"
    args = argv if argv is not None else sys.argv[1:]
    return {"out": a.out, "device": a.device, "tiny": a.tiny, "world": int(ws) if ws else a.world,
            "layers": a.layers, "shapes": [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",") if s],
            "modes": modes, "style": a.style, "link": link, "iters": a.iters, "ckpt_dir": ckpt,
            "command": " ".join([*(["NCCL_P2P_DISABLE=1"] if link == "p2p_off" else []), head,
                                 *map(shlex.quote, args)])}


def main(argv=None) -> int:
    cfg = parse(argv)
    if "WORLD_SIZE" not in os.environ:   # ranks spawned here (gloo on CPU, NCCL on GPUs)
        from tbo_compiler.runtime.launch import run_ranks

        env = dict(MULTICAST_OFF)
        if cfg["link"] == "p2p_off":
            env["NCCL_P2P_DISABLE"] = "1"
        res = run_ranks(rank_main, cfg["world"], cfg, backend="nccl" if cfg["device"] == "cuda" else "gloo",
                        env=env, timeout=3000)
        print(summary(res[0]))
        return 0
    import torch.distributed as dist

    from tbo_compiler.runtime.comm import register_group

    if cfg["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo")
    register_group("ep", dist.group.WORLD)
    rows = rank_main(dist.get_rank(), dist.get_world_size(), cfg)
    if dist.get_rank() == 0:
        print(summary(rows))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
