"""The plan file: what `tbo-compile` writes and `load_plan` runs.

A plan is `torch.save` of plain containers only (dicts, lists, strings, numbers), so it loads with
`torch.load(weights_only=True)`: no pickled code runs. It holds, per bucket (token count), two
programs: "tbo" (split into two ubatches) and "serial" (one ubatch), each as a JSON node list (ATen
op names, no weights: parameters are placeholders named by their FQN in the model directory) with
its schedule, predicted times and the peak activation bytes it needs (`peak_activation_bytes`,
passes/memory.py: the load refuses what does not fit; a format-3 plan written before the field
has it computed at load, so the format did not change); plus the split policy, the parallel
config, versions and a hash of the model's config.json. The JSON text is stored with its sha256, checked at load, so an edited
or damaged plan is refused rather than run. Same input, same bytes (no timestamps, sorted keys). A
loaded program's schedule is verified again before it runs (tbo_compiler/load.py `programs_of`).

A format module only: containers in, containers out; it imports no passes, runtime or package root.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import PlanError
from tbo_compiler.version import __version__

if TYPE_CHECKING:
    from tbo_compiler.capture import InputSpec

FORMAT_VERSION = 3  # 3: the JSON text's sha256 beside it


# Step 1: values <-> JSON ----------------------------------------------------------------------

def _enc(v):
    if isinstance(v, fx.Node):
        return {"n": v.name}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"f": repr(v)}
    if isinstance(v, (list, tuple)):
        return {"t": [_enc(x) for x in v]} if isinstance(v, tuple) else [_enc(x) for x in v]
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": v.type}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise PlanError(f"cannot store argument {v!r} of type {type(v).__name__} in a plan")


def _dec(v, env, device):
    if isinstance(v, list):
        return [_dec(x, env, device) for x in v]
    if isinstance(v, dict):
        if "n" in v:
            return env[v["n"]]
        if "t" in v:
            return tuple(_dec(x, env, device) for x in v["t"])
        if "f" in v:
            return float(v["f"])
        if "dtype" in v:
            return getattr(torch, v["dtype"])
        if "device" in v:
            return torch.device(device) if device is not None else torch.device(v["device"])
        if "layout" in v:
            return getattr(torch, v["layout"])
        if "memory_format" in v:
            return getattr(torch, v["memory_format"])
        raise PlanError(f"plan holds an argument of unknown form {v!r}")
    return v


def _target_name(t) -> str:
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return str(t)  # e.g. "aten.mm.default", "tbo.dispatch_start.default"
    raise PlanError(f"cannot store call target {t} in a plan")


def _op_from_name(name: str):
    if name == "getitem":
        return operator.getitem
    ns, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError:
        raise PlanError(f"plan uses op {name}, which this torch does not have") from None


def _val_meta(v):
    if isinstance(v, torch.Tensor):
        return [list(v.shape), str(v.dtype).removeprefix("torch.")]
    if isinstance(v, (list, tuple)):
        return [_val_meta(x) for x in v]
    return None


def graph_to_json(gm: fx.GraphModule) -> list:
    nodes = []
    for n in gm.graph.nodes:
        rec = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            rec["target"] = _target_name(n.target)
        if n.op in ("call_function", "output"):
            rec["args"] = _enc(n.args)
            rec["kwargs"] = {k: _enc(v) for k, v in n.kwargs.items()}
        rec["ubatch"] = n.meta.get("tbo_ubatch")
        rec["stream"] = n.meta.get("tbo_stream")
        if n.meta.get("tbo_comm"):
            rec["comm"] = dict(n.meta["tbo_comm"])
        rec["val"] = _val_meta(n.meta.get("val"))
        nodes.append(rec)
    return nodes


def graph_from_json(nodes: list, device=None) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for rec in nodes:
        if rec["op"] == "placeholder":
            n = g.placeholder(rec["name"])
        elif rec["op"] == "call_function":
            kwargs = {k: _dec(v, env, device) for k, v in rec["kwargs"].items()}
            n = g.create_node("call_function", _op_from_name(rec["target"]), _dec(rec["args"], env, device),
                              kwargs, name=rec["name"])
        elif rec["op"] == "output":
            n = g.output(_dec(rec["args"], env, device)[0])
        else:
            raise PlanError(f"plan node {rec['name']} has unsupported kind {rec['op']}")
        n.meta.update({"tbo_ubatch": rec.get("ubatch"), "tbo_stream": rec.get("stream"),
                       "tbo_val": rec.get("val")})
        if rec.get("comm"):
            n.meta["tbo_comm"] = rec["comm"]
        env[rec["name"]] = n
    g.lint()
    return fx.GraphModule(torch.nn.Module(), g)


# Step 2: the plan record ----------------------------------------------------------------------

def config_hash(model_dir) -> str:
    """sha256 of config.json, canonicalised (key order and whitespace do not matter)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: cannot read the model's config ({type(e).__name__})") from None
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict:
    return {"tbo_compiler": __version__, "torch": torch.__version__.split("+")[0],
            "format": FORMAT_VERSION}


