"""tbo-compiler: Two-Batch Overlap for MoE models as a compiler pass.

    torch.compile(model, backend="tbo")                       # the dynamo backend
    tbo-compile MODEL_DIR -o plan.pt                          # the CLI
    run = tbo_compiler.load_plan("plan.pt", MODEL_DIR)        # plan -> callable like the model

Every error the project raises on bad input is a `tbo_compiler.TboError`.
"""
__version__ = "0.2.0"

from tbo_compiler import runtime  # noqa: E402,F401  (binds the implementations of the tbo ops)
from tbo_compiler.ops.errors import TboError  # noqa: E402
from tbo_compiler.passes.pipeline import TboFallbackWarning  # noqa: E402
from tbo_compiler.passes.token_axis import declare_op  # noqa: E402


def load_plan(plan_path, model_dir, **kw):
    from tbo_compiler.compile import load_plan as _load

    return _load(plan_path, model_dir, **kw)


__all__ = ["load_plan", "declare_op", "TboError", "TboFallbackWarning", "__version__"]
