"""Fixtures for the model and loader tests: one tiny checkpoint per architecture per session."""
import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy) on CPU tensors; the flag must
# be set before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="tbo" compiles its compute regions with Inductor by default; on CPU that is a C++ compile
# per region (seconds each), so the suite runs the ATen runtime unless a test asks for Inductor
# (tests/test_inductor_path.py does, on tiny graphs). Spawned ranks inherit it.
os.environ.setdefault("TBO_INDUCTOR", "0")

import pytest  # noqa: E402

from tbo_compiler.models import load_model
from tbo_compiler.models.tiny import ARCHS, make_tiny

BLOCK_SIZE = 4  # small, so short requests already span several (non-contiguous) blocks


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    return {arch: load_model(d, dtype=torch.float32, block_size=BLOCK_SIZE) for arch, d in tiny_dirs.items()}
