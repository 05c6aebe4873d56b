"""Errors the passes raise: one line naming the node and, where known, the user's source line."""
from __future__ import annotations

import re

import torch.fx as fx


class TboCompileError(RuntimeError):
    """Base of every error the compiler raises for a graph it cannot transform."""


class TokenAxisError(TboCompileError):
    """The graph mixes tokens where a split would change the result."""


class SplitError(TboCompileError):
    """The graph cannot be split into two ubatches."""


class ScheduleError(TboCompileError):
    """A schedule broke a dependency, missed an event or reused a buffer too early."""


_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in (\S+))?\s*\n\s*(.*)')


def user_frame(node: fx.Node) -> str | None:
    """The innermost frame of the model's source that produced `node` ("file:line (code)")."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    path, line, fn, code = frames[-1]
    return f"{path}:{line} ({code.strip()})" if code.strip() else f"{path}:{line}"


def node_error(cls, node: fx.Node, why: str) -> TboCompileError:
    where = user_frame(node)
    target = getattr(node.target, "__name__", str(node.target))
    msg = f"{why} at node '{node.name}' ({target})"
    if where:
        msg += f", from {where}"
    return cls(msg.replace("\n", " "))
