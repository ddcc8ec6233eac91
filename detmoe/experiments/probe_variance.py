"""Which stock PyTorch ops give a row other bits as its batch grows, or from one run to the next, on this
device (CPU or CUDA)? One op at a time, nothing of the model.

    python -m detmoe.experiments.probe_variance --device cpu  --out benchmarks/results/science/variance_cpu
    python -m detmoe.experiments.probe_variance --device cuda --out benchmarks/results/science/variance_cuda

For each op, row 0 of a fixed random input (or one query, for attention) is computed inside batches of
1..max_batch rows, and the bitwise-distinct versions of that row's result are counted; then the same call
is repeated `runs` times at batch 1 and at max_batch, and the versions across repeats are counted. Ops:
`torch.mm` over a grid of K and N, `torch._grouped_mm` (row 0's group grows; where it runs), SDPA decode
over the batch, SDPA prefill vs decode of the same query, SDPA with the key axis padded and masked,
`F.rms_norm`, `softmax`, `log_softmax`, a row `sum`, and `index_add_` over repeated runs. bfloat16 and
float32. Stock settings (cuBLAS/SDPA defaults, non-deterministic algorithms allowed); the JSON records them.

Writes into --out: variance.json (results, device, versions, sizes, the command), variance.csv (one row
per op x shape x dtype) and variance_table.md, a Markdown table made from the JSON: the table
docs/results.md links to (`--table-from DIR/variance.json` remakes it from a saved run).

The probes themselves (inputs, version counting, the dimension legend) live in lab.op_variance; this app
holds the sizes per device, runs every probe for both dtypes, and writes the results.
Not for: timing (no op is timed beyond the wall clock of the probe), or the model's own shapes (the
ablation runs those).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from detmoe.lab.op_variance import Probe, ProbeSizes, Record, batch_sizes
from detmoe.lab.outputs import write_text
from detmoe.lab.run_meta import run_meta, write_meta


DEFAULTS: dict[str, ProbeSizes] = {
    # the CPU's keep a 2-core run to seconds (bf16 matmul on a CPU without bf16 units is ~20x slower than fp32)
    "cpu": ProbeSizes(mm_k=(64, 512, 1024), mm_n=(512,), grouped=((512, 512),), n_experts=8, heads=4,
                      head_dim=64, context=200, row_len=4096, max_batch=128, runs=5, index_add_rows=4096),
    # K and N of the wide preset (Mixtral-8x7B layers: d_model 4096, d_expert 14336) and of large
    # (d_model 2048, 2 x d_expert 1536); a decode context of 4096 keys; a 32k vocabulary
    "cuda": ProbeSizes(mm_k=(512, 2048, 4096, 14336), mm_n=(512, 4096, 14336),
                       grouped=((2048, 1536), (14336, 4096)), n_experts=8, heads=8, head_dim=128, context=4096,
                       row_len=32768, max_batch=256, runs=5, index_add_rows=65536),
}


def probe(device: str, sizes: ProbeSizes, seed: int = 0) -> list[Record]:
    """Every op's records on `device` ("cpu" or "cuda"), bfloat16 then float32."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device must be 'cpu' on a machine without CUDA, got 'cuda'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    p = Probe(sizes, dev, seed)
    records: list[Record] = []
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for fn in (p.mm, p.grouped_mm, p.sdpa, p.row_ops, p.index_add):
                records += fn(dtype)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return records


def _setting(read: Callable[[], object]) -> object:
    """A backend setting, or why it could not be read (these flags move between torch versions)."""
    try:
        return read()
    except Exception as e:
        return f"unreadable: {e}"


def environment(device: str) -> dict:
    """What the bits depend on besides the code: device, library versions, the stock precision settings."""
    env = dict(device=device, torch=torch.__version__, python=platform.python_version(),
               cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        m, b = torch.backends.cuda.matmul, torch.backends.cuda
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   matmul_allow_tf32=_setting(lambda: m.allow_tf32),
                   matmul_allow_bf16_reduced_precision_reduction=_setting(
                       lambda: m.allow_bf16_reduced_precision_reduction),
                   sdpa_enabled={name: _setting(getattr(b, f"{name}_sdp_enabled"))
                                 for name in ("flash", "mem_efficient", "math", "cudnn")
                                 if hasattr(b, f"{name}_sdp_enabled")})
    else:
        env.update(device_name=env["cpu"])
    return env


