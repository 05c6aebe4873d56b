"""Capture a model as a functional ATen graph, the form every pass takes.

Three fronts, one normal form:
  * `capture_make_fx(model, args)` - one make_fx trace with functionalization (what torch.export
    runs underneath); `tbo-compile`'s default because it traces once: ~0.2 s per DeepSeek-V3
    layer, where torch.export plus `run_decompositions` traces twice (~1.7 s per layer);
  * `capture_export(model, args)` - torch.export, decomposed to ATen (`tbo-compile --capture export`);
  * the torch.compile backend (backend.py) - dynamo + aot_autograd, same ATen level.
Normal form: placeholders in order [params/buffers..., user inputs...] described by `InputSpec`s;
input mutations (KV-cache writes) as a trailing `aten.copy_(input, new_value)`; outputs are the
user outputs only.
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import CaptureError, one_line


@dataclass(frozen=True)
class InputSpec:
    name: str      # placeholder name
    kind: str      # param | buffer | constant | user
    target: str    # parameter/buffer FQN, or the user input's flat index as a string


def _first_line(e: BaseException) -> str:
    return one_line(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__


_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _where(exc: BaseException) -> str:
    """The innermost frame outside torch of an exception: the user's line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if "/torch/" not in fr.filename and "tbo_compiler/capture" not in fr.filename:
            return f"{fr.filename}:{fr.lineno} ({(fr.line or '').strip()})"
    m = _USER_FRAME.findall(str(exc))
    return f"{m[-1][0]}:{m[-1][1]}" if m else "?"


def capture_export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None
                   ) -> tuple[fx.GraphModule, tuple[InputSpec, ...]]:
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs or {}, strict=False)
            ep = ep.run_decompositions()
    except Exception as e:  # report the user's line, not torch's stack
        raise CaptureError(f"torch.export could not capture the model: {_first_line(e)} (at {_where(e)})") from e
    return normalize_export(ep)


def normalize_export(ep) -> tuple[fx.GraphModule, tuple[InputSpec, ...]]:
    from torch.export.graph_signature import InputKind, OutputKind

    gm = ep.graph_module
    sig = ep.graph_signature
    specs = []
    user_i = 0
    for s in sig.input_specs:
        if s.kind == InputKind.USER_INPUT:
            specs.append(InputSpec(s.arg.name, "user", str(user_i)))
            user_i += 1
        elif s.kind == InputKind.PARAMETER:
            specs.append(InputSpec(s.arg.name, "param", s.target))
        elif s.kind == InputKind.BUFFER:
            specs.append(InputSpec(s.arg.name, "buffer", s.target))
        elif s.kind in (InputKind.CONSTANT_TENSOR,):
            specs.append(InputSpec(s.arg.name, "constant", s.target))
        else:
            raise CaptureError(f"unsupported exported input kind {s.kind} ({s.arg.name})")
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    buffer_ph = {s.target: s.name for s in specs if s.kind == "buffer"}
    user_outs = []
    vals = list(out.args[0])
    with g.inserting_before(out):
        for spec, v in zip(sig.output_specs, vals):
            if spec.kind == OutputKind.USER_OUTPUT:
                user_outs.append(v)
            elif spec.kind in (OutputKind.USER_INPUT_MUTATION, OutputKind.BUFFER_MUTATION):
                dst = placeholders[spec.target if spec.kind == OutputKind.USER_INPUT_MUTATION
                                   else buffer_ph[spec.target]]
                c = g.call_function(torch.ops.aten.copy_.default, (dst, v))
                c.meta["val"] = dst.meta.get("val")
            else:
                raise CaptureError(f"unsupported exported output kind {spec.kind}")
    out.args = (tuple(user_outs),)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, tuple(specs)


class _ModuleStack:
    """Record each node's module path (meta["nn_module_stack"], as dynamo/export do) with hooks:
    make_fx copies fx_traceback.current_meta into every node it creates."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.handles, self.stack = model, [], []

    def __enter__(self):
        from torch.fx import traceback as fx_traceback

        def pre(name, mod):
            def hook(*_):
                self.stack.append((name, type(mod).__qualname__))
                fx_traceback.current_meta["nn_module_stack"] = {k: (k, t) for k, t in self.stack}
            return hook

        def post(*_):
            self.stack.pop()
            fx_traceback.current_meta["nn_module_stack"] = {k: (k, t) for k, t in self.stack}

        for name, mod in self.model.named_modules():
            if name:
                self.handles.append(mod.register_forward_pre_hook(pre(name, mod)))
                self.handles.append(mod.register_forward_hook(post))
        self._ctx = fx_traceback.preserve_node_meta()
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()
        return False


def _has_record_stack_traces() -> bool:
    import inspect

    from torch.fx.experimental.proxy_tensor import make_fx
    return "record_stack_traces" in inspect.signature(make_fx).parameters


_HAS_RECORD_ST = _has_record_stack_traces()


def capture_make_fx(model: torch.nn.Module, args: tuple, *, stack_traces: bool = False
                    ) -> tuple[fx.GraphModule, tuple[InputSpec, ...]]:
    """One fake-tensor make_fx trace, functionalized (input mutations become a trailing copy_).

    `stack_traces` records the user's source line on every node: it costs about half the trace
    time, so the compiler re-traces with it only to word an error."""
    from torch.func import functional_call, functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = {**params, **buffers}

    def fn(state, *a):
        return (functional_call(model, state, a),)

    try:
        with torch.no_grad(), _ModuleStack(model):
            extra = {"record_stack_traces": stack_traces} if _HAS_RECORD_ST else {}
            gm = make_fx(functionalize(fn, remove="mutations"), tracing_mode="fake", **extra)(state, *args)
    except Exception as e:
        raise CaptureError(f"could not trace the model: {_first_line(e)} (at {_where(e)})") from e
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = [InputSpec(p.name, "param" if k in params else "buffer", k) for p, k in zip(phs, state)]
    specs += [InputSpec(p.name, "user", str(i)) for i, p in enumerate(phs[len(state):])]
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, tuple(specs)
