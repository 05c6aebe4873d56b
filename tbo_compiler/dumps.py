"""Human-readable dumps of a compiled program: graphs, an overview, the predicted trace, a summary.

`write_dumps(compiled, out_dir)` writes
  graph_before.dot / .svg   the captured graph, rows in graph order
  graph_after.dot / .svg    the split graph, rows in schedule ("run") order
  overview.svg              every layer, one row per ubatch: its stages (`L3 u0 attn`,
                            `L3 u1 dispatch`) on the predicted timeline, comm hidden per layer
  schedule.json             Chrome/Perfetto trace of the cost model's predicted timeline
  summary.txt               the verdict; what comm was found, how much of its predicted time is
                            hidden and why not more; the cut, stages, schedule (summary.py)

Contract
  requires   a `State` from `compile_graph`.
  guarantees every output is a pure function of its arguments (same input, same bytes); every file
             is written to a temp file in out_dir and moved into place, so no reader sees half a
             file; work is linear in nodes + edges. The DOT files hold the whole graph (for tools);
             the SVGs stay openable whatever the model: the graph SVGs draw a window of layers
             (the first MoE layer and the next, or `layers=` / $TBO_DUMP_LAYERS=a:b) and at most
             MAX_ROWS rows, the overview a row per layer and ubatch (61 layers: ~3.6k px).
  must not   change the graphs or the schedule.

Drawing (no graphviz binary on our machines, so the SVG is laid out here)
  Step 1: the layer of every node (its `layers.N` module; glue goes with its inputs); rows = what
          the window reads from outside it (inputs worth drawing, under the user's names like
          input_ids; earlier layers' values), then the window's nodes in order. Read-only
          placeholders that are not token inputs (weights, constants) are left out and counted.
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
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape, quoteattr

import torch
import torch.fx as fx

from tbo_compiler.ops.instr import COMM, COMPUTE, Op
from tbo_compiler.runtime.env import flag
from tbo_compiler.summary import IN, OUT, none_last, ub_name, comm_beside, node_layers, summary_text

log = logging.getLogger(__name__)

FILL = {None: "#d9d9d9", 0: "#9ecae1", 1: "#fdae6b"}     # shared grey, ubatch 0 blue, 1 orange
BORDER = {None: "#737373", 0: "#3182bd", 1: "#e6550d"}
UB_CLASS = {None: "sh", 0: "u0", 1: "u1"}
TID = {COMPUTE: 1, COMM: 2}

# SVG geometry in px, integers so coordinates print the same everywhere
ROW, LANE_W, BOX_W, BOX_H, TOP, LEGEND_W = 16, 160, 144, 12, 48, 300
MAX_ROWS = 1200        # a graph SVG stays under 20k px tall whatever the model
OV_ROW, OV_GAP, OV_LABEL_W, OV_PLOT_W, OV_NOTE_W = 28, 6, 80, 900, 360


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
    return ub_name(ub) + suffix


# Step 1 ---------------------------------------------------------------------------------------

def _layer_name(layer) -> str:
    return f"L{layer}" if isinstance(layer, int) else layer


def layer_window(layer: dict, comm_layers, choice=None) -> tuple[int, int] | None:
    """Layers [lo, hi) the graph SVGs draw in full: `choice` ("a:b", "a", "all" or a pair), else
    $TBO_DUMP_LAYERS, else the first layer with comm and the one after it. None: every layer."""
    ints = sorted({v for v in layer.values() if isinstance(v, int)})
    choice = flag("TBO_DUMP_LAYERS") if choice is None else choice
    if not ints or choice == "all":
        return None
    if isinstance(choice, str):
        a, colon, b = choice.strip().partition(":")
        try:
            lo = int(a) if a else ints[0]
            choice = (lo, (int(b) if b else ints[-1] + 1) if colon else lo + 1)
        except ValueError:
            log.warning("TBO_DUMP_LAYERS=%r is not a:b (layers a to b-1); drawing the default window", choice)
            choice = None
    if choice is None:
        first = min((c for c in comm_layers if c is not None), default=ints[0])
        choice = (first, first + 2)
    lo, hi = choice
    return None if lo <= ints[0] and hi > ints[-1] else (lo, hi)


def _inside(window, ints):
    if window is None:
        return lambda v: True
    lo, hi = window
    return lambda v: lo <= v < hi if isinstance(v, int) else (v == IN and lo <= ints[0]) or (v == OUT and hi > ints[-1])


def _label(n: fx.Node, names: dict, default: str) -> str:
    """A box's text: inputs and the split's slices of them by the user's name (input_ids u0)."""
    if n.meta.get("tbo_role") == "split_input" and n.args and getattr(n.args[0], "name", None) in names:
        return f"{names[n.args[0].name]} u{n.meta['tbo_ubatch']}"
    return names.get(n.name, default)


