"""The runtime on CPU: the generated program, its timing modes, the kernel selector's fallback, a
plan's schedule verified again at load, one error root, and the import layering."""
from __future__ import annotations

import ast
import logging
import pathlib
import types

import pytest
import torch

from tbo_compiler import TboError, load_plan
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.load import programs_of
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.errors import ScheduleError
from tbo_compiler.plan import read_plan
from tbo_compiler.runtime import kernels
from tbo_compiler.runtime.program import Program

import tbo_scenarios as sc

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the KV-write tests: the kernel on the GPU


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    d = make_tiny("deepseek_v3", root / "m", seed=3, num_hidden_layers=2)
    p = root / "p.pt"
    compile_model_dir(d, p, dtype=torch.float32, block_size=sc.BLOCK_SIZE, max_blocks=sc.MAX_BLOCKS,
                      token_counts=(8,), profile="cpu")
    return d, p


def test_program_is_straight_line_code(plan_path):
    """One line of source per run instruction and per free; no interpreter loop, no dispatch."""
    _, p = plan_path
    bp = programs_of(read_plan(p))[8]["tbo"]
    prog = Program(bp.gm, bp.instrs)
    runs = sum(i.op == "run" for i in bp.instrs)
    frees = sum(i.op == "free" for i in bp.instrs)
    lines = prog.source.splitlines()
    assert lines[0].startswith("def program(")
    assert sum(" = " in x and not x.strip().startswith("del") for x in lines) == runs
    assert sum(x.strip().startswith("del ") for x in lines) == frees
    assert not any(w in prog.source for w in ("for ", "while ", "_set(", "wait_event"))  # CPU: no streams


def test_timing_modes_run_the_parts_alone(plan_path):
    """compute: every node, no communication (a world-1 plan still runs); comm: only comm ops."""
    d, p = plan_path
    run = load_plan(p, d, dtype=torch.float32, policy="tbo")
    bp = run.buckets[8]["tbo"][0]
    comm_only = Program(bp.gm, bp.instrs, mode="comm")
    body = comm_only.source.splitlines()[1:-1]
    assert all(".wait()" in x or any(k in x for k in ("dispatch", "combine", "all_")) for x in body)
    kv = run.new_kv_cache(sc.NUM_BLOCKS)
    b = kv.make_batch([("a", list(range(1, 9)))], max_blocks=sc.MAX_BLOCKS)
    args = run.args_for(8, "tbo", [*b.args(), *kv.caches])
    (out,) = run.run_mode(8, "tbo", "compute")(*args)
    assert out.shape == (8, run.model.config.vocab_size) and torch.isfinite(out).all()


def test_auto_times_each_program_in_back_to_back_blocks(monkeypatch):
    """`policy="auto"` times each program as a serving loop runs it: blocks of back-to-back calls,
    each after one untimed call, ordered A B B A (single calls alternated between the programs
    misjudged TBO by 3-5 % on 4 H200s, bench/results/ep4_h200/auto_check_ep4_before_fix.json).
    CUDA events are faked with a clock that each call advances by its program's cost."""
    from tbo_compiler.runtime import graphs

    clock, calls = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(graphs.torch.cuda, "Event", Event)

    def prog(name, ms):
        def run():
            calls.append(name)
            clock[0] += ms
        return run

    ms = graphs.time_replays({"tbo": prog("tbo", 2.0), "serial": prog("serial", 3.0)}, block=3, rounds=2)
    assert ms == {"tbo": 2.0, "serial": 3.0}
    assert calls == ["tbo"] * 4 + ["serial"] * 8 + ["tbo"] * 4


def test_failing_backend_falls_back_once(monkeypatch, caplog):
    calls = []

    def broken(*a):
        calls.append(1)
        raise RuntimeError("no kernel image for this GPU")

    fake = types.SimpleNamespace(NAME="fake", available=lambda: True, supports=lambda op, a: True,
                                 IMPLS={"silu_mul": broken})
    monkeypatch.setitem(kernels._LOADED, "fake", fake)
    monkeypatch.setitem(kernels.MODULES, "fake", ".fake")
    monkeypatch.setitem(kernels.PREFERENCE, "silu_mul", ["fake", "torch"])
    monkeypatch.setattr(kernels, "_BROKEN", set())
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        y = torch.ops.tbo.silu_mul(x)
        y2 = torch.ops.tbo.silu_mul(x)
    torch.testing.assert_close(y, torch.nn.functional.silu(x[:, :4]) * x[:, 4:])
    assert torch.equal(y, y2) and len(calls) == 1  # tried once, then never again
    assert sum("backend fake failed on first use" in r.message for r in caplog.records) == 1


