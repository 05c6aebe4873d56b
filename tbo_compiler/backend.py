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
  split               False compiles one ubatch (the baseline, same runtime)
  dump_dir            write graph/schedule dumps (default $TBO_DUMP_DIR)
  cuda_graphs         capture the program in a CUDA graph (default True on CUDA)
  on_compile          callback(state) with each compiled graph's pipeline state (tests, tools)
Shapes must be static (one compiled graph per batch-size bucket): use dynamic=False.
"""
from __future__ import annotations

import logging
import os
import re

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph
from tbo_compiler.runtime.graphs import GraphedProgram
from tbo_compiler.runtime.program import Program

log = logging.getLogger(__name__)
_DYNAMO_NAME = re.compile(r"^L_(.*)_$")


def _user_name(placeholder_target: str) -> str:
    m = _DYNAMO_NAME.match(placeholder_target)
    return m.group(1) if m else placeholder_target


def _pick_token_inputs(names, examples, mutated, wanted):
    users = [i for i, x in enumerate(examples)
             if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)]
    if wanted is not None:
        picked = []
        for w in wanted:
            if isinstance(w, int):
                picked.append(users[w])
            else:
                hit = [i for i in users if _user_name(names[i]) == w or names[i] == w]
                if not hit:
                    raise TboCompileError(f"token input {w!r} is not an input of the compiled graph "
                                          f"(inputs: {[_user_name(names[i]) for i in users]})")
                picked.extend(hit)
        return picked
    cands = [i for i in users if i not in mutated and examples[i].dim() >= 1]
    if not cands:
        return []
    T = examples[cands[0]].shape[0]
    return [i for i in cands if examples[i].shape[0] == T]


def tbo_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    opts = dict(options or {})
    if any(isinstance(x, torch.SymInt) for x in example_inputs) or any(
            isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)
            for x in example_inputs):
        raise TboCompileError("backend='tbo' compiles static shapes (one graph per batch bucket); "
                              "pass dynamic=False to torch.compile")
    dyn_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    copts = CompileOptions(mode=opts.get("mode", "prefill"),
                           tokens_per_request=int(opts.get("tokens_per_request", 1)),
                           profile=opts.get("profile", "cpu"), order=opts.get("order"),
                           split=bool(opts.get("split", True)))
    dump_dir = opts.get("dump_dir", os.environ.get("TBO_DUMP_DIR"))

    def compiler(aot_gm: fx.GraphModule, aot_inputs):
        phs = [n for n in aot_gm.graph.nodes if n.op == "placeholder"]
        offset = len(phs) - len(example_inputs)   # aot puts the module's own params first
        mutated = {phs.index(n.args[0]) - offset for n in aot_gm.graph.nodes
                   if n.op == "call_function" and n.target == torch.ops.aten.copy_.default
                   and n.args[0].op == "placeholder"}
        picked = _pick_token_inputs(dyn_names, list(example_inputs), mutated, opts.get("token_inputs"))
        T = int(example_inputs[picked[0]].shape[0]) if picked else 0
        token_names = tuple(phs[i + offset].name for i in picked)
        o = copts if picked else CompileOptions(**{**copts.__dict__, "split": False})
        if not picked:
            log.info("tbo: no token inputs in this graph; compiled without a split")
        compiled = compile_graph(aot_gm, token_names, T, o)
        if dump_dir:
            from tbo_compiler.dumps import write_dumps
            write_dumps(compiled, os.path.join(dump_dir, f"graph{_counter()}_T{T}"), name="torch_compile")
        device = next((x.device for x in aot_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        prog = Program(compiled.gm, compiled.schedule.instrs, device=device)
        if opts.get("on_compile"):
            opts["on_compile"](compiled)
        graphed = device.type == "cuda" and opts.get("cuda_graphs", True)
        if graphed:
            prog = GraphedProgram(prog, [i + offset for i in picked], name=f"torch.compile T={T}")

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


def _counter() -> int:
    _N[0] += 1
    return _N[0]
