"""`transformers`' own MoE models inside and outside `detmoe.invariant_mode()` on a GPU: the diagnosis of a
probe alone vs in batches of 2-64 (left-padded greedy generation, right-padded forward), the distinct greedy
completions of one prompt over 100 runs under varying load, and the wall time of a prefill and of a greedy
generation inside vs outside the mode (same run, alternating).

    python -m benchmarks.invariant_mode_hf --out DIR            # mixtral and qwen3_moe shapes, 4 layers

Models: random weights, bf16, the layer shapes of Mixtral-8x7B and Qwen3-30B-A3B with a few layers
(benchmarks/diagnose_hf.py builds them), transformers' default paths (sdpa attention, grouped_mm experts)
outside the mode. Inside: `invariant_mode(model, strict=True)`, so any fallback to a PyTorch kernel stops
the run. Writes DIR/invariant_mode_hf.json, DIR/cells.csv, DIR/distinct.csv and DIR/meta.json.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
from pathlib import Path

import torch

import detmoe
from benchmarks import diagnose_hf
from benchmarks.diagnose_hf import SHAPES, build, cell, timed
from detmoe.diagnose import compare, record, recording
from detmoe.diagnose.batches import pad_rows, positions_from_mask
from detmoe.lab.outputs import write_csv, write_json
from detmoe.lab.run_meta import run_meta, write_meta

DEVICE = "cuda"


def mode_of(model, name: str):
    """The context a run is made in: "stock" (transformers' defaults), "invariant" (the mode with the
    model's attention and experts switched), "aten" (the mode's aten overrides alone)."""
    if name == "stock":
        return contextlib.nullcontext()
    return detmoe.invariant_mode(model if name == "invariant" else None, strict=True)


def batch_with(probe: list, B: int, side: str, rng: random.Random, vocab: int, lengths: tuple, row: int):
    rows = [probe if b == row else [rng.randrange(1, vocab) for _ in range(rng.randint(*lengths))] for b in range(B)]
    ids, mask = pad_rows(rows, side)
    return ids.to(DEVICE), mask.to(DEVICE)


@torch.no_grad()
def proof(model, shape: str, modes: list, batch_sizes: list, probe_len: int, lengths: tuple, new_tokens: int,
          seed: int) -> list:
    """Cells: each mode's probe alone vs in a batch (left-padded generate, right-padded forward)."""
    vocab = model.config.vocab_size
    rng = random.Random(seed)
    probe = [rng.randrange(1, vocab) for _ in range(probe_len)]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    cells = []
    for name in modes:
        one = torch.tensor([probe], device=DEVICE)
        with mode_of(model, name):
            with recording(model) as rec:
                out_alone = model.generate(one, attention_mask=torch.ones_like(one), **kw)
            alone_gen = rec.trace()
            alone_fwd = record(model, one)
            for B in batch_sizes:
                row = rng.randrange(B)
                ids, mask = batch_with(probe, B, "left", rng, vocab, lengths, row)
                with recording(model) as rec:
                    out = model.generate(ids, attention_mask=mask, **kw)
                same = out[row, -new_tokens:].tolist() == out_alone[0, -new_tokens:].tolist()
                cells.append(cell(compare(alone_gen, rec.trace(), other_row=row), shape=shape, mode=name,
                                  run="generate", padding_side="left", batch_size=B, same_completion=same))
                ids, mask = batch_with(probe, B, "right", rng, vocab, lengths, row)
                trace = record(model, ids, mask, position_ids=positions_from_mask(mask))
                cells.append(cell(compare(alone_fwd, trace, other_row=row), shape=shape, mode=name,
                                  run="forward", padding_side="right", batch_size=B, same_completion=None))
        print(shape, name, [(c["run"], c["batch_size"], c["divergent"]) for c in cells if c["mode"] == name],
              flush=True)
    return cells


