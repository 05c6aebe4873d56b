"""Token-local regions (passes/token_axis/permutation.py): a sort of the batch's rows, per-row work
in the sorted order (gathers, a grouped matmul with offsets counted from the sort's keys) and the
inverse permutation split as a whole -- each ubatch sorts its own rows -- and equal the unsplit
program; a permuted value or a sort's positions escaping into a real cross-token mix is refused,
naming the op. Also the rules transformers' models and their tensor parallelism need: a cat with a
shared tensor broadcast to the batch, a masked write of token rows, floor_divide, and an
all_gather's rows split per rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.fx.experimental.proxy_tensor import make_fx

from tbo_compiler.ops.errors import TokenAxisError
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph
from tbo_compiler.passes.split_ubatches import split_ubatches
from tbo_compiler.passes.token_axis import TokenDim, family, infer_token_axes
from tbo_compiler.runtime.program import Program

T, K, E, D = 6, 2, 3, 8  # tokens, experts per token, experts, width (16-byte strides: _grouped_mm on CPU)
_g = torch.Generator().manual_seed(0)
W_ROUTE = torch.randn(D, E, generator=_g)
W_EXP = (torch.randn(E, D, D, generator=_g) * 0.3).bfloat16()  # _grouped_mm's meta kernel: bf16 only
SINK = torch.randn(D, generator=_g)


def split_run(fn, x):
    """Trace fn(x) (x: the token input, rows on axis 0), split it strictly, run it; returns (eager
    output, split output, the pipeline state). Each row's work is the same in both programs, so
    they agree to fp32 rounding even through bf16 matmuls."""
    gm = make_fx(fn)(x)
    (ph,) = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    st = compile_graph(gm, (ph,), x.shape[0], CompileOptions(strict=True))
    return fn(x), Program(st.gm, st.schedule.instrs)(x), st


def route(x):
    """Each token's K experts and weights (top-k of a router): per-row, so token-dependent."""
    w, ids = torch.topk((x @ W_ROUTE).softmax(-1), K, dim=-1)
    return ids, w


