"""Tables and a plot from bench/tbo_bench.py's JSON.

    python bench/report.py bench/results/tbo_bench_ep2.json [--png bench/results/tbo_bench_ep2.png]

Prints the markdown tables RESULTS.md quotes (rank 0's rows; every ratio is from one run, side by
side). The plot (matplotlib, if installed) shows, per link and bucket, each mode's time relative to
the serial CUDA-graph program.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def tables(data: dict) -> str:
    rows = [r for r in data["rows"] if r["rank"] == 0 and r["dtype"] == "bfloat16"]
    out = ["| link | phase | tok/rank | eager | serial | TBO | **TBO/serial** | auto keeps | auto vs serial | "
           "compute | comm | ideal | ideal/serial |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tbo, ser = r.get("tbo_ms"), r["serial_ms"]
        out.append(f"| {r['link']} | {r['phase']} | {r['tokens_per_rank']} | {_f(r['eager_ms'])} | {_f(ser)} | "
                   f"{_f(tbo)} | {_f(ser / tbo if tbo else None, '{:.2f}x')} | {r['auto_choice']} | "
                   f"{_f(r['auto_ms'] / ser, '{:.3f}')} | {_f(r.get('compute_ms'))} | {_f(r.get('comm_ms'))} | "
                   f"{_f(r.get('ideal_ms'))} | {_f(ser / r['ideal_ms'] if r.get('ideal_ms') else None, '{:.2f}x')} |")
    out += ["", "Correctness, every bucket and rank: greedy-token agreement and max |diff| / max |logit| of",
            "TBO against eager; of eager run on TBO's two ubatches one after the other (`halves`) against",
            "eager (the rounding the row split alone causes); of TBO against `halves`; of serial against eager.", "",
            "| link | phase | tok/rank | dtype | rank | TBO vs eager: agree, rel | halves vs eager: agree, rel | "
            "TBO vs halves: rel | serial vs eager: rel |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['link']} | {r['phase']} | {r['tokens_per_rank']} | {r['dtype']} | {r['rank']} | "
                   f"{_f(r.get('tbo_greedy_agree'), '{:.4f}')}, {_f(r.get('tbo_rel_diff'), '{:.1e}')} | "
                   f"{_f(r.get('eager_halves_greedy_agree'), '{:.4f}')}, {_f(r.get('eager_halves_rel_diff'), '{:.1e}')} | "
                   f"{_f(r.get('tbo_rel_diff_vs_eager_halves'), '{:.1e}')} | {_f(r.get('serial_rel_diff'), '{:.1e}')} |")
    pred = [r for r in rows if r.get("predicted")]
    if pred:
        out += ["", "Cost model fed by measurement (each op timed alone on the GPU, the schedule simulated):", "",
                "| link | phase | tok/rank | TBO predicted | TBO measured | error | serial predicted | serial measured | error |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in pred:
            p = r["predicted"]
            out.append(f"| {r['link']} | {r['phase']} | {r['tokens_per_rank']} | {p['tbo_ms']:.2f} | {r['tbo_ms']:.2f} | "
                       f"{p['tbo_error_pct']:+.1f}% | {p['serial_ms']:.2f} | {r['serial_ms']:.2f} | {p['serial_error_pct']:+.1f}% |")
    traced = [r for r in rows if r.get("trace")]
    if traced:
        out += ["", "Measured trace of one TBO step (CUDA graph replay, rank 0):", "",
                "| link | tok/rank | span ms | GPU idle | comm hidden | compute busy ms | comm busy ms | kernels | file |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in traced:
            t = r["trace"]
            out.append(f"| {r['link']} | {r['tokens_per_rank']} | {t['span_ms']:.2f} | {t['gpu_idle_pct']:.1f}% | "
                       f"{_f(t['comm_hidden_pct'], '{:.1f}%')} | {t['compute_busy_ms']:.2f} | {t['comm_busy_ms']:.2f} | "
                       f"{t['kernels']} | {t.get('file', '')} |")
    return "\n".join(out)


def plot(data: dict, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in data["rows"] if r["rank"] == 0 and r["dtype"] == "bfloat16"]
    links = sorted({r["link"] for r in rows})
    fig, axes = plt.subplots(1, len(links), figsize=(7 * len(links), 4), squeeze=False)
    for ax, link in zip(axes[0], links):
        rs = [r for r in rows if r["link"] == link]
        labels = [f"{r['phase'][0]}{r['tokens_per_rank']}" for r in rs]
        x = range(len(rs))
        for k, (mode, color) in enumerate((("eager_ms", "#bbbbbb"), ("tbo_ms", "#e6550d"),
                                           ("auto_ms", "#31a354"), ("ideal_ms", "#3182bd"))):
            vals = [r["serial_ms"] / r[mode] if r.get(mode) else 0 for r in rs]
            ax.bar([i + 0.2 * k - 0.3 for i in x], vals, width=0.2, color=color, label=mode[:-3])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(list(x), labels, rotation=45)
        ax.set_ylabel("speed vs serial CUDA graph (x)")
        ax.set_title(f"EP={data['meta']['world']}, {link}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--png")
    a = ap.parse_args(argv)
    data = json.loads(Path(a.json).read_text())
    print(tables(data))
    if a.png:
        print("plot:", a.png if plot(data, Path(a.png)) else "matplotlib not installed")


if __name__ == "__main__":
    main()
