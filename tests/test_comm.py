"""The tbo comm ops in one process: fake implementations give the real ops' shapes and dtypes
(world 1 runs locally; worlds 2 and 4 run the real multi-rank code path over a fake process group,
which moves no data, so only shapes are compared there: values are test_ep.py's job over gloo),
the world-1 dispatch/combine round trip equals local experts, the pending-work registry, opcheck,
and the dispatch packing against a per-token loop."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from tbo_compiler import TboError
from tbo_compiler.ops import comm as comm_ops
from tbo_compiler.ops.kernels import unpack_meta
from tbo_compiler.runtime import comm

ops = torch.ops.tbo
D, K, E = 6, 3, 8


def _routing(T, g):
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.int64)
    return ids, torch.rand(T, K, generator=g)


def _inputs(T, world, dtype):
    """Start-op payloads of every op for T tokens per rank."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids, w = _routing(T, g)
    y = torch.randn(world * T, D, generator=g).to(dtype)  # a [W*T, ...] input (combine, reduce_scatter)
    send_x, send_meta = ops.dispatch_pack(x, ids, w, world, E // world)
    return {"dispatch": (send_x, send_meta), "combine": (y,), "all_gather": (x,), "reduce_scatter": (y,),
            "all_reduce": (x,)}


START = {k: s for s, (_, k) in comm_ops.START_OPS.items()}
WAIT = {k: w for s, (w, k) in comm_ops.START_OPS.items()}
KINDS = sorted(START)


def _run(kind, group, world, tensors):
    """start + wait; -> (handle, outputs as a tuple). The wait gets the start's payload again."""
    h = START[kind](*tensors, group, world)
    out = WAIT[kind](h, *tensors, group, world)
    return h, out if isinstance(out, tuple) else (out,)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def world(request):
    """World 1: no process group. Worlds 2, 4: a fake process group as the default group."""
    if request.param == 1:
        yield 1
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.param)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


@pytest.fixture
def group(world):
    """The group name the ops get; nothing pending before; after, no group and no pending work
    (clear_groups also drops the starts opcheck leaves pending)."""
    assert comm.pending_count() == 0
    comm.register_group("g", dist.group.WORLD if world > 1 else None)
    yield "g"
    comm.clear_groups()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [5, 0])
@pytest.mark.parametrize("kind", KINDS)
def test_fake_matches_real(group, world, kind, T, dtype):
    tensors = _inputs(T, world, dtype)[kind]
    h, real = _run(kind, group, world, tensors)
    assert comm.pending_count() == 0
    with FakeTensorMode() as mode:
        fh, fake = _run(kind, group, world, tuple(mode.from_tensor(t) for t in tensors))
    assert comm.pending_count() == 0  # a fake start registers no work
    assert (fh.shape, fh.dtype) == (h.shape, h.dtype) == ((1,), torch.int64)
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)
    # the shapes the module docstring promises
    R = world * T
    want = {"dispatch": [(R, D), (R, 2 * K)], "combine": [(R, D)], "all_gather": [(R, D)],
            "reduce_scatter": [(T, D)], "all_reduce": [(T, D)]}[kind]
    assert [tuple(r.shape) for r in real] == want
    if kind == "dispatch":
        assert [r.dtype for r in real] == [dtype, torch.int32]


@pytest.mark.parametrize("world", [1], indirect=True)
def test_world1_dispatch_combine_round_trip(group, world):
    T = 9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    ids, w = _routing(T, g)
    w13, w2 = torch.randn(E, 8, D, generator=g), torch.randn(E, D, 4, generator=g)
    rx, rmeta = comm_ops.dispatch(*ops.dispatch_pack(x, ids, w, 1, E), group, 1)
    rids, rw = unpack_meta(rmeta, K)
    # one rank owns every expert: the tokens, ids and weights come back as they went
    assert torch.equal(rx, x) and torch.equal(rids.long(), ids) and torch.equal(rw, w)
    y = comm_ops.combine(ops.moe_experts(rx, rids, rw, w13, w2), group, 1)
    want = ops.moe_experts(x, ids, w, w13, w2)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for fn in (comm_ops.all_gather, comm_ops.reduce_scatter, comm_ops.all_reduce):
        out = fn(x, group, 1)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()  # a fresh tensor, not x


