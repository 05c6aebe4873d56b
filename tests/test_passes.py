"""The passes on their own: token-axis errors, split policy, view mapping, schedule structure,
and the verifier catching broken schedules."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_compiler.capture import capture_make_fx
from tbo_compiler.compile import compile_model
from tbo_compiler.models import ParallelConfig, build_model
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.errors import InvariantError, ScheduleError, SplitError, TokenAxisError
from tbo_compiler.passes.annotate_comm import layer_of
from tbo_compiler.passes.pipeline import TboFallbackWarning, PASSES, CompileOptions, Pass, compile_graph
from tbo_compiler.passes.split_ubatches import split_point
from tbo_compiler.passes.token_axis import TokenDim, _view_map
from tbo_compiler.passes.verify_schedule import verify_schedule


# Split policy -------------------------------------------------------------------------------

def test_split_point_policy():
    assert split_point(14, "prefill") == 7
    assert split_point(13, "prefill") == 7          # token-balanced, a request may straddle
    assert split_point(3, "decode") == 2            # by request
    assert split_point(6, "decode", 2) == 4         # MTP: 3 requests of 2 tokens, kept whole
    assert split_point(2, "decode", 2) == 0         # one request: no split
    assert split_point(1, "prefill") == 0 and split_point(0, "decode") == 0
    with pytest.raises(SplitError, match="not whole requests"):
        split_point(5, "decode", 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(0, 3), st.integers(2, 5),
       st.integers(1, 4), st.sampled_from(["right", "left", "flat"]))
def test_view_map_agrees_with_slicing(rest, axis_pos, T, cut, merge):
    """Where _view_map puts the token axis, taking the first `cut` tokens before the reshape equals
    taking them after it (in the [outer][T][inner] layout it reports)."""
    axis = min(axis_pos, len(rest))
    shape = rest[:axis] + [T] + rest[axis:]
    cut = min(cut, T - 1)
    if merge == "right" and axis + 1 < len(shape):
        out = shape[:axis] + [T * shape[axis + 1]] + shape[axis + 2:]
    elif merge == "left" and axis > 0:
        out = shape[:axis - 1] + [shape[axis - 1] * T] + shape[axis + 1:]
    else:
        out = [torch.Size(shape).numel()]
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    m = _view_map(shape, TokenDim(axis), out, T)
    assert m is not None  # merging whole dims never scatters the token axis
    j = m.axis
    blocks = x.reshape(out).reshape(out[:j] + [m.outer, T, m.inner] + out[j + 1:])
    after = blocks.narrow(j + 1, 0, cut).reshape(out[:j] + [m.outer * cut * m.inner] + out[j + 1:])
    before = x.narrow(axis, 0, cut).reshape(out[:j] + [m.outer * cut * m.inner] + out[j + 1:])
    assert torch.equal(before, after)


def test_view_map_refuses_to_scatter_tokens():
    assert _view_map([6, 4], TokenDim(0), [4, 6], 6) is None     # a transpose-like reshape
    assert _view_map([6, 4], TokenDim(0), [3, 8], 6) is None     # tokens split over two dims


# Token-axis errors name the user's line -----------------------------------------------------

class MixesTokens(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return y - y.mean(0, keepdim=True)  # normalises over the batch: mixes tokens


def test_token_mixing_is_reported_with_source_line():
    gm, specs = capture_make_fx(MixesTokens(), (torch.randn(6, 4),), stack_traces=True)
    users = tuple(s.name for s in specs if s.kind == "user")
    with pytest.raises(TokenAxisError) as e:
        compile_graph(gm, users, 6, CompileOptions(strict=True))
    msg = str(e.value)
    assert "token axis" in msg and "test_passes.py" in msg and "\n" not in msg


def test_graph_that_cannot_split_falls_back_with_one_warning_naming_the_line():
    gm, specs = capture_make_fx(MixesTokens(), (torch.randn(6, 4),), stack_traces=True)
    users = tuple(s.name for s in specs if s.kind == "user")
    with pytest.warns(TboFallbackWarning) as w:
        c = compile_graph(gm, users, 6, CompileOptions())
    assert len(w) == 1
    msg = str(w[0].message)
    assert "without TBO" in msg and "test_passes.py" in msg and "strict" in msg and "\n" not in msg
    assert c.cut == 0 and c.split is None and "token axis" in c.fallback
    x = torch.randn(6, 4)
    from tbo_compiler.runtime.program import Program
    assert torch.allclose(Program(c.gm, c.schedule.instrs)(x)[0], MixesTokens()(x))


def test_no_split_for_one_token():
    gm, specs = capture_make_fx(MixesTokens(), (torch.randn(1, 4),))
    c = compile_graph(gm, tuple(s.name for s in specs if s.kind == "user"), 1, CompileOptions())
    assert c.cut == 0 and all(n.meta["tbo_ubatch"] is None for n in c.gm.graph.nodes)


# Structure of a compiled DeepSeek-V3 with EP=2 -----------------------------------------------

@pytest.fixture(scope="module")
def compiled_dsv3(tmp_path_factory):
    d = make_tiny("deepseek_v3", tmp_path_factory.mktemp("s") / "m", seed=0, n_routed_experts=8,
                  num_hidden_layers=3)
    model = build_model(d, parallel=ParallelConfig(2, 0, "ep", "a2a"), block_size=4, dtype=torch.float32)
    (c,) = compile_model(model, [16], CompileOptions(mode="prefill"), max_blocks=8, variants=("tbo",))
    return c.state


@pytest.fixture(scope="module")
def dsv3_graph(tmp_path_factory):
    d = make_tiny("deepseek_v3", tmp_path_factory.mktemp("g") / "m", seed=0, n_routed_experts=8,
                  num_hidden_layers=2)
    model = build_model(d, parallel=ParallelConfig(2, 0, "ep", "a2a"), block_size=4, dtype=torch.float32)
    from tbo_compiler.models import example_inputs
    gm, specs = capture_make_fx(model, example_inputs(model, 8, max_blocks=8, num_blocks=8))
    return gm, tuple(s.name for s in specs if s.kind == "user")[:4]


def _corrupt_pass(name, fn):
    def run(st, o):
        fn(st.gm)
        return {}
    return Pass(name, run)


def _drop_a_wait(gm):
    """A comm wait replaced by its payload: the start's handle is then read by nothing."""
    w = next(n for n in gm.graph.nodes if n.op == "call_function" and "combine_wait" in str(n.target))
    w.replace_all_uses_with(w.args[1])
    gm.graph.erase_node(w)


