"""`tbo-compile`'s engine: model directory -> plan; and `load_plan`: plan + model directory -> the
runtime's PlanModule.

Tracing needs shapes only, so the model is built on the meta device from config.json (no weights
are read at compile time; a 61-layer DeepSeek-V3 compiles on a laptop). The plan is traced for
rank 0 of the expert-parallel group; every rank-dependent number is a buffer, so one plan serves
every rank. Each bucket gets two programs: TBO (split into two ubatches) and serial (one ubatch,
the same runtime); the runtime keeps the faster (runtime/plan_module.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from tbo_compiler.capture import InputSpec, capture_export, capture_make_fx
from tbo_compiler.models import ParallelConfig, build_model, example_inputs
from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.passes.pipeline import CompileOptions, State, compile_graph
from tbo_compiler.passes.split_ubatches import split_point
from tbo_compiler.plan import (bucket_record, check_plan, make_plan, programs_of, read_plan, save_plan)
from tbo_compiler.runtime.plan_module import PlanModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledProgram:
    T: int
    variant: str          # "tbo" | "serial"
    state: State          # the pipeline's result: graph, schedule, comm, timings
    specs: tuple[InputSpec, ...]


def _capture(model, T: int, max_blocks: int, num_blocks: int, device, capture: str):
    cap = {"make_fx": capture_make_fx, "export": capture_export}[capture]
    inputs = example_inputs(model, T, max_blocks=max_blocks, num_blocks=num_blocks, device=device)
    t0 = time.perf_counter()
    gm, specs = cap(model, inputs)
    return gm, specs, inputs, time.perf_counter() - t0


def compile_model(model, token_counts: Sequence[int], options: CompileOptions, *, max_blocks: int = 64,
                  num_blocks: int = 64, device="meta", progress: Callable[[str], None] | None = None,
                  dump_dir=None, capture: str = "make_fx", variants: Sequence[str] = ("tbo", "serial")
                  ) -> list[CompiledProgram]:
    """Capture the model at each token count and run the pipeline once per variant."""
    n_tok = len(model.token_inputs)
    out = []
    for T in token_counts:
        if progress:
            progress(f"capture T={T}")
        gm, specs, inputs, t_capture = _capture(model, T, max_blocks, num_blocks, device, capture)
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
            if dump_dir is not None and variant == variants[0]:
                from tbo_compiler.dumps import write_dumps
                write_dumps(st, Path(dump_dir) / f"T{T}", name=type(model).__name__)
            out.append(CompiledProgram(T, variant, st, specs))
    return out


def compile_model_dir(model_dir, out_path, *, ep: int = 1, moe_comm: str = "a2a", mode: str = "prefill",
                      token_counts: Sequence[int] = (64,), tokens_per_request: int = 1,
                      profile: str = "cpu", block_size: int = 16, max_blocks: int = 64,
                      dtype=torch.bfloat16, num_layers: int | None = None, dump_dir=None,
                      progress=None, split: bool = True, capture: str = "make_fx",
                      stats: dict | None = None) -> dict:
    """Compile and write the plan atomically. Returns the plan dict; `stats` gets the seconds
    spent per stage (capture, each pass, plan) summed over buckets."""
    par = ParallelConfig(ep_size=ep, ep_rank=0, group="ep", moe_comm=moe_comm)
    model = build_model(model_dir, parallel=par, block_size=block_size, dtype=dtype, num_layers=num_layers)
    # a plan is compiled ahead of time: a model that cannot be split is an error here, not a fallback
    opts = CompileOptions(mode=mode, tokens_per_request=tokens_per_request, profile=profile, split=split,
                          strict=True)
    results = compile_model(model, token_counts, opts, max_blocks=max_blocks, progress=progress,
                            dump_dir=dump_dir, capture=capture)
    plan = make_plan([bucket_record(r.T, r.variant, r.state, r.specs) for r in results], model_dir=model_dir,
                     mode=mode, tokens_per_request=tokens_per_request,
                     parallel={"ep": ep, "moe_comm": moe_comm, "group": "ep", "block_size": block_size,
                               "num_layers": model.config.num_hidden_layers,
                               "dtype": str(dtype).removeprefix("torch.")},
                     profile=profile)
    t0 = time.perf_counter()
    save_plan(plan, out_path)
    if stats is not None:
        for r in results:
            for k, v in r.state.timings.items():
                stats[k] = stats.get(k, 0.0) + v
        stats["plan"] = time.perf_counter() - t0
    return plan


def load_plan(plan_path, model_dir, *, rank: int = 0, device="cpu", dtype=None, group: str | None = None,
              policy: str = "auto", graphs: bool | None = None) -> PlanModule:
    """The plan as a callable with the model's forward signature; weights from `model_dir`.

    With EP > 1 the comm group is the plan's ("ep"): registered already, or set up here from
    torch.distributed's default group when it has the plan's number of ranks."""
    from tbo_compiler.models import load_model

    plan = read_plan(plan_path)
    check_plan(plan, plan_path, model_dir)
    p = plan["parallel"]
    par = ParallelConfig(ep_size=p["ep"], ep_rank=rank, group=group or p["group"], moe_comm=p["moe_comm"])
    if par.group != p["group"]:
        from tbo_compiler.ops.errors import PlanError
        raise PlanError(f"{plan_path}: plan was compiled for comm group {p['group']!r}")
    model = load_model(model_dir, dtype=dtype or getattr(torch, p["dtype"]), device=device, parallel=par,
                       block_size=p["block_size"], num_layers=p["num_layers"])
    return PlanModule(programs_of(plan, device), model, device, ep=p["ep"], group=par.group, policy=policy,
                      graphs=graphs, num_token_inputs=len(model.token_inputs))


__all__ = ["compile_model", "compile_model_dir", "load_plan", "CompiledProgram"]