def _rows(gm: fx.GraphModule, order: list[str], token_inputs, layer: dict, window, names: dict):
    """Nodes to draw top to bottom with their box labels, how many are inputs (drawn first, not
    scheduled), and how many weight placeholders were left out. Inputs are what the window reads
    from outside it: inputs worth seeing under their user names, and earlier layers' values."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inside = _inside(window, sorted({v for v in layer.values() if isinstance(v, int)}))
    body = [nodes[name] for name in order if inside(layer[name])]
    drawn = set(body)
    feeders = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in drawn))
    # state written back (KV caches: copy_ into the placeholder) is worth seeing; weights are not
    written = {n.args[0] for n in gm.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.aten.copy_.default}
    fed = set(feeders)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in fed]
    kept = [n for n in inputs if n.name in token_inputs or n in written]
    outside = [a for a in feeders if a.op != "placeholder"]
    labels = ([names.get(n.name, n.name) for n in kept]
              + [_label(a, names, f"from {_layer_name(layer[a.name])} {a.name}") for a in outside]
              + [_label(n, names, _op_label(n)) for n in body])
    return kept + outside + body, labels, len(kept) + len(outside), len(inputs) - len(kept)


def _edges(rows: list[fx.Node]) -> list[tuple[int, int]]:
    row = {n: i for i, n in enumerate(rows)}
    return [(row[a], i) for i, n in enumerate(rows) for a in n.all_input_nodes if a in row]


def _titles(rows, stage: dict, layer: dict, names: dict) -> list[str]:
    out = []
    for n in rows:
        t = f"{names[n.name]} ({n.name})" if n.name in names else n.name
        t += f" {_shape(n.meta.get('val'))} {_layer_name(layer[n.name])} {ub_name(n.meta.get('tbo_ubatch'))}"
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


def _dot(graph_name: str, rows, labels, edges, titles, note: str) -> str:
    lanes = sorted({_lane(n) for n in rows}, key=_lane_order)
    out = [f"digraph {_q(graph_name)} {{",
           "  rankdir=TB; newrank=true;",
           '  node [shape=box, style=filled, fontname="monospace", fontsize=9, height=0.2];',
           '  edge [color="#999999", arrowsize=0.4];']
    by_lane = {lane: [] for lane in lanes}
    for n, label, t in zip(rows, labels, titles):
        by_lane[_lane(n)].append((n, label, t))
    for k, lane in enumerate(lanes):
        out.append(f"  subgraph cluster_{k} {{ label={_q(_lane_title(lane))};")
        for n, label, t in by_lane[lane]:
            ub = lane[0]
            if lane[1] == COMM:
                extra = ', shape=cds, penwidth=2.5, color="#000000"'
            else:
                extra = f', color="{BORDER[ub]}"'
            out.append(f'    {_q(n.name)} [label={_q(label)}, fillcolor="{FILL[ub]}"{extra}, '
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


def _svg(title: str, rows, labels, edges, titles, note: str, first_scheduled: int) -> str:
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
                   f'<text x="{xs[i] + 3}" y="{y + 9}">{escape(labels[i][:26])}</text></g>')
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


def _view(gm, order, token_inputs, stage, order_desc, layer, window, names, cap=None) -> tuple:
    rows, labels, first, hidden = _rows(gm, order, token_inputs, layer, window, names)
    note = f"{hidden} read-only inputs (weights) not drawn; rows in {order_desc}; hover: name, shape"
    if window is not None:
        ints = sorted({v for v in layer.values() if isinstance(v, int)})
        note += (f"; layers {window[0]}..{window[1] - 1} of {ints[0]}..{ints[-1]}, after what they read;"
                 " TBO_DUMP_LAYERS=a:b draws a..b-1; overview.svg: every layer")
    if cap and len(rows) > cap:
        note += f"; the first {cap} of {len(rows)} rows"
        rows, labels = rows[:cap], labels[:cap]
    return rows, labels, _edges(rows), _titles(rows, stage, layer, names), note, first


def _graph_dumps(gm, order, token_inputs, stage, title, order_desc, layer, window, names):
    """DOT of the whole graph (for tools); SVG of the layer window, at most MAX_ROWS rows (a real
    model's whole graph does not open: 61 layers were 300k px tall)."""
    common = (gm, order, token_inputs, stage, order_desc, layer)
    return (_dot(title, *_view(*common, None, names)[:5]),
            _svg(title, *_view(*common, window, names, MAX_ROWS)))


# Overview: every layer, one row per ubatch ----------------------------------------------------

class StageRun(NamedTuple):
    """One named stage of one layer and ubatch on the predicted timeline (`L3 u0 attn`)."""
    name: str        # comm kind (dispatch, combine, ...) or what the compute is (attn, experts, mlp, ...)
    start_us: float
    end_us: float
    busy_us: float
    stage: int | None
    comm: bool


def _what(n: fx.Node) -> str | None:
    """What a compute node is part of: attention, experts, else its module below `layers.N`
    (mlp, input_layernorm), or outside the layers its top module (lm_head); None for glue."""
    op = _op_label(n)
    if "attention" in op:
        return "attn"
    if "experts" in op or "grouped_mm" in op:
        return "experts"
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = str(path[0] if isinstance(path, tuple) else path)
    inner = re.search(r"layers\.\d+\.([^.]+)", path)
    if inner:
        return inner.group(1)
    return None if re.search(r"layers\.\d+$", path) else path.split(".")[0]


def _stage_run(spans: list, nodes: dict, stage) -> StageRun:
    time = Counter()
    for name, start, end in spans:
        n = nodes[name]
        what = n.meta["tbo_comm"]["kind"] if "tbo_comm" in n.meta else _what(n)
        if what:
            time[what] += end - start
    # attention and experts name a stage whatever else it holds; otherwise the most time wins
    name = next((w for w in ("attn", "experts") if w in time), None) or \
        (max(time, key=lambda w: (time[w], w)) if time else "compute")
    return StageRun(name, spans[0][1], max(e for _, _, e in spans), sum(e - s for _, s, e in spans), stage,
                    "tbo_comm" in nodes[spans[0][0]].meta)


def stage_runs(compiled, layer: dict) -> dict:
    """The predicted timeline cut into named stages: (layer, ubatch) -> [StageRun] in time order,
    a run being that layer's and ubatch's consecutive ops on one stream within one schedule stage.
    Split, the shared ops (the weights' transforms, few and short) are left out."""
    nodes = {n.name: n for n in compiled.gm.graph.nodes}
    stage = {name: st for name, _, st in compiled.schedule.stages}
    groups: dict = {}   # (layer, ubatch) -> [(stage, comm?, [(node, start, end)])]
    for name, ub, _, start, end in compiled.schedule.timeline.spans:
        if end <= start or (ub is None and compiled.cut):   # waits take no time
            continue
        key = (stage.get(name), "tbo_comm" in nodes[name].meta)
        runs = groups.setdefault((layer[name], ub), [])
        if not runs or runs[-1][0] != key:
            runs.append((key, []))
        runs[-1][1].append((name, start, end))
    return {row: [_stage_run(spans, nodes, key[0]) for key, spans in runs] for row, runs in groups.items()}


def _layer_order(layer) -> tuple:
    return (layer != IN, layer == OUT, layer if isinstance(layer, int) else 0)


def _overview_svg(title: str, rows: dict, per_layer: dict, profile: str, split: bool) -> str:
    """One row per (layer, ubatch); x is predicted time since the layer's first op, one scale for
    every layer; compute above, comm below in each row; a note per layer on its comm."""
    layers = sorted({L for L, _ in rows}, key=_layer_order)
    t0 = {L: min(r.start_us for (l2, _), runs in rows.items() if l2 == L for r in runs) for L in layers}
    span = max((r.end_us - t0[L] for (L, _), runs in rows.items() for r in runs), default=0.0) or 1.0
    scale = OV_PLOT_W / span
    height = TOP + OV_ROW * len(rows) + OV_GAP * len(layers) + 20
    width = OV_LABEL_W + OV_PLOT_W + OV_NOTE_W
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">', f"<title>{escape(title)}</title>", f"<style>{_CSS}</style>",
           f'<text class="hd" x="10" y="16">{escape(title)}</text>',
           f'<text x="10" y="32">predicted by the cost model ({escape(profile)}), not measured: x = time since '
           f"the layer's first op ({OV_PLOT_W} px = {span:.1f} us); compute above, comm below; hover for times"
           + ("; shared ops (weights' transforms) not drawn" if split else "") + "</text>"]
    y = TOP
    for L in layers:
        keys = sorted((k for k in rows if k[0] == L), key=lambda k: none_last(k[1]))
        out.append(f'<rect class="lane" x="4" y="{y - 2}" width="{width - 8}" height="{OV_ROW * len(keys) + 2}"/>')
        if L in per_layer:
            out.append(f'<text x="{OV_LABEL_W + OV_PLOT_W + 10}" y="{y + 12}">{escape(per_layer[L])}</text>')
        for k in keys:
            ub = k[1]
            row = _layer_name(L) + ("" if ub is None else f" u{ub}")
            out.append(f'<text class="hd" x="10" y="{y + 12}">{escape(row)}</text>')
            for r in rows[k]:
                x = OV_LABEL_W + round((r.start_us - t0[L]) * scale)
                w = max(1, round((r.end_us - r.start_us) * scale))
                top, h = (y + 14, 10) if r.comm else (y, 13)
                tip = (f"{row} {r.name}: {r.start_us - t0[L]:.1f}..{r.end_us - t0[L]:.1f} us, "
                       f"busy {r.busy_us:.1f} us, stage {r.stage}")
                fits = w >= 6 * len(r.name) + 4   # 9px monospace: ~6 px a character
                text = f'<text x="{x + 2}" y="{top + h - 3}">{escape(r.name)}</text>' if fits else ""
                out.append(f'<g class="seg {UB_CLASS[ub]}{" comm" if r.comm else ""}"><title>{escape(tip)}</title>'
                           f'<rect x="{x}" y="{top}" width="{w}" height="{h}"/>{text}</g>')
            y += OV_ROW
        y += OV_GAP
    out.append("</svg>")
    return "\n".join(out) + "\n"


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
        if ins.op == Op.RUN:
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
        elif ins.op == Op.RECORD and ins.stream in last_start:
            ev.append({"ph": "s", "pid": 1, "tid": TID[ins.stream], "name": "event", "cat": "sync",
                       "id": ins.event, "ts": last_start[ins.stream]})
        elif ins.op == Op.WAIT:
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


