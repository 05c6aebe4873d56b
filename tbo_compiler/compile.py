"""`tbo-compile`'s engine: model directory -> plan, and `load_plan`: plan + model directory -> callable.

Tracing needs shapes only, so the model is built on the meta device from config.json (no weights
are read at compile time; a 61-layer DeepSeek-V3 compiles on a laptop). The plan is traced for
rank 0 of the expert-parallel group; every rank-dependent number is a buffer, so one plan serves
every rank.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from tbo_compiler.capture import InputSpec, capture_export, capture_make_fx
from tbo_compiler.models.batch import PagedKVCache
from tbo_compiler.models.moe import MoEBlock, ParallelConfig
from tbo_compiler.passes.errors import TboCompileError
from tbo_compiler.passes.pipeline import CompileOptions, Compiled, compile_graph
from tbo_compiler.plan import (PlanError, bucket_from_compiled, check_plan, graph_from_json,
                               instrs_of, make_plan, read_plan, save_plan)
from tbo_compiler.runtime.comm import agree_num_tokens
from tbo_compiler.runtime.executor import Executor

log = logging.getLogger(__name__)
TOKEN_INPUTS = 4  # input_ids, positions, slot_mapping, block_table: the model's first four inputs


def build_model(model_dir, *, parallel: ParallelConfig, block_size: int = 16, dtype=torch.bfloat16,
                num_layers: int | None = None, device="meta"):
    """The model of `model_dir`'s config on `device` (meta: shapes only, nothing read)."""
    from tbo_compiler.models.loader import _resolve

    cfg, model_cls, _ = _resolve(model_dir)
    if num_layers is not None:
        cfg.num_hidden_layers = min(num_layers, cfg.num_hidden_layers)
    with torch.device(device):
        model = model_cls(cfg, parallel, block_size=block_size, dtype=dtype)
    if device != "meta":
        model.init_buffers()
        for m in model.modules():
            if isinstance(m, MoEBlock):
                m.init_buffers()
    return model.eval().requires_grad_(False)


def example_inputs(model, num_tokens: int, *, max_blocks: int, num_blocks: int, device="meta",
                   cache_dtype=None):
    """Shape-only inputs for tracing at `num_tokens` tokens."""
    T = num_tokens
    dt = cache_dtype or next(model.parameters()).dtype
    ids = torch.zeros(T, dtype=torch.int64, device=device)
    table = torch.zeros(T, max_blocks, dtype=torch.int32, device=device)
    caches = [torch.zeros(num_blocks * model.block_size, *s, dtype=dt, device=device)
              for s in model.kv_cache_entry_shapes()]
    return (ids, ids.clone(), ids.clone(), table, caches)


def compile_model(model, token_counts: Sequence[int], options: CompileOptions, *, max_blocks: int = 64,
                  num_blocks: int = 64, device="meta", progress: Callable[[str], None] | None = None,
                  dump_dir=None, capture: str = "make_fx") -> list[tuple[Compiled, tuple[InputSpec, ...]]]:
    cap = {"make_fx": capture_make_fx, "export": capture_export}[capture]
    out = []
    for T in token_counts:
        if progress:
            progress(f"capture T={T}")
        inputs = example_inputs(model, T, max_blocks=max_blocks, num_blocks=num_blocks, device=device)
        t0 = time.perf_counter()
        gm, specs = cap(model, inputs)
        t_capture = time.perf_counter() - t0
        users = [s.name for s in specs if s.kind == "user"]
        try:
            compiled = compile_graph(gm, tuple(users[:TOKEN_INPUTS]), T, options,
                                     progress=(lambda s, T=T: progress(f"{s} T={T}")) if progress else None)
        except TboCompileError:
            if capture != "make_fx":
                raise
            # trace again with source lines so the error names the model's line (rare, slow path)
            gm, specs = capture_make_fx(model, inputs, stack_traces=True)
            users = [s.name for s in specs if s.kind == "user"]
            compile_graph(gm, tuple(users[:TOKEN_INPUTS]), T, options)
            raise
        compiled.timings = {"capture": t_capture, **compiled.timings}
        if dump_dir is not None:
            from tbo_compiler.dumps import write_dumps
            write_dumps(compiled, Path(dump_dir) / f"T{T}", name=type(model).__name__)
        out.append((compiled, specs))
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
    opts = CompileOptions(mode=mode, tokens_per_request=tokens_per_request, profile=profile, split=split)
    results = compile_model(model, token_counts, opts, max_blocks=max_blocks, progress=progress,
                            dump_dir=dump_dir, capture=capture)
    buckets = [bucket_from_compiled(c, specs) for c, specs in results]
    plan = make_plan(buckets, model_dir=model_dir, mode=mode, tokens_per_request=tokens_per_request,
                     parallel={"ep": ep, "moe_comm": moe_comm, "group": "ep", "block_size": block_size,
                               "num_layers": model.config.num_hidden_layers,
                               "dtype": str(dtype).removeprefix("torch.")},
                     profile=profile)
    t0 = time.perf_counter()
    save_plan(plan, out_path)
    if stats is not None:
        for c, _ in results:
            for k, v in c.timings.items():
                stats[k] = stats.get(k, 0.0) + v
        stats["plan"] = time.perf_counter() - t0
    return plan


