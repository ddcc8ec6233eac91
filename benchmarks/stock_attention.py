"""The stock attention candidates (detmoe/kernels/stock_attention.py) timed against each other and against the
batch-invariant Triton attention (detmoe/kernels/ops/attention.py), on one GPU.

Each cell is a batch over one shared KV cache of 256 slots x 7936 positions (H=32, Hkv=8, Dh=128, bf16;
just under 2**31 elements per tensor, the most that flex's int32 key offsets reach), its sequences in scattered
slots, as a serving engine's cache holds them: decode (B sequences of one
query at context C: B = 1, 16, 64, 256; C = 1024, 7936), prefill from an empty slot (1 x 4096 and
16 x 512 tokens) and a serving engine's mixed step (one 1280-token prompt from an empty slot among B =
8, 40, 63 decodes at context 1280). Every candidate's output is first compared with sdpa_gather's
(rel_err, max_abs; the Triton kernel's where sdpa_gather runs out of memory: column reference); then
`triton.testing.do_bench` times the call as the backend makes it (ms: median, host launches included)
and, for the candidates a CUDA graph can capture, `do_bench_cudagraph` times it replayed (graph_ms: what
a captured decode step pays). first_call_s is the first call's wall time (flex: its compile).

Kernels: the KERNELS of detmoe/kernels/stock_attention.py ("varlen" where this torch offers it), "flex_plan"
(flex's block lists and query chunks alone, without the kernel: what a step pays once, not per layer),
"split_plan" (the same for "split": the lengths read back and the sub-batch's index tensors), "sdpa_ideal"
(SDPA straight on the cache for a batch whose slots are 0..B-1 and lengths equal, no mask: a bound that
no ragged batch reaches through SDPA) and "triton" (the batch-invariant kernel).

    python -m benchmarks.stock_attention --out DIR [--only decode|prefill|mixed] [--kernels flex,triton,...]

Writes DIR/stock_attention.json (the run's record: command, GPU, versions, date, git commit; rows, fastest
stock kernel per cell), DIR/stock_attention.csv (one row per cell and kernel) and DIR/meta.json (the record,
detmoe/lab/run_meta.py); with --only, stock_attention_decode.* etc.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from detmoe.kernels import stock_attention as sa
from detmoe.lab.run_meta import run_meta, write_meta
from detmoe.kernels.ops.attention import attention as triton_attention  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

DEVICE = "cuda"
H, HKV, DH, DTYPE = 32, 8, 128, torch.bfloat16
N_SLOTS, CACHE_LEN = 256, 7936           # under flex's 2**31 elements per tensor; a multiple of varlen's pages
DECODE = [(b, c) for c in (1024, CACHE_LEN) for b in (1, 16, 64, 256)]
PREFILL = [(1, 4096), (16, 512)]
MIXED = [(8, 1280), (40, 1280), (63, 1280)]      # a serving engine's mixed step: B decodes + one prompt
STOCK = ["flex", "split", "sdpa_gather", "varlen", "flex_plan", "split_plan", "sdpa_ideal"]
PLANS = ("flex_plan", "split_plan")          # plan building alone: no attention output to check
UNCAPTURED = ("sdpa_gather", "split", "split_plan")   # they read lengths back to the host: not graph-timed


def make_cell(kind: str, B: int, n: int, k: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> dict:
    """Index tensors and queries of one cell: decode (B x one query at context n), prefill (B x n
    queries from position 0) or mixed (one n-token prompt from position 0, then B decodes at context
    n), in distinct slots drawn at random."""
    n_q = 1 if kind == "decode" else n
    if kind == "mixed":
        slots = torch.randperm(N_SLOTS, generator=gen)[:B + 1]
        cu = torch.cat([torch.zeros(1), n + torch.arange(B + 1)]).to(torch.int32)
        kv = torch.full((B + 1,), n, dtype=torch.int32)
        q = torch.randn(n + B, H, DH, generator=gen).to(DEVICE, DTYPE)
        return dict(q=q, k=k, v=v, cu=cu.to(DEVICE), kv=kv.to(DEVICE), slots=slots.to(DEVICE, torch.int32),
                    n_q=n_q, n=n, B=B, kind=kind)
    slots = torch.randperm(N_SLOTS, generator=gen)[:B]
    q = torch.randn(B * n_q, H, DH, generator=gen).to(DEVICE, DTYPE)
    cu = torch.arange(B + 1, dtype=torch.int32) * n_q
    kv = torch.full((B,), n, dtype=torch.int32)
    return dict(q=q, k=k, v=v, cu=cu.to(DEVICE), kv=kv.to(DEVICE), slots=slots.to(DEVICE, torch.int32),
                n_q=n_q, n=n, B=B, kind=kind)


def call_for(name: str, c: dict) -> Optional[Callable[[], torch.Tensor]]:
    """The call a kernel makes for the cell (None where it does not apply)."""
    q, k, v, cu, kv, slots, scale = c["q"], c["k"], c["v"], c["cu"], c["kv"], c["slots"], DH ** -0.5
    if name == "flex":
        return lambda: sa.flex_paged_attention(q, k, v, cu, kv, slots, scale, compiled=DEVICE == "cuda")
    if name == "sdpa_gather":        # as the backend calls it: max_q, max_k read back from the GPU
        return lambda: sa.sdpa_gather_attention(q, k, v, cu, kv, slots, scale)
    if name == "split":              # as a step's layers call it, the step's plan built once (as flex's is)
        return lambda: sa.split_attention(q, k, v, cu, kv, slots, scale)
    if name == "split_plan":         # that plan alone: the lengths read back, the sub-batch indices built
        def plan() -> sa.SplitPlan:
            sa._last_split = None
            return sa.split_plan(cu, kv, slots, q.shape[0], N_SLOTS, CACHE_LEN)
        return plan
    if name == "varlen":
        if not sa.varlen_available(k):
            return None
        return lambda: sa.varlen_paged_attention(q, k, v, cu, kv, slots, scale)
    if name == "flex_plan":
        def plan() -> torch.Tensor:
            p = sa.flex_plan(cu, kv, slots, q.shape[0], N_SLOTS, CACHE_LEN, H // HKV)
            qc = q.new_zeros(p.n_chunks, p.chunk, H, DH)
            qc[p.row_chunk, p.row_offset] = q
            return qc
        return plan
    if name == "sdpa_ideal" and c["kind"] == "mixed":
        return None
    if name == "sdpa_ideal":        # slots 0..B-1 in batch order: row b reads slot b
        B, n, n_q = c["B"], c["n"], c["n_q"]
        ks, vs = k[:B, :n].transpose(1, 2), v[:B, :n].transpose(1, 2)        # [B, Hkv, n, Dh], strided
        qs = q.view(B, n_q, H, DH).transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=n_q > 1, scale=scale,
                                                      enable_gqa=True).transpose(1, 2).reshape(-1, H, DH)
    if name == "triton":
        return lambda: triton_attention(q, k, v, cu, kv, slots, scale)
    raise ValueError(f"kernel must be one of {STOCK + ['triton']}, got {name!r}")


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(rel_err, max_abs) of a kernel's output against the reference's."""
    diff = out.float() - ref.float()
    return (diff.norm() / ref.float().norm()).item(), diff.abs().max().item()