def _forget_ubatch(gm):
    next(n for n in gm.graph.nodes if n.op == "call_function").meta.pop("tbo_ubatch")


@pytest.mark.parametrize("after, breaker, invariant", [
    ("token_axis", _drop_a_wait, "comm_paired"),
    ("split_ubatches", _forget_ubatch, "ubatches_marked"),
])
def test_driver_catches_a_pass_breaking_an_invariant(dsv3_graph, after, breaker, invariant):
    """A pass inserted into the list breaks the graph: the driver names that pass and the invariant."""
    gm, users = dsv3_graph
    import copy
    gm = copy.deepcopy(gm)
    k = [p.name for p in PASSES].index(after) + 1
    passes = PASSES[:k] + (_corrupt_pass("breaker", breaker),) + PASSES[k:]
    with pytest.raises(InvariantError, match=f"after pass breaker: invariant '{invariant}'"):
        compile_graph(gm, users, 8, CompileOptions(), passes=passes)


def test_every_comm_op_once_per_ubatch_on_comm_stream(compiled_dsv3):
    c = compiled_dsv3
    assert len(c.comm_before.ops) == 2 * 2  # 2 MoE layers x (dispatch, combine)
    nodes = {n.name: n for n in c.gm.graph.nodes}
    seen = {}
    for op in c.comm.ops:
        origin = nodes[op.start].meta["tbo_origin"]
        seen.setdefault(origin, []).append(op.ubatch)
        assert nodes[op.start].meta["tbo_stream"] == "comm" and nodes[op.wait].meta["tbo_stream"] == "comm"
    assert sorted(seen) == sorted(op.start for op in c.comm_before.ops)
    assert all(sorted(u) == [0, 1] for u in seen.values())
    runs = [i for i in c.schedule.instrs if i.op == "run"]
    assert all(i.stream == "comm" for i in runs if "tbo_comm" in nodes[i.node].meta)
    assert all(i.stream == "compute" for i in runs if "tbo_comm" not in nodes[i.node].meta)


