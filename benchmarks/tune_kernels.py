"""How the GPU tile tables in detmoe/kernels/ops/ were chosen: time candidate tiles on one GPU and check bits.

For every candidate the script records the median time (`triton.testing.do_bench`) beside the stock
peer's, and whether the probe rows' bits equal those of the reference tiles (a candidate that moves a
row's bits could not be used as an M-dependent choice). It also separates host launch cost from GPU time
(`do_bench` against `do_bench_cudagraph`, which replays a CUDA graph and so has no launch cost).

    python -m benchmarks.tune_kernels --out benchmarks/results/kernels/tune_kernels   # ~4 minutes on an H100

Writes tune_{matmul,grouped,launch}.csv, tune_summary.json (best candidate per cell and per M bucket,
with the run's record: command, GPU, versions, date, git commit) and meta.json (that record,
detmoe/lab/run_meta.py). Nothing here is used at run time: the chosen tiles are copied into TILES_GPU by hand, with the
run's file named beside them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import sys
import time

import torch

from benchmarks.bench_kernels import (MATMUL_KN, MATMUL_M, decode_case,  # noqa: E402
                                      grouped_rows)
from detmoe.kernels.ops import grouped_gemm as gg  # noqa: E402
from detmoe.kernels.ops.attention import attention  # noqa: E402
from detmoe.kernels.ops.matmul import Tiles, matmul, reduction_for  # noqa: E402
from detmoe.lab.run_meta import run_meta, write_meta  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) candidates per M range
SMALL_M = [Tiles(64, bn, 4, st, bk) for bn in (64, 128) for bk in (64, 128) for st in (3, 4, 5)] + \
    [Tiles(64, 32, 4, 4, 128), Tiles(64, 32, 4, 3, 256)]
MID_M = [Tiles(64, 128, 4, 4, 64), Tiles(64, 128, 4, 6, 64), Tiles(64, 128, 4, 4, 128), Tiles(128, 128, 8, 3, 64),
         Tiles(128, 128, 8, 4, 64), Tiles(128, 256, 8, 3, 64), Tiles(128, 256, 8, 4, 64), Tiles(64, 256, 4, 3, 64),
         Tiles(64, 64, 4, 4, 128)]
LARGE_M = [Tiles(128, 256, 8, 3, 64), Tiles(128, 256, 8, 4, 64), Tiles(128, 256, 8, 2, 128),
           Tiles(128, 128, 8, 3, 128), Tiles(128, 128, 8, 4, 64), Tiles(256, 128, 8, 3, 64)]


def timed(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def try_time(fn):
    """(ms, output) or (None, None) when the candidate does not fit the GPU (shared memory, registers)."""
    try:
        out = fn()
        return timed(fn), out
    except (triton.runtime.errors.OutOfResources, RuntimeError):
        return None, None


def tune_matmul(rows: list[dict]) -> None:
    for K, N in MATMUL_KN:
        w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(max(MATMUL_M), K, device="cuda", dtype=torch.bfloat16)
        base = reduction_for(N, K, x.dtype)
        ref0 = matmul(x[:1], w, tiles=Tiles(64, 64, 4, 4))[0]
        for M in MATMUL_M:
            xm = x[:M]
            refl = matmul(xm[-1:], w, tiles=Tiles(64, 64, 4, 4))[0]
            stock = timed(lambda: torch.mm(xm, w))
            tiles = SMALL_M if M <= 64 else MID_M if M <= 256 else LARGE_M
            for t in tiles:
                # the default reduction, so the tile's BLOCK_K step applies
                ms, out = try_time(lambda: matmul(xm, w, tiles=t))
                same = None if out is None else bool(torch.equal(out[0], ref0) and torch.equal(out[-1], refl))
                rows.append(dict(K=K, N=N, M=M, kind="one_chunk", BLOCK_K=t.BLOCK_K or base.BLOCK_K, N_CHUNKS=1,
                                 BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, warps=t.num_warps, stages=t.num_stages,
                                 ms=ms, stock_ms=stock, ratio=None if ms is None else ms / stock, same_bits=same))
            best = min((r for r in rows if r["K"] == K and r["N"] == N and r["M"] == M and r["ms"]),
                       key=lambda r: r["ms"])
            print(f"matmul K={K:6d} N={N:6d} M={M:6d} best {best['kind']} BM{best['BLOCK_M']} BN{best['BLOCK_N']} BK{best['BLOCK_K']} "
                  f"w{best['warps']} s{best['stages']} ratio {best['ratio']:.3f} same_bits {best['same_bits']}",
                  flush=True)
        del w, x


NARROW = [Tiles(bm, bn, w, st, bk) for bm in (32, 64, 128) for bn in (32, 64, 128) for bk in (64, 128)
          for w, st in ((4, 3), (4, 5), (8, 4)) if not (bm == 128 and w == 4) and bm * bn <= 8192]


def tune_narrow(rows: list[dict], K: int = 2048, N: int = 768) -> None:
    """A narrow weight (N=768) at mid M, where 128x256 tiles leave SMs idle: a wider candidate set."""
    w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, K, device="cuda", dtype=torch.bfloat16)
    ref0 = matmul(x[:1], w, tiles=Tiles(64, 64, 4, 4))[0]
    for M in (256, 1024, 4096, 16384):
        xm = x[:M]
        refl = matmul(xm[-1:], w, tiles=Tiles(64, 64, 4, 4))[0]
        stock = timed(lambda: torch.mm(xm, w))
        for t in NARROW:
            ms, out = try_time(lambda: matmul(xm, w, tiles=t))
            same = None if out is None else bool(torch.equal(out[0], ref0) and torch.equal(out[-1], refl))
            rows.append(dict(K=K, N=N, M=M, kind="one_chunk", BLOCK_K=t.BLOCK_K, N_CHUNKS=1, BLOCK_M=t.BLOCK_M,
                             BLOCK_N=t.BLOCK_N, warps=t.num_warps, stages=t.num_stages, ms=ms, stock_ms=stock,
                             ratio=None if ms is None else ms / stock, same_bits=same))
        for r in sorted((r for r in rows if r["M"] == M and r["ms"]), key=lambda r: r["ms"])[:3]:
            print(f"narrow M={M:6d} BM{r['BLOCK_M']} BN{r['BLOCK_N']} BK{r['BLOCK_K']} w{r['warps']} s{r['stages']} "
                  f"ratio {r['ratio']:.3f} same_bits {r['same_bits']}", flush=True)


# The experts' two projections of the GPU presets (E, K, N): large's gate+up [64, 2048, 2 x 768] and down
# [64, 768, 2048]; wide's [8, 4096, 2 x 14336] and [8, 14336, 4096]. Rows are tokens x top_k of the decode
# batches 1-256 and the prefills 1 x 4096 and 16 x 512 of bench_model.
GROUPED_SHAPES = {"large gate_up": (64, 2048, 1536, 8), "large down": (64, 768, 2048, 8),
                  "wide gate_up": (8, 4096, 28672, 2), "wide down": (8, 14336, 4096, 2)}
GROUPED_TOKENS = [1, 4, 16, 64, 256, 4096, 8192]
# candidates for few rows per expert (decode: memory-bound, so narrow and deep tiles that keep many loads
# in flight) and for many (prefill: compute-bound)
GROUPED_FEW = [Tiles(bm, bn, 4, st, bk) for bm in (16, 32, 64) for bn in (64, 128) for bk in (64, 128)
               for st in (3, 4, 5)] + [Tiles(16, 32, 4, 4, 128), Tiles(16, 32, 2, 6, 128), Tiles(16, 64, 2, 5, 128),
                                       Tiles(32, 256, 8, 3, 64), Tiles(64, 256, 8, 3, 64)]
GROUPED_MANY = [Tiles(64, 128, 4, 4), Tiles(64, 256, 4, 3), Tiles(128, 128, 8, 3), Tiles(128, 128, 8, 4),
                Tiles(128, 256, 8, 3), Tiles(128, 256, 8, 4), Tiles(128, 128, 4, 4, 128), Tiles(128, 256, 8, 3, 128),
                Tiles(256, 128, 8, 3)]


def _explicit_k(t: Tiles) -> Tiles:
    """t with its K step written out (None: the reduction's 64 for bf16)."""
    return dataclasses.replace(t, BLOCK_K=t.BLOCK_K or 64)


def tune_grouped(rows: list[dict]) -> None:
    """Every candidate on every (shape, tokens) cell, against torch._grouped_mm and the cell's bound: the
    bytes it must move (the weights of the experts hit, x and out) at the measured HBM bandwidth, or its
    FLOPs at the measured bf16 peak, whichever is longer."""
    from benchmarks.roofline import measure_device_bounds
    bounds = measure_device_bounds("cuda", timed)
    print(bounds.how, flush=True)
    for name, (E, K, N, top_k) in GROUPED_SHAPES.items():
        w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16)
        for tokens in GROUPED_TOKENS:
            T = tokens * top_k
            x, offs = grouped_rows(E, K, T)
            hit = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
            bound_ms = 1e3 * max(2 * (hit * K * N + T * (K + N)) / bounds.hbm_bytes_per_s,
                                 2 * T * K * N / bounds.matmul_flops_per_s)
            ref = gg.grouped_matmul(x, w, offs, tiles=Tiles(64, 128, 4, 4))
            stock = timed(lambda: torch._grouped_mm(x, w, offs=offs))
            default = _explicit_k(gg.tiles_for(T, E, N))
            for t in GROUPED_FEW if T <= 64 * E else GROUPED_MANY:
                ms, out = try_time(lambda: gg.grouped_matmul(x, w, offs, tiles=t))
                rows.append(dict(shape=name, E=E, K=K, N=N, tokens=tokens, rows=T, rows_per_expert=T / E,
                                 BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K or 64, warps=t.num_warps,
                                 stages=t.num_stages, is_default=_explicit_k(t) == default, ms=ms, stock_ms=stock,
                                 ratio=None if ms is None else ms / stock, bound_ms=bound_ms,
                                 frac_of_bound=None if ms is None else bound_ms / ms,
                                 same_bits=None if out is None else bool(torch.equal(out, ref))))
            cell = [r for r in rows if r["shape"] == name and r["tokens"] == tokens and r["ms"]]
            best = min(cell, key=lambda r: r["ms"])
            dflt = next((r for r in cell if r["is_default"]), None)
            print(f"grouped {name:13s} tokens={tokens:5d} rows/expert={T / E:7.1f} stock {stock:.4f} ms "
                  f"({bound_ms / stock:.0%} of bound); best BM{best['BLOCK_M']} BN{best['BLOCK_N']} "
                  f"BK{best['BLOCK_K']} w{best['warps']} s{best['stages']} {best['ms']:.4f} ms "
                  f"({best['frac_of_bound']:.0%}) same_bits {best['same_bits']}; default "
                  + (f"{dflt['ms']:.4f} ms ({dflt['frac_of_bound']:.0%})" if dflt else "not a candidate"), flush=True)
        del w