class PlanModule:
    """A loaded plan: call it like the model, `(input_ids, positions, slot_mapping, block_table,
    kv_caches) -> logits`. Pads the batch to the smallest compiled bucket that holds it."""

    def __init__(self, plan: dict, model, device):
        self.plan = plan
        self.model = model
        self.block_size = model.block_size
        self.model_group = plan["parallel"]["group"]
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        self.buckets = []
        for b in plan["buckets"]:
            gm = graph_from_json(b["nodes"], device=device)
            specs = [InputSpec(**s) for s in b["inputs"]]
            bound = []
            for s in specs:
                if s.kind in ("param", "buffer"):
                    if s.target not in params:
                        raise PlanError(f"plan needs {s.kind} {s.target}, which the model does not have")
                    bound.append(params[s.target])
                elif s.kind == "user":
                    bound.append(int(s.target))
                else:
                    raise PlanError(f"plan input {s.name} of kind {s.kind} cannot be bound")
            self.buckets.append((b["tokens"], b["cut"], bound, Executor(gm, instrs_of(b), device=device)))

    def new_kv_cache(self, num_blocks: int, **kw) -> PagedKVCache:
        return self.model.new_kv_cache(num_blocks, **kw)

    def __call__(self, input_ids, positions, slot_mapping, block_table, kv_caches):
        T = int(input_ids.shape[0])
        T_all = T
        if self.plan["parallel"]["ep"] > 1:
            # every rank must run the same bucket (same shapes, same split): agree on the largest
            # token count with one collective, then pad to the same bucket
            T_all = agree_num_tokens(T, self.model_group)
        fits = [b for b in self.buckets if b[0] >= T_all]
        if not fits:
            raise ValueError(f"batch of {T_all} tokens exceeds the plan's largest bucket "
                             f"({max(b[0] for b in self.buckets)}); recompile with a larger --tokens")
        tokens, _, bound, run = min(fits, key=lambda b: b[0])
        pad = tokens - T
        user = [input_ids, positions, slot_mapping, block_table]
        if pad:  # padding rows: token 0 at position 0 in the null block, zero block table
            user = [torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in user]
        user += list(kv_caches)
        args = [user[b] if isinstance(b, int) else b for b in bound]
        (logits,) = run(*args)
        return logits[:T]


def load_plan(plan_path, model_dir, *, rank: int = 0, device="cpu", dtype=None, group: str | None = None
              ) -> PlanModule:
    """The plan as a callable with the model's forward signature; weights from `model_dir`."""
    from tbo_compiler.models import load_model

    plan = read_plan(plan_path)
    check_plan(plan, plan_path, model_dir)
    p = plan["parallel"]
    par = ParallelConfig(ep_size=p["ep"], ep_rank=rank, group=group or p["group"], moe_comm=p["moe_comm"])
    if par.group != p["group"]:
        raise PlanError(f"{plan_path}: plan was compiled for comm group {p['group']!r}")
    model = load_model(model_dir, dtype=dtype or getattr(torch, p["dtype"]), device=device, parallel=par,
                       block_size=p["block_size"], num_layers=p["num_layers"])
    return PlanModule(plan, model, device)


__all__ = ["build_model", "example_inputs", "compile_model", "compile_model_dir", "load_plan",
           "PlanModule"]
