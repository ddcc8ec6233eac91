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
Writes to --out: bench_model.json and .csv (every cell, the measured bounds, the run's record: command,
device, torch and triton versions, date, git commit), meta.json (that record, detmoe/lab/run_meta.py),
bench_model_roofline.png (fraction of the bound vs batch size, a panel per preset and
context) and bench_model_summary.txt (printed too: batch_invariant / torch wall per cell, their
geometric mean, the fractions of the bound).

    python -m benchmarks.bench_model --profile large:decode:256 small:decode:1 --out DIR

profiles those cases instead (torch.profiler, both backends, the eager step of the benchmark, at
--context, default 1024, and --prefill-len, default 256): per backend the host and kernel time per
step, kernel launches and host-sync events per step, and the top kernels by total GPU time, in
DIR/profile_<preset>_<mode>_B<B>.txt (printed) with a Chrome trace beside it, and DIR/meta.json.

`--device cpu` runs the same benchmark on the CPU (kernels under Triton's interpreter: a smoke run of a
tiny preset; the timings and bounds are the CPU's and say nothing about a GPU).

The pieces: benchmarks/bench_steps.py (the steps and their inputs), benchmarks/bench_timing.py (how a
cell's variants are timed), benchmarks/bench_report.py (ratios, summary, CSV, plot),
benchmarks/profile_step.py (--profile) and benchmarks/roofline.py (bytes, FLOPs, the measured bounds);
this file builds the cells, runs them and holds the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from detmoe import kernels
from detmoe import moe
from benchmarks.bench_report import geomean, plot, ratios, summary_text, write_csv
from detmoe.lab.run_meta import run_meta, write_meta
from benchmarks.bench_steps import Shape, build_model, decode_inputs, decode_step, prefill_inputs, shape_of
from benchmarks.bench_timing import ROUNDS, Settings, failure, free_memory, measure, time_ms
from benchmarks.profile_step import parse_case, profile_case
from benchmarks.roofline import (GiB, DeviceBounds, StepCost, assignments, experts_hit, fraction_of_bound,
                                 measure_device_bounds, step_cost)
from detmoe.moe import MoETransformer

GRAPH_MODES = {"on": ("on",), "off": ("off",), "both": ("off", "on")}


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


# ---- command line


def parse_prefill_shape(spec: str) -> tuple[int, int]:
    """'BxL', e.g. '16x512': B sequences of L tokens."""
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BxL with positive integers (e.g. 16x512), got {spec!r}")
    return int(parts[0]), int(parts[1])


def run(presets: Sequence[str], batch_sizes: Sequence[int], contexts: Sequence[int],
        prefill_shapes: Sequence[tuple[int, int]], graphs: str, rounds: int, device: str, out: Path,
        command: str, gc_off: bool = False, gpu_time: bool = True) -> tuple[list[dict], dict]:
    """Measure the device's bounds, then every cell of every preset; write the results to `out`."""
    dev = torch.device(device)
    if dev.type == "cuda":   # the bounds of the GPU; on the CPU, sizes a smoke run affords
        bounds = measure_device_bounds(dev, lambda fn: time_ms(fn, dev))
    else:
        bounds = measure_device_bounds(dev, lambda fn: time_ms(fn, dev), copy_bytes=64 << 20, mm_n=512)
    record = run_meta(command=command, device=dev)
    meta = dict(record, bounds=dataclasses.asdict(bounds), gc_off=gc_off, rounds=rounds, graphs=graphs,
                gpu_time=gpu_time, decode_graphs_available=hasattr(moe, "DecodeGraphs"))
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
    write_meta(out, record)
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
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/model_step/bench_model"))
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
    command = "python -m benchmarks.bench_model " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.profile:
        write_meta(args.out, run_meta(command=command, device=args.device))
        for preset, mode, B in args.profile:
            print(profile_case(preset, mode, B, args.prefill_len or 256, args.context or 1024, args.device,
                               args.out), flush=True)
            free_memory(torch.device(args.device))
        return
    contexts = [args.context] if args.context is not None else args.contexts
    prefill = ([(B, args.prefill_len) for B in args.batch_sizes] if args.prefill_len is not None
               else args.prefill_shapes)
    run(args.presets, args.batch_sizes, contexts, prefill, args.graphs, args.rounds, args.device, args.out,
        command, args.gc_off, not args.no_gpu_time)


if __name__ == "__main__":
    main()