# Attention heads of the GPU presets (H, Hkv, Dh) and the decode cells of bench_model.
ATTENTION_HEADS = {"large": (16, 4, 128), "wide": (32, 8, 128)}
ATTENTION_DECODE = [(b, c) for b in (1, 4, 16, 64, 256) for c in (1024, 8192)]


def tune_attention_schedule(rows: list[dict]) -> None:
    """Decode (one query per sequence) under the fold and the split schedule, which give the same bits
    (tests/kernels/test_attention.py): GPU time of a replayed CUDA graph, as a captured decode step runs
    it, against the KV bytes' HBM bound, and which schedule the default picks. The cache holds 8192 + 512
    positions per sequence, as a model cache of max_seq_len 8192 would, plus room for the new key."""
    from benchmarks.roofline import measure_device_bounds
    from detmoe.kernels.ops import attention as att
    bounds = measure_device_bounds("cuda", timed)
    dt = torch.bfloat16
    for name, (H, Hkv, Dh) in ATTENTION_HEADS.items():
        for B, C in ATTENTION_DECODE:
            L = 8192 + 512
            q = torch.randn(B, H, Dh, device="cuda", dtype=dt)
            k = torch.randn(B, L, Hkv, Dh, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
            kv = torch.full((B,), C, device="cuda", dtype=torch.int32)
            slots = torch.arange(B, device="cuda", dtype=torch.int32)
            bound_ms = 1e3 * 2 * B * C * Hkv * Dh * 2 / bounds.hbm_bytes_per_s
            outs = {}
            for schedule in (None, "fold", "split"):
                fn = lambda: att.attention(q, k, v, cu, kv, slots, Dh ** -0.5, schedule=schedule)  # noqa: E731
                outs[schedule] = fn()
                # do_bench_cudagraph works on a stream of its own: the launch above must be done first
                # (the split schedule's arrival counters serve one stream at a time)
                torch.cuda.synchronize()
                ms = do_bench_cudagraph(fn, rep=40, return_mode="median")
                rows.append(dict(preset=name, B=B, context=C, schedule=schedule or "default", ms=ms,
                                 bound_ms=bound_ms, frac_of_bound=bound_ms / ms))
            same = torch.equal(outs["fold"], outs["split"])
            cell = {r["schedule"]: r["ms"] for r in rows[-3:]}
            print(f"attention {name} B={B:3d} ctx={C:5d}: fold {cell['fold']:.4f} split {cell['split']:.4f} "
                  f"default {cell['default']:.4f} ms (bound {bound_ms:.4f}); fold == split: {same}", flush=True)
            del q, k, v


# The row-parallel projections (reduce_chunks = 4 leaves on one GPU): attention output and expert down
# projection of each GPU preset, at decode and prefill row counts.
CHUNK_SUM_DENSE = {"large attn_out": (2048, 2048), "wide attn_out": (4096, 4096)}
CHUNK_SUM_GROUPED = {"large down": (64, 768, 2048, 8), "wide down": (8, 14336, 4096, 2)}
CHUNK_SUM_TOKENS = [1, 4, 16, 64, 256, 1024, 8192]
# candidates: chunks one after another (x1), two side by side (x2: as many live accumulators), four (x4:
# one more accumulator, and four chunks' loads per stage, so shorter K steps or fewer stages)
CHUNK_SUM_TILES = [Tiles(64, 64, 4, 4), Tiles(64, 128, 4, 3), Tiles(64, 256, 8, 3), Tiles(16, 128, 4, 4, 128),
                   Tiles(128, 128, 8, 4)]
CHUNK_SUM_TILES += [dataclasses.replace(t, chunks_per_loop=2) for t in
                    (Tiles(16, 128, 4, 4), Tiles(16, 64, 4, 4), Tiles(32, 128, 4, 4), Tiles(64, 64, 4, 4),
                     Tiles(64, 128, 4, 3), Tiles(128, 64, 4, 3), Tiles(128, 64, 4, 4), Tiles(128, 64, 8, 3),
                     Tiles(128, 128, 8, 3), Tiles(128, 128, 8, 4, 32), Tiles(64, 256, 8, 2))]
CHUNK_SUM_TILES += [dataclasses.replace(t, chunks_per_loop=4) for t in
                    (Tiles(16, 64, 4, 4), Tiles(16, 128, 4, 4, 32), Tiles(32, 64, 4, 4, 32), Tiles(64, 64, 4, 3, 32),
                     Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 3, 32), Tiles(128, 64, 4, 3, 32), Tiles(64, 128, 8, 3, 32))]


