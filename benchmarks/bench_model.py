"""End-to-end price of batch invariance, and how far each step is from the GPU's physical limit: the MoE
transformer's decode and prefill steps, `torch` vs `batch_invariant` kernels, CUDA-graph decode on and
off, each cell against the roofline (benchmarks/roofline.py) measured in the same run.

    python -m benchmarks.bench_model --out DIR                # GPU; presets large and wide

Cells: decode, one token for each of B sequences over a KV cache holding `context` tokens each (B in
--batch-sizes, context in --contexts); prefill, B sequences of L tokens in one ragged step, no cache
(--prefill-shapes BxL). Decode runs eagerly and through `moe.DecodeGraphs` (a CUDA graph per batch
bucket; --graphs); prefill eagerly. Per cell:

- wall ms: the median over --rounds rounds, in which the variants alternate (so a drift of the host's
  speed hits all alike), of `triton.testing.do_bench`'s median: CUDA events around each step of a
  back-to-back loop, so host time the GPU waits on is counted;
- GPU ms: the device's busy time per step (kernels, copies, memsets) from torch.profiler;
- bytes the step must move and FLOPs it must do (the experts hit counted from the step's own routing);
- the fraction of the bound the wall time reaches: decode against the HBM bound (bytes / measured
  bandwidth), prefill against the bf16 tensor-core bound (FLOPs / measured matmul peak). Both bounds are
  measured at the start of the run (a 2 GiB device-to-device copy, an 8192^3 bf16 torch.mm), never read
  from a datasheet. `frac_of_bound_gpu` gives the same against GPU ms.

A decode cell whose cache and stock-attention copies do not fit the free GPU memory is skipped, and the
row says why; a variant that fails (a capture refused, out of memory) keeps its row with the error.
Writes to --out: bench_model.json and .csv (every cell, the measured bounds, device, torch and triton
versions), bench_model_roofline.png (fraction of the bound vs batch size, a panel per preset and
context) and bench_model_summary.txt (printed too: batch_invariant / torch wall per cell, their
geometric mean, the fractions of the bound).

    python -m benchmarks.bench_model --profile large:decode:256 small:decode:1 --out DIR

profiles those cases instead (torch.profiler, both backends, the eager step of the benchmark, at
--context, default 1024, and --prefill-len, default 256): per backend the host and kernel time per
step, kernel launches and host-sync events per step, and the top kernels by total GPU time, in
DIR/profile_<preset>_<mode>_B<B>.txt (printed) with a Chrome trace beside it.

`--device cpu` runs the same benchmark on the CPU (kernels under Triton's interpreter: a smoke run of a
tiny preset; the timings and bounds are the CPU's and say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import kernels
import moe
from benchmarks.roofline import (GiB, DeviceBounds, StepCost, assignments, experts_hit, fraction_of_bound,
                                 measure_device_bounds, step_cost)
from moe import KVCache, ModelConfig, MoETransformer

# Steps of small models and at small batch are host-bound (ms of Python per step, a few samples per
# do_bench call) and the host's speed drifts: the variants alternate over rounds, each reports the
# median of its rounds.
ROUNDS = 3
BACKEND_NAMES = {"torch": "stock kernels (torch)", "batch_invariant": "batch-invariant kernels"}
GRAPH_NAMES = {"off": "eager", "on": "CUDA-graph decode (moe.DecodeGraphs)"}
CPU_GRAPH_NAMES = {"off": "eager", "on": "moe.DecodeGraphs' static-buffer step (eager on a CPU)"}
GRAPH_MODES = {"on": ("on",), "off": ("off",), "both": ("off", "on")}


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


@dataclass(frozen=True)
class Shape:
    preset: str
    mode: str       # "decode" or "prefill"
    batch: int      # sequences
    seq_len: int    # new tokens per sequence (1 at decode)
    context: int    # cached tokens per sequence before the step (0 at prefill)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        if self.mode == "decode":
            return f"{self.preset} decode B={self.batch} ctx={self.context}"
        return f"{self.preset} prefill {self.batch}x{self.seq_len}"


@dataclass(frozen=True)
class Settings:
    bounds: DeviceBounds
    rounds: int = ROUNDS
    graph_modes: tuple[str, ...] = ("off", "on")   # decode variants: eager, DecodeGraphs
    gpu_time: bool = True   # profile each variant after its timing rounds, for its GPU busy time


def shape_of(row: dict) -> Shape:
    return Shape(*(row[f.name] for f in dataclasses.fields(Shape)))


def build_model(preset: str, max_len: int, device: str | torch.device) -> MoETransformer:
    return MoETransformer(ModelConfig.from_name(preset, max_seq_len=max_len), device=device)


def decode_inputs(model: MoETransformer, B: int,
                  context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
    """tokens [B], cu_seqlens [B+1], slots [B] and a cache of B+1 slots of context+1 positions (the last
    slot is DecodeGraphs' padding slot, never a real sequence's)."""
    dev = model.device
    g = torch.Generator().manual_seed(B)
    tokens = torch.randint(0, model.cfg.vocab_size, (B,), generator=g).to(dev)
    return tokens, torch.arange(B + 1, device=dev), torch.arange(B, device=dev), model.new_cache(B + 1, context + 1)


def prefill_inputs(model: MoETransformer, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B*L] of B sequences of L tokens, cu_seqlens [B+1]."""
    g = torch.Generator().manual_seed(B * L)
    tokens = torch.randint(0, model.cfg.vocab_size, (B * L,), generator=g).to(model.device)
    return tokens, torch.arange(B + 1, device=model.device) * L


