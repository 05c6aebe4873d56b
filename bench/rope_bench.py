"""The attention's work before the cache write: tbo.qk_rope_kv (one launch) at several tilings
against the ops it replaces (rms_norm of q and k, rope_half of both, the stack), as CUDA graphs.

    python bench/rope_bench.py --out DIR      # GPU; DIR/rope_bench.json

Shapes: the roofline's models at a decode (256) and a prefill (4096) token count, positions up to
4096, q/k/v the separate projection outputs the attention hands over. Each fused tiling is checked
bit for bit against the separate Triton ops.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

#: heads, kv heads, head dim, q/k norm (Qwen3) of the models
MODELS = {"qwen3_30b_a3b": (32, 4, 128, True), "gpt_oss_20b": (64, 8, 64, False), "mixtral_8x7b": (32, 8, 128, False)}
#: (q heads a program, warps) tried besides the default (None, None); a thread must hold a whole
#: 16-byte vector of each row: warps <= q heads * head dim / 256
TILINGS = [(None, None), (32, 4), (16, 4), (16, 2), (8, 4), (8, 2), (4, 2), (4, 1)]


def graph_ms(fn, reps: int = 20, replays: int = 7) -> float:
    from tbo_compiler.runtime.kernels.moe_tuned import graph_ms as timed

    return timed(fn, reps, replays)


def rows_for(name: str, T: int, dev: str = "cuda") -> dict:
    from tbo_compiler.runtime.kernels import triton_elementwise as te
    from tbo_compiler.runtime.kernels import triton_rope as tr

    H, G, Dh, norm = MODELS[name]
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16 if dev == "cuda" else torch.float32   # (the interpreter's check: fp32)
    q, k, v = (torch.randn(T, n, Dh, device=dev, generator=g).to(bf) for n in (H, G, G))
    pos = torch.randint(0, 4096, (T,), device=dev, generator=g)
    f = 1.0 / 1e6 ** (torch.arange(0, Dh, 2, device=dev, dtype=torch.float32) / Dh)
    qw, kw = ((torch.rand(Dh, device=dev, generator=g) + 0.5).to(bf) for _ in range(2)) if norm else (None, None)
    eps = 1e-6

    def separate():
        qn, kn = (te.rms_norm(q, qw, eps), te.rms_norm(k, kw, eps)) if norm else (q, k)
        return te.rope_half(qn, pos, f), torch.stack([te.rope_half(kn, pos, f), v], 1)

    ref = separate()
    nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * v.numel() * 2   # q, k read and written, v copied
    row = dict(model=name, tokens=T, bytes=nbytes, separate_ms=round(graph_ms(separate), 4), fused={})
    for bh_q, warps in TILINGS:
        key = f"bhq{bh_q or 'auto'}_w{warps or 'auto'}"
        if bh_q is not None and (bh_q > H or warps * 256 > bh_q * Dh):
            continue

        def fused(bh_q=bh_q, warps=warps):
            return tr.qk_rope_kv(q, k, v, pos, f, qw, kw, eps, bh_q=bh_q, num_warps=warps)
        try:
            out = fused()
            same = all(torch.equal(a, b) for a, b in zip(out, ref))
            ms = graph_ms(fused)
            row["fused"][key] = dict(ms=round(ms, 4), bitwise_equal=same, tb_s=round(nbytes / ms / 1e9, 2))
        except Exception as e:  # noqa: BLE001 - one tiling failing must not hide the others
            row["fused"][key] = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
        print(f"{name} T={T} {key:16s} {row['fused'][key]}  separate {row['separate_ms']} ms", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--out", default="out/rope_bench")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("rope_bench: needs a CUDA GPU (the kernels are timed as CUDA graphs)", file=sys.stderr)
        return 2
    import triton
    rows = [rows_for(m, int(t)) for m in a.models.split(",") for t in a.tokens.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv))
    (out / "rope_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
