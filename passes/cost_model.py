"""A cost model of compute vs communication time, and a two-stream simulator.

Compute nodes cost max(flops / peak, bytes / bandwidth) plus a launch; comm nodes cost
latency + bytes / link bandwidth. Numbers per device profile; the H200 ones are the measured
ceilings in shared/reference/PHYSICAL_LIMITS.md (bf16 GEMM ~790 TFLOP/s, HBM ~4.3 TB/s, NCCL
all-to-all ~300 GB/s over NVLink at large sizes, ~29 GB/s with P2P off). A prediction, used to
choose between schedules and to draw the predicted timeline, never to decide correctness.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from tbo_compiler.ops.instr import Op
from tbo_compiler.passes.token_axis import is_alias

aten = torch.ops.aten


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float        # FLOP/s reachable by GEMMs
    mem_bw: float       # bytes/s
    link_bw: float      # bytes/s on the wire per rank
    link_latency_us: float
    launch_us: float    # host cost of issuing one op


PROFILES = {
    "cpu": DeviceProfile("cpu", 5e10, 1e10, 2e9, 100.0, 8.0),
    "h100": DeviceProfile("h100", 6e14, 3.0e12, 2.5e11, 15.0, 4.0),
    "h200": DeviceProfile("h200", 6.5e14, 4.3e12, 3.0e11, 15.0, 4.0),
    "h200-scaleout": DeviceProfile("h200-scaleout", 6.5e14, 4.3e12, 2.9e10, 25.0, 4.0),
}


def nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(nbytes(x) for x in v)
    return 0


def _shape(n):
    return tuple(n.meta["val"].shape)


def node_flops(node: fx.Node, world: int = 1) -> float:
    """FLOPs of a GEMM-like node; `world` is the expert-parallel size (a routed pair is local to
    this rank with probability 1/world)."""
    t = node.target
    try:
        if t == aten.mm.default:
            (m, k), (_, n) = _shape(node.args[0]), _shape(node.args[1])
            return 2.0 * m * k * n
        if t == aten.addmm.default:
            (m, k), (_, n) = _shape(node.args[1]), _shape(node.args[2])
            return 2.0 * m * k * n
        if t == aten.bmm.default:
            (b, m, k), (_, _, n) = _shape(node.args[0]), _shape(node.args[1])
            return 2.0 * b * m * k * n
        if t == torch.ops.tbo.moe_experts.default:
            (n, d), (_, k) = _shape(node.args[0]), _shape(node.args[1])
            e, i2, _ = _shape(node.args[3])
            # each row runs the experts it routes to here: about k/W of them with EP over W ranks
            return 2.0 * n * k / max(1, world) * 1.5 * i2 * d
        if t == torch.ops.tbo.paged_attention.default:
            q = _shape(node.args[0])
            ctx = _shape(node.args[2])[1] * node.args[4]  # block-table width x block size
            return 4.0 * q[0] * q[1] * q[2] * ctx
        if t == torch.ops.tbo.latent_attention.default:
            (T, H, V), R = _shape(node.args[0]), _shape(node.args[1])[2]
            ctx = _shape(node.args[3])[1] * node.args[5]
            return 2.0 * T * H * (2 * V + R) * ctx
    except (KeyError, ValueError, TypeError, IndexError):
        pass
    return 0.0


def node_cost_us(node: fx.Node, prof: DeviceProfile, comm_bytes: int | None = None, world: int = 1) -> float:
    if comm_bytes is not None:
        return prof.link_latency_us + comm_bytes / prof.link_bw * 1e6
    if node.op != "call_function" or node.target is operator.getitem:
        return 0.0
    if is_alias(node.target):
        return 0.5  # views: no kernel
    moved = nbytes(node.meta.get("val")) + sum(nbytes(a.meta.get("val")) for a in node.all_input_nodes)
    return prof.launch_us + max(node_flops(node, world) / prof.flops, moved / prof.mem_bw) * 1e6


@dataclass(frozen=True)
class Timeline:
    """Predicted [start, end] in microseconds of every Run, per stream."""
    spans: tuple  # (node, ubatch, stream, start_us, end_us)
    makespan_us: float
    busy_us: dict

    def overlap_us(self) -> float:
        """Time the comm stream is busy while the compute stream is busy too (one sweep)."""
        edges = []
        for _, _, st, s, e in self.spans:
            if e > s:
                k = 0 if st == "compute" else 1
                edges += [(s, 1, k), (e, -1, k)]
        edges.sort()
        busy, ov, last = [0, 0], 0.0, 0.0
        for t, d, k in edges:
            if busy[0] and busy[1]:
                ov += t - last
            busy[k] += d
            last = t
        return ov


def simulate(instrs, costs: dict, prof: DeviceProfile | None = None) -> Timeline:
    """Replay an instruction list on two streams and one host thread issuing in order.
    `prof=None`: a CUDA graph replay, where the host issues nothing per op (costs measured on the
    GPU, e.g. by runtime/profile.py, are then the whole story)."""
    launch = prof.launch_us if prof is not None else 0.0
    clock = {"compute": 0.0, "comm": 0.0}
    host = 0.0
    events: dict[int, float] = {}
    spans = []
    busy = {"compute": 0.0, "comm": 0.0}
    for ins in instrs:
        if ins.op == Op.RECORD:
            events[ins.event] = clock[ins.stream]
        elif ins.op == Op.WAIT:
            clock[ins.stream] = max(clock[ins.stream], events.get(ins.event, 0.0))
        elif ins.op == Op.RUN:
            c = costs.get(ins.node, 0.0)
            host += min(c, launch)
            start = max(clock[ins.stream], host)
            end = start + c
            clock[ins.stream] = end
            busy[ins.stream] += c
            spans.append((ins.node, ins.ubatch, ins.stream, start, end))
    return Timeline(tuple(spans), max(clock.values()) if spans else 0.0, busy)