def cost_of(model: MoETransformer, shape: Shape, tokens: torch.Tensor, routings) -> StepCost:
    return step_cost(model.cfg, [shape.seq_len] * shape.batch, [shape.context] * shape.batch,
                     experts_hit(routings), assignments(routings), int(tokens.unique().numel()),
                     model.dtype.itemsize)


def decode_memory_shortfall(model: MoETransformer, B: int, context: int) -> Optional[str]:
    """Why a decode cell cannot fit the free GPU memory (None if it can, and always on the CPU): its
    cache, plus twice the stock attention's per-layer copy of the batch's keys and values (one live in
    the eager step, one held by the stock backend's graph pool), plus 1 GiB of working space."""
    if model.device.type != "cuda":
        return None
    cfg, elt = model.cfg, model.dtype.itemsize
    kv_row = 2 * cfg.n_kv_heads * cfg.head_dim * elt                       # keys and values of one position
    cache = cfg.n_layers * (B + 1) * (context + 1) * kv_row
    need = cache + 2 * B * (context + 1) * kv_row + GiB
    free, _ = torch.cuda.mem_get_info(model.device)
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    if need <= free:
        return None
    return f"skipped: needs ~{need / GiB:.1f} GiB (cache {cache / GiB:.1f} GiB), {free / GiB:.1f} GiB free"


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


def make_row(shape: Shape, backend: str, graphs: str, cost: Optional[StepCost], hit: Optional[list[int]],
             bounds: DeviceBounds, status: str, timing: Optional[tuple[list[float], Optional[float]]]) -> dict:
    """One cell's row; cost and hit (distinct experts per layer) are None where the step never ran, timing
    (rounds' ms, GPU ms) where it was not timed."""
    row = dict(dataclasses.asdict(shape), backend=backend, graphs=graphs, status=status, wall_ms=None,
               gpu_ms=None, tokens_per_s=None, bytes=None, flops=None, experts_hit_per_layer=None,
               hbm_bound_ms=None, tc_bound_ms=None, bound="hbm" if shape.mode == "decode" else "tensor_core",
               frac_of_bound=None, frac_of_bound_gpu=None, cost=None, experts_hit=hit, rounds_ms=None)
    if cost is not None:
        row.update(bytes=cost.bytes, flops=cost.flops, cost=dataclasses.asdict(cost),
                   experts_hit_per_layer=sum(hit) / len(hit),
                   hbm_bound_ms=bounds.hbm_ms(cost.bytes), tc_bound_ms=bounds.matmul_ms(cost.flops))
    if timing is not None and cost is not None:
        rounds_ms, gpu_ms = timing
        wall = statistics.median(rounds_ms)
        bound_ms = row["hbm_bound_ms"] if shape.mode == "decode" else row["tc_bound_ms"]
        row.update(wall_ms=wall, gpu_ms=gpu_ms, tokens_per_s=shape.tokens / wall * 1e3,
                   rounds_ms=[round(t, 4) for t in rounds_ms], frac_of_bound=fraction_of_bound(bound_ms, wall),
                   frac_of_bound_gpu=None if gpu_ms is None else fraction_of_bound(bound_ms, gpu_ms))
    return row


