"""Coverage by construction: every op of PyTorch's core ATen opset has a token-axis family, and
each family's ops run through the pass (split into two ubatches, compared with the unsplit op)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from tbo_compiler.ops.errors import TboCompileError, TokenAxisError
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph
from tbo_compiler.passes.token_axis import declare_op, family, infer_token_axes, register_rule
from tbo_compiler.runtime.program import Program

aten = torch.ops.aten
T = 6


def core_ops():
    """Every overload tagged core, whether or not something loaded its packet before."""
    out = []
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::")}
    for name in sorted(names | set(dir(aten))):
        pk = getattr(aten, name, None)
        if isinstance(pk, torch._ops.OpOverloadPacket):
            out += [getattr(pk, o) for o in pk.overloads() if torch.Tag.core in getattr(pk, o).tags]
    return out


def split_run(fn, args, n_token):
    """Trace fn(*args) to ATen, split it (the first n_token args carry tokens on axis 0), run
    the split program; returns (eager outputs, split outputs, cut)."""
    gm = make_fx(fn)(*args)
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    st_ = compile_graph(gm, tuple(phs[:n_token]), args[0].shape[0], CompileOptions(strict=True))
    got = Program(st_.gm, st_.schedule.instrs)(*args)
    return gm(*args), got, st_.cut


def assert_same(a, b):
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, equal_nan=True)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)


def test_every_core_aten_op_has_a_family():
    ops = core_ops()
    assert len(ops) > 150
    missing = [str(o) for o in ops if family(o) is None]
    assert not missing, missing


# pointwise: arguments built from the schema -------------------------------------------------

def _pointwise_args(op, dtype):
    g = torch.Generator().manual_seed(0)
    args, n_tok = [], 0
    for a in op._schema.arguments:
        if a.kwarg_only:
            continue
        ty = str(a.type)
        if ty.startswith("Tensor"):
            if dtype == torch.bool:
                t = torch.rand(T, 4, generator=g) > 0.5
            elif dtype.is_floating_point:
                t = torch.rand(T, 4, generator=g, dtype=dtype) + 0.5   # positive: log, sqrt, pow
            else:
                t = torch.randint(1, 5, (T, 4), generator=g, dtype=dtype)
            args.append(t if n_tok == 0 else t[:1, :])  # later tensors broadcast over the tokens
            n_tok += 1
        elif ty in ("Scalar", "number"):
            args.append(2)
        elif ty == "bool":
            args.append(False)
        elif ty == "int":
            args.append(1)
        elif ty in ("float", "float?"):
            args.append(0.5)
        elif ty.endswith("?") or a.has_default_value():
            break
        else:
            return None
    return args if n_tok else None


def _call(op, args):
    """fn(*tensors) calling op with the non-tensor args bound (traced inputs are tensors only)."""
    def fn(*ts):
        it = iter(ts)
        return op(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])

    return fn


def test_pointwise_family_splits_to_the_same_values():
    ran, skipped = [], []
    for op in core_ops():
        if family(op) != "pointwise":
            continue
        for dtype in (torch.float32, torch.int64, torch.bool):
            args = _pointwise_args(op, dtype)
            if args is None:
                continue
            try:
                op(*args)
            except Exception:
                continue
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            ref, got, cut = split_run(_call(op, args), tensors, 1)
            assert cut == T // 2, op
            assert_same(ref, got)
            ran.append(op)
            break
        else:
            skipped.append(str(op))
    # every pointwise op whose schema the builder can fill runs (random/out-of-place variants aside)
    assert len(ran) >= 70, (len(ran), skipped)


# every other family: a sample per op, tokens on axis 0 --------------------------------------

_g = torch.Generator().manual_seed(1)
x3 = lambda: torch.randn(T, 4, 5, generator=_g)
# weights and other shared operands are made once, outside the traced functions
w = torch.randn(5, 3, generator=_g)
idx = torch.tensor([0, 2, 1])
B25 = torch.randn(1, 5, 2, generator=_g)
EMB = torch.randn(9, 4, generator=_g)
CONV = torch.randn(3, 4, 2, generator=_g)
GRID = torch.rand(1, 3, 3, 2, generator=_g) * 2 - 1
CD = torch.randn(3, 5, generator=_g)

ACCEPTED = {  # op -> (fn over token tensors, token args)
    # reductions / scans / sorts over a non-token dim
    "sum.dim_IntList": (lambda x: aten.sum.dim_IntList(x, [-1]), [x3()]),
    "mean.dim": (lambda x: aten.mean.dim(x, [1, 2], True), [x3()]),
    "amax.default": (lambda x: aten.amax.default(x, [2]), [x3()]),
    "amin.default": (lambda x: aten.amin.default(x, [1]), [x3()]),
    "any.dim": (lambda x: aten.any.dim(x > 0, 1), [x3()]),
    "any.dims": (lambda x: aten.any.dims(x > 0, [1, 2]), [x3()]),
    "argmax.default": (lambda x: aten.argmax.default(x, 2), [x3()]),
    "argmin.default": (lambda x: aten.argmin.default(x, -1), [x3()]),
    "cumsum.default": (lambda x: aten.cumsum.default(x, 1), [x3()]),
    "flip.default": (lambda x: aten.flip.default(x, [2]), [x3()]),
    "max.dim": (lambda x: aten.max.dim(x, 1), [x3()]),
    "min.dim": (lambda x: aten.min.dim(x, 2, True), [x3()]),
    "prod.dim_int": (lambda x: aten.prod.dim_int(x, 1), [x3()]),
    "sort.default": (lambda x: aten.sort.default(x, -1), [x3()]),
    "topk.default": (lambda x: aten.topk.default(x, 2, -1), [x3()]),
    "var.correction": (lambda x: aten.var.correction(x, [2]), [x3()]),
    "var.dim": (lambda x: aten.var.dim(x, [1]), [x3()]),
    "_softmax.default": (lambda x: aten._softmax.default(x, -1, False), [x3()]),
    "_log_softmax.default": (lambda x: aten._log_softmax.default(x, 1, False), [x3()]),
    "_fft_r2c.default": (lambda x: aten.abs.default(aten._fft_r2c.default(x, [2], 0, True)), [x3()]),
    "_fft_c2r.default": (lambda x: aten._fft_c2r.default(aten._fft_r2c.default(x, [2], 0, True), [2], 0, 5), [x3()]),
    # views and layout
    "view.default": (lambda x: aten.view.default(x, [T, 20]), [x3()]),
    "permute.default": (lambda x: aten.permute.default(x, [2, 0, 1]), [x3()]),
    "expand.default": (lambda x: aten.expand.default(x[:, :1], [T, 3, 5]), [x3()]),
    "unsqueeze.default": (lambda x: aten.unsqueeze.default(x, 0), [x3()]),
    "squeeze.dim": (lambda x: aten.squeeze.dim(x[:, :1], 1), [x3()]),
    "squeeze.dims": (lambda x: aten.squeeze.dims(x[:, :1, :1], [1, 2]), [x3()]),
    "slice.Tensor": (lambda x: aten.slice.Tensor(x, 2, 1, 4), [x3()]),
    "select.int": (lambda x: aten.select.int(x, 1, 2), [x3()]),
    "cat.default": (lambda x: aten.cat.default([x, x * 2], 2), [x3()]),
    "split_with_sizes.default": (lambda x: aten.split_with_sizes.default(x, [2, 3], 2), [x3()]),
    "diagonal.default": (lambda x: aten.diagonal.default(x, 0, 1, 2), [x3()]),
    "repeat.default": (lambda x: aten.repeat.default(x, [2, 1, 1]), [x3()]),
    # matmuls (token not contracted)
    "mm.default": (lambda x: aten.mm.default(x[:, 0], w), [x3()]),
    "addmm.default": (lambda x: aten.addmm.default(torch.ones(3), x[:, 1], w), [x3()]),
    "bmm.default": (lambda x: aten.bmm.default(x, B25.expand(T, 5, 2)), [x3()]),
    # indexing
    "embedding.default": (lambda i: aten.embedding.default(EMB, i), [torch.randint(0, 9, (T,))]),
    "gather.default": (lambda x: aten.gather.default(x, 2, torch.zeros(T, 4, 2, dtype=torch.long)), [x3()]),
    "index.Tensor": (lambda x: aten.index.Tensor(x, [None, idx]), [x3()]),
    "index_put.default": (lambda x: aten.index_put.default(x, [None, idx], torch.tensor(1.0)), [x3()]),
    "index_select.default": (lambda x: aten.index_select.default(x, 1, idx), [x3()]),
    "scatter.src": (lambda x: aten.scatter.src(x, 2, torch.zeros(T, 4, 1, dtype=torch.long), x[:, :, :1]), [x3()]),
    "scatter.value": (lambda x: aten.scatter.value(x, 2, torch.zeros(T, 4, 1, dtype=torch.long), 3.0), [x3()]),
    "scatter_add.default": (lambda x: aten.scatter_add.default(x, 1, torch.ones(T, 1, 5, dtype=torch.long), x[:, :1]), [x3()]),
    "scatter_reduce.two": (lambda x: aten.scatter_reduce.two(x, 2, torch.ones(T, 4, 2, dtype=torch.long), x[:, :, :2], "sum"), [x3()]),
    "select_scatter.default": (lambda x: aten.select_scatter.default(x, x[:, 0] * 2, 1, 3), [x3()]),
    "slice_scatter.default": (lambda x: aten.slice_scatter.default(torch.zeros(T, 4, 5), x[:, :2], 1, 0, 2), [x3()]),
    # independent over leading dims
    "native_layer_norm.default": (lambda x: aten.native_layer_norm.default(x, [5], torch.ones(5), torch.zeros(5), 1e-5), [x3()]),
    "native_group_norm.default": (lambda x: aten.native_group_norm.default(x, None, None, T, 4, 5, 2, 1e-5), [x3()]),
    "_native_batch_norm_legit_no_training.default": (lambda x: aten._native_batch_norm_legit_no_training.default(
        x, torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4), 0.1, 1e-5)[0], [x3()]),
    "convolution.default": (lambda x: aten.convolution.default(x, CONV, None, [1], [0], [1], False, [0], 1), [x3()]),
    "constant_pad_nd.default": (lambda x: aten.constant_pad_nd.default(x, [1, 2, 0, 1], 0.0), [x3()]),
    "avg_pool2d.default": (lambda x: aten.avg_pool2d.default(x.view(T, 1, 4, 5), [2, 2]), [x3()]),
    "max_pool2d_with_indices.default": (lambda x: aten.max_pool2d_with_indices.default(x.view(T, 1, 4, 5), [2, 2]), [x3()]),
    "_adaptive_avg_pool2d.default": (lambda x: aten._adaptive_avg_pool2d.default(x.view(T, 1, 4, 5), [2, 2]), [x3()]),
    "avg_pool3d.default": (lambda x: aten.avg_pool3d.default(x.view(T, 1, 1, 4, 5), [1, 2, 2]), [x3()]),
    "max_pool3d_with_indices.default": (lambda x: aten.max_pool3d_with_indices.default(x.view(T, 1, 1, 4, 5), [1, 2, 2]), [x3()]),
    "_adaptive_avg_pool3d.default": (lambda x: aten._adaptive_avg_pool3d.default(x.view(T, 1, 1, 4, 5), [1, 2, 2]), [x3()]),
    "upsample_bilinear2d.vec": (lambda x: aten.upsample_bilinear2d.vec(x.view(T, 1, 4, 5), [8, 10], False, None), [x3()]),
    "upsample_nearest2d.vec": (lambda x: aten.upsample_nearest2d.vec(x.view(T, 1, 4, 5), [8, 10], None), [x3()]),
    "avg_pool1d.default": (lambda x: aten.avg_pool1d.default(x, [2]), [x3()]),
    "adaptive_avg_pool1d.default": (lambda x: aten.adaptive_avg_pool1d.default(x, [2]), [x3()]),
    "reflection_pad1d.default": (lambda x: aten.reflection_pad1d.default(x, [1, 1]), [x3()]),
    "reflection_pad2d.default": (lambda x: aten.reflection_pad2d.default(x.view(T, 1, 4, 5), [1, 1, 1, 1]), [x3()]),
    "reflection_pad3d.default": (lambda x: aten.reflection_pad3d.default(x.view(T, 1, 2, 2, 5), [1, 1, 1, 1, 1, 1]), [x3()]),
    "replication_pad2d.default": (lambda x: aten.replication_pad2d.default(x.view(T, 1, 4, 5), [1, 1, 1, 1]), [x3()]),
    "replication_pad3d.default": (lambda x: aten.replication_pad3d.default(x.view(T, 1, 2, 2, 5), [1, 1, 1, 1, 1, 1]), [x3()]),
    "grid_sampler_2d.default": (lambda x: aten.grid_sampler_2d.default(x.view(T, 1, 4, 5), GRID.expand(T, 3, 3, 2), 0, 0, False), [x3()]),
    "col2im.default": (lambda x: aten.col2im.default(x, [3, 4], [2, 2], [1, 1], [0, 0], [1, 1]), [torch.randn(T, 4, 6, generator=_g)]),
    "_cdist_forward.default": (lambda x: aten._cdist_forward.default(x, CD.expand(T, 3, 5), 2.0, None), [x3()]),
    # factories (no data from tokens) combined with a token tensor
    "full.default": (lambda x: x + aten.full.default([5], 2.0), [x3()]),
    "empty.memory_format": (lambda x: x + aten.empty.memory_format([0]).sum(), [x3()]),
    "arange.start_step": (lambda x: x + aten.arange.start_step(0, 5, 1), [x3()]),
    "scalar_tensor.default": (lambda x: x * aten.scalar_tensor.default(3.0), [x3()]),
}

REFUSED = {  # op -> (fn, token args): each mixes tokens; strict compile names it
    "sum.dim_IntList": (lambda x: aten.sum.dim_IntList(x, [0]), [x3()]),
    "sort.default": (lambda x: aten.sort.default(x, 0)[0], [x3()]),
    "cumsum.default": (lambda x: aten.cumsum.default(x, 0), [x3()]),
    "mm.default": (lambda x: aten.mm.default(aten.t.default(x[:, 0]), x[:, 1]), [x3()]),
    "index_select.default": (lambda x: aten.index_select.default(x, 0, idx), [x3()]),
    "nonzero.default": (lambda x: aten.nonzero.default(x > 0), [x3()]),
    "_pdist_forward.default": (lambda x: aten._pdist_forward.default(x[:, 0].contiguous(), 2.0), [x3()]),
    "masked_scatter.default": (lambda x: aten.masked_scatter.default(torch.zeros(4, 5), torch.ones(4, 5, dtype=torch.bool), x[0] * 0 + x[1]), [x3()]),
    "cat.default": (lambda x: aten.cat.default([x, x], 0), [x3()]),
    "_native_batch_norm_legit.no_stats": (lambda x: aten._native_batch_norm_legit.no_stats(x, None, None, True, 0.1, 1e-5)[0], [x3()]),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_family_op_splits_to_the_same_values(name):
    op = eval(f"aten.{name}")
    assert family(op) in ("reduction", "view", "matmul", "indexing", "batched", "factory", "pointwise")
    fn, args = ACCEPTED[name]
    torch.manual_seed(0)
    ref, got, cut = split_run(fn, args, len(args))
    assert cut == T // 2
    assert_same(ref, got)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_family_op_mixing_tokens_is_refused_by_name(name):
    fn, args = REFUSED[name]
    with pytest.raises(TboCompileError) as e:
        split_run(fn, args, len(args))
    assert "at node" in str(e.value) and "\n" not in str(e.value)


def test_every_non_pointwise_core_family_op_has_a_sample():
    """The tables above cover every core op the pass accepts outside pointwise, save the ones
    that only read shapes or draw random numbers."""
    no_sample = {"sym_numel.default", "sym_size.int", "sym_storage_offset.default", "sym_stride.int",
                 "sym_is_contiguous.default",
                 "rand.default", "randn.default", "randperm.default", "empty_strided.default",
                 "mean.default", "any.default", "prod.default"}  # full reductions: refused, see below
    want = {str(o).replace("aten.", "") for o in core_ops()
            if family(o) in ("reduction", "view", "matmul", "indexing", "batched", "factory")}
    assert not (want - set(ACCEPTED) - no_sample), sorted(want - set(ACCEPTED) - no_sample)


def test_full_reductions_and_mixing_ops_are_refused():
    for fn in (aten.mean.default, lambda x: aten.any.default(x > 0), aten.prod.default):
        with pytest.raises(TokenAxisError):
            split_run(fn, [x3()], 1)
    mixes = [o for o in core_ops() if family(o) == "mixes"]
    assert len(mixes) >= 10


# user ops: one-line declarations that add to the built-ins ----------------------------------

torch.library.define("tbotest::rowscale", "(Tensor x, Tensor w) -> Tensor")
torch.library.impl("tbotest::rowscale", "CompositeExplicitAutograd")(lambda x, w: x * w.sum())
torch.library.register_fake("tbotest::rowscale")(lambda x, w: torch.empty_like(x))


def test_declare_op_teaches_a_custom_op_and_keeps_the_builtins():
    fn = lambda x: torch.ops.tbotest.rowscale(x, torch.ones(3)) .softmax(-1)
    with pytest.raises(TokenAxisError, match="no token-axis rule"):
        split_run(fn, [x3()], 1)
    declare_op(torch.ops.tbotest.rowscale, "rowwise")
    ref, got, cut = split_run(fn, [x3()], 1)
    assert cut == 3
    assert_same(ref, got)
    assert family(aten.mm.default) == "matmul"  # built-ins still there
    register_rule(torch.ops.tbotest.rowscale.default, lambda n, c: c.ax(n.args[0]))
    assert family(aten._softmax.default) == "reduction"
    with pytest.raises(TokenAxisError, match="unknown token behaviour"):
        declare_op(torch.ops.tbotest.rowscale, "sometimes")


# property: random small graphs from the core opset -------------------------------------------

_UNARY = [lambda x: x.exp(), lambda x: x.tanh(), lambda x: x * 2 + 1, lambda x: x.abs().sqrt(),
          lambda x: torch.nn.functional.silu(x), lambda x: x.softmax(-1), lambda x: x.sum(-1, keepdim=True) + x,
          lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2), lambda x: x.flip(-1),
          lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]), lambda x: x.cumsum(-1),
          lambda x: torch.stack([x, -x], 0).sum(0), lambda x: torch.einsum("...d,de->...e", x, torch.ones(x.shape[-1], x.shape[-1])),
          lambda x: x.reshape(x.shape[0], -1).reshape(x.shape), lambda x: x.max(-1, keepdim=True)[0] - x,
          lambda x: x + torch.tensor([1.0, 2.0, 3.0, 4.0])[: x.shape[-1]],
          lambda x: x.sort(-1)[0], lambda x: torch.where(x > 0, x, torch.zeros_like(x))]
_MIXING = [lambda x: x.sum(0, keepdim=True) + x, lambda x: x.cumsum(0), lambda x: x.flip(0),
           lambda x: x - x.mean(0), lambda x: x.sort(0)[0]]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 100)), min_size=1, max_size=5))
def test_random_core_graphs_split_to_the_same_values_or_are_refused(chain):
    def fn(x):
        for mixing, k in chain:
            ops = _MIXING if mixing else _UNARY
            x = ops[k % len(ops)](x)
        return x

    x = torch.randn(T, 3, 4)
    try:
        ref, got, cut = split_run(fn, [x], 1)
    except TokenAxisError:
        assert any(m for m, _ in chain), "a graph of token-independent ops was refused"
        return
    assert not any(m for m, _ in chain), "a graph that mixes tokens was accepted"
    assert_same(ref, got)


def test_compile_without_split_in_a_fresh_process():
    """No split (1 token) in a process that imported only the backend: nothing else needed."""
    import subprocess
    import sys

    code = ("import torch, warnings; warnings.simplefilter('error');"
            "m = torch.nn.Linear(4, 4); x = torch.randn(1, 4);"
            "out = torch.compile(m, backend='tbo', dynamic=False)(x);"
            "assert torch.allclose(out, m(x)); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_infer_token_axes_records_shared_rows_that_pair_with_tokens():
    """A mask built from shapes ([T, ..] with no token data) pairs row i with token i: each
    ubatch reads its rows of it (HF-style causal/padding masks)."""
    def fn(x):
        mask = torch.arange(T).view(T, 1, 1).expand(T, 3, 4) > 2
        return x.masked_fill(mask, 0.0)

    gm = make_fx(fn)(x3()[:, :3, :4])
    ph = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    axes = infer_token_axes(gm, tuple(ph), T)
    assert axes.aligned
    ref, got, _ = split_run(fn, [x3()[:, :3, :4]], 1)
    assert_same(ref, got)