def bucket_record(T: int, variant: str, state, specs: tuple[InputSpec, ...], *,
                  peak_activation_bytes: int | None = None) -> dict:
    """One compiled program as plain containers: graph, inputs, instructions, predictions and,
    when given, the peak activation bytes it needs (passes/memory.py; a plan without the field,
    written before it existed, has it computed at load). `state` is the pipeline's result
    (passes/pipeline.py State): read, not imported."""
    s = state.schedule
    mem = {} if peak_activation_bytes is None else {"peak_activation_bytes": int(peak_activation_bytes)}
    return {**mem, "tokens": T, "variant": variant, "cut": state.cut, "nodes": graph_to_json(state.gm),
            "inputs": [asdict(x) for x in specs], "instrs": [i.to_list() for i in s.instrs],
            "summary": {"order": s.order_name, "predicted_us": round(s.timeline.makespan_us, 3),
                        "serial_us": round(s.serial_us, 3), "overlap_us": round(s.timeline.overlap_us(), 3),
                        "comm_ops": len(state.comm.ops)}}


def make_plan(records: list[dict], *, model_dir, mode: str, tokens_per_request: int,
              parallel: dict, profile: str) -> dict:
    buckets: dict[int, dict] = {}
    for r in records:
        buckets.setdefault(r["tokens"], {"tokens": r["tokens"], "programs": {}})["programs"][r["variant"]] = \
            {k: v for k, v in r.items() if k not in ("tokens", "variant")}
    return {
        "kind": "tbo-plan",
        "versions": versions(),
        "config_sha256": config_hash(model_dir),
        "policy": {"mode": mode, "tokens_per_request": tokens_per_request},
        "parallel": parallel,
        "profile": profile,
        "buckets": [buckets[t] for t in sorted(buckets)],
    }


def save_plan(plan: dict, path) -> None:
    """Atomic: a temp file in the same directory, then a rename. A failure leaves no plan file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    payload = {"json": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):   # a full disk, a quota, an I/O error
            raise PlanError(f"cannot write plan {path}: {_write_cause(e, path.parent, len(text))}") from None
        raise


def _write_cause(e: BaseException, where: Path, need: int) -> str:
    """One line for a failed write: the OS's words, or (torch's writer says only "file write failed")
    the free space left where the plan goes."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < 2 * need:
        return f"no space left on the device ({free} bytes free, the plan needs about {need})"
    return "the write failed (" + str(e).strip().splitlines()[0][-120:] + ")"


def read_plan(path) -> dict:
    """The plan dict; one PlanError line if the file is no plan, damaged, edited or of another format."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, weights_only=True)  # plain containers only: no pickled code runs
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except IsADirectoryError:
        raise PlanError(f"{path}: is a directory, not a plan file") from None
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never for a plan
        raise PlanError(f"{path}: not a tbo plan (it holds pickled objects, not plain data; "
                        "refused without running them)") from None
    except Exception as e:
        raise PlanError(f"{path}: not a tbo plan, or truncated ({type(e).__name__})") from None
    text, digest = (payload.get("json"), payload.get("sha256")) if isinstance(payload, dict) else (None, None)
    corrupted = PlanError(f"{path}: plan is corrupted (checksum mismatch); recompile it")
    if isinstance(text, str) and digest not in (None, hashlib.sha256(text.encode()).hexdigest()):
        raise corrupted  # before parsing: an edited byte may also break the JSON
    try:
        plan = json.loads(text)
    except (TypeError, ValueError):
        plan = None
    if not isinstance(plan, dict) or plan.get("kind") != "tbo-plan":
        raise PlanError(f"{path}: not a tbo plan")
    fmt = (plan.get("versions") or {}).get("format")
    if fmt != FORMAT_VERSION:  # before the checksum: format 2 had none
        raise PlanError(f"{path}: plan format {fmt} is not {FORMAT_VERSION}; recompile it")
    if digest is None:
        raise corrupted
    return plan


def check_plan(plan: dict, path, model_dir) -> None:
    have, want = versions(), plan["versions"]
    if want.get("torch") != have["torch"]:
        raise PlanError(f"{path}: plan was compiled with torch {want.get('torch')}, this is torch "
                        f"{have['torch']}; recompile it")
    if plan["config_sha256"] != config_hash(model_dir):
        raise PlanError(f"{path}: plan was compiled for another model (config.json of {model_dir} differs)")
