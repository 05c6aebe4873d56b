"""transformers' own expert parallelism (`from_pretrained(..., distributed_config=
DistributedConfig(ep_size=2, ...))`) under `torch.compile(model, backend="tbo", dynamic=False)` on 2
gloo ranks (tests/hf_ep_scenarios.py): every style runs, equals the unsharded model in eager (fp32,
1e-5), and the all-reduce style splits. Before them, one process: the two graph shapes those
models give the backend (DTensor parameters, a second wait on a waited collective)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.fx as fx
from torch import nn

import any_models
from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.passes.annotate_comm import annotate_comm

ATOL = 1e-5
c10d = torch.ops._c10d_functional


# one process ------------------------------------------------------------------------------------

def _graph_with_waits(source: str) -> fx.GraphModule:
    """x -> all_reduce -> wait -> wait -> + 1, or a lone wait on the input (source="input")."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 8)
    if source == "input":
        w = g.call_function(c10d.wait_tensor.default, (x,))
    else:
        ar = g.call_function(c10d.all_reduce.default, (x, "sum", "0"))
        w = g.call_function(c10d.wait_tensor.default, (g.call_function(c10d.wait_tensor.default, (ar,)),))
    y = g.call_function(torch.ops.aten.add.Tensor, (w, 1))
    g.output(y)
    for n in g.nodes:
        if n.op == "call_function":
            n.meta["val"] = torch.empty(4, 8)
    return fx.GraphModule(nn.Module(), g)


def test_second_wait_on_a_waited_collective_is_dropped():
    """torch's wait on an already-waited tensor returns it: annotate_comm removes it (the
    runtime then waits once), pairs the collective with the first wait, and leaves values alone."""
    gm = _graph_with_waits("collective")
    (op,) = annotate_comm(gm).ops
    waits = [n for n in gm.graph.nodes if n.target == c10d.wait_tensor.default]
    assert len(waits) == 1 and op.wait == waits[0].name and op.kind == "all_reduce"
    add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert add.args[0] is waits[0]
    assert len(annotate_comm(gm).ops) == 1  # idempotent: the pipeline annotates twice


def test_wait_on_a_graph_input_is_still_an_error():
    """A wait whose collective ran in another graph (a graph break between the halves) may have
    work pending: it is not a no-op, and the pass says so."""
    with pytest.raises(TboCompileError, match="wait with no matching start"):
        annotate_comm(_graph_with_waits("input"))


