"""Any model at compiler speed: `backend="tbo"` against plain `torch.compile` on models nobody here
wrote (`transformers`), and the project's own models through the Inductor path against today's
runtime. One process, one GPU (no comm: TBO's split is pure overhead here; what is measured is
that the compute between comm points runs at Inductor's speed).

    python bench/any_model_bench.py --out bench/results/any_model_h200.json            # on the GPU
    python bench/any_model_bench.py --device cpu --tiny --out /tmp/any.json             # smoke test

Per model and shape, modes (each compiled afresh, first call timed as the compile time):
  eager, inductor, inductor-ro (mode="reduce-overhead"), tbo-unsplit (split=False),
  tbo-split (split=True), tbo-split-aten (split=True, inductor=False: today's runtime),
  tbo-unsplit-aten, inductor-pass (backend="inductor" with tbo_pass(split=True) as its
  post_grad_custom_post_pass). ms per forward = median of CUDA-event-timed calls after warm-up; every mode's
output is compared with eager (max abs difference, and relative to eager's max abs). Timing:
median over 3 blocks of back-to-back calls (bench/results/any_model_h200/any_model_qwen3.json and
any_model_hf.json timed each call alone, host sync between calls).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VOCAB = 8192
#: real dims (shared/reference/MODELS.md), a few layers, vocab cut to VOCAB (the MoE is what counts)
HF_MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                         num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                         num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                      num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8)),
    "gpt_oss": ("GptOssConfig", dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                                     num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                                     head_dim=64, sliding_window=128)),
}
TINY = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
MODES = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "inductor-ro": dict(backend="inductor", mode="reduce-overhead"),
    "tbo-unsplit": dict(backend="tbo", options={"split": False}),
    "tbo-split": dict(backend="tbo", options={"split": True}),
    "tbo-split-aten": dict(backend="tbo", options={"split": True, "inductor": False}),
    "tbo-unsplit-aten": dict(backend="tbo", options={"split": False, "inductor": False}),
    # the engine hook: plain Inductor with tbo_pass as its post-grad custom pass
    "inductor-pass": dict(backend="inductor", options={"post_grad_custom_post_pass": "tbo_pass"}),
}


def hf_model(name: str, layers: int, tiny: bool, dtype, device):
    import transformers as tf

    cls, fields = HF_MODELS[name]
    fields = dict(fields)
    if tiny:
        fields.update({k: v for k, v in TINY.items() if k in fields or k in ("hidden_size", "intermediate_size")})
        for k in ("num_experts", "num_local_experts"):
            if k in fields:
                fields[k] = min(fields[k], 8)
    if name == "gpt_oss":
        fields["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + \
            ["sliding_attention"] * (layers % 2)
    cfg = getattr(tf, cls)(num_hidden_layers=layers, vocab_size=VOCAB if not tiny else 256, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def timed(fn, iters: int, device, before_block=None) -> float:
    """ms per call: the median over 3 blocks of `iters` calls issued back to back (as a serving
    loop issues them: the host's per-call work overlaps the GPU's), each block timed by events.
    `before_block()` runs before each block (ranks meeting at a barrier, say)."""
    blocks = []
    for _ in range(3):
        if before_block is not None:
            before_block()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            e.synchronize()
            blocks.append(s.elapsed_time(e) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            blocks.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(blocks)


def run_mode(model, mode: str, make_call, device, iters: int, ref):
    """One mode: compile (first call timed), warm up, time; returns the row and the output."""
    torch._dynamo.reset()
    spec = MODES[mode]
    info: dict = {}
    tbo_pass = None
    if spec is None:
        fn = model
    else:
        spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
        if spec["backend"] == "tbo":
            spec["options"]["on_compile"] = lambda st: info.update(
                cut=st.cut, T=st.T, fallback=st.fallback, comm=len(st.comm_before.ops))
        tbo_pass = None
        if spec.get("options", {}).get("post_grad_custom_post_pass") == "tbo_pass":
            import tbo_compiler
            tbo_pass = spec["options"]["post_grad_custom_post_pass"] = tbo_compiler.tbo_pass(split=True)
        fn = torch.compile(model, dynamic=False, **spec)
    call = make_call(fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if tbo_pass is not None and tbo_pass.last is not None:
        st = tbo_pass.last
        info.update(cut=st.cut, T=st.T, fallback=st.fallback, comm=len(st.comm_before.ops))
    with torch.no_grad():
        for _ in range(3):
            out = call()
        ms = timed(call, iters, device)
        out = call().float().clone()
        if _TRACE and mode in _TRACE[1]:
            _trace(call, Path(_TRACE[0]) / f"trace_{_TRACE[2]}_{mode}.json")
    row = {"mode": mode, "ms": round(ms, 4), "first_call_s": round(first_s, 2), **info}
    if ref is not None:
        d = (out - ref).abs().max().item()
        row.update(max_abs_diff=d, rel_diff=d / max(ref.abs().max().item(), 1e-30))
    return row, out


_TRACE: list = []  # (dir, modes, label): a Chrome trace of two calls per traced mode


def _trace(call, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            call()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


_SINK: list = []   # (path, meta, rows): every row is written as soon as it is measured


def _emit(row):
    print(json.dumps(row), flush=True)
    if _SINK:
        path, meta, rows = _SINK
        rows.append(row)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def run_modes(model, modes, make_call, device, iters, labels: dict) -> list[dict]:
    """Every mode on one model and batch, eager's output the reference of those after it; a mode
    that fails is a row saying why, not a lost run."""
    rows, ref = [], None
    for mode in modes:
        try:
            row, out = run_mode(model, mode, make_call, device, iters, ref)
        except Exception as e:
            row, out = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}, None
        if mode == "eager" and out is not None:
            ref = out
        row.update(labels)
        _emit(row)
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_hf(name, layers, shapes, modes, tiny, dtype, device, iters):
    model = hf_model(name, layers, tiny, dtype, device)
    rows = []
    for B, S in shapes:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, model.config.vocab_size, (B, S), generator=g).to(device)

        def make_call(fn):
            return lambda: fn(input_ids=ids, use_cache=False).logits
        if _TRACE:
            _TRACE[2] = f"hf_{name}_{B}x{S}"
        rows += run_modes(model, modes, make_call, device, iters,
                          dict(model=f"hf_{name}", layers=layers, batch=f"{B}x{S}"))
    del model
    return rows


def bench_own(slice_name, shapes, modes, dtype, device, iters, tmp: Path):
    """The project's own models (bench slices, EP=1, random weights) under backend="tbo"."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tbo_bench import random_model, synthetic_batch, write_slice

    d = write_slice(tmp / slice_name, 1, slice_name)
    model = random_model(d, 0, 1, dtype, device)
    rows = []
    for phase, T in shapes:
        args, nblocks = synthetic_batch(phase, T, model.config.vocab_size, 0, device)
        kv = model.new_kv_cache(num_blocks=nblocks)

        def make_call(fn):
            return lambda: fn(*args, kv.caches)
        if _TRACE:
            _TRACE[2] = f"own_{slice_name}_{phase}{T}"
        rows += run_modes(model, modes, make_call, device, iters,
                          dict(model=f"own_{slice_name}", layers=model.config.num_hidden_layers, batch=f"{phase} {T}"))
    del model
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    ap.add_argument("--hf", default="qwen3_moe,mixtral,gpt_oss")
    ap.add_argument("--own", default="deepseek_v3,gpt_oss")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shapes", default="8x512,256x1")
    ap.add_argument("--own-shapes", default="prefill:4096,decode:256")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--trace", default="", help="DIR:mode,mode -- Chrome traces of these modes (GPU)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "vocab": VOCAB, "layers": a.layers, "date": time.strftime("%Y-%m-%d"),
            "argv": sys.argv[1:]}
    _SINK[:] = [out, meta, []]
    if a.trace and device.type == "cuda":
        tdir, _, tmodes = a.trace.partition(":")
        _TRACE[:] = [tdir, set(tmodes.split(",")), ""]
    rows = []
    for name in filter(None, a.hf.split(",")):
        rows += bench_hf(name, a.layers, shapes, modes, a.tiny, dtype, device, a.iters)
    own_shapes = [(p, int(t)) for p, t in (s.split(":") for s in a.own_shapes.split(",") if s)]
    for name in filter(None, a.own.split(",")):
        rows += bench_own(name, own_shapes, modes, dtype, device, a.iters, out.parent)
    print(summary(rows))


def summary(rows) -> str:
    """Markdown: ms per mode, and tbo modes against the best of inductor / inductor-ro."""
    keys = []
    for r in rows:
        k = (r["model"], r["batch"])
        if k not in keys:
            keys.append(k)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    lines = ["| model | batch | " + " | ".join(modes) + " | tbo-unsplit vs best inductor | tbo-split vs best |",
             "|---" * (len(modes) + 4) + "|"]
    for k in keys:
        by = {r["mode"]: r for r in rows if (r["model"], r["batch"]) == k}
        cells = [f"{by[m]['ms']:.2f}" if m in by and "ms" in by[m] else "err" if m in by else "" for m in modes]
        base = [by[m]["ms"] for m in ("inductor", "inductor-ro") if m in by and "ms" in by[m]]
        best = min(base) if base else None

        def ratio(m):
            return f"{best / by[m]['ms']:.2f}x" if best and m in by and "ms" in by[m] else ""
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + f" | {ratio('tbo-unsplit')} | {ratio('tbo-split')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
