"""moe_experts by measurement: per shape, the fastest implementation on this GPU.

No one kernel wins everywhere (bench/results/roofline_h200): the fused Triton kernel's best tiles
depend on the rows per expert, and at some shapes CUTLASS's grouped GEMM (torch._grouped_mm) beats
it. So the first call with a new shape (rows, hidden, expert width, experts, top-k, dtype, biases,
activation) times every candidate on that call's own tensors (each captured in a CUDA graph and
replayed ROUNDS times, CUDA events, median), times the CONFIRM fastest and the default again in
turn (so that a GPU warming up during the measurement favours none of them), and keeps the fastest
if it beats the default tiles by MARGIN; later calls of that shape go straight to it.

Candidates: the fused Triton kernel (triton_moe.py) at each tile config of CONFIGS, its TMA variant
(triton_moe_tma.py, Hopper and later: gathered rows, descriptor-loaded tiles, swapped MMAs for
decode) at each of that module's CONFIGS, and the grouped-GEMM path
(triton_moe.moe_experts_grouped, bf16 only).

Choices are stored per GPU in a JSON file, so a later process (every rank of a server, every
restart) measures nothing: TBO_MOE_TUNING names the file (default
~/.cache/tbo_compiler/moe_tuning.json, one section per GPU name, Triton and torch version);
TBO_MOE_TUNING=off measures nothing and takes the Triton kernel's default tiles. Nothing is
measured while a CUDA graph is being captured (the runtime warms a program up before it captures
it, so the measurement happens in that warm-up); a shape first seen inside a capture takes the
default.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path
from typing import Callable

import torch

from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.kernels import triton_moe as tm
from tbo_compiler.runtime.kernels import triton_moe_tma as tt

log = logging.getLogger(__name__)
NAME = "tuned"

#: tile configs tried besides the default: decode-sized (16-64-row blocks, 4 warps) and prefill-sized
#: (128-row blocks, 8 warps, two warpgroups) on Hopper
CONFIGS = {
    # decode: 16-32 pairs per expert fill a 16/32-row block (less padding in the x loads and the MMA)
    "bm16_n128": tm.MoeConfig(16, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(128, 64, 4, 4)),
    "bm32_n128": tm.MoeConfig(32, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(128, 64, 4, 4)),
    # decode's down GEMM has a short K loop (the expert width): wider N tiles or deeper K tiles put
    # more of each expert's weights in flight per program (not yet measured: the tuner decides)
    "bm32_d256": tm.MoeConfig(32, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(256, 64, 8, 3)),
    "bm16_k128": tm.MoeConfig(16, tm.GemmTile(64, 64, 4, 6), tm.GemmTile(64, 128, 4, 4)),
    "bm64_n64": tm.MoeConfig(64, tm.GemmTile(64, 64, 4, 5), tm.GemmTile(64, 64, 4, 5)),
    "bm64_n128": tm.MoeConfig(64, tm.GemmTile(128, 64, 4, 4), tm.GemmTile(128, 64, 4, 4)),
    "bm128_n64": tm.MoeConfig(128, tm.GemmTile(64, 64, 8, 4), tm.GemmTile(128, 64, 8, 4)),
    "bm128_n128": tm.MoeConfig(128, tm.GemmTile(128, 64, 8, 3), tm.GemmTile(256, 64, 8, 3)),
    "bm128_n128s4": tm.MoeConfig(128, tm.GemmTile(128, 64, 8, 4), tm.GemmTile(128, 64, 8, 4)),
}
#: calls per candidate (round robin), and how much faster than the default tiles a candidate must
#: be to replace them: measured twice on one H200, the same shape's candidates moved by up to 5 %
#: between runs, and a choice inside that noise lost in the CUDA graph (issue 24's runs)
ROUNDS, MARGIN = 15, 0.05
#: then the CONFIRM fastest and the default are timed again interleaved (one replay of each in turn,
#: CONFIRM_ROUNDS times), and those times decide: timed one after the other, a candidate measured
#: after others had heated the GPU came out up to 8 % off, and Mixtral's prefill 4096 took tiles
#: timed 9 % faster than the default alone that ran 8 ms slower in the model's graph (H200 runs of
#: 2026-12-03, issue 24)
CONFIRM, CONFIRM_ROUNDS = 3, 10
_CHOICE: dict[str, str] = {}
#: shape key -> {candidate: ms} of every measurement this process made (benches report them)
TIMES: dict[str, dict[str, float]] = {}
_LOADED: list[bool] = [False]


def available() -> bool:
    return torch.cuda.is_available()


def supports(op: str, args: tuple) -> bool:
    return op == "moe_experts" and args[0].is_cuda and tm.supported(*args)


# Step 1: the candidates and the key ------------------------------------------------------------

def candidates(args: tuple) -> dict[str, Callable]:
    out = {"triton_default": lambda *a: tm.moe_experts(*a)}
    for name, cfg in CONFIGS.items():
        out[f"triton_{name}"] = lambda *a, cfg=cfg: tm.moe_experts(*a, config=cfg)
    if tt.supported(*args):
        for name, cfg in tt.CONFIGS.items():
            out[name] = lambda *a, cfg=cfg: tt.moe_experts_tma(*a, config=cfg)
    if tm.grouped_mm_supported(*args):
        out["grouped_mm"] = tm.moe_experts_grouped
    return out


def shape_key(args: tuple) -> str:
    x, ids, _, w13, w2, b13, b2, act, limit = (list(args) + [None, None, "silu", 0.0])[:9]
    return (f"N{x.shape[0]}_D{x.shape[1]}_I{w13.shape[1] // 2}_E{w13.shape[0]}_K{ids.shape[1]}_"
            f"{str(x.dtype).removeprefix('torch.')}_b{int(b13 is not None)}{int(b2 is not None)}_{act}_"
            f"l{int(bool(limit) and limit > 0)}")


# Step 2: the stored choices --------------------------------------------------------------------

def _file() -> Path | None:
    where = flag("TBO_MOE_TUNING")
    if where == "off":
        return None
    return Path(where) if where else Path.home() / ".cache" / "tbo_compiler" / "moe_tuning.json"


def _section() -> str:
    import triton
    return f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"


def _load() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    path = _file()
    if path is None or not path.exists():
        return
    try:
        _CHOICE.update(json.loads(path.read_text()).get(_section(), {}))
    except (OSError, ValueError) as e:  # a damaged file is measured again, never fatal
        log.warning("moe tuning file %s unreadable (%s); measuring again", path, e)


def _store(key: str, name: str) -> None:
    path = _file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a damaged file is replaced by what was measured now
            data = {}
        data.setdefault(_section(), {})[key] = name
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: ranks writing at once never leave a torn file
    except (OSError, ValueError) as e:
        log.warning("moe tuning file %s not written (%s)", path, e)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Step 3: measuring -----------------------------------------------------------------------------

def time_ms(fn: Callable, args: tuple) -> float:
    """One timed call (CUDA events)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn(*args)
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def replayer(fn: Callable, args: tuple) -> Callable[[], object]:
    """fn(*args) as the runtime will run it: on CUDA captured once in a CUDA graph and replayed
    (what is timed is then the kernels alone, as in the plan's graph: timed as eager calls, a
    candidate with more launches paid for them, and decode choices came out wrong by up to 1.9x,
    bench/results/moe_h200); elsewhere the call itself."""
    x = args[0]
    if not (isinstance(x, torch.Tensor) and x.is_cuda):
        return lambda: fn(*args)
    return capture(lambda: fn(*args), x.device)