def test_loaded_schedule_is_verified_again(plan_path, tmp_path):
    from tbo_compiler.plan import save_plan

    _, p = plan_path
    plan = read_plan(p)
    prog = plan["buckets"][0]["programs"]["tbo"]
    first_run = next(k for k, i in enumerate(prog["instrs"]) if i[0] == "run")
    prog["instrs"].insert(first_run, prog["instrs"][-1])  # a free before anything ran
    bad = tmp_path / "bad.pt"
    save_plan(plan, bad)
    with pytest.raises(ScheduleError):
        programs_of(read_plan(bad))


def test_every_bad_input_is_a_tbo_error(plan_path, tmp_path):
    """`except TboError` catches each failure a user can cause, with a one-line message."""
    import json

    from tbo_compiler.models import load_model
    from tbo_compiler.ops.comm import all_reduce
    from tbo_compiler.runtime.kernels import prefer
    d, p = plan_path
    bad_cfg = tmp_path / "bad"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text(json.dumps({"model_type": "llama"}))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    run = load_plan(p, d, dtype=torch.float32)
    kv = run.new_kv_cache(sc.NUM_BLOCKS)
    big = kv.make_batch([("a", list(range(1, 12)))], max_blocks=sc.MAX_BLOCKS)

    class MixesTokens(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    cases = {
        "unknown model": lambda: load_model(bad_cfg),
        "missing dir": lambda: load_model(tmp_path / "nope"),
        "junk plan": lambda: load_plan(junk, d),
        "plan for another model": lambda: load_plan(p, bad_cfg),
        "batch over the largest bucket": lambda: run(*big.args(), kv.caches),
        "unknown policy": lambda: load_plan(p, d, policy="sometimes"),
        "unregistered group": lambda: all_reduce(torch.zeros(2), "nope", 2),
        "unknown kernel backend": lambda: prefer("rms_norm", "cuda-magic"),
        "token mixing": lambda: torch.compile(MixesTokens(), backend="tbo", dynamic=False,
                                              options={"split": True, "strict": True})(torch.randn(4, 3)),
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        with pytest.raises(Exception) as e:
            fn()
        err = e.value
        while not isinstance(err, TboError) and (getattr(err, "inner_exception", None) or err.__cause__):
            err = getattr(err, "inner_exception", None) or err.__cause__  # dynamo wraps backend errors
        assert isinstance(err, TboError), (name, type(e.value), e.value)
        assert "\n" not in str(err), name


def _imports(path: pathlib.Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from tbo_compiler import runtime` imports tbo_compiler.runtime: name each imported name too
            mods |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return mods


def test_imports_sees_every_import_style(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import tbo_compiler.passes\nfrom tbo_compiler import runtime\n"
                 "from tbo_compiler.models import batch as b\n")
    assert {"tbo_compiler.passes", "tbo_compiler.runtime", "tbo_compiler.models.batch"} <= _imports(f)


@pytest.mark.parametrize("folder, forbidden", [
    ("ops", ("tbo_compiler.models", "tbo_compiler.passes", "tbo_compiler.runtime", "tbo_compiler.compile",
             "tbo_compiler.plan", "tbo_compiler.backend", "tbo_compiler.capture")),
    ("passes", ("tbo_compiler.runtime", "tbo_compiler.models")),
    ("runtime", ("tbo_compiler.passes", "tbo_compiler.models")),
    ("models", ("tbo_compiler.runtime", "tbo_compiler.passes")),
])
def test_layering(folder, forbidden):
    """The op vocabulary is a leaf; passes and runtime never import each other; models never
    import runtime or passes."""
    bad = [(f.name, m) for f in (ROOT / folder).rglob("*.py") for m in _imports(f)
           if m.startswith(forbidden)]
    assert not bad


def test_plan_format_is_a_leaf():
    """plan.py is the file format only: it imports no passes, runtime, models or package root."""
    bad = [m for m in _imports(ROOT / "tbo_compiler" / "plan.py")
           if m == "tbo_compiler" or m.startswith(("tbo_compiler.passes", "tbo_compiler.runtime", "tbo_compiler.models"))]
    assert not bad


def test_kv_cache_errors_are_tbo_errors():
    """A serving loop's mistakes with the paged cache are TboErrors (and still ValueError/RuntimeError)."""
    from tbo_compiler.models.batch import PagedKVCache
    from tbo_compiler.ops.errors import RuntimeFailure, UsageError

    with pytest.raises(UsageError, match="at least 2 blocks"):
        PagedKVCache([(4,)], 1, 4)
    kv = PagedKVCache([(4,)], 2, 4)
    with pytest.raises(UsageError, match="more than pad_to=2"):
        kv.make_batch([("a", [1, 2, 3])], pad_to=2)
    with pytest.raises(RuntimeFailure, match="out of blocks"):
        kv.make_batch([("b", [1] * 9)])


def test_env_flags_are_read_through_the_registry():
    """Every flag the code reads is in runtime/env.py's table (and its docstring), read with `flag`."""
    import re

    from tbo_compiler.runtime import env

    used, direct = set(), []
    for folder in ("tbo_compiler", "runtime", "passes", "models", "ops"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            used |= set(re.findall(r'\bflag\("(\w+)"\)', text))
            if f.name not in ("env.py", "launch.py") and re.search(r"os\.environ(\.get|\[)|os\.getenv", text):
                direct.append(f.name)
    assert not direct
    assert used and used <= set(env.FLAGS), used - set(env.FLAGS)
    assert all(name in env.__doc__ for name in env.FLAGS)


def test_instruction_kinds_serialise_as_plain_strings():
    """Op is an enum in code, the same text in plans: lists, JSON and repr as before."""
    import json

    from tbo_compiler.ops.instr import Instr, Op

    i = Instr("free", "x", 1, "comm", 3)
    assert i.op is Op.FREE and i.op == "free" and type(i.to_list()[0]) is str
    assert json.dumps(i.to_list()) == '["free", "x", 1, "comm", 3]'
    assert Instr.from_list(i.to_list()) == i
    assert repr(i) == "Instr(op='free', node='x', ubatch=1, stream='comm', event=3)"
    with pytest.raises(ScheduleError, match="unknown instruction kind 'jump'"):
        Instr.from_list(["jump", None, None, "compute", None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_wide_cache_write_is_index_put(dtype):
    """TBO_KV_WRITE_WIDE's row write lands the same bits as aten.index_put_ on KV-cache-shaped rows
    ([S, 2, G, Dh], int64 and int32 slots, negative slots), on rows of 6 or 12 bytes (2- or 4-byte
    words), and hands every other call to ATen unchanged: accumulate, values of another dtype or not
    contiguous, a 2-D index. The runtime's write takes the row-scatter kernel on CUDA tensors (the
    GPU run of this test); on CPU the kernel itself runs here, in Triton's interpreter."""
    from tbo_compiler.runtime.kernels.triton_elementwise import scatter_rows_
    from tbo_compiler.runtime.program import _index_put_rows_

    def write(base, idx, v, accumulate):
        if (DEV == "cpu" and not accumulate and v.is_contiguous() and v.dtype == base.dtype
                and tuple(v.shape) == (len(idx), *base.shape[1:])):
            return scatter_rows_(base, idx, v)          # the kernel, interpreted, as CUDA takes it
        return _index_put_rows_(base, (idx,), v, accumulate)

    g = torch.Generator().manual_seed(0)

    def case(shape, T, idx_dtype=torch.int64, accumulate=False, vals=None, negative=False):
        base = torch.randn(shape, generator=g).to(DEV, dtype)
        idx = torch.randperm(shape[0], generator=g)[:T].to(DEV, idx_dtype)
        if negative:
            idx[::2] -= shape[0]
        v = (torch.randn(T, *shape[1:], generator=g) if vals is None else vals(T, shape)).to(DEV, dtype)
        ref = base.clone().index_put_((idx,), v, accumulate)
        out = write(base, idx, v, accumulate)
        assert out is base and torch.equal(base.view(torch.uint8) if dtype != torch.float32 else base,
                                           ref.view(torch.uint8) if dtype != torch.float32 else ref)

    case((64, 2, 4, 8), 20)
    case((64, 2, 4, 8), 20, torch.int32)
    case((64, 2, 4, 8), 20, negative=True)
    case((64, 2, 4, 8), 0)
    case((64, 3), 10)                                    # 6 or 12 bytes a row
    case((64, 2, 4, 8), 20, accumulate=True)
    case((64, 2, 4, 8), 20, vals=lambda T, s: torch.randn(*s[1:], T, generator=g).to(dtype).movedim(-1, 0))
    case((64, 2, 4, 8), 20, vals=lambda T, s: torch.randn(T, *s[1:], generator=g).double().to(dtype)[:, :1])
    base = torch.zeros(8, 4, dtype=dtype, device=DEV)
    idx2 = torch.tensor([[0, 1], [2, 3]], device=DEV)
    ref = base.clone().index_put_((idx2,), torch.ones(2, 2, 4, dtype=dtype, device=DEV))
    assert torch.equal(_index_put_rows_(base, (idx2,), torch.ones(2, 2, 4, dtype=dtype, device=DEV)), ref)


def test_scatter_rows_edges():
    """The row-scatter kernel itself: a row wider than one tile (several column tiles), slots past
    either end write nothing, an unaligned view falls to smaller words, bad arguments are one error."""
    from tbo_compiler.runtime.kernels.triton_elementwise import scatter_rows_

    base = torch.zeros(16, 2100, dtype=torch.float16, device=DEV)  # 4200 bytes a row: 525 words of 8
    v = torch.randn(5, 2100).half().to(DEV)
    scatter_rows_(base, torch.tensor([3, 0, 15, 16, -17], device=DEV), v)
    assert torch.equal(base[3], v[0]) and torch.equal(base[0], v[1]) and torch.equal(base[15], v[2])
    assert base[1:3].abs().sum() == 0 and base[4:15].abs().sum() == 0   # 16 and -17: out of range
    odd = torch.zeros(33, 3, dtype=torch.bfloat16, device=DEV)[1:]      # 2-byte aligned: 2-byte words
    w = torch.randn(4, 3).bfloat16().to(DEV)
    scatter_rows_(odd, torch.tensor([0, 30, 7, -1], dtype=torch.int32, device=DEV), w)
    assert torch.equal(odd[0], w[0]) and torch.equal(odd[30], w[1]) and torch.equal(odd[7], w[2])
    assert torch.equal(odd[31], w[3])                                   # -1: the last row
    with pytest.raises(ValueError, match="contiguous rows of one dtype"):
        scatter_rows_(base, torch.tensor([0], device=DEV), v[:1].float())


def test_graphed_program_static_check():
    """A graphed program replays only with the static arguments it was captured with: the same
    tensor addresses (the weights, the KV caches) and the same plain values; per-step inputs are
    copied, never checked."""
    from tbo_compiler.runtime import graphs

    w, kv, ids = torch.zeros(4), torch.zeros(2, 3), torch.arange(3)
    gp = graphs.GraphedProgram(lambda *a: None, copied=[0])
    gp._record([ids, w, kv, 7, None])
    assert gp.tensor_idx == [1, 2] and gp.others == [(3, 7), (4, None)]
    assert gp._same_static([torch.arange(3) + 1, w, kv, 7, None])        # new ids: copied, not checked
    assert gp._same_static([ids, w.view(2, 2), kv, 7, None])             # a view of the same memory
    assert not gp._same_static([ids, w.clone(), kv, 7, None])            # a weight moved
    assert not gp._same_static([ids, w, torch.zeros(2, 3), 7, None])     # new KV caches
    assert not gp._same_static([ids, w, kv, 8, None])                    # another value
    assert not gp._same_static([ids, w, kv, 7.0, None])                  # another type
    assert not gp._same_static([ids, 1, kv, 7, None])                    # a tensor became a number
    assert not gp._same_static([ids, w, kv, 7])                          # an argument fewer
    gp.static = {0: torch.zeros(3, dtype=torch.int64)}
    gp._copy_inputs([torch.tensor([5, 6, 7]), w, kv, 7, None])
    assert gp.static[0].tolist() == [5, 6, 7]