# ---------------------------------------------------------------------------------------------------
# Outputs: JSON, then the CSV and the Markdown table made from it

COLUMNS = ("op", "shape", "dtype", "varies", "versions", "versions_over_runs", "runs", "differs_at", "seconds",
           "status")


def _first(values: list[int], n: int = 8) -> str:
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


def markdown_table(result: dict) -> str:
    """The Markdown table of a saved run (the parsed variance.json): one line per op x shape x dtype."""
    meta = result["meta"]
    lines = [f"Row 0 of a random input on {meta['device_name']} (torch {meta['torch']}), batch sizes "
             f"{meta['sizes']['batch'][0]}..{meta['sizes']['batch'][-1]}; versions = bitwise-distinct results "
             f"(1 = invariant). `python -m {meta['command']}`", "",
             "| op | shape | dtype | what varies | versions | versions over repeated runs | where it differs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r["status"] != "ok":
            status = r["status"].replace("|", "/")   # an error message must not split the row
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['varies']} | {status} | | |")
            continue
        versions = "n/a" if r["versions"] is None else (f"**{r['versions']}**" if r["versions"] > 1 else "1")
        repeats = f"**{r['versions_over_runs']}**" if r["versions_over_runs"] > 1 else "1"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['varies']} | {versions} | "
                     f"{repeats} (of {r['runs']}) | {_first(r['differs_at'])} |")
    return "\n".join(lines) + "\n"


def csv_text(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in result["results"]:
        writer.writerow({**r, "differs_at": " ".join(map(str, r["differs_at"]))})
    return buf.getvalue()


def write_outputs(result: dict, out: Path) -> None:
    """variance.json, then variance.csv and variance_table.md made from the JSON as written."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "variance.json", json.dumps(result, indent=1))
    saved = json.loads((out / "variance.json").read_text())
    write_text(out / "variance.csv", csv_text(saved))
    write_text(out / "variance_table.md", markdown_table(saved))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/science/variance_<device>)")
    ap.add_argument("--max-batch", type=int, help="largest batch size (device default: cpu 128, cuda 256)")
    ap.add_argument("--runs", type=int, help="repeats at batch 1 and at the largest batch")
    ap.add_argument("--mm-k", type=int, nargs="+", help="K values of the torch.mm grid")
    ap.add_argument("--mm-n", type=int, nargs="+", help="N values of the torch.mm grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-from", type=Path, metavar="JSON",
                    help="only remake variance_table.md beside a saved variance.json")
    args = ap.parse_args(argv)
    if args.table_from is not None:
        table = args.table_from.parent / "variance_table.md"
        write_text(table, markdown_table(json.loads(args.table_from.read_text())))
        print(table.read_text())
        return

    overrides = {name: value for name, value in (("max_batch", args.max_batch), ("runs", args.runs),
                                                 ("mm_k", args.mm_k and tuple(args.mm_k)),
                                                 ("mm_n", args.mm_n and tuple(args.mm_n))) if value is not None}
    sizes = dataclasses.replace(DEFAULTS[args.device], **overrides)
    out = args.out or Path("benchmarks/results/science") / f"variance_{args.device}"
    start = time.perf_counter()
    records = probe(args.device, sizes, args.seed)
    meta = environment(args.device)
    meta.update(seconds=round(time.perf_counter() - start, 1),
                command=shlex.join(["detmoe.experiments.probe_variance"] + (sys.argv[1:] if argv is None else argv)),
                sizes=dict(dataclasses.asdict(sizes), batch=batch_sizes(sizes.max_batch)))
    run = run_meta(command="python -m " + meta["command"], device=args.device)   # the run's record
    meta.update(date=run["date"], git_commit=run["git_commit"])
    write_outputs(dict(meta=meta, results=[dataclasses.asdict(r) for r in records]), out)
    write_meta(out, run)
    print((out / "variance_table.md").read_text())
    print(f"{len(records)} probes in {meta['seconds']} s; wrote {out}/variance.json, variance.csv, variance_table.md")


if __name__ == "__main__":
    main()
