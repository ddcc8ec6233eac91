"""End-to-end price of batch invariance: tokens/s of the MoE transformer, `torch` vs `batch_invariant`,
for prefill and decode at batch sizes 1..256, timed in the same run (GPU).

    python -m experiments.bench_model --presets small large --out experiments/results

Medians of `triton.testing.do_bench`. Prefill: B sequences of --prefill-len tokens in one ragged step.
Decode: one token for each of B sequences over a KV cache of --context tokens. Writes
bench_model.csv / .json (with the command line and device) and prints ratios (batch_invariant / torch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import kernels
from moe import ModelConfig, MoETransformer


def time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_preset(preset: str, batch_sizes: list[int], prefill_len: int, context: int, device: str) -> list[dict]:
    cfg = ModelConfig.from_name(preset, max_seq_len=max(prefill_len, context + 1))
    model = MoETransformer(cfg, device=device)
    rows = []
    for B in batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, cfg.vocab_size, (B, prefill_len), generator=g).to(device)
        cu_prefill = torch.arange(B + 1, device=device) * prefill_len
        decode_tokens = torch.randint(0, cfg.vocab_size, (B,), generator=g).to(device)
        cu_decode = torch.arange(B + 1, device=device)
        cache = model.new_cache(B, context + 1)
        for backend in kernels.BACKENDS:
            with kernels.use_backend(backend):
                t_prefill = time_ms(lambda: model(prompts.flatten(), cu_prefill))

                def decode_step():
                    cache.lengths.fill_(context)  # the same step every time: token `context` of each sequence
                    model(decode_tokens, cu_decode, cache)
                t_decode = time_ms(decode_step)
            for mode, t, n in (("prefill", t_prefill, B * prefill_len), ("decode", t_decode, B)):
                rows.append(dict(preset=preset, mode=mode, batch=B, backend=backend, ms=t, tokens_per_s=n / t * 1e3))
            print(f"{preset:6} B={B:4d} {backend:16} prefill {t_prefill:9.3f} ms  decode {t_decode:8.3f} ms", flush=True)
        cache = None  # free the KV cache before the next batch size
        torch.cuda.empty_cache()
    return rows


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
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_model needs a CUDA GPU")
    rows = [r for p in args.presets for r in bench_preset(p, args.batch_sizes, args.prefill_len, args.context, "cuda")]
    rat = ratios(rows)
    print("\nratio batch_invariant / torch (time):")
    for r in rat:
        print(f"  {r['preset']:6} {r['mode']:8} B={r['batch']:4d} {r['ratio']:.3f}")
    geo = math.exp(sum(math.log(r["ratio"]) for r in rat) / len(rat))
    print(f"geometric mean {geo:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python -m experiments.bench_model " + " ".join(sys.argv[1:]),
                device=torch.cuda.get_device_name(), torch=torch.__version__, geomean_ratio=geo)
    (args.out / "bench_model.json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=rat), indent=2))
    with open(args.out / "bench_model.csv", "w") as f:
        f.write("preset,mode,batch,backend,ms,tokens_per_s\n")
        for r in rows:
            f.write(f"{r['preset']},{r['mode']},{r['batch']},{r['backend']},{r['ms']:.4f},{r['tokens_per_s']:.1f}\n")


if __name__ == "__main__":
    main()
