"""How bench_model times a cell's variants: rounds in which the variants alternate, do_bench's median per
round, then each variant's GPU busy time from torch.profiler. A variant that fails is recorded and the
others go on."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from detmoe import kernels
from benchmarks.roofline import DeviceBounds

# Steps of small models and at small batch are host-bound (ms of Python per step, a few samples per
# do_bench call) and the host's speed drifts: the variants alternate over rounds, each reports the
# median of its rounds.
ROUNDS = 3


@dataclass(frozen=True)
class Settings:
    bounds: DeviceBounds
    rounds: int = ROUNDS
    graph_modes: tuple[str, ...] = ("off", "on")   # decode variants: eager, DecodeGraphs
    gpu_time: bool = True   # profile each variant after its timing rounds, for its GPU busy time


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """fn's time per call in ms: do_bench's median on a GPU; on the CPU (a smoke run) one call after a
    warm-up call."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=120, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def gpu_busy_ms(fn: Callable[[], object], device: torch.device, iters: int = 3) -> Optional[float]:
    """The device's busy time per call (every kernel, copy and memset torch.profiler records); None on
    the CPU, or when the profiler recorded no device activity."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:   # device activity only: a short trace
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    busy_us = [e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(busy_us) / iters / 1e3 if busy_us else None


def failure(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(fns: dict[tuple[str, str], Callable[[], object]], status: dict[tuple[str, str], str],
            settings: Settings, device: torch.device) -> dict[tuple[str, str], tuple[list[float], Optional[float]]]:
    """Time each (backend, graphs) variant: rounds of do_bench in which the variants alternate, then its
    GPU busy time. A variant that raises gets its error in `status` and no times."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(settings.rounds):
        for key, fn in fns.items():
            if key in status:
                continue
            try:
                with kernels.use_backend(key[0]):
                    times[key].append(time_ms(fn, device))
            except Exception as e:  # a benchmark of many cells records a failed one and goes on
                status[key] = failure(e)
                print(f"    {key[0]} graphs {key[1]}: {status[key]}", flush=True)
                free_memory(device)
    out = {}
    for key, fn in fns.items():
        if key not in status:
            try:
                with kernels.use_backend(key[0]):
                    gpu_ms = gpu_busy_ms(fn, device) if settings.gpu_time else None
            except Exception as e:   # the wall times stand without it
                print(f"    {key[0]} graphs {key[1]}: GPU time not measured, {failure(e)}", flush=True)
                gpu_ms = None
            out[key] = (times[key], gpu_ms)
    return out
