"""One error root for the whole project, one subclass per stage; every message is one line.

    TboError                      catch this for "any failure of tbo-compiler"
      ModelLoadError              config.json / safetensors (models/loader.py)
      UsageError                  an argument of the API or CLI out of its range
      TboCompileError             a graph the compiler cannot transform
        CaptureError              tracing the model
        TokenAxisError            tokens mix where a split would change the result
        SplitError                the graph cannot be cut into two ubatches
        ScheduleError             a schedule breaks a dependency, an event or a lifetime
        InvariantError            a pass left the graph breaking an invariant of passes/README.md
      PlanError                   a plan file: unreadable, stale, for another model
      RuntimeFailure              running a program: comm groups, handles, buckets, backends, KV blocks

ModelLoadError, UsageError and RuntimeFailure keep ValueError / RuntimeError as second bases, so code that
caught those before still does.
"""
from __future__ import annotations

import re

import torch.fx as fx


class TboError(Exception):
    """Base of every error tbo-compiler raises on bad input or an unsupported model."""


class ModelLoadError(TboError, ValueError):
    """One line: the file, then what is wrong with which tensor or field."""


class UsageError(TboError, ValueError):
    """One line: the argument, what it must be, what it got."""


class TboCompileError(TboError):
    """Base of every error the compiler raises for a graph it cannot transform."""


class CaptureError(TboCompileError):
    """The model could not be traced."""


class TokenAxisError(TboCompileError):
    """The graph mixes tokens where a split would change the result."""


class SplitError(TboCompileError):
    """The graph cannot be split into two ubatches."""


class ScheduleError(TboCompileError):
    """A schedule broke a dependency, missed an event or reused a buffer too early."""


class InvariantError(TboCompileError):
    """A pass returned a graph that breaks an invariant the next passes rely on."""


class PlanError(TboError):
    """A plan file that cannot be used: unreadable, stale, or compiled for something else."""


class RuntimeFailure(TboError, RuntimeError):
    """Running a program failed: an unregistered comm group, a bad handle, a batch too large."""


def one_line(e: object) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in (\S+))?\s*\n\s*(.*)')


def user_frame(node: fx.Node) -> str | None:
    """The innermost frame of the model's source that produced `node` ("file:line (code)")."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    path, line, fn, code = frames[-1]
    return f"{path}:{line} ({code.strip()})" if code.strip() else f"{path}:{line}"


def node_error(cls, node: fx.Node, why: str) -> TboError:
    where = user_frame(node)
    target = getattr(node.target, "__name__", str(node.target))
    msg = f"{why} at node '{node.name}' ({target})"
    if where:
        msg += f", from {where}"
    return cls(msg.replace("\n", " "))