def capture(fn: Callable[[], object], device: torch.device, reps: int = 1) -> Callable[[], object]:
    """`reps` calls of fn() captured in one CUDA graph (after a warm-up call off the default
    stream, which a capture needs) and replayed once; returns the replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()  # the first replay uploads the graph: not timed
    return graph.replay


def graph_ms(fn: Callable[[], object], reps: int = 1, replays: int = ROUNDS) -> float:
    """Median ms of one fn() call on the current GPU: `reps` calls captured in one CUDA graph, the
    graph replayed `replays` times (the benches' timer: bench/moe_bench.py, sort_bench.py, rope_bench.py)."""
    run = capture(fn, torch.device("cuda", torch.cuda.current_device()), reps)
    torch.cuda.synchronize()
    out = [time_ms(run, ()) / reps for _ in range(replays)]
    del run
    torch.cuda.empty_cache()  # the graph's memory pool
    return statistics.median(out)


def measure(args: tuple, rounds: int = ROUNDS) -> dict[str, float]:
    """{candidate: median ms} on these tensors: each candidate warmed up (compiled), captured and
    replayed `rounds` times, one candidate after the other so that only one graph's memory is
    held at a time; a candidate that fails (a tile that does not fit this GPU's shared memory,
    a capture it does not survive) is left out."""
    out: dict[str, float] = {}
    for name, fn in candidates(args).items():
        try:
            fn(*args)
            run = replayer(fn, args)
            out[name] = statistics.median(time_ms(run, ()) for _ in range(rounds))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not hide the others
            log.info("moe tuning: %s failed on %s (%s)", name, shape_key(args), " ".join(str(e).split())[:200])
        finally:
            run = None
    if args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
        torch.cuda.empty_cache()  # the candidates' graph pools
    return out


def confirm(args: tuple, times: dict[str, float]) -> dict[str, float]:
    """{candidate: median ms} of the CONFIRM fastest of `times` and the default, replayed in turn
    (all their graphs held at once); empty when fewer than two or a capture fails."""
    names = sorted(times, key=times.get)[:CONFIRM]
    if "triton_default" in times and "triton_default" not in names:
        names.append("triton_default")
    if len(names) < 2:
        return {}
    fns = candidates(args)
    runs: dict[str, Callable] = {}
    try:
        for n in names:
            runs[n] = replayer(fns[n], args)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(CONFIRM_ROUNDS):
            for n in names:
                samples[n].append(time_ms(runs[n], ()))
    except Exception as e:  # noqa: BLE001 - e.g. no memory for the graphs at once: the first pass decides
        log.info("moe tuning: confirming %s failed (%s)", shape_key(args), " ".join(str(e).split())[:200])
        return {}
    finally:
        runs.clear()
        if args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
            torch.cuda.empty_cache()
    return {n: statistics.median(v) for n, v in samples.items()}


def choose(args: tuple) -> str:
    _load()
    key = shape_key(args)
    if key in _CHOICE and _CHOICE[key] in candidates(args):
        return _CHOICE[key]
    if flag("TBO_MOE_TUNING") == "off" or _capturing():
        return "triton_default"
    first = measure(args)
    TIMES[key] = {k: round(v, 4) for k, v in first.items()}
    if not first:
        return "triton_default"
    times = confirm(args, first) or first
    if times is not first:
        TIMES[key].update({f"{k} (confirm)": round(v, 4) for k, v in times.items()})
    best = min(times, key=times.get)
    default = times.get("triton_default")
    if default is not None and times[best] > (1 - MARGIN) * default:
        best = "triton_default"  # within the noise of the default: keep it
    log.info("moe tuning %s: %s (%s)", key, best, ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items())))
    _CHOICE[key] = best
    _store(key, best)
    return best


# Step 4: the op --------------------------------------------------------------------------------

_FN: dict[str, Callable] = {}


def moe_experts(*args):
    if flag("TBO_MOE_TUNING") == "off":  # read per call: a program built with it off keeps the default
        return tm.moe_experts(*args)
    key = shape_key(args)
    fn = _FN.get(key)
    if fn is None:
        fn = candidates(args)[choose(args)]
        if not _capturing():  # a capture's default is not a measurement
            _FN[key] = fn
    return fn(*args)


IMPLS = {"moe_experts": moe_experts}
