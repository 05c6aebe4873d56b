"""`tbo-compile`'s engine: model directory -> plan (tbo_compiler/load.py runs it).

Tracing needs shapes only, so the model is built on the meta device from config.json (no weights
are read at compile time; a 61-layer DeepSeek-V3 compiles on a laptop). The plan is traced for
rank 0 of the expert-parallel group; every rank-dependent number is a buffer, so one plan serves
every rank. Each bucket gets two programs: TBO (split into two ubatches) and serial (one ubatch,
the same runtime); the runtime keeps the faster (runtime/plan_module.py).
"""
from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from tbo_compiler.capture import InputSpec, capture_export, capture_make_fx
from tbo_compiler.models import ParallelConfig, build_model, example_inputs
from tbo_compiler.ops.errors import TboCompileError, UsageError
from tbo_compiler.passes.memory import peak_activation_bytes
from tbo_compiler.passes.pipeline import CompileOptions, State, compile_graph
from tbo_compiler.passes.split_ubatches import split_point
from tbo_compiler.plan import bucket_record, make_plan, save_plan

log = logging.getLogger(__name__)
_LAYER = re.compile(r"(.*\.)?layers\.\d+")   # a decoder layer's module name


@dataclass(frozen=True)
class CompiledProgram:
    T: int
    variant: str          # "tbo" | "serial"
    state: State          # the pipeline's result: graph, schedule, comm, timings
    specs: tuple[InputSpec, ...]