def write_dumps(compiled, out_dir, *, name: str = "model", input_names: dict | None = None, unsplit=None,
                layers=None) -> dict[str, Path]:
    """Write the graphs, overview, trace and summary into out_dir; returns {file name: path}.
    `input_names`: placeholder -> the user's name (input_ids, kv_caches[0]); `unsplit`: the
    bucket's one-ubatch program, the summary's baseline; `layers`: the window the graph SVGs
    draw ("a:b", (a, b), "all"; default $TBO_DUMP_LAYERS, else the first MoE layer and the next)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = input_names or {}
    sched = compiled.schedule
    stage = {n: s for n, _, s in sched.stages}
    before_order = [n.name for n in compiled.original.graph.nodes if n.op not in ("placeholder", "output")]
    after_order = [i.node for i in sched.instrs if i.op == Op.RUN]
    layer_before, layer_after = node_layers(compiled.original), node_layers(compiled.gm)
    window = layer_window(layer_before, [op.layer for op in compiled.comm_before.ops], layers)
    texts = {}
    texts["graph_before.dot"], texts["graph_before.svg"] = _graph_dumps(
        compiled.original, before_order, compiled.token_inputs, {}, f"{name} before split", "graph order",
        layer_before, window, names)
    texts["graph_after.dot"], texts["graph_after.svg"] = _graph_dumps(
        compiled.gm, after_order, compiled.token_inputs, stage, f"{name} after split ({sched.order_name})",
        "schedule order", layer_after, window, names)
    comm, hidden = Counter(), Counter()
    for b in comm_beside(compiled, layer_after):
        comm[b.layer] += b.us
        hidden[b.layer] += b.us - b.exposed_us
    per_layer = {L: f"comm {c:.1f} us, {100 * hidden[L] / c:.0f}% hidden" for L, c in comm.items() if c}
    texts["overview.svg"] = _overview_svg(f"{name}: every layer's stages ({sched.order_name} schedule)",
                                          stage_runs(compiled, layer_after), per_layer, compiled.options.profile,
                                          bool(compiled.cut))
    texts["schedule.json"] = _trace_json(trace_events(compiled))
    texts["summary.txt"] = summary_text(compiled, name=name, unsplit=unsplit, layer=layer_after)
    paths = {}
    for fname, text in texts.items():
        paths[fname] = out / fname
        _write_atomic(paths[fname], text)
    log.info("wrote %d dumps to %s", len(paths), out)
    return paths
