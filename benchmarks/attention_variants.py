"""Attention tile variants on one GPU: do they keep the bits, and what do they cost against SDPA?

For each variant (module constants of detmoe/kernels/ops/attention.py set for the run) the script checks, on
fresh random data, that decode equals prefill bitwise for both schedules at several positions and batch
sizes, that a split-schedule prefill chunk equals the prefill, that a repeated launch gives the same bits,
and that the split schedule's arrival counters are back at zero; then it times bench_kernels' attention
cells. A variant that moves bits could not be an M- or batch-dependent choice.

    python -m benchmarks.attention_variants OUT_DIR [name,name,...]   # ~2.5 min on an H100

Writes OUT_DIR/variants.json (the run's record: command, GPU, versions, date, git commit; per variant:
settings, bit mismatches, geometric mean, cells) and OUT_DIR/meta.json (the record, detmoe/lab/run_meta.py).
benchmarks/results/kernels/attention_variants/ holds the runs that chose the defaults.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time

import torch

from benchmarks import bench_kernels as bk  # noqa: E402
import detmoe.kernels.ops.attention as A  # noqa: E402
from detmoe.lab.run_meta import run_meta, write_meta  # noqa: E402

VARIANTS = {
    "base": {},                                   # the defaults
    "bm16": {"GPU_BLOCK_M": 16},                  # 16-row split tiles (mma.sync instead of wgmma)
    "bn128_fold128": {"GPU_BLOCK_N": 128, "FOLD_BLOCK_M": 128},   # FA2-tutorial-like fold tiles
    "bn128": {"GPU_BLOCK_N": 128},                # 128-key blocks (another fixed order, both schedules)
    "split256": {"GPU_SPLIT": 256},               # shorter fixed splits (another fixed order)
    "fold128": {"FOLD_BLOCK_M": 128},             # 128-row fold tiles for decode too (8 warps)
    "fold64": {"FOLD_BLOCK_M_PREFILL": 64},       # 64-row prefill tiles, as decode
    "stages2": {"GPU_STAGES": 2},                 # pipeline depth (both schedules)
    "stages4": {"GPU_STAGES": 4},
}
DEFAULTS = {k: getattr(A, k) for v in VARIANTS.values() for k in v}


def bits_check(gen: torch.Generator) -> int:
    """Number of bitwise mismatches (0 when the variant keeps prefill == decode and its schedules agree)."""
    H, Hkv, Dh, dt = 32, 8, 128, torch.bfloat16
    ctx, S = 8500, 4
    L = ctx + 64
    k = torch.randn(S, L, Hkv, Dh, generator=gen).to("cuda", dt)
    v = torch.randn(S, L, Hkv, Dh, generator=gen).to("cuda", dt)
    q = torch.randn(ctx, H, Dh, generator=gen).to("cuda", dt)

    def run(qr: torch.Tensor, seqs: list[tuple[int, int, int]], schedule: str | None = None) -> torch.Tensor:
        cu = torch.tensor([0] + [n for n, _, _ in seqs], device="cuda").cumsum(0).to(torch.int32)
        kv = torch.tensor([l for _, l, _ in seqs], device="cuda", dtype=torch.int32)
        sl = torch.tensor([s for _, _, s in seqs], device="cuda", dtype=torch.int32)
        return A.attention(qr, k, v, cu, kv, sl, Dh ** -0.5, schedule=schedule)
    alone = run(q, [(ctx, ctx, 1)])
    bad = 0
    for i in (0, 63, 64, 511, 512, 513, 4000, ctx - 1):     # query i sits at position i
        for bsz in (1, 3, 32):
            batch = [(1, i + 1, 1)] + [(1, 1 + (37 * j) % (L - 1), j % S) for j in range(1, bsz)]
            qb = torch.cat([q[i:i + 1], torch.randn(bsz - 1, H, Dh, generator=gen).to("cuda", dt)])
            for sch in ("fold", "split"):
                d = run(qb, batch, sch)
                bad += int(not torch.equal(d[0], alone[i]))
    # a split-schedule prefill chunk (many rows per tile) and repeated launches
    chunk = run(q[-100:], [(100, ctx, 1)], "split")
    bad += int(not torch.equal(chunk, alone[-100:]))
    again = run(q[-100:], [(100, ctx, 1)], "split")
    bad += int(not torch.equal(again, chunk))
    bad += int(A._COUNTERS[q.device].count_nonzero().item() != 0)    # counters left at zero
    return bad


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("attention_variants needs a CUDA GPU")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    meta = run_meta(command="python -m benchmarks.attention_variants " + shlex.join(sys.argv[1:]), device="cuda")
    write_meta(out_dir, meta)
    results = {}
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    for name in only:
        for k, v in DEFAULTS.items():
            setattr(A, k, v)
        for k, v in VARIANTS[name].items():
            setattr(A, k, v)
        seed = time.time_ns() % 2**31
        t0 = time.time()
        try:
            bad = bits_check(torch.Generator().manual_seed(seed))
            rows: list[dict] = []
            bk.run_attention(rows, False)
        except Exception as e:  # a variant that does not compile or fit (shared memory, registers)
            print(f"== {name} {VARIANTS[name]}: failed: {e!r}"[:400], flush=True)
            results[name] = dict(settings=VARIANTS[name], failed=repr(e)[:400])
            continue
        geo = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
        results[name] = dict(settings=VARIANTS[name], seed=seed, bits_mismatches=bad, geomean=geo, rows=rows)
        print(f"== {name} {VARIANTS[name]}: bits mismatches {bad}, attention geo {geo:.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        with open(os.path.join(out_dir, "variants.json"), "w") as f:
            json.dump(dict(meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
