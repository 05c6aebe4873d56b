"""Human-readable dumps of a compiled program: graphs, the predicted trace, a summary.

`write_dumps(compiled, out_dir)` writes
  graph_before.dot / .svg   the captured graph, rows in graph order
  graph_after.dot / .svg    the split graph, rows in schedule ("run") order
  schedule.json             Chrome/Perfetto trace of the cost model's predicted timeline
  summary.txt               what comm was found, how the batch was cut and scheduled, the
                            predicted makespan and overlap (`summary_text`, printed by the CLI)

Contract
  requires   a `Compiled` from `compile_graph`.
  guarantees every output is a pure function of `compiled` (same input, same bytes); every file
             is written to a temp file in out_dir and moved into place, so no reader sees half a
             file; work and size are linear in nodes + edges (a 14k-node split graph: all six
             files in about 4 s, the after-graph SVG 3.3 MB, about 230 bytes a node).
  must not   change the graphs or the schedule.

Drawing (no graphviz binary on our machines, so the SVG is laid out here)
  Step 1: rows = the inputs worth drawing, then the nodes in order. Read-only placeholders that are
          not token inputs (weights, constants) are left out and counted in the legend.
  Step 2: one lane (column) per (ubatch, stream): shared | shared comm | ubatch 0 compute |
          ubatch 0 comm | ubatch 1 compute | ubatch 1 comm (lanes with no node are dropped).
          Fill = ubatch (0 blue, 1 orange, shared grey); comm nodes have a thick black border.
  Step 3: edges as thin lines: a curve on the lane's right edge within a lane, a straight red
          line across lanes (across streams, that edge is an event record/wait at run time).
  The DOT text has the same nodes, colours and edges, lanes as clusters, for whoever has graphviz.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import torch
import torch.fx as fx

from tbo_compiler.ops.instr import COMM, COMPUTE

log = logging.getLogger(__name__)

FILL = {None: "#d9d9d9", 0: "#9ecae1", 1: "#fdae6b"}     # shared grey, ubatch 0 blue, 1 orange
BORDER = {None: "#737373", 0: "#3182bd", 1: "#e6550d"}
UB_CLASS = {None: "sh", 0: "u0", 1: "u1"}
TID = {COMPUTE: 1, COMM: 2}

# SVG geometry in px, integers so coordinates print the same everywhere
ROW, LANE_W, BOX_W, BOX_H, TOP, LEGEND_W = 16, 160, 144, 12, 48, 300


# Node facts shared by the DOT and SVG writers ------------------------------------------------

def _op_label(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.name
    t = n.target
    return getattr(t, "_opname", None) or getattr(t, "__name__", None) or str(t)


def _shape(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_shape(x) for x in v) + ")"
    return ""


def _stream(n: fx.Node) -> str:
    # the original graph has no streams assigned; its comm nodes are the annotated ones
    return n.meta.get("tbo_stream") or (COMM if "tbo_comm" in n.meta else COMPUTE)


def _lane(n: fx.Node) -> tuple:
    return (n.meta.get("tbo_ubatch"), _stream(n))


def _lane_order(lane):
    ub, stream = lane
    return (ub is not None, ub or 0, stream != COMPUTE)


def _lane_title(lane) -> str:
    ub, stream = lane
    suffix = "" if stream == COMPUTE and ub is None else f" {stream}"
    return _ub_name(ub) + suffix


def _ub_name(ub) -> str:
    return "shared" if ub is None else f"ubatch {ub}"


def _none_last(x) -> tuple:
    """Sort key for ints that may be None (no layer, shared ubatch): None after the numbers."""
    return (x is None, x or 0)


# Step 1 ---------------------------------------------------------------------------------------

def _rows(gm: fx.GraphModule, order: list[str], token_inputs) -> tuple[list[fx.Node], int]:
    """Nodes to draw, top to bottom, and how many weight placeholders were left out."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # state written back (KV caches: copy_ into the placeholder) is worth seeing; weights are not
    written = {n.args[0] for n in gm.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.aten.copy_.default}
    kept = [n for n in inputs if n.name in token_inputs or n in written]
    return kept + [nodes[name] for name in order], len(inputs) - len(kept)


def _edges(rows: list[fx.Node]) -> list[tuple[int, int]]:
    row = {n: i for i, n in enumerate(rows)}
    return [(row[a], i) for i, n in enumerate(rows) for a in n.all_input_nodes if a in row]


