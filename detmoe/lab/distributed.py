"""The apps on several processes: `torchrun --nproc_per_node W -m detmoe.experiments.<app> ... layout=ep`
(layout names: `LAYOUT_NAMES`; e.g. ep2xtp2 on 4 ranks: experts over 2 pairs, each expert split in a pair).

torchrun sets the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); the first call of
`layout_named` joins the process group (NCCL on GPUs, gloo on CPUs), and every rank runs the same cells
on the same inputs. Only rank 0 writes results (`is_main`). Give every rank the same run directory
(`hydra.run.dir=...`): Hydra names it by the clock, which the ranks may read a second apart.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from detmoe.moe.parallel import EXPERT_LAYOUTS, Layout

# none: one device; ep / tp: attention "tp" with those experts; epGxtpP (e.g. ep2xtp2): experts over G
# groups of P ranks, each expert split over its group's P ranks (G * P = the ranks of the launch)
LAYOUT_NAMES = ("none",) + EXPERT_LAYOUTS + ("epGxtpP",)
_TWO_D = re.compile(r"ep([1-9][0-9]*)xtp([1-9][0-9]*)")


def check_layout(name: Optional[str], key: str = "layout") -> None:
    """A layout name (`key` is its config key, for the message) that this launch can run, else a ValueError:
    the apps check every layout of their config before any work (detmoe/lab/config_checks.py)."""
    if name in (None, "none"):
        return
    if name not in EXPERT_LAYOUTS and not (isinstance(name, str) and _TWO_D.fullmatch(name)):
        raise ValueError(f"{key} must be one of {LAYOUT_NAMES} (G, P: positive ints), got {name!r}")
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"{key}={name!r} needs several processes: launch with torchrun "
                         "(e.g. torchrun --nproc_per_node 2 -m detmoe.experiments.rl_consistency ...)")


def layout_named(name: Optional[str]) -> Optional[Layout]:
    """None for "none"/None; else a Layout over all ranks (attention "tp", experts `name`)."""
    check_layout(name)
    if name in (None, "none"):
        return None
    two_d = _TWO_D.fullmatch(name)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for CUDA tensors, gloo for CPU ones (a model on the CPU of a GPU host)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if two_d is None:
        return Layout(attention="tp", experts=name)
    groups, expert_tp = int(two_d[1]), int(two_d[2])
    if groups * expert_tp != dist.get_world_size():
        raise ValueError(f"layout={name!r} needs {groups} x {expert_tp} = {groups * expert_tp} ranks, "
                         f"the launch has {dist.get_world_size()}")
    return Layout(attention="tp", experts="ep", expert_tp=expert_tp)


def is_main() -> bool:
    """True on the one process that writes results (rank 0 of a launch, or the only process)."""
    return dist.get_rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"
