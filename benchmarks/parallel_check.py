"""Multi-GPU: do the bits depend on the layout, and what does the fixed-order sum cost? Run under torchrun,
once per GPU count, into one folder:

    for W in 1 2 4; do torchrun --nproc_per_node $W -m benchmarks.parallel_check --preset wide --out DIR; done
    python -m benchmarks.parallel_check --compare DIR        # the fingerprints of the runs, side by side

Each run (W processes, one GPU each; W = 1 runs the layout-free model) writes DIR/parallel_W{W}.json (with
the run's record: command, device, versions, date, git commit; DIR/meta.json gathers the runs' commands,
detmoe/lab/run_meta.py):
- per layout (attention "tp" with experts "ep" and "tp") and backend: SHA-256 fingerprints of the logits
  of a fixed ragged prefill, of the decode step after it, and of a probe's greedy completion. The
  batch_invariant backend's must be the same for every W; the stock backend's are expected to differ.
- batch invariance under the layout: the probe alone and inside batches of other sizes, places and
  co-requests (prefill, mixed, chunked), bitwise, batch_invariant backend;
- step time, both backends in alternating rounds in the same run (median wall ms of the rounds): prefill
  (B sequences of L tokens) and decode (B sequences at a context of C tokens), eager and (on GPUs, where
  the layout allows a capture: not experts "ep") replayed as a CUDA graph.
Random weights (the preset's seed), random tokens (fixed seeds): every run sees the same inputs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from detmoe import kernels
from detmoe import moe
from benchmarks.fingerprints import fingerprint
from detmoe.lab.compositions import Composition
from detmoe.lab.distributed import layout_named
from detmoe.lab.run_meta import default_command, run_meta, write_meta
from detmoe.moe.engine import Engine, Request
from detmoe.moe.graphs import DecodeGraphs, graphs_by_default

BACKENDS = ("torch", "batch_invariant")
SCALE = 1        # input lengths are divided by this (10 for the CPU smoke test on the tiny preset)


def n(length: int) -> int:
    return max(2, length // SCALE)


def short_fingerprint(t: torch.Tensor) -> str:
    return fingerprint(t)[:16]


def prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def fingerprints(model: moe.MoETransformer) -> dict:
    V = model.cfg.vocab_size
    batch = prompts(6, n(20), n(300), V, seed=1)
    tokens, cu = moe.cu_seqlens_of(batch, model.device)
    cache = model.new_cache(len(batch), n(512))
    prefill, _ = model(tokens, cu, cache)
    nxt = prefill[cu[1:] - 1].argmax(-1)
    decode, _ = model(nxt, torch.arange(len(batch) + 1, device=model.device), cache)
    completion = moe.generate(model, prompts(1, n(200), n(200), V, seed=2), 16)[0]
    return dict(prefill=short_fingerprint(prefill), decode=short_fingerprint(decode), completion=completion)


def batch_invariance(model: moe.MoETransformer) -> dict:
    """The probe alone vs in compositions, bitwise (batch_invariant backend)."""
    V = model.cfg.vocab_size
    probe = prompts(1, n(300), n(300), V, seed=3)[0]

    def run(comp: Composition | None) -> Request:
        if comp is None:
            req = Request(probe, 8, track=True)
            Engine(model, 1, n(1024)).run([req])
            return req
        req, batch = comp.requests(probe, 8)
        Engine(model, len(batch), n(1024)).run(batch, until_tracked_done=True)
        return req

    alone = run(None)
    out = {}
    for B, mode in [(3, "prefill"), (8, "mixed"), (5, "chunked"), (32, "prefill")]:
        co = prompts(B - 1, n(10), n(400), V, seed=100 + B)
        comp = Composition(batch_size=B, probe_index=B // 2, mode=mode, co_prompts=co, co_new_tokens=[12] * len(co),
                           chunk=n(64) if mode == "chunked" else None)
        got = run(comp)
        out[f"B{B}_{mode}"] = bool(got.generated == alone.generated and
                                   torch.equal(got.token_logits(), alone.token_logits()))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        sync()
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        step()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def step_times(model: moe.MoETransformer, cells: list[tuple[str, int, int]], rounds: int) -> list[dict]:
    """Median wall ms per step, per backend, the backends alternating round by round. `decode_graphs`
    cells replay the decode step as a CUDA graph (detmoe/moe/graphs.py), where the layout allows a capture."""
    V, dev = model.cfg.vocab_size, model.device
    rows = []
    for mode, B, L in cells:
        if mode == "prefill":
            tokens, cu = moe.cu_seqlens_of(prompts(B, L, L, V, seed=5), dev)
            step = lambda: model(tokens, cu)                                        # noqa: E731
        elif mode == "decode":
            cache = model.new_cache(B, L + 4 * rounds + 16)
            cache.lengths[:] = L            # a context of L (zero) keys per sequence: the same reads
            tokens, cu = moe.cu_seqlens_of(prompts(B, 1, 1, V, seed=6), dev)    # one token per sequence
            step = lambda: model(tokens, cu, cache)                                 # noqa: E731
        else:                               # decode replayed as a CUDA graph (one more slot: the padding's)
            if not graphs_by_default(model):
                continue
            cache = model.new_cache(B + 1, L + 4 * rounds + 16)
            cache.lengths[:B] = L
            tokens = torch.tensor(prompts(B, 1, 1, V, seed=6)).flatten()
            graphs, slots = DecodeGraphs(model, cache), torch.arange(B)
            step = lambda: graphs.step(tokens, slots)                               # noqa: E731
        times = {b: [] for b in BACKENDS}
        print(f"rank {os.environ.get('RANK', '0')}: timing {mode} B={B} L={L}", flush=True)
        for b in BACKENDS:                  # warm-up (compiles)
            with kernels.use_backend(b):
                timed(step, 2)
        for _ in range(rounds):
            for b in BACKENDS:
                with kernels.use_backend(b):
                    times[b] += timed(step, 1)
        med = {b: statistics.median(t) for b, t in times.items()}
        rows.append(dict(mode=mode, B=B, L=L, torch_ms=med["torch"], batch_invariant_ms=med["batch_invariant"],
                         ratio=med["batch_invariant"] / med["torch"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="large")
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compare", type=Path, help="print the fingerprints of the runs in this folder")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    gpu = torch.cuda.is_available()        # without one: CPU processes over gloo (a smoke test)
    # experts ep and tp over all ranks; on 4 ranks also two expert-parallel groups of two TP partners
    names = ("ep", "tp") + (("ep2xtp2",) if world == 4 else ())
    layouts = {experts: layout_named(experts) if world > 1 else None for experts in names}
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    cfg = moe.ModelConfig.from_name(args.preset)
    cells = [("prefill", 1, 2048), ("prefill", 16, 256), ("decode", 1, 1024), ("decode", 16, 1024),
             ("decode", 64, 1024), ("decode_graphs", 1, 1024), ("decode_graphs", 16, 1024),
             ("decode_graphs", 64, 1024)]
    if args.preset == "tiny":               # the smoke test's sizes
        global SCALE
        SCALE, cells = 10, [("prefill", 2, 16), ("decode", 1, 32), ("decode", 2, 32)]
    meta = run_meta(device="cuda" if gpu else "cpu")    # under torchrun: "W x <GPU>"
    result = dict(preset=args.preset, world=world, **meta, layouts={})
    for experts in names:
        model = moe.MoETransformer(cfg, device=dev, layout=layouts[experts])
        entry = {}
        for b in BACKENDS:
            with kernels.use_backend(b):
                entry[b] = fingerprints(model)
        with kernels.use_backend("batch_invariant"):
            entry["batch_invariance"] = batch_invariance(model)
        if not args.no_bench:
            entry["step_times"] = step_times(model, cells, args.rounds)
        result["layouts"][experts] = entry
        del model
        if gpu:
            torch.cuda.empty_cache()
        if world == 1:                      # one device: every name is the same layout-free model
            result["layouts"].update({name: entry for name in ("tp", "ep2xtp2")})
            break
    if rank == 0 and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"parallel_W{world}.json").write_text(json.dumps(result, indent=1))
        write_meta(args.out, meta)
        print(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


def compare(folder: Path) -> None:
    runs = {r["world"]: r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("parallel_W*.json")))}
    lines = []
    for experts in ("ep", "tp", "ep2xtp2"):
        for b in BACKENDS:
            fps = {W: r["layouts"][experts][b] for W, r in sorted(runs.items()) if experts in r["layouts"]}
            if len(fps) < 2:
                continue
            same = len({json.dumps(f, sort_keys=True) for f in fps.values()}) == 1
            lines.append(f"experts={experts} {b:16s} same bits on W={sorted(fps)}: {same}")
    rows = [dict(world=W, experts=experts, **cell) for W, r in sorted(runs.items())
             for experts, e in r["layouts"].items() if not (W == 1 and experts != "ep")
             for cell in e.get("step_times", [])]
    if rows:
        with open(folder / "parallel_step_times.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines += ["", "step time, batch_invariant / torch (median wall ms of alternating rounds):"]
        lines += [f"W={c['world']} experts={c['experts']} {c['mode']:7s} B={c['B']:3d} L={c['L']:5d}  "
                  f"torch {c['torch_ms']:8.2f}  invariant {c['batch_invariant_ms']:8.2f}  ratio {c['ratio']:.3f}"
                  for c in rows]
        multi = [c["ratio"] for c in rows if c["world"] > 1]
        if multi:
            lines.append(f"W>1: geometric mean {statistics.geometric_mean(multi):.3f}, max {max(multi):.3f}")
    lines += [f"batch invariance under W={W} experts={experts}: {all(e['batch_invariance'].values())}"
              for W, r in sorted(runs.items()) for experts, e in r["layouts"].items()
              if not (W == 1 and experts != "ep")]
    text = "\n".join(lines)
    (folder / "parallel_compare.txt").write_text(text + "\n")
    write_meta(folder, dict(command=default_command()))
    print(text)


if __name__ == "__main__":
    main()