def sorted_experts(x, unsort="inverse"):
    """transformers' grouped_mm experts, written out: sort the (token, k) pairs by expert, run each
    expert's rows as one group, put the rows back (in one of four ways) and sum over k."""
    ids, w = route(x)
    keys, perm = torch.sort(ids.reshape(-1))
    xg, wg = x[perm // K], w.reshape(-1)[perm]
    offs = torch.cumsum(torch.histc(keys.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
    yg = torch._grouped_mm(xg.bfloat16(), W_EXP, offs=offs).float() * wg[:, None]
    if unsort == "inverse":                        # transformers: inv[perm] = arange; yg[inv]
        inv = torch.empty_like(perm)
        inv = torch.index_put(inv, (perm,), torch.arange(perm.shape[0]))
        return yg[inv].view(-1, K, D).sum(1)
    if unsort == "argsort":                        # the inverse as the sort of the permutation
        return yg[perm.argsort()].view(-1, K, D).sum(1)
    if unsort == "index_put":                      # out[perm] = yg into a buffer of the rows
        return torch.index_put(torch.zeros(x.shape[0] * K, D), (perm,), yg).view(-1, K, D).sum(1)
    return torch.zeros(x.shape[0], D).index_add(0, perm // K, yg)   # sum the k rows into each token


@pytest.mark.parametrize("unsort", ["inverse", "argsort", "index_put", "index_add"])
def test_sorted_grouped_experts_split_as_a_whole(unsort):
    x = torch.randn(T, D, generator=_g)
    ref, got, st = split_run(lambda x: sorted_experts(x, unsort), x)
    assert st.did_split and st.cut == T // 2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # each ubatch sorts its own rows: the sort, the counts and the grouped matmul run once per ubatch
    per = [n.meta.get("tbo_ubatch") for n in st.gm.graph.nodes if n.target == torch.ops.aten.sort.default]
    assert per and per.count(0) == per.count(1) == len(per) // 2
    if unsort == "inverse":  # arange(T*K) numbers each ubatch's own rows
        iotas = [n for n in st.gm.graph.nodes if n.meta.get("tbo_role") == "iota"]
        assert [n.args[0] for n in iotas] == [3 * K, 3 * K]


def test_analysis_tracks_the_permutation_and_its_inverse():
    gm = make_fx(lambda x: sorted_experts(x))(torch.randn(T, D, generator=_g))
    axes = infer_token_axes(gm, ("x_1",), T)
    by = {n.name: axes[n] for n in gm.graph.nodes if n.op == "call_function"}
    sort = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.sort.default).name
    assert by[sort] == (TokenDim(0, 1, K, order=sort, keys_of=sort), TokenDim(0, 1, K, order=sort, points_to=(None, K)))
    gmm = next(n for n in gm.graph.nodes if n.target == torch.ops.aten._grouped_mm.default).name
    assert by[gmm] == TokenDim(0, 1, K, order=sort)          # rows in the sort's order
    put = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.index_put.default).name
    assert by[put] == TokenDim(0, 1, K, points_to=(sort, K))  # the inverse: token order again
    assert family(torch.ops.aten._grouped_mm.default) == family(torch.ops.aten.histc.default) == "permutation"


def _refused(fn, *match):
    with pytest.raises(TokenAxisError) as e:
        split_run(fn, torch.randn(T, D, generator=_g))
    msg = str(e.value)
    assert "at node" in msg and "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_permutation_without_its_inverse_is_refused_naming_the_sort():
    def no_inverse(x):
        ids, _ = route(x)
        keys, perm = torch.sort(ids.reshape(-1))
        return x[perm // K] * 2              # rows left in the sort's order
    _refused(no_inverse, "sorts the tokens, and the graph returns", "at node 'sort'")


@pytest.mark.parametrize("case", ["reduce", "scan", "pair", "positions", "count", "descending", "offsets"])
def test_a_sort_escaping_into_a_cross_token_mix_is_refused(case):
    def fn(x):
        keys, perm = torch.sort(x[:, 0], descending=case == "descending")
        if case == "reduce":                 # sorted over tokens, then a reduction over them
            return x + keys.sum()
        if case == "scan":
            return x + keys.cumsum(0)[perm.argsort()][:, None]
        if case == "pair":                   # sorted rows beside token-ordered rows
            return (x[perm] - x)[perm.argsort()]
        if case == "positions":              # a position (numbered per ubatch) used as data
            return x + perm.float()[perm.argsort()][:, None]
        if case in ("count", "descending"):  # counts of unsorted values / of a descending sort
            c = torch.histc(x[:, 0] if case == "count" else keys, bins=3, min=-1, max=1)
            return x + c.sum()
        other, _ = torch.sort(x[:, 1].gt(0).float())   # offsets counted from another sort's keys
        offs = torch.cumsum(torch.histc(other, bins=2, min=0, max=1), 0, dtype=torch.int32)
        return torch._grouped_mm(x[perm].bfloat16(), W_EXP[:2], offs=offs)[perm.argsort()]
    msg = _refused(fn)
    want = {"reduce": "sum", "scan": "cumsum", "pair": "pairs rows in the order of sort 'sort' with rows in token order", "positions": "positions of rows",
            "count": "histc counts over all tokens", "descending": "histc", "offsets": "grouped matmul"}[case]
    assert want in msg, msg


def test_cat_with_a_shared_tensor_broadcast_to_the_batch_splits():
    """GPT-OSS's attention sinks: a parameter expanded to the batch beside the token scores."""
    def fn(x):
        s = SINK.reshape(1, D, 1).expand(x.shape[0], D, 1)
        return torch.cat([x[:, :, None], s], -1).softmax(-1)[..., 0]
    ref, got, st = split_run(fn, torch.randn(T, D, generator=_g))
    assert st.did_split and any(k[0].startswith("cat") for k in st.axes.aligned)
    torch.testing.assert_close(got, ref)


def test_masked_write_of_token_rows_and_floor_divide_split():
    """A vocab-parallel embedding's ids: out-of-shard ids masked to 0 (index_put with a boolean
    mask of the tokens and a scalar), the shard found with floor_divide."""
    emb = torch.randn(16, D, generator=_g)

    def fn(ids):
        shard = ids // 8
        local = ids - 8
        mask = shard != 1
        local = torch.index_put(local, (mask,), torch.tensor(0))
        out = torch.embedding(emb[8:], local)
        return torch.index_put(out, (mask,), torch.tensor(0.0))
    ids = torch.randint(0, 16, (T,), generator=_g)
    ref, got, st = split_run(fn, ids)
    assert st.did_split
    torch.testing.assert_close(got, ref)
    assert family(torch.ops.aten.floor_divide.default) == "pointwise"


@pytest.fixture
def fake_group():
    """A fake process group of 2 ranks in this process: collectives trace, nothing is sent."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_all_gather_split_per_rank_splits(fake_group):
    """A gather along the last dim (DTensor's Shard(-1) -> Replicate: all_gather of [W*T] rows,
    then split into the ranks' blocks and cat): each block holds every token, so the split pass
    rewrites the block size to the ubatch's rows."""
    def fn(x):
        return funcol.all_gather_tensor(x, 1, fake_group) * 2
    gm = make_fx(fn)(torch.randn(T, D))
    axes = infer_token_axes(gm, ("x_1",), T)
    sp = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.split.Tensor)
    assert axes[sp] == (TokenDim(0), TokenDim(0))
    (out,) = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    assert axes[out] == TokenDim(0) and tuple(out.meta["val"].shape) == (T, 2 * D)
    new, _ = split_ubatches(gm, axes, 2)  # verifies the ubatches' shapes
    sizes = sorted(n.args[1] for n in new.graph.nodes if n.target == torch.ops.aten.split.Tensor)
    assert sizes == [2, 4]
