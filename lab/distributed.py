"""The apps on several processes: `torchrun --nproc_per_node W -m experiments.<app> ... layout=ep`.

torchrun sets the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); the first call of
`layout_named` joins the process group (NCCL on GPUs, gloo on CPUs), and every rank runs the same cells
on the same inputs. Only rank 0 writes results (`is_main`). Give every rank the same run directory
(`hydra.run.dir=...`): Hydra names it by the clock, which the ranks may read a second apart.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from moe.parallel import EXPERT_LAYOUTS, Layout

LAYOUT_NAMES = ("none",) + EXPERT_LAYOUTS   # none: one device; ep / tp: attention "tp" with those experts


def layout_named(name: Optional[str]) -> Optional[Layout]:
    """None for "none"/None; else a Layout over all ranks (attention "tp", experts `name`)."""
    if name in (None, "none"):
        return None
    if name not in EXPERT_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUT_NAMES}, got {name!r}")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(f"layout={name!r} needs several processes: launch with torchrun "
                             "(e.g. torchrun --nproc_per_node 2 -m experiments.rl_consistency ...)")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for CUDA tensors, gloo for CPU ones (a model on the CPU of a GPU host)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Layout(attention="tp", experts=name)


def is_main() -> bool:
    """True on the one process that writes results (rank 0 of a launch, or the only process)."""
    return dist.get_rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"
