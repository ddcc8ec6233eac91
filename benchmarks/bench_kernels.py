"""Benchmark the batch-invariant kernels against their stock peers on one GPU.

Medians of `triton.testing.do_bench`, ours and stock in the same run, ratio = ours / stock (lower is
better; < 1 means ours is faster). Writes bench_kernels[_TAG].csv and .json (with the run's record:
command, GPU, torch and triton versions, date, git commit) and meta.json (that record, detmoe/lab/run_meta.py)
to --out (default benchmarks/results/kernels/bench_kernels/, where git keeps the earlier runs).

    python -m benchmarks.bench_kernels                    # all three tables
    python -m benchmarks.bench_kernels --only matmul --quick
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import shlex
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from detmoe.kernels.ops.attention import attention  # noqa: E402
from detmoe.kernels.ops.grouped_gemm import grouped_matmul  # noqa: E402
from detmoe.kernels.ops.matmul import matmul  # noqa: E402
from detmoe.lab.run_meta import run_meta, write_meta  # noqa: E402
import triton  # noqa: E402

MATMUL_KN = [(4096, 4096), (4096, 14336), (14336, 4096), (2048, 768), (2048, 151936)]
MATMUL_M = [1, 8, 64, 256, 1024, 4096, 16384]
GROUPED = [(64, 2048, 768), (8, 4096, 14336)]            # (E, K, N)
GROUPED_ROWS = [64, 1024, 8192, 65536]                     # tokens * top_k
PREFILL = [512, 2048, 8192, 16384]
DECODE = [(b, c) for b in (1, 16, 64, 256) for c in (1024, 8192, 32768) if b * c <= 64 * 32768]
H, HKV, DH = 32, 8, 128


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def run_matmul(rows: list[dict], quick: bool) -> None:
    for K, N in MATMUL_KN:
        w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        for M in (MATMUL_M[::2] if quick else MATMUL_M):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ours, stock = bench(lambda: matmul(x, w)), bench(lambda: torch.mm(x, w))
            rows.append(dict(table="matmul", shape=f"K={K} N={N}", size=f"M={M}", ours_ms=ours,
                             stock_ms=stock, ratio=ours / stock))
            print(f"matmul  K={K:6d} N={N:6d} M={M:6d}  ours {ours:8.4f} ms  cuBLAS {stock:8.4f} ms  "
                  f"ratio {ours / stock:5.2f}", flush=True)
        del w


def grouped_rows(E: int, K: int, T: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """T rows (tokens x top_k) spread at random over E experts, seeded by T: x [T, K] bf16 and the
    int32 cumulative group ends that torch._grouped_mm takes."""
    gen = torch.Generator().manual_seed(T)
    sizes = torch.multinomial(torch.ones(E), T, replacement=True, generator=gen).bincount(minlength=E)
    offs = sizes.cumsum(0).to(device=device, dtype=torch.int32)
    return torch.randn(T, K, device=device, dtype=torch.bfloat16), offs


def run_grouped(rows: list[dict], quick: bool) -> None:
    for E, K, N in GROUPED:
        w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16)
        for T in GROUPED_ROWS:
            x, offs = grouped_rows(E, K, T)
            ours = bench(lambda: grouped_matmul(x, w, offs))
            stock = bench(lambda: torch._grouped_mm(x, w, offs=offs))
            rows.append(dict(table="grouped", shape=f"E={E} K={K} N={N}", size=f"rows={T}", ours_ms=ours,
                             stock_ms=stock, ratio=ours / stock))
            print(f"grouped E={E:3d} K={K} N={N:6d} rows={T:6d}  ours {ours:8.4f} ms  _grouped_mm "
                  f"{stock:8.4f} ms  ratio {ours / stock:5.2f}", flush=True)
        del w


def decode_case(B: int, C: int, device: str = "cuda") -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """One new query for each of B sequences over a cache of C keys: (ours, SDPA) as calls to time."""
    dt, scale = torch.bfloat16, DH ** -0.5
    q = torch.randn(B, H, DH, device=device, dtype=dt)
    k = torch.randn(B, C, HKV, DH, device=device, dtype=dt)
    v = torch.randn_like(k)
    cu = torch.arange(B + 1, device=device, dtype=torch.int32)
    kv = torch.full((B,), C, device=device, dtype=torch.int32)
    slots = torch.arange(B, device=device, dtype=torch.int32)
    qs, ks, vs = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)   # SDPA reads the same cache, strided
    return (lambda: attention(q, k, v, cu, kv, slots, scale),
            lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True))


def run_attention(rows: list[dict], quick: bool) -> None:
    dt, scale = torch.bfloat16, DH ** -0.5
    for L in PREFILL:      # one sequence, causal prefill from an empty cache
        q = torch.randn(L, H, DH, device="cuda", dtype=dt)
        k = torch.randn(1, L, HKV, DH, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        cu = torch.tensor([0, L], device="cuda", dtype=torch.int32)
        kv = torch.tensor([L], device="cuda", dtype=torch.int32)
        slots = torch.zeros(1, device="cuda", dtype=torch.int32)
        qs, ks, vs = q.transpose(0, 1)[None], k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        ours = bench(lambda: attention(q, k, v, cu, kv, slots, scale))
        stock = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                             enable_gqa=True))
        rows.append(dict(table="attention", shape="prefill", size=f"L={L}", ours_ms=ours, stock_ms=stock,
                         ratio=ours / stock))
        print(f"attn prefill L={L:6d}  ours {ours:8.4f} ms  SDPA {stock:8.4f} ms  ratio {ours / stock:5.2f}",
              flush=True)
    for B, C in DECODE:
        ours_fn, stock_fn = decode_case(B, C)
        ours, stock = bench(ours_fn), bench(stock_fn)
        rows.append(dict(table="attention", shape="decode", size=f"B={B} ctx={C}", ours_ms=ours,
                         stock_ms=stock, ratio=ours / stock))
        print(f"attn decode B={B:4d} ctx={C:6d}  ours {ours:8.4f} ms  SDPA {stock:8.4f} ms  "
              f"ratio {ours / stock:5.2f}", flush=True)
        del ours_fn, stock_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["matmul", "grouped", "attention"], action="append")
    ap.add_argument("--quick", action="store_true", help="fewer matmul M values")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels",
                                                  "bench_kernels"))
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=INT",
                    help="override a module constant for this run, e.g. "
                         "detmoe.kernels.ops.attention.FOLD_BLOCK_M=128 "
                         "(to compare kernel variants; the defaults are what the backend runs)")
    ap.add_argument("--tag", default="", help="added to the output file names: bench_kernels_TAG.csv")
    args = ap.parse_args()
    for item in args.set:
        name, value = item.split("=")
        module, attr = name.rsplit(".", 1)
        setattr(importlib.import_module(module), attr, int(value))
    meta = run_meta(command="python -m benchmarks.bench_kernels " + shlex.join(sys.argv[1:]), device="cuda")
    torch.manual_seed(int(time.time()))
    rows: list[dict] = []
    tables = args.only or ["grouped", "attention", "matmul"]
    for name in tables:
        {"matmul": run_matmul, "grouped": run_grouped, "attention": run_attention}[name](rows, args.quick)
    summary = {}
    for name in tables:
        ratios = [r["ratio"] for r in rows if r["table"] == name]
        summary[name] = dict(geomean=geomean(ratios), max=max(ratios), min=min(ratios), cells=len(ratios))
        print(f"{name:10s} geo-mean ratio {summary[name]['geomean']:.3f}  max {summary[name]['max']:.2f}  "
              f"min {summary[name]['min']:.2f}  ({len(ratios)} cells)")
    os.makedirs(args.out, exist_ok=True)
    stem = "bench_kernels" + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"{stem}.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta, summary=summary, rows=rows), f, indent=1)
    write_meta(args.out, meta)


if __name__ == "__main__":
    main()