def test_comm_of_one_ubatch_beside_compute_of_the_other_in_every_moe_layer(compiled_dsv3):
    """Between a comm op's start and the first compute that needs its result, the compute stream
    has work of the other ubatch to do: that is what runs while the collective is on the wire.
    Each wait is issued right after its start (the comm stream is FIFO)."""
    c = compiled_dsv3
    nodes = {n.name: n for n in c.gm.graph.nodes}
    order = [i for i in c.schedule.instrs if i.op == "run"]
    pos = {i.node: k for k, i in enumerate(order)}
    overlapped_layers = set()
    for op in c.comm.ops:
        assert pos[op.wait] == pos[op.start] + 1
        seen, todo = set(), [nodes[op.wait]]
        while todo:  # everything downstream of the wait
            for u in todo.pop().users:
                if u.name not in seen and u.name in pos:
                    seen.add(u.name)
                    todo.append(u)
        first_use = min(pos[n] for n in seen if order[pos[n]].stream == "compute")
        between = [order[k] for k in range(pos[op.wait] + 1, first_use)]
        if any(i.ubatch == 1 - op.ubatch and i.stream == "compute"
               and nodes[i.node].target.__class__.__name__ == "OpOverload" for i in between):
            overlapped_layers.add(op.layer)
    moe_layers = {op.layer for op in c.comm_before.ops}
    assert moe_layers == {1, 2} and overlapped_layers >= moe_layers
    assert c.schedule.order_name == "interleaved"
    assert {b[0] for b in c.schedule.boundaries} >= moe_layers  # stage boundaries listed per layer


def test_events_pair_up(compiled_dsv3):
    ins = compiled_dsv3.schedule.instrs
    recorded = [i.event for i in ins if i.op == "record"]
    waited = [i.event for i in ins if i.op == "wait"]
    freed = [i.event for i in ins if i.op == "free" and i.event is not None]
    assert len(recorded) == len(set(recorded)) > 0
    assert set(waited) <= set(recorded) and set(recorded) == set(waited) | set(freed)
    for k, i in enumerate(ins):  # a record follows the op that produced what it orders
        if i.op == "record":
            assert ins[k - 1].op == "run" and ins[k - 1].stream == i.stream


# The verifier catches broken schedules --------------------------------------------------------

def _mutated(instrs, fn):
    ins = list(instrs)
    fn(ins)
    return tuple(ins)


def test_verifier_rejects_broken_schedules(compiled_dsv3):
    c = compiled_dsv3
    gm, ins = c.gm, c.schedule.instrs
    verify_schedule(gm, ins)  # the real one passes
    # the last wait before a run: the earlier ones of its group are implied by stream order
    first_wait = next(k for k, i in enumerate(ins) if i.op == "wait" and ins[k + 1].op == "run")
    with pytest.raises(ScheduleError, match="no event waited"):
        verify_schedule(gm, _mutated(ins, lambda x: x.pop(first_wait)))
    first_free = next(k for k, i in enumerate(ins) if i.op == "free")
    with pytest.raises(ScheduleError, match="before its reader|after it was freed"):
        verify_schedule(gm, _reorder_free(ins, first_free))
    runs = [k for k, i in enumerate(ins) if i.op == "run"]
    with pytest.raises(ScheduleError, match="before its input|runs a node twice"):
        verify_schedule(gm, _mutated(ins, lambda x: x.insert(runs[0], x[runs[-1]])))


def _reorder_free(ins, k):
    """Move a free to right after the value's producer: before its readers."""
    ins = list(ins)
    f = ins.pop(k)
    prod = next(j for j, i in enumerate(ins) if i.op == "run" and i.node == f.node)
    ins.insert(prod + 1, f)
    return tuple(ins)


def test_layers_are_attributed(compiled_dsv3):
    layers = {layer_of(n) for n in compiled_dsv3.gm.graph.nodes if n.op == "call_function"}
    assert {0, 1, 2} <= layers