@torch.no_grad()
def distinct(model, shape: str, modes: list, runs: int, probe_len: int, lengths: tuple, max_batch: int,
             new_tokens: int, seed: int) -> list:
    """Greedy completions of one prompt over `runs` runs, each in a batch of random size and co-requests
    (the probe at a random row, left padding): one row per (mode, run)."""
    vocab = model.config.vocab_size
    rows = []
    for name in modes:
        rng = random.Random(seed)   # the same loads for every mode
        probe = [rng.randrange(1, vocab) for _ in range(probe_len)]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with mode_of(model, name):
            for run in range(runs):
                B = rng.randint(1, max_batch)
                row = rng.randrange(B)
                ids, mask = batch_with(probe, B, "left", rng, vocab, lengths, row)
                out = model.generate(ids, attention_mask=mask, **kw)
                rows.append(dict(shape=shape, mode=name, run=run, batch_size=B, row=row,
                                 completion=" ".join(map(str, out[row, -new_tokens:].tolist()))))
        n = len({r["completion"] for r in rows if r["mode"] == name})
        print(shape, name, "distinct completions:", n, "of", runs, flush=True)
    return rows


@torch.no_grad()
def price(model, shape: str, modes: list, rounds: int, seed: int) -> dict:
    """Median wall time (ms) of a 16 x 512 prefill forward and of a greedy generation of 32 tokens for 16
    requests of 128, per mode, the modes alternating round by round; ratios against stock."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prefill_ids = torch.randint(1, vocab, (16, 512), generator=gen).to(DEVICE)
    prompt = torch.randint(1, vocab, (16, 128), generator=gen).to(DEVICE)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    work = {"prefill_16x512": lambda: model(input_ids=prefill_ids),
            "generate_16x128_32": lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)}
    times = {(w, m): [] for w in work for m in modes}
    for name in modes:                       # warm-up: compiles and autotuning outside the timings
        with mode_of(model, name):
            for fn in work.values():
                fn()
    for _ in range(rounds):
        for name in modes:
            with mode_of(model, name):
                for w, fn in work.items():
                    times[(w, name)].append(1e3 * timed(fn, 1 if w.startswith("generate") else 3))
    out = {}
    for w in work:
        base = statistics.median(times[(w, "stock")])
        out[w] = {m: dict(ms=round(statistics.median(times[(w, m)]), 2),
                          ratio=round(statistics.median(times[(w, m)]) / base, 3)) for m in modes}
    print(shape, "price", out, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/science/invariant_mode_hf"))
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"], choices=list(SHAPES))
    ap.add_argument("--parts", nargs="+", default=["proof", "distinct", "price"],
                    choices=["proof", "distinct", "price"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-check", action="store_true", help="the tiny shape on the CPU: checks the script only")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.cpu_check else "cuda"
    diagnose_hf.DEVICE = DEVICE
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.invariant_mode_hf needs a CUDA GPU (or --cpu-check)")
    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    write_meta(args.out, run_meta(device=DEVICE, transformers=transformers.__version__))
    small = args.cpu_check
    results: dict = dict(layers=args.layers, seed=args.seed)
    cells, completions = [], []
    for shape in (["tiny"] if small else args.shapes):
        model = build(shape, args.layers, args.seed, DEVICE)
        if "proof" in args.parts:
            cells += proof(model, shape, ["stock", "invariant"], [2, 3] if small else [2, 4, 8, 16, 32, 64],
                           probe_len=10 if small else 200, lengths=(3, 14) if small else (32, 400),
                           new_tokens=3 if small else 16, seed=args.seed)
        if "distinct" in args.parts:
            completions += distinct(model, shape, ["stock", "invariant"], 3 if small else args.runs,
                                    probe_len=8 if small else 64, lengths=(2, 12) if small else (16, 256),
                                    max_batch=4 if small else 32, new_tokens=3 if small else 24, seed=args.seed)
        if "price" in args.parts and not small:
            results.setdefault("price", {})[shape] = price(model, shape, ["stock", "invariant", "aten"], 5,
                                                           args.seed)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if cells:
        write_csv(args.out / "cells.csv", [{k: v for k, v in c.items() if k != "flip_margins"} for c in cells])
        results["cells"] = cells
    if completions:
        write_csv(args.out / "distinct.csv", completions)
        results["distinct"] = {f"{s}/{m}": len({r["completion"] for r in completions if (r["shape"], r["mode"]) == (s, m)})
                               for s, m in {(r["shape"], r["mode"]) for r in completions}}
    write_json(args.out / "invariant_mode_hf.json", results)


if __name__ == "__main__":
    main()
