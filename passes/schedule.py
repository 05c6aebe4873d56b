"""Streams, stages and the static two-ubatch schedule.

Contract
  requires   a split graph (meta["tbo_ubatch"] on every node) with comm annotated.
  guarantees `assign_streams` puts both halves of every comm op on the comm stream and all else on
             the compute stream (meta["tbo_stream"]). `schedule` returns a frozen `Schedule`: one
             instruction list  Run(node, ubatch, stream) | Record(event, stream) |
             Wait(event, stream) | Free(value, after_event)  in which every node runs once after
             its inputs, an event is recorded on the producer's stream right after every
             cross-stream producer and waited on the consumer's stream right before the first
             consumer there, and every intermediate is freed after its last reader (with the
             event that orders a reader on the other stream). Stage boundaries (comm waits) are
             listed per layer.
  must not   change the graph or values: a scheduler only.

Pseudo-code
  Step 1: DAG of the graph (networkx), stage of a node = comm waits on its longest path.
  Step 2: candidate orders: interleaved (A stage s, B stage s, A stage s+1, ...) so A's comm runs
          beside B's compute, and sequential (A then B); lexicographic topological sorts. In both,
          each comm wait is issued right after its start: the comm stream is FIFO, and on a GPU a
          collective is done when its kernels are, so a wait issued behind the *other* ubatch's
          start would hold this ubatch's consumers until both collectives finish.
  Step 3: lower each order to instructions (events, frees); simulate with the cost model; keep
          the fastest, the interleaved one on ties.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from tbo_compiler.ops.instr import COMM, COMPUTE, Instr, Op
from tbo_compiler.passes.annotate_comm import CommOps, is_comm, is_wait, layer_of
from tbo_compiler.passes.cost_model import PROFILES, Timeline, node_cost_us, simulate


@dataclass(frozen=True)
class Schedule:
    instrs: tuple[Instr, ...]
    order_name: str
    stages: tuple  # (node, ubatch, stage)
    boundaries: tuple  # (layer, ubatch, stage, wait node)
    timeline: Timeline
    serial_us: float   # predicted time of the same work with no overlap at all
    candidates: tuple = field(default=())  # (name, makespan_us)


# Step 0: streams ----------------------------------------------------------------------------

def assign_streams(gm: fx.GraphModule, *, split: bool = True) -> fx.GraphModule:
    """Comm on the comm stream when there are two ubatches to overlap; with one ubatch nothing
    could run beside the comm, so everything stays on the compute stream (no events at all)."""
    for n in gm.graph.nodes:
        n.meta["tbo_stream"] = COMM if split and is_comm(n) else COMPUTE
    return gm


# Step 1 -------------------------------------------------------------------------------------

def build_dag(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, n in enumerate(gm.graph.nodes):
        if n.op in ("call_function", "call_method", "call_module", "get_attr"):
            g.add_node(n.name, idx=i)
    for n in gm.graph.nodes:
        if n.name in g:
            for a in n.all_input_nodes:
                if a.name in g:
                    g.add_edge(a.name, n.name)
    return g


def assign_stages(gm: fx.GraphModule, dag: nx.DiGraph) -> dict[str, int]:
    nodes = {n.name: n for n in gm.graph.nodes}
    stage: dict[str, int] = {}
    for name in nx.topological_sort(dag):
        n = nodes[name]
        s = max((stage[p] for p in dag.predecessors(name)), default=0)
        stage[name] = s + (1 if is_wait(n) else 0)
    # shared nodes (weights' transforms) go with their first consumer
    for name in reversed(list(nx.topological_sort(dag))):
        if nodes[name].meta.get("tbo_ubatch") is None:
            succ = [stage[s] for s in dag.successors(name)]
            stage[name] = min(succ) if succ else stage[name]
    return stage


# Step 2 -------------------------------------------------------------------------------------

def _orders(gm, dag, stage):
    nodes = {n.name: n for n in gm.graph.nodes}

    def ub(name):
        u = nodes[name].meta.get("tbo_ubatch")
        return -1 if u is None else u

    def interleaved(name):
        return (stage[name], ub(name), dag.nodes[name]["idx"])

    def sequential(name):
        return (ub(name) if ub(name) >= 0 else 0, stage[name], dag.nodes[name]["idx"])

    return {"interleaved": waits_after_starts(list(nx.lexicographical_topological_sort(dag, key=interleaved)), nodes),
            "sequential": waits_after_starts(list(nx.lexicographical_topological_sort(dag, key=sequential)), nodes)}


def waits_after_starts(order: list[str], nodes: dict) -> list[str]:
    """Each comm wait moved to right after its start. Still a topological order: a wait reads only
    its start's handle and the payload its start already read."""
    waits = {name for name in order if is_wait(nodes[name])}
    out: list[str] = []
    for name in order:
        if name in waits:
            continue
        out.append(name)
        out += [u.name for u in nodes[name].users if u.name in waits and u.args[0] is nodes[name]]
    return out