def reference(c: dict, ideal: bool) -> tuple[str, torch.Tensor]:
    """sdpa_gather's output for the cell (ideal: with the slots 0..B-1 that sdpa_ideal reads); the
    Triton kernel's where sdpa_gather runs out of memory (its gathered copy of the batch's keys)."""
    slots = torch.arange(c["B"], device=DEVICE, dtype=torch.int32) if ideal else c["slots"]
    args = (c["q"], c["k"], c["v"], c["cu"], c["kv"], slots, DH ** -0.5)
    try:
        return "sdpa_gather", sa.sdpa_gather_attention(*args)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "triton", triton_attention(*args)


def bench_cell(kind: str, B: int, n: int, names: list[str], k, v, gen) -> list[dict]:
    c = make_cell(kind, B, n, k, v, gen)
    refs: dict[bool, tuple[str, torch.Tensor]] = {}
    rows = []
    for name in names:
        fn = call_for(name, c)
        row = dict(kind=kind, B=B, n=n, kernel=name, ms=None, graph_ms=None, rel_err=None, max_abs=None,
                   reference=None, first_call_s=None, status="ok")
        if fn is None:
            rows.append({**row, "status": "unavailable"})
            continue
        try:
            t0 = time.time()
            out = fn()
            torch.cuda.synchronize()
            row["first_call_s"] = time.time() - t0
            if name not in PLANS:
                ideal = name == "sdpa_ideal"
                refs[ideal] = refs[ideal] if ideal in refs else reference(c, ideal)
                row["reference"] = refs[ideal][0]
                row["rel_err"], row["max_abs"] = compare(out, refs[ideal][1])
            row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            if name not in UNCAPTURED:                      # the others have no host sync to capture
                try:
                    row["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                except Exception as e:  # a kernel that cannot be captured is reported, not timed
                    row["status"] = f"not captured: {e!r}"[:300]
        except Exception as e:  # a candidate that fails to compile or run is reported, not timed
            row["status"] = f"failed: {e!r}"[:300]
        rows.append(row)
        print(f"{kind:7s} B={B:3d} n={n:5d} {name:12s} ms={_fmt(row['ms'])} graph_ms={_fmt(row['graph_ms'])} "
              f"rel_err={_fmt(row['rel_err'], '.1e')} first={_fmt(row['first_call_s'], '.1f')}s "
              f"{row['status'] if row['status'] != 'ok' else ''}", flush=True)
    return rows


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def fastest(rows: list[dict]) -> list[dict]:
    """Per cell: the fastest stock kernel (decode: graph time where it has one, as a captured decode step
    pays; prefill and mixed steps run eagerly: ms; bound and plan-only kernels excluded) and its ratio to
    the Triton kernel's time measured the same way."""
    out = []
    for cell in sorted({(r["kind"], r["B"], r["n"]) for r in rows}):
        mine = [r for r in rows if (r["kind"], r["B"], r["n"]) == cell and r["ms"] is not None
                and (r["rel_err"] is None or r["rel_err"] < 2e-2)]
        captured = cell[0] == "decode"
        time_of = lambda r: r["graph_ms"] if captured and r["graph_ms"] is not None else r["ms"]
        stock = [r for r in mine if r["kernel"] in sa.KERNELS]
        if not stock:
            continue
        best = min(stock, key=time_of)
        tri = next((r for r in mine if r["kernel"] == "triton"), None)
        out.append(dict(kind=cell[0], B=cell[1], n=cell[2], fastest=best["kernel"], ms=time_of(best),
                        triton_ms=time_of(tri) if tri else None,
                        triton_over_stock=time_of(tri) / time_of(best) if tri else None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for stock_attention.json and .csv")
    ap.add_argument("--only", choices=["decode", "prefill", "mixed"], action="append")
    ap.add_argument("--kernels", default=",".join(STOCK + ["triton"]),
                    help="comma-separated, from " + ",".join(STOCK + ["triton"]))
    args = ap.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.stock_attention needs a CUDA GPU")
    names = args.kernels.split(",")
    gen = torch.Generator().manual_seed(int(time.time()))
    k = torch.randn(N_SLOTS, CACHE_LEN, HKV, DH, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    kinds = args.only or ["decode", "prefill", "mixed"]
    cells = [("decode", b, c) for b, c in DECODE if "decode" in kinds] + \
            [("prefill", b, n) for b, n in PREFILL if "prefill" in kinds] + \
            [("mixed", b, n) for b, n in MIXED if "mixed" in kinds]
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "stock_attention" + "".join("_" + k for k in args.only or []))
    meta = run_meta(command="python -m benchmarks.stock_attention " + shlex.join(sys.argv[1:]), device=DEVICE)
    write_meta(args.out, meta)
    for kind, B, n in cells:
        rows += bench_cell(kind, B, n, names, k, v, gen)
        with open(stem + ".json", "w") as f:   # rewritten as cells finish
            json.dump(dict(meta, cache=dict(slots=N_SLOTS, len=CACHE_LEN, H=H, Hkv=HKV, Dh=DH, dtype=str(DTYPE)),
                           fastest=fastest(rows), rows=rows), f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    for r in fastest(rows):
        print(f"{r['kind']:7s} B={r['B']:3d} n={r['n']:5d} fastest stock: {r['fastest']:12s} {r['ms']:.4f} ms, "
              f"triton/stock {_fmt(r['triton_over_stock'], '.2f')}")


if __name__ == "__main__":
    main()