def _titles(rows, stage: dict) -> list[str]:
    out = []
    for n in rows:
        t = f"{n.name} {_shape(n.meta.get('val'))}"
        if n.name in stage:
            t += f" stage {stage[n.name]}"
        if "tbo_comm" in n.meta:
            c = n.meta["tbo_comm"]
            t += f" {c['kind']} {c['role']} (pair {c['pair']})"
        out.append(t)
    return out


# DOT ------------------------------------------------------------------------------------------

def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot(graph_name: str, rows, edges, titles, note: str) -> str:
    lanes = sorted({_lane(n) for n in rows}, key=_lane_order)
    out = [f"digraph {_q(graph_name)} {{",
           "  rankdir=TB; newrank=true;",
           '  node [shape=box, style=filled, fontname="monospace", fontsize=9, height=0.2];',
           '  edge [color="#999999", arrowsize=0.4];']
    by_lane = {lane: [] for lane in lanes}
    for n, t in zip(rows, titles):
        by_lane[_lane(n)].append((n, t))
    for k, lane in enumerate(lanes):
        out.append(f"  subgraph cluster_{k} {{ label={_q(_lane_title(lane))};")
        for n, t in by_lane[lane]:
            ub = lane[0]
            if lane[1] == COMM:
                extra = ', shape=cds, penwidth=2.5, color="#000000"'
            else:
                extra = f', color="{BORDER[ub]}"'
            out.append(f'    {_q(n.name)} [label={_q(_op_label(n))}, fillcolor="{FILL[ub]}"{extra}, '
                       f'tooltip={_q(t)}];')
        out.append("  }")
    out.append('  subgraph cluster_legend { label="legend";')
    for ub, text in ((0, "ubatch 0"), (1, "ubatch 1"), (None, "shared")):
        out.append(f'    "legend:{text}" [label={_q(text)}, fillcolor="{FILL[ub]}"];')
    out.append('    "legend:comm" [label="comm (own lane)", shape=cds, penwidth=2.5, fillcolor="white"];')
    out.append(f'    "legend:note" [label={_q(note)}, shape=note, fillcolor="white"];')
    out.append("  }")
    out += [f"  {_q(rows[a].name)} -> {_q(rows[b].name)};" for a, b in edges]
    out.append("}")
    return "\n".join(out) + "\n"


# SVG: Steps 2 and 3 ---------------------------------------------------------------------------

_CSS = ("rect{stroke-width:.6}.sh rect{fill:%s;stroke:%s}.u0 rect{fill:%s;stroke:%s}"
        ".u1 rect{fill:%s;stroke:%s}.comm rect{stroke:#000;stroke-width:2.5}.in rect{stroke-dasharray:3 2}"
        "text{font:9px monospace}.hd{font:bold 11px sans-serif}.lane{fill:#f7f7f7}"
        ".e{stroke:#aaa;stroke-width:.5;fill:none}.x{stroke:#d62728;stroke-width:.5;fill:none;opacity:.6}"
        % (FILL[None], BORDER[None], FILL[0], BORDER[0], FILL[1], BORDER[1]))