def tune_chunk_sum(rows: list[dict], chunks: int = 4) -> None:
    """The chunk tree summed inside the GEMM (matmul_chunk_sum, grouped_matmul_chunk_sum) against the
    partials written out and summed by tree_sum (the two-kernel form it replaces), per candidate tile."""
    from detmoe.kernels.ops.matmul import matmul_chunk_sum, matmul_partials
    from detmoe.kernels.ops.tree_sum import tree_sum
    cases = []
    for name, (K, N) in CHUNK_SUM_DENSE.items():
        w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        for tokens in CHUNK_SUM_TOKENS:
            x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
            cases.append((name, tokens, lambda x=x, w=w: tree_sum(matmul_partials(x, w, chunks), x.dtype),
                          lambda t, x=x, w=w: matmul_chunk_sum(x, w, chunks, x.dtype, tiles=t)))
    for name, (E, K, N, top_k) in CHUNK_SUM_GROUPED.items():
        w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16)
        for tokens in CHUNK_SUM_TOKENS:
            x, offs = grouped_rows(E, K, tokens * top_k)
            cases.append((name, tokens,
                          lambda x=x, w=w, o=offs: tree_sum(gg.grouped_matmul_partials(x, w, o, chunks), x.dtype),
                          lambda t, x=x, w=w, o=offs: gg.grouped_matmul_chunk_sum(x, w, o, chunks, x.dtype, tiles=t)))
    for name, tokens, two_kernels, summed in cases:
        ref = two_kernels()
        old_ms = timed(two_kernels)
        for t in [None] + CHUNK_SUM_TILES:
            ms, out = try_time(lambda: summed(t))
            rows.append(dict(shape=name, tokens=tokens, chunks=chunks,
                             tiles="default" if t is None else f"{t.BLOCK_M}x{t.BLOCK_N} BK{t.BLOCK_K or 64} "
                                                             f"w{t.num_warps} s{t.num_stages} x{t.chunks_per_loop}",
                             BLOCK_M=None if t is None else t.BLOCK_M, BLOCK_N=None if t is None else t.BLOCK_N,
                             BLOCK_K=None if t is None else t.BLOCK_K or 64,
                             num_warps=None if t is None else t.num_warps,
                             num_stages=None if t is None else t.num_stages,
                             chunks_per_loop=None if t is None else t.chunks_per_loop,
                             ms=ms, partials_and_tree_ms=old_ms, ratio=None if ms is None else ms / old_ms,
                             same_bits=None if out is None else bool(torch.equal(out, ref))))
        cell = [r for r in rows if r["shape"] == name and r["tokens"] == tokens and r["ms"]]
        best = min(cell, key=lambda r: r["ms"])
        dflt = next((r for r in cell if r["tiles"] == "default"), None)
        print(f"chunk sum {name:14s} tokens={tokens:5d}: partials + tree {old_ms:.4f} ms; default "
              + (f"{dflt['ms']:.4f} ms ({dflt['ratio']:.2f}x, same bits {dflt['same_bits']})" if dflt else "failed")
              + f"; best {best['tiles']} {best['ms']:.4f} ms ({best['ratio']:.2f}x, same bits {best['same_bits']})",
              flush=True)


