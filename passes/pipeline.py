"""The pass pipeline: a list, run top to bottom by one driver. Both fronts (torch.compile backend,
tbo-compile) call `compile_graph`.

    annotate_comm     find dispatch/combine and collectives (what the model has)
    token_axis        which axis of every value is the token axis; error where tokens mix
    split_ubatches    two ubatches along the token axis, state chained, shapes rewritten
    annotate_split    the comm again, on the split graph (each comm op now once per ubatch)
    assign_streams    comm on the comm stream, the rest on the compute stream
    schedule          interleave the two ubatch chains; events, frees; cost-model choice
    verify_schedule   dependencies, events, buffer lifetimes

Each pass is `fn(state, options) -> dict` of the fields it adds to the `State` record (the next
pass reads them there; nothing travels in `gm.meta`). After every pass the driver times it, lints
the graph and checks the invariants of passes/README.md that hold from that point on
(`Pass.ensures`, accumulated), raising `InvariantError` naming the pass and the invariant: a pass
that breaks the graph is caught where it did, not three passes later (torch's
`PassManager(run_checks_after_each_pass=True)` is the model). `validate` re-checks a schedule
on its own (a loaded plan).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx

from tbo_compiler.ops.comm import START_OPS
from tbo_compiler.ops.errors import InvariantError, SplitError, TboCompileError, TokenAxisError, one_line
from tbo_compiler.ops.instr import COMM, STREAMS
from tbo_compiler.passes.annotate_comm import CommOps, annotate_comm, is_comm
from tbo_compiler.passes.schedule import Schedule, assign_streams, schedule_ubatches
from tbo_compiler.passes.split_ubatches import SplitLayout, split_point, split_ubatches
from tbo_compiler.passes.token_axis import IGNORED, TokenAxes, infer_token_axes
from tbo_compiler.passes.verify_schedule import verify_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    mode: str = "prefill"            # prefill | decode (how the batch is cut)
    tokens_per_request: int = 1      # decode: tokens per request (MTP > 1), kept in one ubatch
    profile: str = "cpu"             # cost-model device profile
    order: str | None = None         # force "interleaved" or "sequential"
    split: bool | str = True         # False: one ubatch (the no-TBO baseline, same runtime);
                                     # "auto": split only a graph that has comm to overlap
    strict: bool = False             # a graph that cannot be split raises instead of running unsplit


@dataclass
class State:
    """What the passes hand each other: the graph plus the records earlier passes produced."""
    gm: fx.GraphModule
    token_inputs: tuple[str, ...]
    T: int
    cut: int = 0
    original: fx.GraphModule | None = None   # the captured graph, before the split
    comm_before: CommOps | None = None
    axes: TokenAxes | None = None
    split: SplitLayout | None = None
    comm: CommOps | None = None
    schedule: Schedule | None = None
    options: CompileOptions = CompileOptions()
    timings: dict = field(default_factory=dict)
    #: why the graph runs unsplit although a split was asked for (None: it split, or was not asked)
    fallback: str | None = None
    #: the runtime program the torch.compile backend built from this state (for on_compile callbacks)
    program: object | None = None

    @property
    def did_split(self) -> bool:
        return bool(self.cut) and self.split is not None


# Step 1: the passes, as the driver calls them -------------------------------------------------

def _annotate(st: State, o: CompileOptions) -> dict:
    return {"comm_before": annotate_comm(st.gm), "original": st.gm}


class TboFallbackWarning(UserWarning):
    """A graph that cannot be split runs unsplit (correct, without TBO)."""


def _token_axis(st: State, o: CompileOptions) -> dict:
    if st.cut and o.split == "auto" and not st.comm_before.ops:
        log.info("no split: the graph has no communication to overlap")
        return {"cut": 0}
    return {"axes": infer_token_axes(st.gm, st.token_inputs, st.T)} if st.cut else {}


def _split(st: State, o: CompileOptions) -> dict:
    if not st.cut:
        log.info("no split: %d tokens (mode %s)", st.T, o.mode)
        gm = fx.GraphModule(st.gm, st.gm.graph)  # shares the graph; every node is one ubatch
        for n in gm.graph.nodes:
            n.meta["tbo_ubatch"] = None
        return {"gm": gm}
    gm, layout = split_ubatches(st.gm, st.axes, st.cut)
    return {"gm": gm, "split": layout}


def _annotate_split(st: State, o: CompileOptions) -> dict:
    comm = annotate_comm(st.gm)
    if st.cut and len(comm.ops) != 2 * len(st.comm_before.ops):
        raise TboCompileError(f"split graph has {len(comm.ops)} comm ops, expected 2 x {len(st.comm_before.ops)}")
    return {"comm": comm}


def _streams(st: State, o: CompileOptions) -> dict:
    assign_streams(st.gm, split=bool(st.cut))
    return {}


def _schedule(st: State, o: CompileOptions) -> dict:
    return {"schedule": schedule_ubatches(st.gm, st.comm, profile=o.profile, prefer=o.order)}


def _verify(st: State, o: CompileOptions) -> dict:
    verify_schedule(st.gm, st.schedule.instrs)
    return {}


# Step 2: the invariants (passes/README.md) ----------------------------------------------------

def functional_with_vals(gm: fx.GraphModule) -> str | None:
    """1. Functional ATen with meta["val"]: no in-place op but the trailing copy_ into an input."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in IGNORED:  # asserts: no value to describe
            continue
        if "val" not in n.meta:
            return f"node {n.name} has no meta['val']"
        t = n.target
        if getattr(t, "_schema", None) is not None and t._schema.is_mutable and t != torch.ops.aten.copy_.default:
            return f"node {n.name} ({t}) mutates its input"
    return None