def decode_step(run: Callable[[], object], cache: KVCache, context: int) -> Callable[[], object]:
    """The timed decode step: every sequence back at `context` cached tokens, then one token each."""
    def step():
        cache.lengths.fill_(context)
        return run()
    return step


def bench_decode(model: MoETransformer, shape: Shape, settings: Settings) -> list[dict]:
    """One decode cell per (backend, graphs): the same tokens, slots and cache, its lengths reset to
    `context` before every step so that each step is token `context` of every sequence."""
    bounds, graph_modes = settings.bounds, settings.graph_modes
    variants = [(b, g) for b in kernels.BACKENDS for g in graph_modes]
    shortfall = decode_memory_shortfall(model, shape.batch, shape.context)
    if shortfall:
        print(f"{shape.label:34} {shortfall}", flush=True)
        return [make_row(shape, b, g, None, None, bounds, shortfall, None) for b, g in variants]
    context = shape.context
    try:
        tokens, cu, slots, cache = decode_inputs(model, shape.batch, context)
    except torch.OutOfMemoryError as e:   # the estimate above was too kind
        free_memory(model.device)
        return [make_row(shape, b, g, None, None, bounds, failure(e), None) for b, g in variants]
    costs: dict[str, StepCost] = {}
    hits: dict[str, list[int]] = {}
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    status: dict[tuple[str, str], str] = {}
    for backend in kernels.BACKENDS:
        try:
            with kernels.use_backend(backend):
                cache.lengths.fill_(context)
                _, routings = model(tokens, cu, cache, slots)   # the step's routing, for its accounting
        except Exception as e:   # out of memory, most likely: recorded, and the run goes on
            status.update({(backend, g): failure(e) for g in graph_modes})
            free_memory(model.device)
            continue
        costs[backend], hits[backend] = cost_of(model, shape, tokens, routings), experts_hit(routings)
        for graphs in graph_modes:
            key = (backend, graphs)
            if graphs == "off":
                fns[key] = decode_step(lambda: model(tokens, cu, cache, slots), cache, context)
            elif not hasattr(moe, "DecodeGraphs"):
                status[key] = "graphs unavailable"
            else:
                try:  # one per backend, each capturing its own kernels on first use
                    graphed = partial(moe.DecodeGraphs(model, cache).step, tokens, slots)
                    fns[key] = decode_step(graphed, cache, context)
                except ValueError as e:
                    status[key] = failure(e)
    timed = measure(fns, status, settings, model.device)
    rows = [make_row(shape, b, g, costs.get(b), hits.get(b), bounds, status.get((b, g), "ok"),
                     timed.get((b, g))) for b, g in variants]
    print_rows(rows)
    return rows


def bench_prefill(model: MoETransformer, shape: Shape, settings: Settings) -> list[dict]:
    """One prefill cell per backend: B sequences of L tokens in one ragged step (a fresh cache each call,
    as the model makes one without a cache)."""
    tokens, cu = prefill_inputs(model, shape.batch, shape.seq_len)
    costs, hits, fns, status = {}, {}, {}, {}
    for backend in kernels.BACKENDS:
        try:
            with kernels.use_backend(backend):
                _, routings = model(tokens, cu)
            costs[backend], hits[backend] = cost_of(model, shape, tokens, routings), experts_hit(routings)
            fns[(backend, "off")] = lambda: model(tokens, cu)
        except Exception as e:  # out of memory, most likely: recorded, and the run goes on
            status[(backend, "off")] = failure(e)
            free_memory(model.device)
    timed = measure(fns, status, settings, model.device)
    rows = [make_row(shape, b, "off", costs.get(b), hits.get(b), settings.bounds, status.get((b, "off"), "ok"),
                     timed.get((b, "off"))) for b in kernels.BACKENDS]
    print_rows(rows)
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        shape = shape_of(r)
        head = f"{shape.label:34} {r['backend']:16} graphs {r['graphs']:3}"
        if r["wall_ms"] is None:
            print(f"{head} {r['status']}", flush=True)
            continue
        gpu = "    n/a" if r["gpu_ms"] is None else f"{r['gpu_ms']:9.3f}"
        print(f"{head} wall {r['wall_ms']:9.3f} ms  GPU {gpu} ms  {r['tokens_per_s']:11.1f} tok/s  "
              f"{r['bytes'] / 1e9:7.3f} GB {r['flops'] / 1e9:9.1f} GFLOP  "
              f"{100 * r['frac_of_bound']:5.1f}% of the {r['bound']} bound", flush=True)