def _svg(title: str, rows, edges, titles, note: str, first_scheduled: int) -> str:
    lanes = sorted({_lane(n) for n in rows}, key=_lane_order)
    lx = {lane: 10 + k * LANE_W for k, lane in enumerate(lanes)}
    xs = [lx[_lane(n)] for n in rows]
    height = TOP + ROW * len(rows) + 20
    width = 20 + LANE_W * len(lanes) + LEGEND_W
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">',
           f"<title>{escape(title)}</title>", f"<style>{_CSS}</style>"]
    for lane, x in lx.items():
        out.append(f'<rect class="lane" x="{x - 4}" y="{TOP - 8}" width="{LANE_W - 8}" '
                   f'height="{height - TOP}"/>')
        out.append(f'<text class="hd" x="{x}" y="{TOP - 14}">{escape(_lane_title(lane))}</text>')
    # edges before nodes so boxes paint over them; one path each keeps 20k edges small
    same, cross = [], []
    for a, b in edges:
        ya, yb = TOP + a * ROW, TOP + b * ROW
        if xs[a] == xs[b]:   # same lane: bulge into the gap on the lane's right
            x = xs[a] + BOX_W
            same.append(f"M{x} {ya + 6}C{x + 12} {ya + 6} {x + 12} {yb + 6} {x} {yb + 6}")
        elif xs[a] < xs[b]:  # across lanes: leave by the side facing the consumer
            cross.append(f"M{xs[a] + BOX_W} {ya + 6}L{xs[b]} {yb + 6}")
        else:
            cross.append(f"M{xs[a]} {ya + 6}L{xs[b] + BOX_W} {yb + 6}")
    out.append(f'<path class="e" d="{"".join(same)}"/>')
    out.append(f'<path class="x" d="{"".join(cross)}"/>')
    for i, (n, t) in enumerate(zip(rows, titles)):
        ub, stream = _lane(n)
        kind = "node" if i >= first_scheduled else "in"   # inputs are not scheduled nodes
        cls = f"{kind} {UB_CLASS[ub]}" + (" comm" if stream == COMM else "")
        rx = ' rx="5"' if stream == COMM else ""
        y = TOP + i * ROW
        out.append(f'<g class="{cls}" id={quoteattr(n.name)}><title>{escape(t)}</title>'
                   f'<rect x="{xs[i]}" y="{y}" width="{BOX_W}" height="{BOX_H}"{rx}/>'
                   f'<text x="{xs[i] + 3}" y="{y + 9}">{escape(_op_label(n)[:26])}</text></g>')
    out.append(_svg_legend(20 + LANE_W * len(lanes), note))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _svg_legend(x: int, note: str) -> str:
    # class "key", not "node": a reader counting scheduled nodes must not count the swatches
    boxes = [("key u0", "ubatch 0"), ("key u1", "ubatch 1"), ("key sh", "shared (one copy)"),
             ("key u0 comm", "comm op (comm stream lane)"), ("key in sh", "input (not scheduled)")]
    lines = [("e", "edge, same lane"), ("x", "edge across lanes (stream or ubatch)")]
    out = [f'<g class="legend"><text class="hd" x="{x}" y="{TOP - 14}">legend</text>']
    y = TOP
    for cls, text in boxes:
        rx = ' rx="5"' if "comm" in cls else ""
        out.append(f'<g class="{cls}"><rect x="{x}" y="{y}" width="24" height="{BOX_H}"{rx}/></g>'
                   f'<text x="{x + 30}" y="{y + 9}">{escape(text)}</text>')
        y += ROW
    for cls, text in lines:
        out.append(f'<path class="{cls}" d="M{x} {y + 6}L{x + 24} {y + 6}"/>'
                   f'<text x="{x + 30}" y="{y + 9}">{escape(text)}</text>')
        y += ROW
    for line in note.split("; "):
        out.append(f'<text x="{x}" y="{y + 9}">{escape(line)}</text>')
        y += ROW
    out.append("</g>")
    return "".join(out)


def _graph_dumps(gm, order, token_inputs, stage, title, order_desc):
    rows, hidden = _rows(gm, order, token_inputs)
    edges = _edges(rows)
    titles = _titles(rows, stage)
    note = f"{hidden} read-only inputs (weights) not drawn; rows in {order_desc}; hover: name, shape"
    first = len(rows) - len(order)
    return _dot(title, rows, edges, titles, note), _svg(title, rows, edges, titles, note, first)


# Trace ----------------------------------------------------------------------------------------