def comm_paired(gm: fx.GraphModule) -> str | None:
    """3. Every comm start has exactly one wait consuming it, and nothing else reads its handle."""
    waits = {w for w, _ in START_OPS.values()}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in START_OPS:
            want = START_OPS[n.target][0]
            users = list(n.users)
            if len(users) != 1 or users[0].target != want:
                return f"comm start {n.name} is read by {[u.name for u in users]}, not by one {want}"
        if n.op == "call_function" and n.target in waits and n.args[0].target not in START_OPS:
            return f"comm wait {n.name} does not consume a comm start"
    return None


def ubatches_marked(gm: fx.GraphModule) -> str | None:
    """After the split: every node says which ubatch it belongs to (0, 1 or None = shared)."""
    for n in gm.graph.nodes:
        if n.op != "output" and n.meta.get("tbo_ubatch", "missing") not in (0, 1, None):
            return f"node {n.name} has no ubatch"
    return None


def streams_assigned(gm: fx.GraphModule) -> str | None:
    """After assign_streams: every node has a stream, and comm never runs on the compute stream
    when the graph is split (a wait there would stall the other ubatch's compute)."""
    split = any(n.meta.get("tbo_ubatch") is not None for n in gm.graph.nodes)
    for n in gm.graph.nodes:
        s = n.meta.get("tbo_stream")
        if n.op not in ("placeholder", "output") and s not in STREAMS:
            return f"node {n.name} has no stream"
        if split and is_comm(n) and s != COMM:
            return f"comm node {n.name} is on the {s} stream"
    return None


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[State, CompileOptions], dict]
    ensures: tuple[Callable[[fx.GraphModule], str | None], ...] = ()


#: the pipeline, in order; each pass's `ensures` hold from it to the end
PASSES = (
    Pass("annotate_comm", _annotate, (functional_with_vals, comm_paired)),
    Pass("token_axis", _token_axis),
    Pass("split_ubatches", _split, (ubatches_marked,)),
    Pass("annotate_split", _annotate_split),
    Pass("assign_streams", _streams, (streams_assigned,)),
    Pass("schedule", _schedule),
    Pass("verify_schedule", _verify),
)


# Step 3: the driver ---------------------------------------------------------------------------

def run_passes(state: State, options: CompileOptions, passes=PASSES,
               progress: Callable[[str], None] | None = None) -> State:
    checks: list = []
    for p in passes:
        if progress:
            progress(p.name)
        t0 = time.perf_counter()
        state = replace(state, **p.fn(state, options))
        state.timings[p.name] = time.perf_counter() - t0
        checks += [c for c in p.ensures if c not in checks]
        try:
            state.gm.graph.lint()
        except Exception as e:
            raise InvariantError(f"after pass {p.name}: the graph does not lint ({e})") from e
        for check in checks:
            why = check(state.gm)
            if why:
                raise InvariantError(f"after pass {p.name}: invariant '{check.__name__}' broken: {why}")
    return state


def compile_graph(gm: fx.GraphModule, token_inputs: tuple[str, ...], T: int,
                  options: CompileOptions = CompileOptions(),
                  progress: Callable[[str], None] | None = None, passes=PASSES) -> State:
    """Run the pipeline on a captured ATen graph traced at T tokens."""
    cut = split_point(T, options.mode, options.tokens_per_request) if options.split else 0
    try:
        return run_passes(State(gm, tuple(token_inputs), T, cut, options=options), options, passes, progress)
    except (TokenAxisError, SplitError) as e:   # the graph cannot be cut into two ubatches
        if options.strict:
            raise
        why = one_line(e)
    except TboCompileError:                      # a broken invariant or schedule: a bug, raise it
        raise
    except Exception as e:                       # an internal error of the split: the model still runs
        if options.strict or not cut:
            raise
        why = f"internal error {type(e).__name__}: {one_line(e)}"
    # not strict: the graph runs unsplit, with one warning naming the op, the source line and
    # what TBO would need
    warnings.warn(TboFallbackWarning(
        f"tbo: running this graph without TBO (unsplit): {why}. TBO needs every op between the token "
        "inputs and the outputs to keep tokens independent; teach the pass a custom op with "
        "tbo_compiler.declare_op, or pass options={'strict': True} to make this an error"), stacklevel=2)
    st = run_passes(State(gm, tuple(token_inputs), T, 0, options=options), options, passes, progress)
    st.fallback = why
    return st


def validate(gm: fx.GraphModule, instrs) -> None:
    """Validate-only mode: re-check a schedule (e.g. one read from a plan file) against its graph."""
    why = streams_assigned(gm) or comm_paired(gm)
    if why:
        raise InvariantError(f"plan graph: {why}")
    verify_schedule(gm, instrs)


__all__ = ["CompileOptions", "State", "TboFallbackWarning", "Pass", "PASSES", "run_passes", "compile_graph", "validate"]
