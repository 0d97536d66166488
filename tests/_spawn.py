"""Spawned ``torch.distributed`` processes for tests: gloo on 127.0.0.1, one thread each."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfatorch.distributed import _free_port


def spawn(fn: Any, world: int, *args: Any, default_dtype: torch.dtype | None = None) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group."""
    port = _free_port()
    mp.start_processes(_entry, args=(fn, world, port, args, default_dtype), nprocs=world,
                       start_method="spawn", join=True)  # fmt: skip


def _entry(rank: int, fn: Any, world: int, port: int, args: tuple[Any, ...],
           default_dtype: torch.dtype | None) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    if default_dtype is not None:
        torch.set_default_dtype(default_dtype)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # leave together (see dfatorch.distributed.process_group)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
