"""`load_plan`: a plan file + the model directory -> the runtime's PlanModule.

Contract: nothing runs that the plan file does not hold as plain data (tbo_compiler/plan.py reads
it); a plan for another model, torch, dtype, rank or process group is refused with one PlanError
line before any weight is read; every program's schedule is verified against its graph
(passes/pipeline.py `validate`) before it can run.

Pseudo-code:
    1. read and check the plan (format, checksum, torch version, config hash);
    2. check the dtype, the rank and the comm group; with EP > 1 register the plan's group here,
       once (torch.distributed's default group when it has the plan's number of ranks);
    3. load this rank's weights, decode and verify each program, hand them to PlanModule.
"""
from __future__ import annotations

import torch

from tbo_compiler.models import ParallelConfig
from tbo_compiler.ops.errors import PlanError
from tbo_compiler.ops.instr import Instr
from tbo_compiler.passes.memory import peak_activation_bytes
from tbo_compiler.passes.pipeline import validate
from tbo_compiler.plan import check_plan, graph_from_json, read_plan
from tbo_compiler.runtime.plan_module import BucketProgram, PlanModule


def programs_of(plan: dict, device=None) -> dict:
    """{tokens: {variant: BucketProgram}}, every schedule verified against its graph first."""
    out: dict = {}
    for b in plan["buckets"]:
        for variant, p in b["programs"].items():
            gm = graph_from_json(p["nodes"], device=device)
            instrs = tuple(Instr.from_list(x) for x in p["instrs"])
            validate(gm, instrs)
            inputs = tuple((s["kind"], s["target"]) for s in p["inputs"])
            need = p.get("peak_activation_bytes")
            if need is None:  # a plan written before the field: the same walk, from the stored shapes
                need = peak_activation_bytes(gm, instrs)
            out.setdefault(b["tokens"], {})[variant] = BucketProgram(
                b["tokens"], p["cut"], gm, instrs, inputs, p["summary"]["predicted_us"], int(need))
    return out


def _check_parallel(path, p: dict, rank, group) -> None:
    """Refuse, before any weight is read, a rank or process group the plan was not compiled for."""
    import torch.distributed as dist

    from tbo_compiler.runtime.comm import get_group, register_default_group

    ep = p["ep"]
    if group not in (None, p["group"]):
        raise PlanError(f"{path}: plan was compiled for comm group {p['group']!r}, not {group!r}")
    if type(rank) is not int or not 0 <= rank < ep:
        raise PlanError(f"{path}: rank {rank!r} is outside the plan's {ep} expert-parallel ranks (0..{ep - 1})")
    if ep > 1:
        if register_default_group(p["group"], ep) is None and dist.is_available() and dist.is_initialized():
            raise PlanError(f"{path}: plan was compiled for {ep} expert-parallel ranks, torch.distributed has "
                            f"{dist.get_world_size()}: launch {ep} ranks or recompile with "
                            f"--ep {dist.get_world_size()}")
        get_group(p["group"], ep)  # not registered, or registered with another size: one line now


def load_plan(plan_path, model_dir, *, rank: int = 0, device="cpu", dtype=None, group: str | None = None,
              policy: str = "auto", graphs: bool | None = None, inductor: bool = False,
              free_bytes: int | None = None) -> PlanModule:
    """The plan as a callable with the model's forward signature; weights from `model_dir`.

    On CUDA a bucket whose programs need more activation memory than the device has free (after
    the weights are loaded) is refused here, one warning line each (runtime/plan_module.py);
    `free_bytes` overrides the measured free memory (and makes the check run on CPU too).

    With EP > 1 the comm group is the plan's ("ep"): registered already, or set up here from
    torch.distributed's default group when it has the plan's number of ranks."""
    from tbo_compiler.models import load_model

    # Step 1: the plan
    plan = read_plan(plan_path)
    check_plan(plan, plan_path, model_dir)
    # Step 2: what it was compiled for
    p = plan["parallel"]
    if dtype is not None and dtype != getattr(torch, p["dtype"]):  # a plan's programs are of one dtype
        raise PlanError(f"{plan_path}: plan was compiled for {p['dtype']}, not {str(dtype).removeprefix('torch.')}: "
                        f"load it with dtype=torch.{p['dtype']} (or no dtype), or recompile with "
                        f"--dtype {str(dtype).removeprefix('torch.')}")
    _check_parallel(plan_path, p, rank, group)
    # Step 3: weights and programs
    par = ParallelConfig(ep_size=p["ep"], ep_rank=rank, group=p["group"], moe_comm=p["moe_comm"])
    model = load_model(model_dir, dtype=getattr(torch, p["dtype"]), device=device, parallel=par,
                       block_size=p["block_size"], num_layers=p["num_layers"])
    return PlanModule(programs_of(plan, device), model, device, ep=p["ep"], group=par.group, policy=policy,
                      graphs=graphs, num_token_inputs=len(model.token_inputs), inductor=inductor,
                      phase=plan["policy"]["mode"], free_bytes=free_bytes)


__all__ = ["load_plan", "programs_of"]