def bench_preset(preset: str, batch_sizes: Sequence[int], contexts: Sequence[int],
                 prefill_shapes: Sequence[tuple[int, int]], device: torch.device, settings: Settings) -> list[dict]:
    max_len = max([c + 1 for c in contexts] + [L for _, L in prefill_shapes] + [1])
    model = build_model(preset, max_len, device)
    rows = []
    for context in contexts:
        for B in batch_sizes:   # growing caches: a cell that does not fit comes last
            rows += bench_decode(model, Shape(preset, "decode", B, 1, context), settings)
            free_memory(device)
    for B, L in prefill_shapes:
        rows += bench_prefill(model, Shape(preset, "prefill", B, L, 0), settings)
        free_memory(device)
    del model
    free_memory(device)
    return rows


# ---- summary, files and plot


def ratios(rows: list[dict]) -> list[dict]:
    """batch_invariant / torch wall time of every cell measured on both backends."""
    key_fields = ("preset", "mode", "batch", "seq_len", "context", "graphs")
    by_key = {(tuple(r[f] for f in key_fields), r["backend"]): r for r in rows if r["wall_ms"] is not None}
    out = []
    for (key, backend), r in by_key.items():
        stock = by_key.get((key, "torch"))
        if backend == "batch_invariant" and stock is not None:
            out.append(dict(zip(key_fields, key), torch_ms=stock["wall_ms"], invariant_ms=r["wall_ms"],
                            ratio=r["wall_ms"] / stock["wall_ms"], frac_torch=stock["frac_of_bound"],
                            frac_invariant=r["frac_of_bound"]))
    return out


