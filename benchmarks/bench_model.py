"""End-to-end price of batch invariance: tokens/s of the MoE transformer, `torch` vs `batch_invariant`,
for prefill and decode at batch sizes 1..256, timed in the same run (GPU).

    python -m benchmarks.bench_model --presets small large --out benchmarks/results

Medians of `triton.testing.do_bench`, over ROUNDS rounds in which the backends alternate. Prefill: B
sequences of --prefill-len tokens in one ragged step. Decode: one token for each of B sequences over a
KV cache of --context tokens. Writes
bench_model.csv / .json (with the command line and device) and prints ratios (batch_invariant / torch).

    python -m benchmarks.bench_model --profile large:decode:256 small:decode:1 --out DIR

profiles those cases instead (torch.profiler, both backends, the same step as the benchmark): per
backend the host and kernel time per step, kernel launches and host-sync events per step, and the top
kernels by total GPU time, in DIR/profile_<preset>_<mode>_B<B>.txt (printed) with a Chrome trace beside it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import kernels
from moe import ModelConfig, MoETransformer


def time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=120, return_mode="median")


# Steps of the small model and at small batch are host-bound (tens of ms of Python per step, a few
# samples per do_bench call), and the host's speed drifts: the backends are timed in alternating rounds
# and each reports the median of its rounds, so a drift hits both alike.
ROUNDS = 4


def build_model(preset: str, prefill_len: int, context: int, device: str) -> MoETransformer:
    return MoETransformer(ModelConfig.from_name(preset, max_seq_len=max(prefill_len, context + 1)), device=device)


def steps(model: MoETransformer, B: int, prefill_len: int, context: int) -> dict[str, Callable[[], None]]:
    """The two timed steps at batch B: `prefill` (B sequences of prefill_len tokens, one ragged step, no
    cache) and `decode` (one token for each of B sequences over a KV cache of `context` tokens)."""
    device, V = model.device, model.cfg.vocab_size
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, V, (B, prefill_len), generator=g).to(device)
    cu_prefill = torch.arange(B + 1, device=device) * prefill_len
    decode_tokens = torch.randint(0, V, (B,), generator=g).to(device)
    cu_decode = torch.arange(B + 1, device=device)
    cache = model.new_cache(B, context + 1)

    def decode_step():
        cache.lengths.fill_(context)  # the same step every time: token `context` of each sequence
        model(decode_tokens, cu_decode, cache)
    return dict(prefill=lambda: model(prompts.flatten(), cu_prefill), decode=decode_step)


def bench_preset(preset: str, batch_sizes: list[int], prefill_len: int, context: int, device: str) -> list[dict]:
    model = build_model(preset, prefill_len, context, device)
    rows = []
    for B in batch_sizes:
        fns = steps(model, B, prefill_len, context)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for backend in kernels.BACKENDS:
                with kernels.use_backend(backend):
                    for mode, fn in fns.items():
                        times.setdefault((backend, mode), []).append(time_ms(fn))
        for backend in kernels.BACKENDS:
            t_prefill, t_decode = (statistics.median(times[(backend, m)]) for m in ("prefill", "decode"))
            for mode, t, n in (("prefill", t_prefill, B * prefill_len), ("decode", t_decode, B)):
                rows.append(dict(preset=preset, mode=mode, batch=B, backend=backend, ms=t, tokens_per_s=n / t * 1e3,
                                 rounds_ms=[round(x, 4) for x in times[(backend, mode)]]))
            print(f"{preset:6} B={B:4d} {backend:16} prefill {t_prefill:9.3f} ms  decode {t_decode:8.3f} ms", flush=True)
        fns = None  # free the KV cache before the next batch size
        torch.cuda.empty_cache()
    return rows


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


def profile_case(preset: str, mode: str, B: int, prefill_len: int, context: int, device: str, out: Path,
                 iters: int = 5, warmup: int = 3, top: int = 25, model: MoETransformer | None = None) -> str:
    """Profile one benchmark step under each backend; write and return the report."""
    # (the profiler imports triton: `import kernels`, at the top, has already set the interpreter switch)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = model or build_model(preset, prefill_len, context, device)
    fn = steps(model, B, prefill_len, context)[mode]
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


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    keyed = {(r["preset"], r["mode"], r["batch"], r["backend"]): r["ms"] for r in rows}
    for (preset, mode, B, backend), ms in keyed.items():
        if backend == "batch_invariant":
            out.append(dict(preset=preset, mode=mode, batch=B, ratio=ms / keyed[(preset, mode, B, "torch")]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small", "large"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--profile", nargs="+", type=parse_case, default=[], metavar="PRESET:MODE:B",
                    help="profile these cases (e.g. large:decode:256) instead of running the benchmark")
    ap.add_argument("--gc-off", action="store_true",
                    help="switch Python's cyclic garbage collector off while timing (a check: do GC pauses "
                         "explain rounds that are much slower than the others?)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_model needs a CUDA GPU")
    if args.profile:
        for preset, mode, B in args.profile:
            print(profile_case(preset, mode, B, args.prefill_len, args.context, "cuda", args.out), flush=True)
            torch.cuda.empty_cache()
        return
    if args.gc_off:
        gc.collect()
        gc.disable()
    rows = [r for p in args.presets for r in bench_preset(p, args.batch_sizes, args.prefill_len, args.context, "cuda")]
    rat = ratios(rows)
    print("\nratio batch_invariant / torch (time):")
    for r in rat:
        print(f"  {r['preset']:6} {r['mode']:8} B={r['batch']:4d} {r['ratio']:.3f}")
    geo = math.exp(sum(math.log(r["ratio"]) for r in rat) / len(rat))
    print(f"geometric mean {geo:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python -m benchmarks.bench_model " + " ".join(sys.argv[1:]),
                device=torch.cuda.get_device_name(), torch=torch.__version__, geomean_ratio=geo, gc_off=args.gc_off)
    (args.out / "bench_model.json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=rat), indent=2))
    with open(args.out / "bench_model.csv", "w") as f:
        f.write("preset,mode,batch,backend,ms,tokens_per_s\n")
        for r in rows:
            f.write(f"{r['preset']},{r['mode']},{r['batch']},{r['backend']},{r['ms']:.4f},{r['tokens_per_s']:.1f}\n")


if __name__ == "__main__":
    main()
