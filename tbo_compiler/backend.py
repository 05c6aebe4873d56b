"""`torch.compile(model, backend="tbo", options={...})`, registered by entry point.

Dynamo captures the graph, aot_autograd lowers it to functional ATen (input mutations kept as a
trailing `copy_`), and the same pass pipeline as `tbo-compile` splits and schedules it; the
returned callable is the same generated program the plans run (runtime/program.py), captured in a
CUDA graph on CUDA (token inputs copied into static buffers; weights and caches must stay the same
tensors, else it captures again).

options:
  token_inputs        names (e.g. ["input_ids", "positions"]) or indices of the user inputs whose
                      axis 0 is the token axis. Default: every input that is not a parameter, not
                      mutated, and whose axis 0 has the first such input's length.
  mode                "prefill" (token-balanced cut) or "decode" (cut between requests)
  tokens_per_request  decode: tokens per request (MTP), kept in one ubatch
  profile, order      cost-model profile; force "interleaved" or "sequential"
  split               "auto" (default): split when the graph has comm to overlap; True: always;
                      False: one ubatch (the baseline, same runtime)
  strict              a graph that cannot be split raises (default: it runs unsplit, one warning)
  dump_dir            write graph/schedule dumps (default $TBO_DUMP_DIR)
  cuda_graphs         capture the program in a CUDA graph (default True on CUDA)
  on_compile          callback(state) with each compiled graph's pipeline state (tests, tools)
  inductor            True (default; $TBO_INDUCTOR=0 changes the default): the compute between
                      two comm points runs as Inductor-compiled regions (a dict: Inductor config
                      options for them); False: today's runtime, one ATen op per generated line
Shapes must be static (one compiled graph per batch-size bucket): use dynamic=False.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.fx as fx

from tbo_compiler.graph_inputs import AotInputs, is_module_state, pick_token_inputs
from tbo_compiler.ops.errors import TboCompileError, one_line
from tbo_compiler.passes.pipeline import CompileOptions, TboFallbackWarning, compile_graph
from tbo_compiler.runtime.comm import gather_records
from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.graphs import GraphedProgram
from tbo_compiler.runtime.program import Program

log = logging.getLogger(__name__)


#: the options this backend reads (the module docstring says what each does)
OPTIONS = ("token_inputs", "mode", "tokens_per_request", "profile", "order", "split", "strict", "dump_dir",
           "cuda_graphs", "on_compile", "inductor")


def _split_option(v):
    if v in ("auto", True, False):
        return v
    raise TboCompileError(f"options['split'] must be 'auto', True or False, not {v!r}")


def _inductor_option(v):
    """options['inductor']: True, False or a dict of Inductor options; unset: $TBO_INDUCTOR (default on)."""
    if v is None:
        return flag("TBO_INDUCTOR")
    if isinstance(v, bool) or isinstance(v, dict):
        return v
    raise TboCompileError(f"options['inductor'] must be True, False or a dict of Inductor options, not {v!r}")


def _agreement_group(gm: fx.GraphModule):
    """The process group the graph's collectives run on (all of its ranks compile this graph at
    the same point of the same program), or None when there is nothing to agree with."""
    import torch.distributed as dist

    from tbo_compiler.passes.annotate_comm import annotate_comm

    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        ops = annotate_comm(gm).ops
    except TboCompileError:
        ops = ()
    if not ops:
        return None
    try:  # native collectives name their process group
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _resolve_process_group(ops[0].group)
    except Exception:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def tbo_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise TboCompileError(f"unknown backend='tbo' option(s) {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(OPTIONS)}")
    if any(isinstance(x, torch.SymInt) for x in example_inputs) or any(
            isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)
            for x in example_inputs):
        # dynamic=True, or dynamo going dynamic on a second batch size: TBO needs static shapes (a
        # cut per bucket), so this graph runs as plain Inductor (never a crash where Inductor runs)
        from torch._inductor.compile_fx import compile_fx

        warnings.warn(TboFallbackWarning(
            "tbo: this graph has dynamic shapes (dynamic=True, or a new batch size made dynamo compile "
            "it dynamically): it runs as plain Inductor, without TBO. backend='tbo' compiles static "
            "shapes: pass dynamic=False to torch.compile and pad batches to a few bucket sizes"))
        return compile_fx(gm, example_inputs)
    dyn_phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    module_state = frozenset(i for i, n in enumerate(dyn_phs) if is_module_state(n))
    copts = CompileOptions(mode=opts.get("mode", "prefill"),
                           tokens_per_request=int(opts.get("tokens_per_request", 1)),
                           profile=opts.get("profile", "cpu"), order=opts.get("order"),
                           split=_split_option(opts.get("split", "auto")),
                           strict=bool(opts.get("strict", False)))
    dump_dir = opts.get("dump_dir", flag("TBO_DUMP_DIR"))
    inductor = _inductor_option(opts.get("inductor"))
    _count_sizes(gm, example_inputs)

    def compiler(aot_gm: fx.GraphModule, aot_inputs):
        inputs = AotInputs.of(aot_gm, gm)   # what aot_autograd says each placeholder is
        asked = opts.get("token_inputs")
        picked = inputs.token_placeholders(pick_token_inputs(dyn_phs, list(example_inputs), inputs.mutated_users(),
                                                             asked, module_state), dyn_phs, asked=asked is not None)
        T = int(picked[0].meta["val"].shape[0]) if picked else 0
        token_names = tuple(n.name for n in picked)
        o = copts if picked else CompileOptions(**{**copts.__dict__, "split": False})
        if not picked:
            log.info("tbo: no token inputs in this graph; compiled without a split")
        compiled, error = None, None
        try:
            compiled = compile_graph(aot_gm, token_names, T, o)
        except TboCompileError as e:
            error = e
        group = _agreement_group(aot_gm)
        if group is not None:  # every rank of the graph's collectives takes the same decision
            import torch.distributed as dist
            views = gather_records(group, {"rank": dist.get_rank(), "T": T, "cut": compiled.cut if compiled else 0,
                                           "error": one_line(error) if error else None,
                                           "fallback": compiled.fallback if compiled else None})
            failed = [v for v in views if v["error"]]
            if failed:
                raise TboCompileError(f"rank {failed[0]['rank']} could not compile this graph: {failed[0]['error']}")
            if len({(v["T"], v["cut"]) for v in views}) > 1:
                seen = ", ".join(f"rank {v['rank']}: T={v['T']} cut={v['cut']}" for v in views)
                why = f"ranks disagree on the split ({seen})"
                cause = next((v for v in views if v["fallback"]), None)
                why += (f": rank {cause['rank']} cannot split: {cause['fallback']}" if cause else
                        "; pad every rank's batch to the same token count (a bucket) to get TBO")
                if compiled.cut:
                    warnings.warn(TboFallbackWarning(f"tbo: running this graph without TBO (unsplit): {why}"))
                    compiled = compile_graph(aot_gm, token_names, T, CompileOptions(**{**o.__dict__, "split": False}))
                compiled.fallback = compiled.fallback or why
        elif error is not None:
            raise error
        if dump_dir:
            from tbo_compiler.dumps import write_dumps
            write_dumps(compiled, os.path.join(dump_dir, f"graph{_counter()}_T{T}"), name="torch_compile",
                        input_names=inputs.names)
        device = next((x.device for x in aot_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        prog = Program(compiled.gm, compiled.schedule.instrs, device=device, inductor=inductor)
        log.info("tbo: compiled a graph of %d tokens: %s, %d comm ops", T,
                 f"split {compiled.cut}+{T - compiled.cut}" if compiled.cut else
                 f"not split ({compiled.fallback or 'not asked'})", len(compiled.comm_before.ops))
        compiled.program = prog
        if opts.get("on_compile"):
            opts["on_compile"](compiled)
        graphed = device.type == "cuda" and opts.get("cuda_graphs", True)
        if graphed:
            prog = GraphedProgram(prog, [inputs.index(n) for n in picked], name=f"torch.compile T={T}")

        def run(args):
            out = prog(*args)
            args.clear()
            return tuple(o.clone() for o in out) if graphed else out

        run._boxed_call = True
        return run

    def eager_bw(bw_gm, _):
        return make_boxed_func(bw_gm.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, inference_compiler=compiler,
                                 bw_compiler=eager_bw, keep_inference_input_mutations=True)


_N = [0]
_SIZES: dict[tuple, set] = {}


def _count_sizes(gm: fx.GraphModule, example_inputs) -> None:
    """Warn once when a graph reaches dynamo's recompile limit by batch size: past it, dynamo runs
    the frame eagerly (without TBO) for every new size, which would otherwise go unnoticed."""
    key = (tuple(n.target for n in gm.graph.nodes if n.op == "placeholder"), len(gm.graph.nodes))
    shape = tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor))
    sizes = _SIZES.setdefault(key, set())
    sizes.add(shape)
    cfg = torch._dynamo.config
    limit = getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit", 8)
    if len(sizes) == limit:
        warnings.warn(TboFallbackWarning(
            f"tbo: this graph is now compiled for {limit} input shapes, dynamo's recompile_limit: any new "
            "batch size runs eagerly, without TBO. Pad batches to a few bucket sizes "
            "(kv.make_batch(..., pad_to=bucket)) or raise torch._dynamo.config.recompile_limit"))


def _counter() -> int:
    _N[0] += 1
    return _N[0]