def trace_events(compiled) -> dict:
    """The predicted timeline as a Chrome/Perfetto trace: one pid, a track per stream."""
    sched = compiled.schedule
    stage = {name: s for name, _, s in sched.stages}
    nodes = {n.name: n for n in compiled.gm.graph.nodes}
    ev = [{"ph": "M", "pid": 1, "name": "process_name",
           "args": {"name": f"predicted ({compiled.options.profile} cost model)"}}]
    for stream, tid in TID.items():
        ev.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": stream}})
        ev.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    spans = iter(sched.timeline.spans)   # simulate() emits one span per run, in instruction order
    last_start: dict[str, float] = {}   # stream -> start of the last run there (a record follows it)
    waiting: dict[str, list[int]] = {}  # stream -> events waited, bound to the next run there
    for ins in sched.instrs:
        if ins.op == "run":
            name, ub, stream, start, end = next(spans)
            assert name == ins.node, (name, ins.node)
            ts = round(start, 3)
            args = {"node": name, "ubatch": ub, "stage": stage.get(name), "stream": stream,
                    "shape": _shape(nodes[name].meta.get("val"))}
            if "tbo_comm" in nodes[name].meta:
                args.update({f"comm_{k}": v for k, v in sorted(nodes[name].meta["tbo_comm"].items())})
            label = _op_label(nodes[name]) + ("" if ub is None else f" (u{ub})")
            ev.append({"ph": "X", "pid": 1, "tid": TID[stream], "name": label,
                       "cat": "shared" if ub is None else f"ubatch{ub}",
                       "ts": ts, "dur": round(end - start, 3), "args": args})
            for e in waiting.pop(stream, []):
                ev.append({"ph": "f", "bp": "e", "pid": 1, "tid": TID[stream], "name": "event",
                           "cat": "sync", "id": e, "ts": ts})
            last_start[stream] = ts
        elif ins.op == "record" and ins.stream in last_start:
            ev.append({"ph": "s", "pid": 1, "tid": TID[ins.stream], "name": "event", "cat": "sync",
                       "id": ins.event, "ts": last_start[ins.stream]})
        elif ins.op == "wait":
            waiting.setdefault(ins.stream, []).append(ins.event)
    other = {"note": "durations are predicted by the cost model, not measured",
             "profile": compiled.options.profile, "order": sched.order_name,
             "makespan_us": round(sched.timeline.makespan_us, 3), "serial_us": round(sched.serial_us, 3),
             "T": compiled.T, "cut": compiled.cut, "mode": compiled.options.mode}
    return {"traceEvents": ev, "otherData": other}


def _trace_json(trace: dict) -> str:
    # one event per line: diffs and greps stay readable on big traces
    body = ",\n".join(json.dumps(e, sort_keys=True) for e in trace["traceEvents"])
    rest = {k: v for k, v in trace.items() if k != "traceEvents"}
    return '{"traceEvents": [\n' + body + "\n],\n" + json.dumps(rest, sort_keys=True)[1:] + "\n"


# Summary --------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _kinds(ops) -> str:
    count, size = Counter(), Counter()
    for op in ops:   # Counter keeps first-seen order: model order
        count[op.kind] += 1
        size[op.kind] += op.bytes
    parts = ", ".join(f"{k} x{count[k]} ({_human(size[k])})" for k in count)
    return f"{parts}; {_human(sum(size.values()))} on the wire"


def _layer(layer) -> str:
    return "layer ?" if layer is None else f"layer {layer}"


def verdict(compiled) -> str:
    """One line first in the summary: did TBO happen, with how much comm, and if not, why."""
    n = len(compiled.comm_before.ops)
    comm = f"{n} comm op{'s' if n != 1 else ''} found"
    if compiled.cut:
        tl, serial = compiled.schedule.timeline, compiled.schedule.serial_us
        pred = f"; predicted {serial / tl.makespan_us:.2f}x by the cost model" if tl.makespan_us else ""
        return (f"Verdict: TBO on: split into 2 ubatches ({compiled.cut} + {compiled.T - compiled.cut} tokens), "
                f"{comm}, each run once per ubatch beside the other ubatch's compute{pred}")
    if compiled.fallback:
        return f"Verdict: no TBO, the graph runs unsplit ({comm}): {compiled.fallback}"
    if compiled.options.split and compiled.T <= 1:
        return f"Verdict: no TBO: {compiled.T} token, nothing to split ({comm})"
    if compiled.options.split == "auto" and not n:
        return "Verdict: no TBO: no communication found, nothing to overlap (split=True forces a split)"
    return f"Verdict: no TBO: compiled unsplit as asked (split={compiled.options.split!r}; {comm})"