@pytest.mark.parametrize("W", [1, 2, 4])
def test_dispatch_pack_matches_a_token_loop(W):
    """Slab d row t: the token if any of its experts lives on rank d (else zeros), the expert's
    rank-local id (else -1) and its weight (else 0)."""
    T, e_loc = 7, E // W
    g = torch.Generator().manual_seed(W)
    x = torch.randn(T, D, generator=g)
    ids, w = _routing(T, g)
    send_x, meta = ops.dispatch_pack(x, ids, w, W, e_loc)
    lids, lw = unpack_meta(meta, K)
    for d in range(W):
        for t in range(T):
            row = d * T + t
            here = [k for k in range(K) if ids[t, k] // e_loc == d]
            assert torch.equal(send_x[row], x[t] if here else torch.zeros(D))
            for k in range(K):
                assert lids[row, k] == (ids[t, k] - d * e_loc if k in here else -1)
                assert lw[row, k] == (w[t, k] if k in here else 0.0)


@pytest.mark.parametrize("world", [1], indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_pending_work_and_unknown_handles(group, world, kind):
    tensors = _inputs(4, 1, torch.float32)[kind]
    h = START[kind](*tensors, group, 1)
    assert comm.pending_count() == 1
    WAIT[kind](h, *tensors, group, 1)
    assert comm.pending_count() == 0
    with pytest.raises(TboError, match="no pending start"):  # waited twice
        WAIT[kind](h, *tensors, group, 1)
    with pytest.raises(TboError, match="no pending start"):  # never started
        WAIT[kind](torch.zeros(1, dtype=torch.int64), *tensors, group, 1)


@pytest.mark.parametrize("world", [2], indirect=True)
def test_group_errors_name_the_group(group, world):
    x = torch.zeros(2, D)
    with pytest.raises(TboError, match="'nope'.*not registered"):
        comm_ops.all_reduce(x, "nope", 2)
    with pytest.raises(TboError, match="'g' has 2 ranks.*built for 4"):
        comm_ops.all_reduce(x, group, 4)
    assert comm.pending_count() == 0


class _OneWork(dict):
    """A pending-work registry that answers every handle with its one entry: opcheck calls the
    op several times on clones of its arguments, and a clone of a handle has another address."""

    def pop(self, key, *default):
        return next(iter(self.values()))


@pytest.mark.parametrize("world", [1], indirect=True)
@pytest.mark.parametrize("half", ["start", "wait"])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(group, world, kind, half, monkeypatch):
    # Every start numbers its handle afresh; pinned, repeated calls agree and eager and AOT
    # outputs can be compared.
    monkeypatch.setattr(comm, "_COUNTER", itertools.repeat(7))
    tensors = _inputs(4, 1, torch.float32)[kind]
    if half == "start":
        op, args = START[kind], (*tensors, group, 1)
    else:
        monkeypatch.setattr(comm, "_PENDING", _OneWork())
        h = START[kind](*tensors, group, 1)
        op, args = WAIT[kind], (h, *tensors, group, 1)
    # test_autograd_registration left out: the ops have no autograd formula by design (the
    # models are inference-only; the loader turns grads off), so there is nothing to register.
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert result == dict.fromkeys(utils, "SUCCESS")


def test_every_comm_backend_module_has_the_protocol():
    """select.py's table: each module has its NAME, a probe and a BACKEND with every comm kind."""
    from tbo_compiler.ops.errors import RuntimeFailure
    from tbo_compiler.runtime.comm import CommGroup, select

    for name in select.MODULES:
        mod = select._module(name)
        assert mod.NAME == name and callable(mod.probe) and mod.BACKEND.name == name
        assert all(callable(getattr(mod.BACKEND, k, None))
                   for k in ("dispatch", "combine", "all_gather", "reduce_scatter", "all_reduce")), name
    with pytest.raises(RuntimeFailure, match="unknown comm backend 'carrier_pigeon'"):
        select.make_backend("carrier_pigeon", CommGroup("g", 1, 0))
