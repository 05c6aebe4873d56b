"""Fake `mori.shmem`: shmem_torch_process_group_init(name) takes the process group that
torch has registered under `name` (torch._C._distributed_c10d._register_process_group)."""
from __future__ import annotations

import torch

from fakes import check
from fakes.mori import CALLS

STATE: dict = {}


def shmem_torch_process_group_init(group_name: str) -> None:
    CALLS.append({"op": None, "fn": "shmem_torch_process_group_init", "args": {"group_name": group_name}})
    check(isinstance(group_name, str), "group_name: a str")
    check("pg" not in STATE, "shmem is already initialised")
    STATE.update(pg=torch._C._distributed_c10d._resolve_process_group(group_name), name=group_name)


def shmem_finalize() -> None:
    CALLS.append({"op": None, "fn": "shmem_finalize", "args": {}})
    check("pg" in STATE, "shmem_finalize without init")
    STATE.clear()
