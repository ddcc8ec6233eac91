"""bench_model's --profile: where one benchmark step's time goes under each backend. torch.profiler over
the eager step bench_model times; per backend the host and kernel time per step, kernel launches and
host-sync events per step, and the top kernels by total GPU time (on a CPU, the top ops by self time),
written to OUT/profile_<preset>_<mode>_B<B>.txt with a Chrome trace per backend beside it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from detmoe import kernels
from benchmarks.bench_steps import build_model, decode_inputs, decode_step, prefill_inputs
from detmoe.moe import MoETransformer

# host-side events that stall the host until the GPU catches up (or mark a value read back)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def parse_case(spec: str) -> tuple[str, str, int]:
    """'PRESET:MODE:B', e.g. 'large:decode:256'."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in ("prefill", "decode") or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"expected PRESET:prefill|decode:B (e.g. large:decode:256), got {spec!r}")
    return parts[0], parts[1], int(parts[2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_report(backend: str, prof: "torch.profiler.profile", wall: float, iters: int, top: int) -> list[str]:
    """One backend's section of the report, from a profile of `iters` steps and the unprofiled wall ms
    per step."""
    from torch.autograd import DeviceType
    kernels_by_name: dict[str, list[float]] = {}
    cpu_self_us, syncs, launches, memcpy = 0.0, {}, 0, 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels_by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
            continue
        cpu_self_us += e.self_cpu_time_total
        if e.name in SYNC_EVENTS:
            syncs[e.name] = syncs.get(e.name, 0) + 1
        launches += e.name in LAUNCH_EVENTS
        memcpy += e.name.startswith("cudaMemcpy")
    gpu_ms = sum(sum(v) for v in kernels_by_name.values()) / iters / 1e3
    n_kernels = sum(len(v) for v in kernels_by_name.values()) / iters
    lines = ["", f"== {backend}",
             f"host wall per step (not profiled) {wall:9.3f} ms",
             f"CPU self time per step (profiled; all ops and runtime calls) {cpu_self_us / iters / 1e3:9.3f} ms",
             f"GPU kernel time per step {gpu_ms:9.3f} ms  ({n_kernels:.0f} kernels; "
             f"GPU busy {100 * gpu_ms / wall if wall else 0:.0f}% of the unprofiled wall time)",
             f"kernel launch calls per step {launches / iters:.0f}, cudaMemcpy* calls per step {memcpy / iters:.0f}",
             "host-sync events per step: " + (", ".join(f"{k} {v / iters:g}" for k, v in sorted(syncs.items()))
                                              or "none recorded")]
    if kernels_by_name:
        lines += [f"top {top} kernels by total GPU time:",
                  f"{'total ms/step':>13} {'share':>6} {'calls/step':>10} {'avg us':>9}  kernel"]
        ranked = sorted(kernels_by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        for kname, ts in ranked:
            total = sum(ts) / iters / 1e3
            lines.append(f"{total:13.3f} {100 * total / gpu_ms:5.1f}% {len(ts) / iters:10.1f} "
                         f"{sum(ts) / len(ts):9.1f}  {kname[:140]}")
    else:
        lines += ["top CPU ops by self time (no GPU in this run):"]
        lines += [f"  {line}" for line in prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=top).splitlines()]
    return lines


def profile_case(preset: str, mode: str, B: int, prefill_len: int, context: int, device: str, out: Path,
                 iters: int = 5, warmup: int = 3, top: int = 25, model: MoETransformer | None = None) -> str:
    """Profile one benchmark step under each backend; write and return the report."""
    # (the profiler imports triton: `import kernels`, at the top, has already set the interpreter switch)
    from torch.profiler import ProfilerActivity, profile

    model = model or build_model(preset, max(prefill_len, context + 1), device)
    fn: Callable[[], object]
    if mode == "decode":
        tokens, cu, slots, cache = decode_inputs(model, B, context)
        fn = decode_step(lambda: model(tokens, cu, cache, slots), cache, context)
    else:
        tokens, cu = prefill_inputs(model, B, prefill_len)
        fn = lambda: model(tokens, cu)  # noqa: E731
    dev = model.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    name = f"profile_{preset}_{mode}_B{B}"
    lines = [f"{preset} {mode} B={B} (prefill_len={prefill_len}, context={context}) on "
             f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}; "
             f"per step, mean of {iters} profiled steps after {warmup} warm-up steps"]
    for backend in kernels.BACKENDS:
        with kernels.use_backend(backend):
            for _ in range(warmup):
                fn()
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(dev)
            wall = (time.perf_counter() - t0) / iters * 1e3
            with profile(activities=activities) as prof:
                for _ in range(iters):
                    fn()
                _sync(dev)
        lines += backend_report(backend, prof, wall, iters, top)
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"{name}_{backend}.trace.json"))
    text = "\n".join(lines) + "\n"
    (out / f"{name}.txt").write_text(text)
    return text
