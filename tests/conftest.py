"""Fixtures for the model and loader tests: one tiny checkpoint per architecture per session."""
import pytest
import torch

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
