"""The summary of a compiled program (the dumps' summary.txt): the verdict, what comm was found,
how much of its predicted time is hidden and why not more, the cut, stages and schedule. Text only;
the drawings are tbo_compiler/dumps.py.

Contract
  requires   a `State` from `compile_graph` (and optionally the bucket's unsplit one, the baseline).
  guarantees a pure function of its arguments (same input, same text); every number is read from
             the cost model's timeline, so the summary and the trace never disagree.
  must not   change the graph or the schedule.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch.fx as fx

from tbo_compiler.ops.instr import COMM, COMPUTE
from tbo_compiler.passes.annotate_comm import layer_of
from tbo_compiler.passes.memory import estimate_memory, format_bytes, peak_activation_bytes

IN, OUT = "pre", "post"  # in no layer: before the first (embedding, inputs), after the last (head)


# Node facts shared with the drawings -----------------------------------------------------------

def ub_name(ub) -> str:
    return "shared" if ub is None else f"ubatch {ub}"


def none_last(x) -> tuple:
    """Sort key for ints that may be None (no layer, shared ubatch): None after the numbers."""
    return (x is None, x or 0)


def node_layers(gm: fx.GraphModule) -> dict[str, int | str]:
    """Layer of every node: its module path (`layers.N`); glue with no module (the split's slices
    and joins, top-level code) goes with its inputs' last layer; what is in no layer is IN (before
    the first: embedding, inputs) or OUT (after the last: norm, head), a module wholly one or the
    other (the head's weight transpose reads only inputs, yet belongs to the head)."""
    out: dict = {}
    module = {}   # node -> its top module, for nodes of a module outside the layers
    for n in gm.graph.nodes:
        ins = [out[a.name] for a in n.all_input_nodes]
        own = layer_of(n)
        stack = n.meta.get("nn_module_stack")
        if own is None and not stack:
            own = max((x for x in ins if isinstance(x, int)), default=None)
        if own is None and stack:
            path = list(stack.values())[0]
            module[n.name] = str(path[0] if isinstance(path, tuple) else path)
        out[n.name] = own if own is not None else OUT if any(x != IN for x in ins) else IN
    late = {m for name, m in module.items() if out[name] == OUT}
    return {name: OUT if module.get(name) in late else v for name, v in out.items()}


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


class CommBeside(NamedTuple):
    """One comm op on the predicted timeline and what ran beside it."""
    layer: int | str
    ubatch: int | None
    kind: str
    us: float
    behind_other_us: float   # hidden behind the other ubatch's compute
    behind_own_us: float     # hidden behind other compute: its own ubatch's (shared experts), shared ops
    other_left: bool         # the other ubatch still had compute to run after this comm began

    @property
    def exposed_us(self) -> float:
        return self.us - self.behind_other_us - self.behind_own_us


def comm_beside(compiled, layer: dict) -> list[CommBeside]:
    """Each comm-stream op and the compute-stream time beside it: one sweep, each stream's spans
    being in time order. Nothing when the program is unsplit (its comm runs in line)."""
    nodes = {n.name: n for n in compiled.gm.graph.nodes}
    spans = compiled.schedule.timeline.spans
    compute = [(s, e, ub) for _, ub, st, s, e in spans if st == COMPUTE and e > s]
    last = {ub: e for s, e, ub in compute}   # each ubatch's last compute end
    out, i = [], 0
    for name, ub, st, s, e in spans:
        if st != COMM or e <= s:
            continue
        while i < len(compute) and compute[i][1] <= s:
            i += 1
        other = own = 0.0
        for cs, ce, cub in compute[i:]:
            if cs >= e:
                break
            if cub is not None and cub != ub:
                other += min(e, ce) - max(s, cs)
            else:
                own += min(e, ce) - max(s, cs)
        left = ub is not None and last.get(1 - ub, 0.0) > s
        out.append(CommBeside(layer[name], ub, nodes[name].meta["tbo_comm"]["kind"], e - s, other, own, left))
    return out


def _layers_text(layers) -> str:
    ints = sorted(x for x in set(layers) if isinstance(x, int))
    if not ints:
        return "no layer"
    runs, lo = [], ints[0]
    for a, b in zip(ints, ints[1:] + [None]):
        if b != a + 1:
            runs.append(f"{lo}" if lo == a else f"{lo}-{a}")
            lo = b
    return "layer" + ("s " if len(ints) > 1 else " ") + ", ".join(runs)


def explain(compiled, beside: list[CommBeside], unsplit=None) -> list[str]:
    """What was found, what was overlapped, and why not more: every number from the timeline."""
    before, sched = compiled.comm_before.ops, compiled.schedule
    tl = sched.timeline
    if not before:
        return ["Found: 0 comm ops: nothing to overlap (TBO hides communication; this graph has none)"]
    kinds = Counter(op.kind for op in before)
    split = f"; after the split each runs once per ubatch ({len(compiled.comm.ops)})" if compiled.cut else ""
    out = [f"Found: {len(before)} comm op{'s' if len(before) != 1 else ''} "
           f"({', '.join(f'{k} x{c}' for k, c in kinds.items())}) in {_layers_text(op.layer for op in before)}{split}"]
    nodes = {n.name: n for n in compiled.gm.graph.nodes}
    comm_us = sum(e - s for name, _, _, s, e in tl.spans if "tbo_comm" in nodes[name].meta)
    compute_us = sched.serial_us - comm_us
    out.append(f"Comm predicted: {comm_us:.1f} us, {100 * comm_us / (sched.serial_us or 1):.1f}% of the "
               f"{sched.serial_us:.1f} us the program's ops take one after another")
    if not beside:
        return out + [f"Hidden: nothing: with one ubatch the comm runs in line, {comm_us:.1f} us exposed"]
    other = sum(b.behind_other_us for b in beside)
    hidden = other + sum(b.behind_own_us for b in beside)
    pct = 100 * hidden / comm_us if comm_us else 0.0
    out.append(f"Hidden: {hidden:.1f} us ({pct:.1f}%) behind compute, {other:.1f} us of it behind the other "
               "ubatch's")
    exposed = [b for b in beside if b.exposed_us > 1e-6]
    out.append(f"Not hidden: {comm_us - hidden:.1f} us ({100 - pct:.1f}%)" + (":" if exposed else ""))
    starved = [b for b in exposed if b.other_left]
    if starved:
        worst = max(starved, key=lambda b: b.exposed_us)
        where = _layer(worst.layer if isinstance(worst.layer, int) else None)
        out.append(f"  {sum(b.exposed_us for b in starved):.1f} us in {len(starved)} comm ops that outlast the "
                   "compute the other ubatch had ready beside them (its work up to its own next comm), so the "
                   f"compute stream idled (most: {where} {worst.kind}, ubatch {worst.ubatch}: {worst.us:.1f} us "
                   f"of comm beside {worst.behind_other_us:.1f} us of the other ubatch's compute)")
    tail = [b for b in exposed if not b.other_left]
    if tail:
        out.append(f"  {sum(b.exposed_us for b in tail):.1f} us in {len(tail)} comm ops with no compute of the "
                   "other ubatch left to run beside them (the end of the forward)")
    # why not more: the bound any schedule of this split meets, then what the split itself costs
    bound = sched.serial_us / (max(compute_us, comm_us) or 1)
    now = sched.serial_us / (tl.makespan_us or 1)
    why = [f"compute ({compute_us:.1f} us) outweighs comm ({comm_us:.1f} us): hiding all of the comm gives"
           if comm_us <= compute_us else
           f"comm ({comm_us:.1f} us) outweighs compute ({compute_us:.1f} us): the wire sets the pace,"]
    why[0] += f" at most {bound:.2f}x over the ops run one after another; this schedule: {now:.2f}x"
    if compiled.cut and 2 * compiled.cut != compiled.T:
        why.append(f"the ubatches are unequal ({compiled.cut} + {compiled.T - compiled.cut} tokens): the "
                   "smaller one's compute covers less of the larger one's comm")
    base = unsplit.schedule.timeline.makespan_us if unsplit is not None and unsplit is not compiled else 0.0
    if base and sched.serial_us > 1.01 * base:
        why.append(f"the split costs work: the two ubatches' ops take {sched.serial_us:.1f} us one after another "
                   f"vs {base:.1f} us for the unsplit program (+{100 * (sched.serial_us / base - 1):.0f}%: each "
                   "op runs twice on half the tokens, and per-op costs do not halve); vs the unsplit program "
                   f"{base / (tl.makespan_us or 1):.2f}x")
    return out + ["Why not more:"] + [f"  {w}" for w in why]


def verdict(compiled, unsplit=None) -> str:
    """One line first in the summary: did TBO happen, with how much comm, and if not, why;
    `unsplit`: the same bucket's one-ubatch program, the baseline the runtime measures against."""
    n = len(compiled.comm_before.ops)
    comm = f"{n} comm op{'s' if n != 1 else ''} found"
    if compiled.cut:
        tl, serial = compiled.schedule.timeline, compiled.schedule.serial_us
        pred = f"; predicted {serial / tl.makespan_us:.2f}x by the cost model" if tl.makespan_us else ""
        head = "Verdict: TBO on: "
        if unsplit is not None and unsplit is not compiled and tl.makespan_us:
            gain = unsplit.schedule.timeline.makespan_us / tl.makespan_us
            pred += (f" over its ops run one after another, {gain:.2f}x vs the unsplit program"
                     " (the runtime measures both and keeps the faster)")
            if gain < 1:   # not "TBO on" beside a predicted slowdown: the runtime will likely keep unsplit
                head = (f"Verdict: TBO compiled but predicted slower than unsplit ({gain:.2f}x), so the "
                        "runtime will likely keep the unsplit program: ")
        return (f"{head}split into 2 ubatches ({compiled.cut} + {compiled.T - compiled.cut} tokens), "
                f"{comm}, each run once per ubatch beside the other ubatch's compute{pred}")
    if compiled.fallback:
        return f"Verdict: no TBO, the graph runs unsplit ({comm}): {compiled.fallback}"
    if compiled.options.split and compiled.T <= 1:
        return f"Verdict: no TBO: {compiled.T} token, nothing to split ({comm})"
    if compiled.options.split == "auto" and not n:
        return "Verdict: no TBO: no communication found, nothing to overlap (split=True forces a split)"
    return f"Verdict: no TBO: compiled unsplit as asked (split={compiled.options.split!r}; {comm})"


def summary_text(compiled, *, name: str = "model", unsplit=None, layer: dict | None = None) -> str:
    o, sched = compiled.options, compiled.schedule
    tl = sched.timeline
    layer = layer or node_layers(compiled.gm)
    out = [f"TBO summary: {name}", verdict(compiled, unsplit)]
    out += explain(compiled, comm_beside(compiled, layer), unsplit) + [""]
    mode = o.mode + (f" ({o.tokens_per_request} tokens per request)" if o.mode == "decode" else "")
    if compiled.cut:
        out.append(f"tokens T={compiled.T}, cut at {compiled.cut}: ubatch sizes "
                   f"{compiled.cut} + {compiled.T - compiled.cut}, mode {mode}")
    else:
        out.append(f"tokens T={compiled.T}, no split (one ubatch), mode {mode}")

    # "layer ?": comm outside any `layers.N` module, listed last
    before = compiled.comm_before.ops
    out += ["", f"Comm ops in the original graph: {len(before)}"]
    for layer in sorted(compiled.comm_before.by_layer(), key=none_last):
        out.append(f"  {_layer(layer)}: {_kinds(compiled.comm_before.by_layer()[layer])}")
    groups = sorted({(op.group, op.world) for op in before}, key=str)
    if groups:
        out.append("  groups: " + ", ".join(f"{g} (world {w})" for g, w in groups))

    out += ["", f"Comm ops after the split: {len(compiled.comm.ops)}"]
    per_ub: dict = {}
    for op in compiled.comm.ops:
        per_ub.setdefault(op.ubatch, []).append(op)
    for ub in sorted(per_ub, key=none_last):
        out.append(f"  {ub_name(ub)}: {_kinds(per_ub[ub])}")

    # one line per (layer, stage): bounded width however many layers the model has
    out += ["", "Stage boundaries (a stage begins at a comm wait):"]
    bounds: dict = {}
    for layer, ub, stage, wait in sched.boundaries:   # the scheduler writes layer -1 for unknown
        bounds.setdefault((None if layer is None or layer < 0 else layer, stage), []).append((ub, wait))
    for layer, stage in sorted(bounds, key=lambda k: (*none_last(k[0]), k[1])):
        waits = sorted(bounds[layer, stage], key=lambda x: none_last(x[0]))
        where = ", ".join(f"{ub_name(ub)} @ {w}" for ub, w in waits)
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
    mem = estimate_memory(compiled.gm, sched.instrs)
    base = f"; unsplit {format_bytes(peak_activation_bytes(unsplit.gm, unsplit.schedule.instrs))}" \
        if unsplit is not None and unsplit is not compiled else ""
    out.append(f"Peak activations (estimated, what the load checks against free memory): "
               f"{format_bytes(mem.peak_bytes)} at {mem.peak_node}{base}")

    out += ["", "Pass timings:"]
    out += [f"  {p:<22} {s * 1e3:9.2f} ms" for p, s in compiled.timings.items()]
    out.append(f"  {'total':<22} {sum(compiled.timings.values()) * 1e3:9.2f} ms")
    return "\n".join(out) + "\n"