# The fused SwiGLU projections of the GPU presets (E, K, F, top_k) and the candidate tiles (BLOCK_N counts
# gate and up columns together).
SWIGLU_SHAPES = {"large gate_up": (64, 2048, 768, 8), "wide gate_up": (8, 4096, 14336, 2)}
SWIGLU_TOKENS = {"large gate_up": [16, 64, 256, 8192], "wide gate_up": [1, 16, 256]}
SWIGLU_TILES = [Tiles(16, 256, 4, 4), Tiles(32, 128, 4, 4), Tiles(32, 256, 4, 4), Tiles(64, 128, 4, 3),
                Tiles(64, 128, 4, 4), Tiles(64, 256, 8, 3), Tiles(128, 128, 8, 3), Tiles(128, 256, 8, 3)]


def tune_swiglu(rows: list[dict]) -> None:
    """grouped_swiglu (the assignments' rows read in place, silu(gate) * up in the epilogue) per candidate
    tile, against the plain grouped GEMM of the gathered rows (the GEMM alone) and the composition it
    replaces (gather, GEMM, silu, product), whose bits it must give."""
    from detmoe.kernels.torch_backend import grouped_swiglu_torch
    gen = torch.Generator().manual_seed(0)
    for name, (E, K, F, S) in SWIGLU_SHAPES.items():
        w = torch.randn(E, K, 2 * F, device="cuda", dtype=torch.bfloat16) / 8
        for tokens in SWIGLU_TOKENS[name]:
            x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
            experts = torch.stack([torch.randperm(E, generator=gen)[:S] for _ in range(tokens)]).cuda()
            order = torch.argsort(experts.flatten(), stable=True)
            offs = torch.searchsorted(experts.flatten()[order], torch.arange(E, device="cuda"), right=True).int()
            gathered = x[order // S]
            ref = grouped_swiglu_torch(gg.grouped_matmul, x, w, offs, order, S)
            gemm = timed(lambda: gg.grouped_matmul(gathered, w, offs))
            composed = timed(lambda: grouped_swiglu_torch(gg.grouped_matmul, x, w, offs, order, S))
            default = gg.tiles_for(tokens * S, E, 2 * F, gg.SWIGLU_TILES_GPU)
            for t in SWIGLU_TILES:
                ms, out = try_time(lambda: gg.grouped_swiglu(x, w, offs, order, S, tiles=t))
                rows.append(dict(shape=name, tokens=tokens, rows_per_expert=tokens * S / E, BLOCK_M=t.BLOCK_M,
                                 BLOCK_N=t.BLOCK_N, warps=t.num_warps, stages=t.num_stages,
                                 is_default=dataclasses.replace(t, BLOCK_N=min(t.BLOCK_N, 2 * F)) == default,
                                 ms=ms, gemm_ms=gemm, composition_ms=composed,
                                 same_bits=None if out is None else bool(torch.equal(out, ref))))
            cell = [r for r in rows if r["shape"] == name and r["tokens"] == tokens and r["ms"]]
            best = min(cell, key=lambda r: r["ms"])
            dflt = next((r for r in cell if r["is_default"]), None)
            print(f"swiglu {name} tokens={tokens:5d}: gemm alone {gemm * 1e3:.1f} us, composition "
                  f"{composed * 1e3:.1f} us; default " + (f"{dflt['ms'] * 1e3:.1f} us" if dflt else "failed")
                  + f"; best {best['BLOCK_M']}x{best['BLOCK_N']} w{best['warps']} s{best['stages']} "
                  f"{best['ms'] * 1e3:.1f} us; all same bits: {all(r['same_bits'] for r in cell)}", flush=True)
        del w


def best_grouped_per_bucket(rows: list[dict], buckets: list[tuple[float, float]]) -> dict:
    """For each bucket of mean rows per expert, the bit-neutral candidate with the lowest geometric mean
    of ms / stock ms over all its cells (every shape)."""
    out = {}
    for lo, hi in buckets:
        sel = [r for r in rows if lo < r["rows_per_expert"] <= hi]
        cells = {(r["shape"], r["tokens"]) for r in sel}
        by_tile: dict[tuple, list[float]] = {}
        for r in sel:
            if r["ms"] and r["same_bits"]:
                by_tile.setdefault((r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"], r["BLOCK_K"]),
                                   []).append(r["ratio"])
        full = {t: math.exp(sum(map(math.log, v)) / len(v)) for t, v in by_tile.items() if len(v) == len(cells)}
        if full:
            t = min(full, key=full.get)
            out[f"rows/expert {lo}-{hi}"] = dict(tiles=t, geomean=full[t], cells=sorted(cells),
                                                 top=sorted(full.items(), key=lambda kv: kv[1])[:6])
    return out


def host_us(fn, n: int = 300) -> float:
    """Microseconds of host time per call when the GPU keeps up (calls queue without a sync)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def launch_costs(rows: list[dict]) -> None:
    """do_bench (host launch included) vs do_bench_cudagraph (GPU only) vs host time per call."""
    dt = torch.bfloat16
    x1, w = torch.randn(1, 2048, device="cuda", dtype=dt), torch.randn(2048, 768, device="cuda", dtype=dt)
    x64 = torch.randn(64, 4096, device="cuda", dtype=dt)
    w4 = torch.randn(4096, 4096, device="cuda", dtype=dt)
    cases = {"matmul M=1 2048x768": (lambda: matmul(x1, w), lambda: torch.mm(x1, w)),
             "matmul M=64 4096x4096": (lambda: matmul(x64, w4), lambda: torch.mm(x64, w4))}
    for B, C in ((1, 1024), (16, 1024), (1, 8192), (1, 32768), (16, 8192)):
        cases[f"attention decode B={B} ctx={C // 1024}k"] = decode_case(B, C)
    for name, (ours, stock) in cases.items():
        r = dict(case=name)
        for who, fn in (("ours", ours), ("stock", stock)):
            r[f"{who}_do_bench_ms"] = timed(fn)
            r[f"{who}_graph_ms"] = do_bench_cudagraph(fn, rep=40)
            r[f"{who}_host_us"] = host_us(fn)
        rows.append(r)
        print("launch", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
              flush=True)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_profile(out_dir: str) -> None:
    """Where the host time of one call goes (cProfile over 300 calls), for the launch-bound cells."""
    import cProfile
    import io
    import pstats
    dt = torch.bfloat16
    x1, w = torch.randn(1, 2048, device="cuda", dtype=dt), torch.randn(2048, 768, device="cuda", dtype=dt)
    q = torch.randn(1, 32, 128, device="cuda", dtype=dt)
    k = torch.randn(1, 1024, 8, 128, device="cuda", dtype=dt)
    cu = torch.arange(2, device="cuda", dtype=torch.int32)
    kv = torch.full((1,), 1024, device="cuda", dtype=torch.int32)
    slots = torch.zeros(1, device="cuda", dtype=torch.int32)
    a, b = torch.randn(1024, device="cuda"), torch.empty(1024, device="cuda")
    cases = {"copy kernel (3 args)": lambda: _copy_kernel[(1,)](a, b, 1024, BLOCK=1024),
             "matmul M=1": lambda: matmul(x1, w), "torch.mm M=1": lambda: torch.mm(x1, w),
             "attention decode B=1": lambda: attention(q, k, k, cu, kv, slots, 0.1)}
    k8 = torch.randn(1, 8192, 8, 128, device="cuda", dtype=dt)
    kv8 = torch.full((1,), 8192, device="cuda", dtype=torch.int32)
    cases["attention decode B=1 ctx=8k"] = lambda: attention(q, k8, k8, cu, kv8, slots, 0.1)
    with open(os.path.join(out_dir, "host_profile.txt"), "w") as f:
        for name, fn in cases.items():
            f.write(f"== {name}: {host_us(fn):.1f} us per call on the host (no profiler)\n")
            fn()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            f.write(s.getvalue()[-4000:] + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


def best_per_bucket(rows: list[dict], buckets: list[tuple[int, int]]) -> dict:
    """For each M bucket, the bit-neutral candidate with the lowest geometric-mean ratio over its cells."""
    out = {}
    for lo, hi in buckets:
        cells = {(r["K"], r["N"], r["M"]) for r in rows if lo <= r["M"] <= hi}
        by_tile: dict[tuple, list[float]] = {}
        for r in rows:
            if lo <= r["M"] <= hi and r["ms"] and r["same_bits"] and r["kind"] == "one_chunk":
                by_tile.setdefault((r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"], r["BLOCK_K"]), []).append(r["ratio"])
        full = {t: math.exp(sum(map(math.log, v)) / len(v)) for t, v in by_tile.items() if len(v) == len(cells)}
        if full:
            t = min(full, key=full.get)
            out[f"M {lo}-{hi}"] = dict(tiles=t, geomean=full[t], all=sorted(full.items(), key=lambda kv: kv[1])[:6])
    return out


def sweep(name: str, tune, out: str, summary: dict) -> list[dict]:
    """Run one sweep (`tune(rows)`), write its rows to OUT/tune_<name>.csv and, where it checks bits, list
    in the summary every candidate that moved them (such a tile could not be an M-dependent choice)."""
    rows: list[dict] = []
    tune(rows)
    write_csv(os.path.join(out, f"tune_{name}.csv"), rows)
    if any("same_bits" in r for r in rows):
        summary[f"{name}_bits_moved"] = [r for r in rows if r.get("same_bits") is False]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels/tune_kernels")
    ap.add_argument("--only", action="append", choices=["matmul", "grouped", "launch", "host", "narrow", "attention",
                                                        "chunk_sum", "swiglu"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_kernels needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    parts = args.only or ["launch", "grouped", "matmul"]
    meta = run_meta(command="python -m benchmarks.tune_kernels " + shlex.join(sys.argv[1:]), device="cuda")
    write_meta(args.out, meta)
    summary: dict = dict(meta)
    if "host" in parts:
        host_profile(args.out)
    if "launch" in parts:
        summary["launch"] = sweep("launch", launch_costs, args.out, summary)
    if "narrow" in parts:
        sweep("narrow", tune_narrow, args.out, summary)
    if "grouped" in parts:
        grouped = sweep("grouped", tune_grouped, args.out, summary)
        summary["grouped_buckets"] = best_grouped_per_bucket(grouped, [(0, 1), (1, 4), (4, 16), (16, 64),
                                                                       (64, 2**62)])
    if "chunk_sum" in parts:
        sweep("chunk_sum", tune_chunk_sum, args.out, summary)
    if "swiglu" in parts:
        sweep("swiglu", tune_swiglu, args.out, summary)
    if "attention" in parts:
        sweep("attention_schedule", tune_attention_schedule, args.out, summary)
    if "matmul" in parts:
        mm = sweep("matmul", tune_matmul, args.out, summary)
        summary["matmul_buckets"] = best_per_bucket(mm, [(1, 64), (65, 256), (257, 2**62)])
        summary["matmul_buckets_by_N"] = {N: best_per_bucket([r for r in mm if r["N"] == N], [(1, 64), (65, 256), (257, 2**62)])
                                          for N in sorted({r["N"] for r in mm})}
    with open(os.path.join(args.out, "tune_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in summary.items() if k != "launch"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
