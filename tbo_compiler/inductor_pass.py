"""TBO as an Inductor custom graph pass: the split + schedule inside an engine's own compile.

    torch.compile(model, backend="inductor",
                  options={"post_grad_custom_post_pass": tbo_pass(mode="prefill")})

vLLM passes the same dict through `CompilationConfig.inductor_compile_config`. The pass runs on
Inductor's post-grad graph (functional ATen, the same level the tbo backend's passes see): it finds
the comm, splits the batch into two ubatches along the token axis, and rewrites the graph in place
in the schedule's order -- ubatch A's collective issued, then ubatch B's compute, then A's wait.
Inductor then compiles it as usual: the compute is its fused code; native functional collectives
run asynchronously on the process group's own stream (NCCL), so what the schedule places between
a collective and its wait overlaps it. There is no second stream and no CUDA graph of ours here
(the engine's own, e.g. vLLM's piecewise graphs or mode="reduce-overhead", applies); for both, use
`backend="tbo"`.

Contract
  requires   Inductor's post-grad graph of one forward (static shapes), its placeholders labelled
             by aot_autograd (`meta["desc"]`: user inputs apart from parameters and buffers).
  guarantees the graph computes the same values; when it can be split, every comm op appears once
             per ubatch and the nodes are in the schedule's interleaved order; `meta["val"]` is a
             fake tensor on the graph's device for every node (Inductor's lowering reads it).
             Where it cannot be split, the graph is left as it was (one TboFallbackWarning, as the
             backend; strict=True raises).
  must not   change values or placeholders; depend on anything but its options and the code for
             `uuid()` (Inductor's FX graph cache keys on it).

Pseudo-code
  Step 1: token inputs = the user's inputs (not parameters or buffers: aot_autograd's descriptors
          and static input indices say which) whose axis 0 has the first
          one's length, or those named by `token_inputs` (placeholder names or user-input indices).
  Step 2: run the pass pipeline (passes/pipeline.compile_graph) on the graph.
  Step 3: rewrite the graph in place: erase the old body, copy the split graph's nodes in the order
          of the schedule's `run` instructions, re-propagate fake values.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.ops.instr import Op
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph

log = logging.getLogger(__name__)
_MODES = ("prefill", "decode")


def _register_inductor_prims() -> None:
    """Token-axis rules for the ops only Inductor's post-grad graph holds (torch._inductor.
    inductor_prims), registered here because only this pass meets them: `prepare_softmax_online`
    is amax and sum(exp(x - amax)) over `dim` with keepdim (a reduction), `fma` is pointwise,
    `inductor_force_stride_order` a copy; `convert_element_type` (what `.float()` / `.int()` become)
    is a cast that keeps what the values mean (sort keys, positions), as `_to_copy` does; `iota` is
    arange (a factory)."""
    import torch._inductor.inductor_prims  # noqa: F401  (defines the prims)

    from tbo_compiler.passes.token_axis.factory import rule_factory
    from tbo_compiler.passes.token_axis.pointwise import rule_copy, rule_pointwise
    from tbo_compiler.passes.token_axis.reduction import dim_rule
    from tbo_compiler.passes.token_axis.registry import register

    prims = torch.ops.prims
    register("reduction", prims.prepare_softmax_online.default)(dim_rule(1, None, removes=False))
    register("pointwise", prims.fma.default, prims.inductor_force_stride_order.default)(rule_pointwise)
    register("pointwise", prims.convert_element_type.default, reads_order=True, keeps_keys=True)(rule_copy)
    register("factory", prims.iota.default)(rule_factory)


_register_inductor_prims()


def _is_user_input(ph: fx.Node) -> bool:
    desc = ph.meta.get("desc")
    if desc is None:   # an older torch without descriptors: every tensor placeholder may be one
        return True
    return type(desc).__name__ == "PlainAOTInput"


def _static_inputs() -> set[int]:
    """Placeholder indices of the module's parameters and buffers: dynamo lifts them as plain
    inputs and marks them static (aot_autograd's `static_input_indices`, what cudagraphs reads)."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    return set(getattr(meta, "static_input_indices", None) or ())


class TboInductorPass(CustomGraphPass):
    """The `post_grad_custom_post_pass` object: call `tbo_pass(...)` to make one."""

    def __init__(self, token_inputs=None, *, mode: str = "prefill", split: bool | str = True,
                 tokens_per_request: int = 1, order: str | None = None, profile: str = "cpu",
                 strict: bool = False):
        if mode not in _MODES:
            raise TboCompileError(f"tbo_pass: mode must be one of {_MODES}, not {mode!r}")
        if split not in ("auto", True, False):
            raise TboCompileError(f"tbo_pass: split must be 'auto', True or False, not {split!r}")
        self.token_inputs = tuple(token_inputs) if token_inputs is not None else None
        self.options = CompileOptions(mode=mode, tokens_per_request=int(tokens_per_request), profile=profile,
                                      order=order, split=split, strict=bool(strict))
        self.last = None   # the pipeline state of the last graph (tests, tools)

    # Step 1
    def _token_inputs(self, phs: list[fx.Node]) -> list[fx.Node]:
        static = _static_inputs()
        users = [p for i, p in enumerate(phs) if _is_user_input(p) and i not in static
                 and isinstance(p.meta.get("val"), torch.Tensor)]
        if self.token_inputs is not None:
            out = []
            for w in self.token_inputs:
                hit = [users[w]] if isinstance(w, int) and w < len(users) else [p for p in phs if p.name == w]
                if not hit:
                    raise TboCompileError(f"tbo_pass: token input {w!r} is not an input of the graph "
                                          f"(user inputs: {[p.name for p in users]})")
                out += hit
            return out
        mutated = {n.args[0] for n in phs[0].graph.nodes if n.op == "call_function"
                   and n.target == torch.ops.aten.copy_.default and n.args[0].op == "placeholder"} if phs else set()
        cands = [p for p in users if p not in mutated and p.meta["val"].dim() >= 1]
        if not cands:
            return []
        T = cands[0].meta["val"].shape[0]
        return [p for p in cands if p.meta["val"].shape[0] == T]

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        tokens = self._token_inputs(phs)
        if not tokens or not self.options.split:
            log.info("tbo_pass: nothing to split (%s)", "no token inputs" if not tokens else "split=False")
            return
        T = int(tokens[0].meta["val"].shape[0])
        # Step 2: the pipeline reads the graph (meta only) and builds the split one apart
        st = compile_graph(gm, tuple(p.name for p in tokens), T, self.options)
        self.last = st
        if not st.cut:
            return
        # Step 3
        _rewrite_in_place(gm, st.gm, [i.node for i in st.schedule.instrs if i.op == Op.RUN])
        log.info("tbo_pass: split %d+%d, %d comm ops per ubatch", st.cut, T - st.cut, len(st.comm_before.ops))

    def uuid(self) -> bytes:
        here = os.path.dirname(os.path.abspath(__file__))
        passes = os.path.join(os.path.dirname(here), "passes")
        files = [os.path.abspath(__file__)]
        for root in (passes,) if os.path.isdir(passes) else ():
            for dirpath, _, names in sorted(os.walk(root)):
                files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
        return get_hash_for_files(tuple(files), repr((self.token_inputs, self.options)))


def _rewrite_in_place(gm: fx.GraphModule, split: fx.GraphModule, order: list[str]) -> None:
    """Replace gm's body by the split graph's nodes, in `order`; placeholders stay (Inductor holds
    them), fake values are propagated again on the real device."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph = gm.graph
    old_phs = [n for n in graph.nodes if n.op == "placeholder"]
    new_nodes = {n.name: n for n in split.graph.nodes}
    new_phs = [n for n in split.graph.nodes if n.op == "placeholder"]
    if [p.name for p in new_phs] != [p.name for p in old_phs]:
        raise TboCompileError("tbo_pass: the split graph changed the placeholders")
    env = dict(zip(new_phs, old_phs))
    for n in reversed(list(graph.nodes)):
        if n.op != "placeholder":
            graph.erase_node(n)
    for name in order:
        n = new_nodes[name]
        if n.op == "get_attr":
            setattr(gm, n.target, getattr(split, n.target))
        env[n] = graph.node_copy(n, lambda a: env[a])
        for key in ("tbo_ubatch", "tbo_stream"):
            env[n].meta.pop(key, None)
    out = next(n for n in split.graph.nodes if n.op == "output")
    graph.output(fx.map_arg(out.args[0], lambda a: env[a]))
    graph.lint()
    vals = [p.meta["val"] for p in old_phs]
    mode = detect_fake_mode(vals)
    FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*vals)
    gm.recompile()


def tbo_pass(token_inputs=None, **options) -> TboInductorPass:
    """TBO's split + schedule for `torch._inductor.config.post_grad_custom_post_pass`. Options as the
    backend's: mode ("prefill" | "decode"), split (True | "auto" | False), tokens_per_request, order,
    profile, strict; `token_inputs`: placeholder names or indices among the user inputs."""
    return TboInductorPass(token_inputs, **options)


__all__ = ["TboInductorPass", "tbo_pass"]