def _capture(model, T: int, max_blocks: int, num_blocks: int, device, capture: str, progress=None):
    cap = {"make_fx": capture_make_fx, "export": capture_export}[capture]
    inputs = example_inputs(model, T, max_blocks=max_blocks, num_blocks=num_blocks, device=device)
    # the trace is most of a compile (~0.2 s a DeepSeek-V3 layer): say which layer it is in
    layers = [m for name, m in model.named_modules() if _LAYER.fullmatch(name)] if progress else []
    hooks = [m.register_forward_pre_hook(lambda *_, i=i: progress(f"capture T={T}", f"layer {i + 1}/{len(layers)}"))
             for i, m in enumerate(layers)]
    t0 = time.perf_counter()
    try:
        gm, specs = cap(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return gm, specs, inputs, time.perf_counter() - t0


def _input_names(model, inputs, specs) -> dict[str, str]:
    """Placeholder -> the name its user knows: forward's parameter (input_ids, kv_caches[3]) or
    the parameter's FQN; the dumps show these instead of arg1_1."""
    params = list(inspect.signature(model.forward).parameters)
    flat = []
    for name, a in zip(params, inputs):
        flat += [f"{name}[{j}]" for j in range(len(a))] if isinstance(a, (list, tuple)) else [name]
    return {s.name: (flat[int(s.target)] if int(s.target) < len(flat) else s.name) if s.kind == "user"
            else s.target for s in specs}


def compile_model(model, token_counts: Sequence[int], options: CompileOptions, *, max_blocks: int = 64,
                  num_blocks: int = 64, device="meta", progress: Callable[..., None] | None = None,
                  dump_dir=None, capture: str = "make_fx", variants: Sequence[str] = ("tbo", "serial")
                  ) -> list[CompiledProgram]:
    """Capture the model at each token count and run the pipeline once per variant.
    `progress(stage, detail=None)` hears each stage and, while capturing, each layer
    (tbo_compiler/progress.py draws it)."""
    n_tok = len(model.token_inputs)
    out = []
    for T in token_counts:
        if progress:
            progress(f"capture T={T}")
        gm, specs, inputs, t_capture = _capture(model, T, max_blocks, num_blocks, device, capture, progress)
        users = tuple(s.name for s in specs if s.kind == "user")[:n_tok]
        for variant in variants:
            opts = CompileOptions(**{**options.__dict__, "split": options.split and variant == "tbo"})
            if variant == "tbo" and not (opts.split and split_point(T, opts.mode, opts.tokens_per_request)):
                continue  # too few tokens to split: the serial program is the only one
            try:
                st = compile_graph(gm, users, T, opts,
                                   progress=(lambda s, T=T, v=variant: progress(f"{s} T={T} ({v})"))
                                   if progress else None)
            except TboCompileError:
                if capture != "make_fx":
                    raise
                # trace again with source lines so the error names the model's line (rare, slow path)
                gm2, specs2 = capture_make_fx(model, inputs, stack_traces=True)
                compile_graph(gm2, tuple(s.name for s in specs2 if s.kind == "user")[:n_tok], T, opts)
                raise
            st.timings = {"capture": t_capture, **st.timings}
            out.append(CompiledProgram(T, variant, st, specs))
        done = {r.variant: r.state for r in out if r.T == T}
        if dump_dir is not None and done:
            from tbo_compiler.dumps import write_dumps
            if progress:
                progress(f"dumps T={T}")
            # the first variant compiled; the unsplit program, when there is one, is its baseline
            write_dumps(next(iter(done.values())), Path(dump_dir) / f"T{T}", name=type(model).__name__,
                        input_names=_input_names(model, inputs, specs), unsplit=done.get("serial"))
    return out


def _check_args(token_counts, choices: dict, **positive) -> None:
    """Arguments a caller of the API may get wrong (the CLI refuses them already): one line each."""
    for name, (v, have) in choices.items():
        if v not in have:
            raise UsageError(f"{name} must be one of {', '.join(have)}, got {v!r}")
    for name, v in positive.items():
        if type(v) is not int or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(token_counts, (str, bytes)) or not token_counts or \
            any(type(t) is not int or t < 1 for t in token_counts):
        raise UsageError(f"token_counts must be a non-empty list of positive integers, got {token_counts!r}")


def compile_model_dir(model_dir, out_path, *, ep: int = 1, moe_comm: str = "a2a", mode: str = "prefill",
                      token_counts: Sequence[int] = (64,), tokens_per_request: int = 1,
                      profile: str = "cpu", block_size: int = 16, max_blocks: int = 64,
                      dtype=torch.bfloat16, num_layers: int | None = None, dump_dir=None,
                      progress=None, split: bool = True, capture: str = "make_fx",
                      stats: dict | None = None) -> dict:
    """Compile and write the plan atomically. Returns the plan dict; `stats` gets the seconds
    spent per stage (capture, each pass, plan) summed over buckets."""
    from tbo_compiler.models.moe import MOE_COMM_MODES
    from tbo_compiler.passes.cost_model import PROFILES

    _check_args(token_counts, {"mode": (mode, ("prefill", "decode")), "moe_comm": (moe_comm, MOE_COMM_MODES),
                               "profile": (profile, tuple(PROFILES)), "capture": (capture, ("make_fx", "export"))},
                ep=ep, block_size=block_size, max_blocks=max_blocks, tokens_per_request=tokens_per_request)
    par = ParallelConfig(ep_size=ep, ep_rank=0, group="ep", moe_comm=moe_comm)
    model = build_model(model_dir, parallel=par, block_size=block_size, dtype=dtype, num_layers=num_layers)
    # a plan is compiled ahead of time: a model that cannot be split is an error here, not a fallback
    opts = CompileOptions(mode=mode, tokens_per_request=tokens_per_request, profile=profile, split=split,
                          strict=True)
    results = compile_model(model, token_counts, opts, max_blocks=max_blocks, progress=progress,
                            dump_dir=dump_dir, capture=capture)
    # the memory each program needs is a fact of the plan: the load refuses what will not fit
    records = [bucket_record(r.T, r.variant, r.state, r.specs,
                             peak_activation_bytes=peak_activation_bytes(r.state.gm, r.state.schedule.instrs))
               for r in results]
    plan = make_plan(records, model_dir=model_dir,
                     mode=mode, tokens_per_request=tokens_per_request,
                     parallel={"ep": ep, "moe_comm": moe_comm, "group": "ep", "block_size": block_size,
                               "num_layers": model.config.num_hidden_layers,
                               "dtype": str(dtype).removeprefix("torch.")},
                     profile=profile)
    t0 = time.perf_counter()
    if progress:
        progress(f"write {out_path}")
    save_plan(plan, out_path)
    if stats is not None:
        for r in results:
            for k, v in r.state.timings.items():
                stats[k] = stats.get(k, 0.0) + v
        stats["plan"] = time.perf_counter() - t0
    return plan


__all__ = ["compile_model", "compile_model_dir", "CompiledProgram"]
