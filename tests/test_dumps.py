"""Dumps of a compiled toy MoE: graphs (DOT, SVG), predicted trace, summary.

One tiny two-layer MoE with tbo dispatch/combine is captured once per module and compiled with and
without the split; the tests read the files back and check structural facts against `Compiled`.
"""
import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tbo_compiler.ops.kernels import unpack_meta
from tbo_compiler.capture import capture_export
from tbo_compiler.dumps import FILL, write_dumps
from tbo_compiler.models import ParallelConfig, build_model
from tbo_compiler.models.batch import PagedKVCache
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.instr import COMM
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph
from tbo_compiler.summary import node_layers, summary_text

# Legend: T tokens, D hidden, E experts, F expert ffn, K top-k, H heads, Dh head dim
D, E, F_, K, H, DH, VOCAB, LAYERS, BLOCK = 16, 4, 8, 2, 2, 8, 50, 2, 4
FILES = {"graph_before.dot", "graph_before.svg", "graph_after.dot", "graph_after.svg", "overview.svg",
         "schedule.json", "summary.txt"}
SVG = "{http://www.w3.org/2000/svg}"
ops = torch.ops.tbo


class Block(nn.Module):
    """Paged attention then a routed MoE whose dispatch/combine are tbo comm ops."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.gate = nn.Linear(D, E, bias=False)
        self.w13_EFD = nn.Parameter(torch.randn(E, 2 * F_, D) * 0.2)
        self.w2_EDF = nn.Parameter(torch.randn(E, D, F_) * 0.2)

    def forward(self, x_TD, cache, slots_T, bt_TB, pos_T):
        T = x_TD.shape[0]
        q, k, v = self.qkv(x_TD).view(T, 3, H, DH).unbind(1)
        cache.index_put_((slots_T,), torch.stack([k, v], 1))
        x_TD = x_TD + ops.paged_attention(q, cache, bt_TB, pos_T, BLOCK, 0.3).reshape(T, D)
        w_TK, ids_TK = self.gate(x_TD).softmax(-1).topk(K, -1)
        send_x, send_meta = ops.dispatch_pack(x_TD, ids_TK, w_TK, 1, E)
        h = ops.dispatch_start(send_x, send_meta, "g", 1)
        rx, rmeta = ops.dispatch_wait(h, send_x, send_meta, "g", 1)
        y = ops.moe_experts(rx, *unpack_meta(rmeta, K), self.w13_EFD, self.w2_EDF)
        return x_TD + ops.combine_wait(ops.combine_start(y, "g", 1), y, "g", 1)


class ToyMoE(nn.Module):
    def __init__(self, layers=LAYERS):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block() for _ in range(layers))  # "layers.N": comm gets a layer
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids_T, pos_T, slots_T, bt_TB, caches):
        x_TD = self.emb(ids_T)
        for layer, cache in zip(self.layers, caches):
            x_TD = layer(x_TD, cache, slots_T, bt_TB, pos_T)
        return self.head(F.rms_norm(x_TD, (D,)))


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    kv = PagedKVCache([(2, H, DH)] * LAYERS, 16, BLOCK)
    batch = kv.make_batch([("a", list(range(5))), ("b", list(range(3, 10)))])
    gm, specs = capture_export(ToyMoE().eval(), (*batch.args(), [c.clone() for c in kv.caches]))
    token_inputs = tuple(s.name for s in specs if s.kind == "user")[:4]
    return gm, token_inputs, batch.num_tokens


@pytest.fixture(scope="module")
def compiled(captured):
    return compile_graph(*captured, CompileOptions(mode="prefill"))


@pytest.fixture(scope="module")
def dumps(compiled, tmp_path_factory):
    out = tmp_path_factory.mktemp("dumps")
    return write_dumps(compiled, out, name="toy"), out


def _runs(compiled):
    return [i.node for i in compiled.schedule.instrs if i.op == "run"]


def _comm_nodes(plan):
    return {name for op in plan.ops for name in (op.start, op.wait)}


def _dot_nodes(text):
    """name -> attribute text of every node statement (edges and defaults excluded)."""
    return dict(re.findall(r'^\s+"([^"]+)" \[(.*)\];$', text, re.M))


def _dot_edges(text):
    return re.findall(r'^\s+"([^"]+)" -> "([^"]+)";$', text, re.M)


def test_every_file_written_and_no_temp_left(dumps):
    paths, out = dumps
    assert set(paths) == FILES
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # atomic writes left no temp files


def test_after_dot_colours_ubatches_and_marks_comm(dumps, compiled):
    text = dumps[0]["graph_after.dot"].read_text()
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    nodes = _dot_nodes(text)
    assert f'fillcolor="{FILL[0]}"' in text and f'fillcolor="{FILL[1]}"' in text
    for name in _runs(compiled):
        assert name in nodes, name
    ub = {n.name: n.meta.get("tbo_ubatch") for n in compiled.gm.graph.nodes}
    for name in _runs(compiled):
        assert f'fillcolor="{FILL[ub[name]]}"' in nodes[name], name
    comm = _comm_nodes(compiled.comm)
    assert {n for n, attrs in nodes.items() if "shape=cds" in attrs and not n.startswith("legend:")} == comm
    assert not any(n.startswith("p_") for n in nodes)  # weights are collapsed into the legend note
    edges = _dot_edges(text)
    assert edges and all(a in nodes and b in nodes for a, b in edges)


def test_before_dot_is_unsplit(dumps, compiled):
    text = dumps[0]["graph_before.dot"].read_text()
    nodes = _dot_nodes(text)
    graph = {n: a for n, a in nodes.items() if not n.startswith("legend:")}
    assert all(f'fillcolor="{FILL[None]}"' in a for a in graph.values())  # nothing split yet
    assert {n for n, a in graph.items() if "shape=cds" in a} == _comm_nodes(compiled.comm_before)
    assert "read-only inputs (weights) not drawn" in text


def _svg_nodes(path):
    root = ET.parse(path).getroot()  # raises on malformed XML
    return [g for g in root.iter(f"{SVG}g") if g.get("class", "").split()[0] == "node"]


def test_after_svg_one_element_per_scheduled_node_in_lanes(dumps, compiled):
    groups = _svg_nodes(dumps[0]["graph_after.svg"])
    assert [g.get("id") for g in groups] == _runs(compiled)
    comm = _comm_nodes(compiled.comm)
    x_of = {}
    for g in groups:
        cls = g.get("class").split()
        assert ("comm" in cls) == (g.get("id") in comm), g.get("id")
        x_of.setdefault(tuple(cls[1:]), set()).add(g.find(f"{SVG}rect").get("x"))
    # one column per (ubatch, stream), all distinct
    assert set(x_of) == {("sh",), ("u0",), ("u0", "comm"), ("u1",), ("u1", "comm")}
    assert all(len(xs) == 1 for xs in x_of.values())
    assert len({xs.pop() for xs in x_of.values()}) == 5


def test_before_svg_rows_in_graph_order(dumps, compiled):
    groups = _svg_nodes(dumps[0]["graph_before.svg"])
    order = [n.name for n in compiled.original.graph.nodes if n.op not in ("placeholder", "output")]
    assert [g.get("id") for g in groups] == order
    ys = [int(g.find(f"{SVG}rect").get("y")) for g in groups]
    assert ys == sorted(ys) and len(set(ys)) == len(ys)


def test_trace_tracks_ubatches_and_predicted_durations(dumps, compiled):
    trace = json.loads(dumps[0]["schedule.json"].read_text())
    ev = trace["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(threads.values()) == ["comm", "compute"]
    xs = [e for e in ev if e["ph"] == "X"]
    assert [e["args"]["node"] for e in xs] == _runs(compiled)
    assert all(e["dur"] >= 0 for e in xs)
    assert {e["args"]["ubatch"] for e in xs} == {None, 0, 1}
    comm = _comm_nodes(compiled.comm)
    for e in xs:
        assert threads[e["tid"]] == ("comm" if e["args"]["node"] in comm else "compute"), e["args"]["node"]
    makespan = compiled.schedule.timeline.makespan_us
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(makespan, abs=1e-2)
    assert "predicted" in trace["otherData"]["note"]
    assert trace["otherData"]["profile"] == compiled.options.profile
    # every event waited on was recorded earlier, on the other stream
    starts = {e["id"]: e for e in ev if e["ph"] == "s"}
    finishes = [e for e in ev if e["ph"] == "f"]
    assert finishes
    for f in finishes:
        assert starts[f["id"]]["ts"] <= f["ts"] and starts[f["id"]]["tid"] != f["tid"]


def test_summary_reports_comm_layers_and_prediction(dumps, compiled):
    text = dumps[0]["summary.txt"].read_text()
    assert text == summary_text(compiled, name="toy")
    assert f"T={compiled.T}" in text and f"cut at {compiled.cut}" in text and "prefill" in text
    for kind in {op.kind for op in compiled.comm_before.ops}:
        assert kind in text
    assert set(compiled.comm_before.by_layer()) == set(range(LAYERS))  # the toy's layers are found
    for layer in range(LAYERS):
        assert re.search(rf"^  layer {layer}: dispatch x1 \(.*\), combine x1 \(.*\)", text, re.M), layer
        assert re.search(rf"^  layer {layer} stage \d+: ubatch 0 @ \w+, ubatch 1 @ \w+$", text, re.M), layer
    for ub in (0, 1):
        assert re.search(rf"^  ubatch {ub}: dispatch x{LAYERS} ", text, re.M)
    assert f"Schedule: {compiled.schedule.order_name}" in text
    assert all(name in text for name, _ in compiled.schedule.candidates)
    assert re.search(r"overlap [\d.]+ us = [\d.]+% of comm busy", text)
    assert all(p in text for p in compiled.timings)


def test_same_input_same_bytes(compiled, tmp_path):
    a = write_dumps(compiled, tmp_path / "a")
    b = write_dumps(compiled, tmp_path / "b")
    again = write_dumps(compiled, tmp_path / "a")   # overwriting in place is fine too
    for f in FILES:
        assert a[f].read_bytes() == b[f].read_bytes() == again[f].read_bytes(), f


def test_no_split_baseline(captured, tmp_path):
    c = compile_graph(*captured, CompileOptions(split=False))
    paths = write_dumps(c, tmp_path)
    assert "no split (one ubatch)" in paths["summary.txt"].read_text()
    classes = {tuple(g.get("class").split()[1:]) for g in _svg_nodes(paths["graph_after.svg"])}
    assert classes == {("sh",)}  # one ubatch: the comm runs in line, on the compute stream
    assert len(c.comm.ops) == len(c.comm_before.ops) > 0
    xs = [e for e in json.loads(paths["schedule.json"].read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["ubatch"] for e in xs} == {None}


# Real size: a window of layers in full, every layer in the overview -----------------------------

def _toy(layers):
    torch.manual_seed(0)
    kv = PagedKVCache([(2, H, DH)] * layers, 16, BLOCK)
    batch = kv.make_batch([("a", list(range(5))), ("b", list(range(3, 10)))])
    gm, specs = capture_export(ToyMoE(layers).eval(), (*batch.args(), [c.clone() for c in kv.caches]))
    return compile_graph(gm, tuple(s.name for s in specs if s.kind == "user")[:4], batch.num_tokens)


@pytest.fixture(scope="module")
def deep():
    return {n: _toy(n) for n in (4, 20)}


def _height(path) -> int:
    return int(ET.parse(path).getroot().get("height"))


def _drawn_layers(path, compiled):
    layer = node_layers(compiled.gm)
    return {layer[g.get("id")] for g in _svg_nodes(path)}


def test_graph_svgs_draw_a_window_whatever_the_depth(deep, tmp_path):
    paths = {n: write_dumps(c, tmp_path / str(n)) for n, c in deep.items()}
    for f in ("graph_before.svg", "graph_after.svg"):
        assert _height(paths[4][f]) == _height(paths[20][f]) < 20_000, f  # the window does not grow
    # default window: the first layer with comm and the next, after what precedes them
    assert _drawn_layers(paths[20]["graph_after.svg"], deep[20]) == {"pre", 0, 1}
    # the DOT keeps the whole graph, for tools
    assert set(_runs(deep[20])) <= set(_dot_nodes(paths[20]["graph_after.dot"].read_text()))


def test_dump_layers_picks_the_window(deep, tmp_path, monkeypatch):
    monkeypatch.setenv("TBO_DUMP_LAYERS", "7:9")
    c = deep[20]
    p = write_dumps(c, tmp_path)["graph_after.svg"]
    assert _drawn_layers(p, c) == {7, 8}
    ids = {g.get("id") for g in _svg_nodes(p)}
    assert {op.start for op in c.comm.ops if op.layer in (7, 8)} <= ids
    # what layers 7..8 read from layer 6 is drawn as inputs, named by layer
    root = ET.parse(p).getroot()
    inputs = [g for g in root.iter(f"{SVG}g") if g.get("class", "").split()[0] == "in"]
    assert any(g.find(f"{SVG}text").text.startswith("from L6 ") for g in inputs)
    assert write_dumps(c, tmp_path / "all", layers="all")["graph_after.svg"].stat().st_size > 5 * p.stat().st_size


def test_overview_has_every_layer_and_ubatch_as_named_stages(deep, tmp_path):
    c = deep[20]
    path = write_dumps(c, tmp_path)["overview.svg"]
    assert _height(path) < 20_000
    root = ET.parse(path).getroot()
    tips = [g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if "seg" in g.get("class", "").split()]
    for layer in range(20):
        for ub in (0, 1):
            for kind in ("dispatch", "combine"):
                assert any(t.startswith(f"L{layer} u{ub} {kind}: ") for t in tips), (layer, ub, kind)
    # comm segments on the comm band carry the comm class; the rest is compute
    comm = [g for g in root.iter(f"{SVG}g") if "comm" in g.get("class", "").split()]
    assert len(comm) == 2 * 2 * 20 and all(" dispatch: " in g.find(f"{SVG}title").text
                                            or " combine: " in g.find(f"{SVG}title").text for g in comm)


# The summary explains itself: a tiny DeepSeek-V3 compiled for EP=2 ---------------------------------

@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    from tbo_compiler.compile import compile_model

    root = tmp_path_factory.mktemp("ep2")
    model = build_model(make_tiny("deepseek_v3", root / "ds"), parallel=ParallelConfig(ep_size=2, group="ep"),
                        dtype=torch.float32, block_size=4)
    progs = compile_model(model, [16], CompileOptions(profile="h200", strict=True), max_blocks=8,
                          dump_dir=root / "dumps")
    return {p.variant: p.state for p in progs}, root / "dumps" / "T16"


def _us(text, label):
    return float(re.search(rf"^{label}: ([\d.]+) us", text, re.M).group(1))


def test_summary_leads_with_verdict_then_what_was_found_hidden_and_why(ep2):
    states, out = ep2
    st, serial = states["tbo"], states["serial"]
    text = (out / "summary.txt").read_text()
    lines = text.splitlines()
    gain = serial.schedule.timeline.makespan_us / st.schedule.timeline.makespan_us
    # "TBO on" only where the cost model predicts a gain over the unsplit program (the demo's
    # tiny CPU case predicts 0.56x: it says the runtime will likely keep the unsplit program)
    head = "Verdict: TBO on: " if gain >= 1 else f"Verdict: TBO compiled but predicted slower than unsplit ({gain:.2f}x)"
    assert lines[1].startswith(head) and "vs the unsplit program" in lines[1]
    kinds = [op.kind for op in st.comm_before.ops]
    assert lines[2] == (f"Found: {len(kinds)} comm ops (dispatch x{kinds.count('dispatch')}, combine "
                        f"x{kinds.count('combine')}) in layers 1-2; after the split each runs once per ubatch "
                        f"({2 * len(kinds)})")
    tl = st.schedule.timeline
    comm, hidden = _us(text, "Comm predicted"), _us(text, "Hidden")
    assert comm == pytest.approx(tl.busy_us[COMM], abs=0.1)
    assert hidden == pytest.approx(tl.overlap_us(), abs=0.1)   # the sweep over both streams agrees
    assert _us(text, "Not hidden") == pytest.approx(comm - hidden, abs=0.2)
    causes = re.findall(r"^  ([\d.]+) us in \d+ comm ops", text, re.M)
    assert sum(map(float, causes)) == pytest.approx(comm - hidden, abs=0.2)
    why = text.split("Why not more:\n")[1].split("\n\n")[0]
    compute = st.schedule.serial_us - tl.busy_us[COMM]
    assert f"at most {st.schedule.serial_us / max(compute, comm):.2f}x" in why
    base = serial.schedule.timeline.makespan_us
    if st.schedule.serial_us > 1.01 * base:   # the split's own cost, against the unsplit program
        assert f"vs {base:.1f} us for the unsplit program" in why


def test_dumps_name_inputs_and_stages_as_the_user_knows_them(ep2):
    _, out = ep2
    texts = [t.text for t in ET.parse(out / "graph_after.svg").getroot().iter(f"{SVG}text")]
    assert "positions u0" in texts and "kv_caches[1]" in texts
    assert not [t for t in texts if re.fullmatch(r"arg\d+_\d+", t or "")]
    root = ET.parse(out / "overview.svg").getroot()
    tips = [g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if "seg" in g.get("class", "").split()]
    assert any(t.startswith("L1 u0 attn: ") for t in tips) and any(t.startswith("L2 u1 dispatch: ") for t in tips)