def summary_text(compiled, *, name: str = "model") -> str:
    o, sched = compiled.options, compiled.schedule
    tl = sched.timeline
    out = [f"TBO summary: {name}", verdict(compiled)]
    mode = o.mode + (f" ({o.tokens_per_request} tokens per request)" if o.mode == "decode" else "")
    if compiled.cut:
        out.append(f"tokens T={compiled.T}, cut at {compiled.cut}: ubatch sizes "
                   f"{compiled.cut} + {compiled.T - compiled.cut}, mode {mode}")
    else:
        out.append(f"tokens T={compiled.T}, no split (one ubatch), mode {mode}")

    # "layer ?": comm outside any `layers.N` module, listed last
    before = compiled.comm_before.ops
    out += ["", f"Comm ops in the original graph: {len(before)}"]
    for layer in sorted(compiled.comm_before.by_layer(), key=_none_last):
        out.append(f"  {_layer(layer)}: {_kinds(compiled.comm_before.by_layer()[layer])}")
    groups = sorted({(op.group, op.world) for op in before}, key=str)
    if groups:
        out.append("  groups: " + ", ".join(f"{g} (world {w})" for g, w in groups))

    out += ["", f"Comm ops after the split: {len(compiled.comm.ops)}"]
    per_ub: dict = {}
    for op in compiled.comm.ops:
        per_ub.setdefault(op.ubatch, []).append(op)
    for ub in sorted(per_ub, key=_none_last):
        out.append(f"  {_ub_name(ub)}: {_kinds(per_ub[ub])}")

    # one line per (layer, stage): bounded width however many layers the model has
    out += ["", "Stage boundaries (a stage begins at a comm wait):"]
    bounds: dict = {}
    for layer, ub, stage, wait in sched.boundaries:   # the scheduler writes layer -1 for unknown
        bounds.setdefault((None if layer is None or layer < 0 else layer, stage), []).append((ub, wait))
    for layer, stage in sorted(bounds, key=lambda k: (*_none_last(k[0]), k[1])):
        waits = sorted(bounds[layer, stage], key=lambda x: _none_last(x[0]))
        where = ", ".join(f"{_ub_name(ub)} @ {w}" for ub, w in waits)
        out.append(f"  {_layer(layer)} stage {stage}: {where}")
    if not bounds:
        out.append("  none (no comm waits)")

    forced = " (forced by options.order)" if o.order else ""
    out += ["", f"Schedule: {sched.order_name}{forced}; candidates: "
            + ", ".join(f"{n} {ms:.1f} us" for n, ms in sched.candidates)]
    comm_busy = tl.busy_us.get(COMM, 0.0)
    ov = tl.overlap_us()
    pct = f"{100 * ov / comm_busy:.1f}% of comm busy {comm_busy:.1f} us" if comm_busy else "no comm"
    speed = f", {sched.serial_us / tl.makespan_us:.2f}x" if tl.makespan_us else ""
    out += [f"Predicted by the cost model (profile {o.profile}), not measured:",
            f"  makespan {tl.makespan_us:.1f} us vs serial {sched.serial_us:.1f} us{speed}",
            f"  overlap {ov:.1f} us = {pct}",
            f"  busy: compute {tl.busy_us.get(COMPUTE, 0.0):.1f} us, comm {comm_busy:.1f} us"]

    out += ["", "Pass timings:"]
    out += [f"  {p:<22} {s * 1e3:9.2f} ms" for p, s in compiled.timings.items()]
    out.append(f"  {'total':<22} {sum(compiled.timings.values()) * 1e3:9.2f} ms")
    return "\n".join(out) + "\n"


# Writing --------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; these are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_dumps(compiled, out_dir, *, name: str = "model") -> dict[str, Path]:
    """Write the graphs, trace and summary into out_dir; returns {file name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_inputs = compiled.axes.token_inputs if compiled.axes is not None else ()
    stage = {n: s for n, _, s in compiled.schedule.stages}
    before_order = [n.name for n in compiled.original.graph.nodes if n.op not in ("placeholder", "output")]
    after_order = [i.node for i in compiled.schedule.instrs if i.op == "run"]
    texts = {}
    texts["graph_before.dot"], texts["graph_before.svg"] = _graph_dumps(
        compiled.original, before_order, token_inputs, {}, f"{name} before split", "graph order")
    texts["graph_after.dot"], texts["graph_after.svg"] = _graph_dumps(
        compiled.gm, after_order, token_inputs, stage, f"{name} after split ({compiled.schedule.order_name})",
        "schedule order")
    texts["schedule.json"] = _trace_json(trace_events(compiled))
    texts["summary.txt"] = summary_text(compiled, name=name)
    paths = {}
    for fname, text in texts.items():
        paths[fname] = out / fname
        _write_atomic(paths[fname], text)
    log.info("wrote %d dumps to %s", len(paths), out)
    return paths
