"""tbo-compiler: Two-Batch Overlap for MoE models as a compiler pass.

    torch.compile(model, backend="tbo")                       # the dynamo backend
    tbo-compile MODEL_DIR -o plan.pt                          # the CLI
    run = tbo_compiler.load_plan("plan.pt", MODEL_DIR)        # plan -> callable like the model
    torch.compile(model, backend="inductor",                  # inside an engine's own compile
                  options={"post_grad_custom_post_pass": tbo_compiler.tbo_pass()})

Every error the project raises on bad input is a `tbo_compiler.TboError`.
"""
from tbo_compiler.version import __version__  # noqa: F401
from tbo_compiler import runtime  # noqa: E402,F401  (binds the implementations of the tbo ops)
from tbo_compiler.ops.errors import TboError  # noqa: E402
from tbo_compiler.passes.pipeline import TboFallbackWarning  # noqa: E402
from tbo_compiler.passes.token_axis import declare_op  # noqa: E402


def load_plan(plan_path, model_dir, **kw):
    from tbo_compiler.load import load_plan as _load

    return _load(plan_path, model_dir, **kw)


def tbo_pass(token_inputs=None, **options):
    """TBO's split + schedule as an Inductor custom graph pass (tbo_compiler/inductor_pass.py)."""
    from tbo_compiler.inductor_pass import tbo_pass as _pass   # imports torch._inductor: lazily

    return _pass(token_inputs, **options)


__all__ = ["load_plan", "tbo_pass", "declare_op", "TboError", "TboFallbackWarning", "__version__"]
