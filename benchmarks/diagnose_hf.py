"""Diagnose `transformers`' own MoE models at real layer shapes on a GPU: how many of a probe's tokens
diverge alone vs in batches of 1-64, by cause, with the margins of the flips, under which of
transformers' own paths (attention implementation, experts implementation, padding side); where a
greedy generation alone vs in a batch departs; and what recording costs against an unhooked forward.

    python -m benchmarks.diagnose_hf --out DIR                      # mixtral and qwen3_moe shapes, 4 layers

Models: random weights (transformers' own init), bf16, the layer shapes of Mixtral-8x7B and
Qwen3-30B-A3B with a few layers. Each batch holds the probe (at its middle row) and other random
requests of 64-400 tokens; left padding passes positions counted from the mask, as generate does.
Writes DIR/diagnose_hf.json, DIR/cells.csv and DIR/meta.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from detmoe.diagnose import compare, record, recording
from detmoe.diagnose.batches import pad_rows, positions_from_mask
from detmoe.lab.outputs import write_csv, write_json
from detmoe.lab.run_meta import run_meta, write_meta

SHAPES = {
    "mixtral": ("MixtralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                      num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                         moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
    # for a run on the CPU that checks the script (tests/benchmarks/test_diagnose_hf.py)
    "tiny": ("MixtralConfig", dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
PATHS = [("sdpa", "grouped_mm"), ("sdpa", "eager"), ("eager", "grouped_mm")]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
DEVICE = "cuda"


def build(shape: str, layers: int, seed: int, device: str):
    import transformers
    cls, opts = SHAPES[shape]
    cfg = getattr(transformers, cls)(num_hidden_layers=layers, max_position_embeddings=4096, **opts)
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def batch_with(probe: torch.Tensor, B: int, side: str, gen: torch.Generator, vocab: int, lengths: tuple):
    """(ids [B, N], mask, position_ids, row of the probe): the probe among B - 1 random requests."""
    lens = [int(x) for x in torch.randint(lengths[0], lengths[1] + 1, (B,), generator=gen)]
    row = B // 2
    rows = [probe if b == row else torch.randint(1, vocab, (n,), generator=gen) for b, n in enumerate(lens)]
    ids, mask = pad_rows(rows, side)
    return ids.to(DEVICE), mask.to(DEVICE), positions_from_mask(mask).to(DEVICE), row


def cell(comparison, **keys) -> dict:
    counts = comparison.cause_counts()
    first = comparison.divergent[0] if comparison.divergent else None
    return dict(**keys, compared=comparison.n_compared, divergent=len(comparison.divergent), **counts,
                first_position=first.position if first else None, first_layer=first.first_layer if first else None,
                first_module=first.first_module if first else None,
                primary_flips=len(comparison.flipped_margins), cascade_flips=comparison.cascade_flips,
                flip_margins=[round(float(m), 6) for m in comparison.flipped_margins],
                greedy_differs_at=comparison.first_greedy_difference)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed(fn, repeats: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def overhead(model, gen: torch.Generator, vocab: int, shape: tuple = (16, 512)) -> dict:
    """Median forward time of a prefill (16 x 512), unhooked and recorded, alternating."""
    ids = torch.randint(1, vocab, shape, generator=gen).to(DEVICE)
    plain = lambda: model(input_ids=ids)
    recorded = lambda: record(model, ids)
    for f in (plain, recorded):
        timed(f, 2)
    a, b = [], []
    for _ in range(5):
        a.append(timed(plain, 3))
        b.append(timed(recorded, 3))
    return dict(plain_ms=round(1e3 * statistics.median(a), 2), recorded_ms=round(1e3 * statistics.median(b), 2),
                ratio=round(statistics.median(b) / statistics.median(a), 3))


def run_shape(shape: str, layers: int, seed: int, new_tokens: int, probe_len: int = 300,
              lengths: tuple = (64, 400), batch_sizes: list = BATCH_SIZES) -> tuple[list, dict]:
    model = build(shape, layers, seed, DEVICE)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randint(1, vocab, (probe_len,), generator=gen)
    cells, extra = [], {}
    for attn, experts in PATHS:
        model.set_attn_implementation(attn)
        model.set_experts_implementation(experts)
        alone = record(model, probe[None].to(DEVICE))
        for side in ("right", "left"):
            for B in batch_sizes:
                ids, mask, positions, row = batch_with(probe, B, side, gen, vocab, lengths)
                trace = record(model, ids, mask, position_ids=positions)
                cells.append(cell(compare(alone, trace, other_row=row), shape=shape, attn=attn, experts=experts,
                                  padding_side=side, batch_size=B, run="forward"))
                del trace
        print(shape, attn, experts, "forward cells done", flush=True)
    # greedy generation with transformers' defaults: alone, then in a left-padded batch of 16
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("grouped_mm")
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with recording(model) as rec:
        out_alone = model.generate(probe[None].to(DEVICE), attention_mask=torch.ones_like(probe[None]).to(DEVICE), **kw)
    alone = rec.trace()
    ids, mask, _, row = batch_with(probe, 16, "left", gen, vocab, lengths)
    with recording(model) as rec:
        out_batch = model.generate(ids, attention_mask=mask, **kw)
    batch = rec.trace()
    c = compare(alone, batch, other_row=row)
    new_alone, new_batch = out_alone[0, -new_tokens:].tolist(), out_batch[row, -new_tokens:].tolist()
    departs = next((i for i, (x, y) in enumerate(zip(new_alone, new_batch)) if x != y), None)
    cells.append(cell(c, shape=shape, attn="sdpa", experts="grouped_mm", padding_side="left", batch_size=16,
                      run="generate"))
    extra["generate"] = dict(completion_departs_at=departs, summary=c.summary())
    extra["overhead_16x512"] = overhead(model, gen, vocab, (16, 512) if DEVICE == "cuda" else (2, 16))
    print(shape, "generate and overhead done", extra, flush=True)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return cells, extra


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/science/diagnose_hf"))
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"], choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-check", action="store_true", help="the tiny shape on the CPU: checks the script only")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.cpu_check else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.diagnose_hf needs a CUDA GPU (or --cpu-check)")
    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    write_meta(args.out, run_meta(device=DEVICE, transformers=transformers.__version__))
    cells, extra = [], {}
    for shape in (["tiny"] if args.cpu_check else args.shapes):
        small = dict(probe_len=12, lengths=(3, 16), batch_sizes=[1, 3]) if args.cpu_check else {}
        c, e = run_shape(shape, args.layers, args.seed, args.new_tokens, **small)
        cells += c
        extra[shape] = e
    write_csv(args.out / "cells.csv", [{k: v for k, v in c.items() if k != "flip_margins"} for c in cells])
    write_json(args.out / "diagnose_hf.json", dict(cells=cells, **extra, layers=args.layers, seed=args.seed))


if __name__ == "__main__":
    main()