def geomean(xs: Sequence[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_text(rows: list[dict], meta: dict) -> str:
    b = meta["bounds"]
    lines = [f"bench_model on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})",
             f"measured in this run: HBM {b['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{b['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({b['how']})",
             "fraction of bound = bound time / wall time: decode against the HBM bound (bytes / bandwidth), "
             "prefill against the bf16 tensor-core bound (FLOPs / peak)", "",
             f"{'cell':34} {'graphs':6} {'torch ms':>9} {'inv ms':>9} {'inv/torch':>9} "
             f"{'torch frac':>10} {'inv frac':>9}"]
    rat = ratios(rows)
    for r in rat:
        lines.append(f"{shape_of(r).label:34} {r['graphs']:6} {r['torch_ms']:9.3f} {r['invariant_ms']:9.3f} "
                     f"{r['ratio']:9.3f} {100 * r['frac_torch']:9.1f}% {100 * r['frac_invariant']:8.1f}%")
    lines.append("")
    groups = (("all cells", lambda r: True),
              ("decode, eager", lambda r: r["mode"] == "decode" and r["graphs"] == "off"),
              ("decode, graphs", lambda r: r["mode"] == "decode" and r["graphs"] == "on"),
              ("prefill", lambda r: r["mode"] == "prefill"))
    for name, sel in ((name, [r for r in rat if keep(r)]) for name, keep in groups):
        g = geomean([r["ratio"] for r in sel])
        if g is not None:
            lines.append(f"geometric mean of batch_invariant / torch wall, {name}: {g:.3f} over {len(sel)} cells")
    for mode in ("decode", "prefill"):
        measured = [r for r in rows if r["mode"] == mode and r["frac_of_bound"] is not None]
        if measured:
            best = max(measured, key=lambda r: r["frac_of_bound"])
            worst = min(r["frac_of_bound"] for r in measured)
            lines.append(f"{mode}: fraction of the {best['bound']} bound from {100 * worst:.1f}% to "
                         f"{100 * best['frac_of_bound']:.1f}% (best: {shape_of(best).label}, {best['backend']}, "
                         f"graphs {best['graphs']})")
    missing = [r for r in rows if r["wall_ms"] is None]
    if missing:
        lines += ["", "not measured:"]
        lines += [f"  {shape_of(r).label:34} {r['backend']:16} "
                  f"graphs {r['graphs']:3} {r['status']}" for r in missing]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("preset", "mode", "batch", "seq_len", "context", "backend", "graphs", "status", "wall_ms", "gpu_ms",
              "tokens_per_s", "bytes", "flops", "experts_hit_per_layer", "hbm_bound_ms", "tc_bound_ms", "bound",
              "frac_of_bound", "frac_of_bound_gpu")


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    b = meta["bounds"]
    common = dict(hbm_GBps=b["hbm_bytes_per_s"] / 1e9, bf16_TFLOPs=b["matmul_flops_per_s"] / 1e12,
                  device=meta["device"], torch=meta["torch"], triton=meta["triton"])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *common])
        w.writeheader()
        for r in rows:
            out = {k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS}
            out.update(common)
            w.writerow(out)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Fraction of the bound vs batch size: a row of panels per preset, a panel per decode context and
    one for prefill; colour = backend, line style = graphs on/off."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    contexts = sorted({r["context"] for r in rows if r["mode"] == "decode"})
    panels = [("decode", c) for c in contexts] + ([("prefill", 0)] if any(r["mode"] == "prefill" for r in rows) else [])
    fig, axes = plt.subplots(len(presets), len(panels), figsize=(5.2 * len(panels), 3.8 * len(presets)),
                             squeeze=False)
    colours = {"torch": "tab:red", "batch_invariant": "tab:blue"}
    graph_names = CPU_GRAPH_NAMES if meta["device"] == "cpu" else GRAPH_NAMES
    styles = {"off": dict(linestyle="--", marker="o"), "on": dict(linestyle="-", marker="s")}
    for i, preset in enumerate(presets):
        for j, (mode, context) in enumerate(panels):
            ax = axes[i][j]
            cells = [r for r in rows if r["preset"] == preset and r["mode"] == mode and r["context"] == context]
            for backend in kernels.BACKENDS:
                for graphs in ("off", "on"):
                    pts = sorted((r["batch"], r["frac_of_bound"]) for r in cells if r["backend"] == backend
                                 and r["graphs"] == graphs and r["frac_of_bound"] is not None)
                    if pts:
                        ax.plot(*zip(*pts), color=colours[backend], **styles[graphs],
                                label=f"{BACKEND_NAMES[backend]}, {graph_names[graphs]}")
            batches = sorted({r["batch"] for r in cells})
            ax.set_xscale("log", base=2)
            if batches:
                seq_len = {r["batch"]: r["seq_len"] for r in cells}
                ax.set_xticks(batches)
                ax.set_xticklabels([str(B) if mode == "decode" else f"{B}x{seq_len[B]}" for B in batches])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size (sequences)" if mode == "decode" else "prefill shape (sequences x tokens)")
            ax.set_ylabel("fraction of the bound (wall time)")
            ax.set_title(f"{preset}: decode, context {context} (HBM bound)" if mode == "decode"
                         else f"{preset}: prefill (bf16 tensor-core bound)", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    b = meta["bounds"]
    fig.suptitle(f"{meta['device']}: wall time against the roofline; measured HBM {b['hbm_bytes_per_s'] / 1e9:.0f} "
                 f"GB/s (copy), bf16 matmul {b['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (torch.mm)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- profile


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


def parse_prefill_shape(spec: str) -> tuple[int, int]:
    """'BxL', e.g. '16x512': B sequences of L tokens."""
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BxL with positive integers (e.g. 16x512), got {spec!r}")
    return int(parts[0]), int(parts[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_case(preset: str, mode: str, B: int, prefill_len: int, context: int, device: str, out: Path,
                 iters: int = 5, warmup: int = 3, top: int = 25, model: MoETransformer | None = None) -> str:
    """Profile one benchmark step under each backend; write and return the report."""
    # (the profiler imports triton: `import kernels`, at the top, has already set the interpreter switch)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = model or build_model(preset, max(prefill_len, context + 1), device)
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
        events = prof.events()
        kernels_by_name: dict[str, list[float]] = {}
        cpu_self_us, syncs, launches, memcpy = 0.0, {}, 0, 0
        for e in events:
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
        lines += ["", f"== {backend}",
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
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"{name}_{backend}.trace.json"))
    text = "\n".join(lines) + "\n"
    (out / f"{name}.txt").write_text(text)
    return text


# ---- command line


def run(presets: Sequence[str], batch_sizes: Sequence[int], contexts: Sequence[int],
        prefill_shapes: Sequence[tuple[int, int]], graphs: str, rounds: int, device: str, out: Path,
        command: str, gc_off: bool = False, gpu_time: bool = True) -> tuple[list[dict], dict]:
    """Measure the device's bounds, then every cell of every preset; write the results to `out`."""
    dev = torch.device(device)
    if dev.type == "cuda":   # the bounds of the GPU; on the CPU, sizes a smoke run affords
        bounds = measure_device_bounds(dev, lambda fn: time_ms(fn, dev))
    else:
        bounds = measure_device_bounds(dev, lambda fn: time_ms(fn, dev), copy_bytes=64 << 20, mm_n=512)
    import triton
    meta = dict(command=command, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__, bounds=dataclasses.asdict(bounds),
                gc_off=gc_off, rounds=rounds, graphs=graphs, gpu_time=gpu_time,
                decode_graphs_available=hasattr(moe, "DecodeGraphs"))
    print(f"{meta['device']}: HBM {bounds.hbm_bytes_per_s / 1e9:.0f} GB/s, bf16 matmul "
          f"{bounds.matmul_flops_per_s / 1e12:.3g} TFLOP/s, measured ({bounds.how})", flush=True)
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        settings = Settings(bounds, rounds, GRAPH_MODES[graphs], gpu_time)
        rows = [r for p in presets for r in bench_preset(p, batch_sizes, contexts, prefill_shapes, dev, settings)]
    finally:
        if gc_off:
            gc.enable()
    rat = ratios(rows)
    meta["geomean_ratio"] = geomean([r["ratio"] for r in rat])
    summary = summary_text(rows, meta)
    print("\n" + summary, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=rat, summary=summary),
                                                     indent=2))
    write_csv(out / "bench_model.csv", rows, meta)
    (out / "bench_model_summary.txt").write_text(summary)
    plot(rows, meta, out / "bench_model_roofline.png")
    return rows, meta


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--presets", nargs="+", default=["large", "wide"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64, 256], help="decode batch sizes")
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192], help="decode contexts (cached tokens)")
    ap.add_argument("--context", type=int, default=None,
                    help="one decode context instead of --contexts; also --profile's context (default 1024)")
    ap.add_argument("--prefill-shapes", nargs="*", type=parse_prefill_shape, default=[(1, 4096), (16, 512)],
                    metavar="BxL", help="prefill cells: B sequences of L tokens (none: no prefill)")
    ap.add_argument("--prefill-len", type=int, default=None,
                    help="prefill B x this at every --batch-sizes instead of --prefill-shapes; also "
                         "--profile's prefill length (default 256)")
    ap.add_argument("--graphs", choices=tuple(GRAPH_MODES), default="both",
                    help="decode with moe.DecodeGraphs (on), eagerly (off) or both")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="timing rounds, variants alternating")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run (Triton's interpreter), timings meaningless for a GPU")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--profile", nargs="+", type=parse_case, default=[], metavar="PRESET:MODE:B",
                    help="profile these cases (e.g. large:decode:256) instead of running the benchmark")
    ap.add_argument("--no-gpu-time", action="store_true",
                    help="skip the profiler pass that gives each cell its GPU busy time (a check: do the "
                         "profiler sessions between cells move the wall times?)")
    ap.add_argument("--gc-off", action="store_true",
                    help="switch Python's cyclic garbage collector off while timing (a check: do GC pauses "
                         "explain rounds that are much slower than the others?)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model needs a CUDA GPU (--device cpu runs a smoke run on the CPU)")
    if args.profile:
        for preset, mode, B in args.profile:
            print(profile_case(preset, mode, B, args.prefill_len or 256, args.context or 1024, args.device,
                               args.out), flush=True)
            free_memory(torch.device(args.device))
        return
    contexts = [args.context] if args.context is not None else args.contexts
    prefill = ([(B, args.prefill_len) for B in args.batch_sizes] if args.prefill_len is not None
               else args.prefill_shapes)
    command = "python -m benchmarks.bench_model " + " ".join(sys.argv[1:] if argv is None else argv)
    run(args.presets, args.batch_sizes, contexts, prefill, args.graphs, args.rounds, args.device, args.out,
        command, args.gc_off, not args.no_gpu_time)


if __name__ == "__main__":
    main()