# Step 3 -------------------------------------------------------------------------------------

def lower(gm: fx.GraphModule, order: list[str]) -> tuple[Instr, ...]:
    nodes = {n.name: n for n in gm.graph.nodes}
    pos = {name: i for i, name in enumerate(order)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a.name for a in out_node.all_input_nodes}
    stream = {name: nodes[name].meta.get("tbo_stream", COMPUTE) for name in order}
    instrs: list[Instr] = []
    next_event = [0]
    recorded: dict[str, int] = {}          # producer -> event recorded after it
    waited: set[tuple[int, str]] = set()   # (event, stream) already waited
    # last reader of each value per stream, to place frees
    last_use: dict[str, dict[str, str]] = {}
    for name in order:
        for a in nodes[name].all_input_nodes:
            if a.name in pos:
                last_use.setdefault(a.name, {})[stream[name]] = name
    frees_after: dict[str, list[str]] = {}
    for v, per in last_use.items():
        if v in outputs:
            continue
        last = max(per.values(), key=pos.get)
        frees_after.setdefault(last, []).append(v)
    free_event: dict[str, int] = {}  # value -> event recorded after its last cross-stream reader

    def new_event():
        next_event[0] += 1
        return next_event[0]

    for name in order:
        n = nodes[name]
        s = stream[name]
        for a in n.all_input_nodes:
            if a.name in pos and stream[a.name] != s:
                ev = recorded[a.name]
                if (ev, s) not in waited:
                    instrs.append(Instr(Op.WAIT, stream=s, event=ev))
                    waited.add((ev, s))
        instrs.append(Instr(Op.RUN, name, n.meta.get("tbo_ubatch"), s))
        if any(stream.get(u.name, s) != s for u in n.users if u.name in pos):
            ev = new_event()
            recorded[name] = ev
            instrs.append(Instr(Op.RECORD, stream=s, event=ev))
        # values whose last reader on this stream is this node, and that live on the other stream
        for a in n.all_input_nodes:
            if a.name in pos and a.name not in outputs and stream[a.name] != s \
                    and last_use[a.name].get(s) == name:
                ev = recorded.get(name)
                if ev is None:
                    ev = new_event()
                    recorded.setdefault(name, ev)
                    instrs.append(Instr(Op.RECORD, stream=s, event=ev))
                free_event[a.name] = ev
        for v in frees_after.get(name, []):
            instrs.append(Instr(Op.FREE, v, nodes[v].meta.get("tbo_ubatch"), stream[v], free_event.get(v)))
    return tuple(instrs)


def schedule_ubatches(gm: fx.GraphModule, comm: CommOps, *, profile: str = "cpu",
                      prefer: str | None = None) -> Schedule:
    prof = PROFILES[profile]
    dag = build_dag(gm)
    stage = assign_stages(gm, dag)
    nodes = {n.name: n for n in gm.graph.nodes}
    comm_bytes = {op.start: op.bytes for op in comm.ops}
    world = max((op.world for op in comm.ops), default=1)
    # a collective's time is its start's; the wait issues nothing on the GPU
    costs = {name: 0.0 if is_wait(nodes[name]) else node_cost_us(nodes[name], prof, comm_bytes.get(name), world)
             for name in dag.nodes}
    results = []
    for oname, order in _orders(gm, dag, stage).items():
        instrs = lower(gm, order)
        tl = simulate(instrs, costs, prof)
        results.append((tl.makespan_us, 0 if oname == "interleaved" else 1, oname, instrs, tl))
    results.sort(key=lambda r: r[:2])
    if prefer:
        results.sort(key=lambda r: r[2] != prefer)
    _, _, oname, instrs, tl = results[0]
    stages = tuple((name, nodes[name].meta.get("tbo_ubatch"), stage[name]) for name in dag.nodes)
    bounds = tuple(sorted(((layer_of(nodes[n]) if layer_of(nodes[n]) is not None else -1,
                            nodes[n].meta.get("tbo_ubatch"), stage[n], n)
                           for n in dag.nodes if is_wait(nodes[n])), key=lambda b: (b[2], b[1] or 0)))
    return Schedule(instrs, oname, stages, bounds, tl, sum(costs.values()),
                    tuple((r[2], r[0]) for r in results))
