"""tbo-compiler: Two-Batch Overlap for MoE models as a compiler pass.

    torch.compile(model, backend="tbo")                       # the dynamo backend
    tbo-compile MODEL_DIR -o plan.pt                          # the CLI
    run = tbo_compiler.load_plan("plan.pt", MODEL_DIR)        # plan -> callable like the model
"""
__version__ = "0.1.0"


def load_plan(plan_path, model_dir, **kw):
    from tbo_compiler.compile import load_plan as _load

    return _load(plan_path, model_dir, **kw)


__all__ = ["load_plan", "__version__"]