@pytest.fixture
def one_rank_group(tmp_path):
    """A real process group of one rank in this process (DTensors need a mesh), torn down after."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class DTensorMLP(nn.Module):
    """A weight held as a DTensor (as transformers' TP/EP hold theirs), a plain bias, and a
    collective waited twice (as transformers' all-to-all EP does)."""

    def __init__(self, mesh):
        super().__init__()
        from torch.distributed.tensor import Replicate, distribute_tensor

        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(distribute_tensor(torch.randn(16, 16, generator=g) * 0.3, mesh, [Replicate()]))
        self.b = nn.Parameter(torch.randn(16, generator=g))

    def forward(self, x, scale):
        h = torch.relu(x @ self.w.to_local().t() + self.b) * scale
        h = funcol.wait_tensor(funcol.all_reduce(h, "sum", dist.group.WORLD))  # waits while traced, then again
        return h + x


@pytest.mark.parametrize("token_inputs", [None, ["x"], [0]])
def test_dtensor_parameters_leave_the_token_input_where_it_is(one_rank_group, token_inputs):
    """aot_autograd flattens each DTensor parameter into its local shard and its DeviceMesh, so
    its graph has more placeholders than dynamo's; the token input is found by what aot says each
    placeholder is (by default, by name, by index), the graph splits, and the output is eager's."""
    from torch.distributed.device_mesh import init_device_mesh

    m = DTensorMLP(init_device_mesh("cpu", (1,)))
    scale, x = torch.tensor(0.5), torch.randn(6, 16)
    opts = {"token_inputs": token_inputs} if token_inputs else {}
    fn, seen, warned = any_models.compile_tbo(m, split=True, inductor=False, **opts)
    with torch.no_grad():
        out, ref = fn(x, scale), m(x, scale)
    assert (out - ref).abs().max() <= ATOL
    (c,) = seen
    assert (c.T, c.cut, c.did_split, len(c.comm_before.ops)) == (6, 3, True, 1), any_models.report(seen)
    (ph,) = [n for n in c.original.graph.nodes if n.name == c.token_inputs[0]]
    assert tuple(ph.meta["val"].shape) == (6, 16) and not warned


def test_token_input_names_a_missing_input_in_one_line(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    m = DTensorMLP(init_device_mesh("cpu", (1,)))
    fn, _, _ = any_models.compile_tbo(m, split=True, inductor=False, token_inputs=["input_ids"])
    with pytest.raises(Exception, match=r"token input 'input_ids' is not an input.*\['x', 'scale'\]"):
        fn(torch.randn(6, 16), torch.tensor(0.5))


# transformers' EP on 2 gloo ranks -------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_ep(tmp_path_factory):
    """Every style in one spawn of 2 ranks (compiles dominate: ~1 min on 2 cores), against the
    unsharded model's eager logits."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers loads a distributed_config through it
    import hf_ep_scenarios as sc
    from tbo_compiler.runtime.launch import run_ranks

    path = str(tmp_path_factory.mktemp("hf_qwen3_moe"))
    model, ids = sc.write_checkpoint(path), sc.batch()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    res = run_ranks(sc.rank_main, 2, path, tuple(sc.STYLES), ids, env={"TBO_INDUCTOR": "0"}, timeout=500)
    return {style: [(r[style], sc.rows(style, rank, ref)) for rank, r in enumerate(res)] for style in sc.STYLES}


@pytest.mark.slow
@pytest.mark.parametrize("style", ["all_reduce", "all_to_all", "all_to_all_fsdp"])
def test_each_ep_style_runs_under_tbo_and_equals_the_unsharded_model(hf_ep, style):
    """No style crashes (all-to-all's second wait is a no-op); eager EP, the compiled model and
    its second call all equal the unsharded model on each rank's rows."""
    for rank, (r, ref) in enumerate(hf_ep[style]):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        for what in ("eager", "tbo", "again"):
            assert (r[what] - ref).abs().max() <= ATOL, (rank, what, float((r[what] - ref).abs().max()))


@pytest.mark.slow
def test_all_reduce_style_splits(hf_ep):
    """EP with TP, all-reduce style: one graph (no data-dependent shape), split into two ubatches
    (the batch's 2 requests, 1 + 1) on both ranks, with its collectives once per ubatch."""
    for rank, (r, _) in enumerate(hf_ep["all_reduce"]):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        (rep,) = r["report"]
        assert rep["did_split"] and (rep["T"], rep["cut"]) == (2, 1) and rep["comm"] > 0, (rank, rep)
        assert not r["warned"], r["warned"]


@pytest.mark.slow
@pytest.mark.parametrize("style", ["all_to_all", "all_to_all_fsdp"])
def test_all_to_all_styles_warn_once_per_graph_that_cannot_split(hf_ep, style):
    """The split sizes are read back with .tolist(): dynamo breaks the forward into many graphs.
    Each graph that cannot be split runs unsplit with exactly one warning naming the op and the
    library line; the graphs that can (attention beside TP's all-reduce) split."""
    for rank, (r, _) in enumerate(hf_ep[style]):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        reps = r["report"]
        assert len(reps) > 2, reps  # the graph breaks
        fell_back = [x for x in reps if x["fallback"]]
        assert fell_back and len(r["warned"]) == len(fell_back), (r["warned"], reps)
        for w, x in zip(r["warned"], fell_back):
            assert x["fallback"] in w and ".py:" in w, (w, x)
        if style == "all_to_all":
            assert any(x["did_split"] and x["comm"] for x in reps), reps
