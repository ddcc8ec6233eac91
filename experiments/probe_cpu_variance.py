"""Which stock PyTorch ops are batch-variant on this machine? For each op, compute row 0 (or the
first sequence) alone and inside batches of 1..max rows, and count the distinct bit patterns.

    python -m experiments.probe_cpu_variance --out benchmarks/results

Writes cpu_variance.json (with torch version and CPU) and prints a table; the README quotes it.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = list(range(1, 33)) + [48, 64, 100, 128, 256, 512]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def versions(fn, make_batch, sizes=SIZES) -> tuple[int, list[int]]:
    """Distinct results of row 0 across batch sizes, and the sizes where it differs from size 1."""
    ref = fn(make_batch(1))
    outs, differ = {_bits(ref)}, []
    for m in sizes:
        o = fn(make_batch(m))
        outs.add(_bits(o))
        if not torch.equal(o, ref):
            differ.append(m)
    return len(outs), differ


def probes(dtype: torch.dtype) -> dict[str, tuple[int, list[int]]]:
    g = torch.Generator().manual_seed(0)
    K, N, V, D = 512, 512, 4096, 64
    x = torch.randn(max(SIZES), K, generator=g).to(dtype)
    w = torch.randn(K, N, generator=g).to(dtype)
    logits = torch.randn(max(SIZES), V, generator=g).to(dtype)
    nw = torch.randn(K, generator=g).to(dtype)
    E = 8
    we = torch.randn(E, K, N, generator=g).to(dtype)
    res = {
        "mm": versions(lambda a: (a @ w)[0], lambda m: x[:m]),
        "rms_norm": versions(lambda a: F.rms_norm(a, (K,), nw, 1e-6)[0], lambda m: x[:m]),
        "softmax": versions(lambda a: torch.softmax(a.float(), -1)[0], lambda m: logits[:m]),
        "log_softmax": versions(lambda a: torch.log_softmax(a.float(), -1)[0], lambda m: logits[:m]),
        "sum(dim=-1)": versions(lambda a: a.float().sum(-1)[:1], lambda m: logits[:m]),
    }
    # _grouped_mm: row 0 in expert 0's group, as the group grows (fp32 only on this CPU)
    if dtype == torch.float32:
        res["_grouped_mm (group size)"] = versions(
            lambda a: torch._grouped_mm(a, we, offs=torch.full((E,), a.shape[0], dtype=torch.int32))[0],
            lambda m: x[:m])
    # SDPA: one query's output, alone vs. beside other sequences in a padded batch
    q = torch.randn(max(SIZES), 4, 1, D, generator=g).to(dtype)
    kv = torch.randn(max(SIZES), 4, 200, D, generator=g).to(dtype)
    res["sdpa decode (batch)"] = versions(
        lambda a: F.scaled_dot_product_attention(a[0], a[1], a[1])[0], lambda m: (q[:m], kv[:m]))
    # one query over its 50 keys, the key axis padded (and masked) to the batch's longest sequence
    def padded(L: int):
        mask = (torch.arange(L) < 50)[None, :]
        return F.scaled_dot_product_attention(q[:1], kv[:1, :, :L], kv[:1, :, :L], attn_mask=mask)[0]
    ref_pad = padded(50)
    pads = [L for L in range(51, 201, 7) if not torch.equal(padded(L), ref_pad)]
    res["sdpa key padding (51..200)"] = (1 + bool(pads), pads)
    # prefill vs decode of the last query of a 200-token sequence
    qp = torch.randn(1, 4, 200, D, generator=g).to(dtype)
    pre = F.scaled_dot_product_attention(qp, kv[:1], kv[:1], is_causal=True)[0, :, -1]
    dec = F.scaled_dot_product_attention(qp[:, :, -1:], kv[:1], kv[:1])[0, :, 0]
    res["sdpa prefill vs decode"] = (1 if torch.equal(pre, dec) else 2, [])
    src = torch.randn(4096, 64, generator=g).to(dtype)
    idx = torch.randint(0, 256, (4096,), generator=g)
    runs = {_bits(torch.zeros(256, 64, dtype=dtype).index_add_(0, idx, src)) for _ in range(10)}
    res["index_add_ (10 identical runs)"] = (len(runs), [])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    table = {str(dt).removeprefix("torch."): probes(dt) for dt in (torch.float32, torch.bfloat16)}
    meta = dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), sizes=SIZES,
                command="python -m experiments.probe_cpu_variance --out " + str(args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_variance.json").write_text(json.dumps(dict(meta=meta, results={
        dt: {op: dict(versions=v, sizes_differing=d) for op, (v, d) in r.items()} for dt, r in table.items()}), indent=2))
    print(f"{'op':32} {'dtype':9} versions  first sizes that differ from 1 row")
    for dt, r in table.items():
        for op, (v, d) in r.items():
            print(f"{op:32} {dt:9} {v:8d}  {d[:8]}")


if __name__ == "__main__":
    main()
