"""Which stock PyTorch ops give a row other bits as its batch grows, or from one run to the next, on this
device (CPU or CUDA)? One op at a time, nothing of the model.

    python -m experiments.probe_variance --device cpu  --out benchmarks/results/variance_cpu
    python -m experiments.probe_variance --device cuda --out benchmarks/results/variance_cuda

For each op, row 0 of a fixed random input (or one query, for attention) is computed inside batches of
1..max_batch rows, and the bitwise-distinct versions of that row's result are counted; then the same call
is repeated `runs` times at batch 1 and at max_batch, and the versions across repeats are counted. Ops:
`torch.mm` over a grid of K and N, `torch._grouped_mm` (row 0's group grows; where it runs), SDPA decode
over the batch, SDPA prefill vs decode of the same query, SDPA with the key axis padded and masked,
`F.rms_norm`, `softmax`, `log_softmax`, a row `sum`, and `index_add_` over repeated runs. bfloat16 and
float32. Stock settings (cuBLAS/SDPA defaults, non-deterministic algorithms allowed); the JSON records them.

Writes into --out: variance.json (results, device, versions, sizes, the command), variance.csv (one row
per op x shape x dtype) and variance_table.md, a Markdown table made from the JSON: the table the README
quotes (`--table-from DIR/variance.json` remakes it from a saved run).

Dimensions: M = rows of the batch (1..max_batch), K = contraction, N = output columns, E = experts,
H = heads, L = keys per sequence, Dh = head dim, D = row length of the row-wise ops.
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
import torch.nn.functional as F

Row = Callable[[int], torch.Tensor]   # batch size M -> row 0's result computed inside a batch of M


@dataclasses.dataclass(frozen=True)
class ProbeSizes:
    """The shapes one probe run uses. DEFAULTS holds one per device kind: the CPU's keep a 2-core run to
    seconds (bf16 matmul on a CPU without bf16 units is ~20x slower than fp32)."""
    mm_k: tuple[int, ...]                    # K of the torch.mm grid
    mm_n: tuple[int, ...]                    # N of the torch.mm grid
    grouped: tuple[tuple[int, int], ...]     # (K, N) of each _grouped_mm weight [E, K, N]
    n_experts: int
    heads: int                               # H of the SDPA probes
    head_dim: int                            # Dh
    context: int                             # L: keys per sequence of the SDPA probes
    row_len: int                             # D of rms_norm, softmax, log_softmax and sum
    max_batch: int
    runs: int                                # repeats at batch 1 and at max_batch (index_add_: >= 10)
    index_add_rows: int                      # source rows of index_add_, added into 256 rows of 64

    def __post_init__(self) -> None:
        for name in ("n_experts", "heads", "head_dim", "context", "row_len", "max_batch", "runs", "index_add_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("mm_k", "mm_n"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {values!r}")
        if any(len(kn) != 2 or min(kn) < 1 for kn in self.grouped):
            raise ValueError(f"grouped must hold (K, N) pairs of positive ints, got {self.grouped!r}")
        if self.context < 4:
            raise ValueError(f"context must be >= 4 (the key-padding probe pads a quarter of it), got {self.context}")


DEFAULTS: dict[str, ProbeSizes] = {
    "cpu": ProbeSizes(mm_k=(64, 512, 1024), mm_n=(512,), grouped=((512, 512),), n_experts=8, heads=4,
                      head_dim=64, context=200, row_len=4096, max_batch=128, runs=5, index_add_rows=4096),
    # K and N of the wide preset (Mixtral-8x7B layers: d_model 4096, d_expert 14336) and of large
    # (d_model 2048, 2 x d_expert 1536); a decode context of 4096 keys; a 32k vocabulary
    "cuda": ProbeSizes(mm_k=(512, 2048, 4096, 14336), mm_n=(512, 4096, 14336),
                       grouped=((2048, 1536), (14336, 4096)), n_experts=8, heads=8, head_dim=128, context=4096,
                       row_len=32768, max_batch=256, runs=5, index_add_rows=65536),
}


def batch_sizes(max_batch: int) -> list[int]:
    """Every M up to 32, then powers of two and their neighbours (tile and split-K boundaries), then max_batch."""
    extra = [33, 48, 63, 64, 65, 96, 127, 128, 129, 192, 255, 256, 384, 511, 512, 1024]
    return sorted({m for m in list(range(1, 33)) + extra if m <= max_batch} | {max_batch})


# ---------------------------------------------------------------------------------------------------
# Counting versions


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers (so -0.0 and +0.0 count as two versions, NaNs compare equal)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(as_int).clone()   # clone: never keep a batch alive through a view


class Versions:
    """The distinct bit patterns seen so far, numbered in order of first appearance."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def index(self, t: torch.Tensor) -> int:
        b = _bits(t)
        for i, v in enumerate(self.seen):
            if v.shape == b.shape and torch.equal(v, b):
                return i
        self.seen.append(b)
        return len(self.seen) - 1


def over_batch(row: Row, sizes: list[int]) -> tuple[int, list[int]]:
    """Versions of row 0's result across batch sizes, and the sizes where it is not the first size's."""
    versions = Versions()
    index = [versions.index(row(m)) for m in sizes]
    return len(versions.seen), [m for m, i in zip(sizes, index) if i != index[0]]


def over_runs(row: Row, sizes: list[int], runs: int) -> int:
    """The most versions that `runs` identical calls gave at any one of `sizes`."""
    most = 0
    for m in sizes:
        versions = Versions()
        for _ in range(runs):
            versions.index(row(m))
        most = max(most, len(versions.seen))
    return most


@dataclasses.dataclass
class Record:
    """One probed (op, shape, dtype). `versions` counts what `varies` varies; `differs_at` lists the values
    of that axis where the result is not the first value's; `versions_over_runs` counts repeats."""
    op: str
    shape: str
    dtype: str
    varies: str
    versions: Optional[int]
    versions_over_runs: Optional[int]
    runs: int
    differs_at: list[int]
    seconds: float
    status: str = "ok"


# ---------------------------------------------------------------------------------------------------
# The probes: each returns its records for one dtype


class Probe:
    """The inputs of one run: random data drawn on `device` from a seeded generator per tensor."""

    def __init__(self, sizes: ProbeSizes, device: torch.device, seed: int):
        self.sizes, self.device, self.seed = sizes, device, seed
        self.batch = batch_sizes(sizes.max_batch)
        self.repeat_at = sorted({1, sizes.max_batch})

    def randn(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        self.seed += 1
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        return torch.randn(*shape, generator=g, device=self.device).to(dtype)

    def record(self, op: str, shape: str, dtype: torch.dtype, row: Row) -> Record:
        """Row 0 over the batch sizes, then repeated at batch 1 and max_batch."""
        start = time.perf_counter()
        versions, differ = over_batch(row, self.batch)
        repeats = over_runs(row, self.repeat_at, self.sizes.runs)
        return Record(op, shape, _name(dtype), "batch size", versions, repeats, self.sizes.runs, differ,
                      round(time.perf_counter() - start, 3))

    def mm(self, dtype: torch.dtype) -> list[Record]:
        out = []
        for K in self.sizes.mm_k:
            x = self.randn(self.sizes.max_batch, K, dtype=dtype)                   # [M, K]
            for N in self.sizes.mm_n:
                w = self.randn(K, N, dtype=dtype)                                  # [K, N]
                out.append(self.record("torch.mm", f"K={K} N={N}", dtype, lambda m: torch.mm(x[:m], w)[0]))
                del w
        return out

    def grouped_mm(self, dtype: torch.dtype) -> list[Record]:
        """Row 0 sits in expert 0's group, which holds all M rows; the other groups are empty."""
        out, E = [], self.sizes.n_experts
        for K, N in self.sizes.grouped:
            x = self.randn(self.sizes.max_batch, K, dtype=dtype)                   # [M, K]
            w = self.randn(E, K, N, dtype=dtype)                                   # [E, K, N]

            def row(m: int) -> torch.Tensor:
                offs = torch.full((E,), m, dtype=torch.int32, device=self.device)  # group ends
                return torch._grouped_mm(x[:m], w, offs=offs)[0]

            shape = f"E={E} K={K} N={N}"
            try:
                out.append(self.record("torch._grouped_mm (row's group grows)", shape, dtype, row))
            except Exception as e:   # not every device and dtype has it (the message is recorded)
                out.append(Record("torch._grouped_mm (row's group grows)", shape, _name(dtype), "batch size",
                                  None, None, 0, [], 0.0, "not supported: " + str(e).splitlines()[0][:120]))
            del w
        return out

    def sdpa(self, dtype: torch.dtype) -> list[Record]:
        s = self.sizes
        H, L, Dh = s.heads, s.context, s.head_dim
        shape = f"H={H} L={L} Dh={Dh}"
        out = []
        # decode: one query per sequence over its own L keys; row 0 = sequence 0's output [H, Dh]
        q = self.randn(s.max_batch, H, 1, Dh, dtype=dtype)                         # [M, H, 1, Dh]
        k = self.randn(s.max_batch, H, L, Dh, dtype=dtype)                         # [M, H, L, Dh]
        v = self.randn(s.max_batch, H, L, Dh, dtype=dtype)
        out.append(self.record("SDPA decode (batch of sequences)", shape, dtype,
                               lambda m: F.scaled_dot_product_attention(q[:m], k[:m], v[:m])[0]))

        # prefill vs decode: the last query of a causal L-token prefill, and that query alone (decode)
        start = time.perf_counter()
        qp = self.randn(1, H, L, Dh, dtype=dtype)                                  # [1, H, L, Dh]
        prefill = lambda: F.scaled_dot_product_attention(qp, k[:1], v[:1], is_causal=True)[0, :, -1]
        decode = lambda: F.scaled_dot_product_attention(qp[:, :, -1:], k[:1], v[:1])[0, :, 0]
        versions = Versions()
        versions.index(prefill()), versions.index(decode())
        repeats = max(over_runs(lambda _: prefill(), [1], s.runs), over_runs(lambda _: decode(), [1], s.runs))
        out.append(Record("SDPA prefill vs decode (same query)", shape, _name(dtype), "prefill or decode",
                          len(versions.seen), repeats, s.runs, [],
                          round(time.perf_counter() - start, 3)))

        # key padding: one query over its first L/4 keys, the key axis padded (masked) to lengths up to L
        start = time.perf_counter()
        keep = L // 4
        pad_lens = list(range(keep, L + 1, max(1, (L - keep) // 24)))

        def padded(length: int) -> torch.Tensor:
            mask = (torch.arange(length, device=self.device) < keep)[None, :]      # [1, length]
            return F.scaled_dot_product_attention(q[:1], k[:1, :, :length], v[:1, :, :length], attn_mask=mask)[0]

        n, differ = over_batch(padded, pad_lens)
        repeats = over_runs(padded, [pad_lens[-1]], s.runs)
        out.append(Record(f"SDPA key padding ({keep} real keys)", shape, _name(dtype), "padded key length",
                          n, repeats, s.runs, differ, round(time.perf_counter() - start, 3)))
        return out

    def row_ops(self, dtype: torch.dtype) -> list[Record]:
        D = self.sizes.row_len
        x = self.randn(self.sizes.max_batch, D, dtype=dtype)                       # [M, D]
        weight = self.randn(D, dtype=dtype)
        # softmax and log_softmax in fp32, as the model's stock backend calls them
        return [
            self.record("F.rms_norm", f"D={D}", dtype, lambda m: F.rms_norm(x[:m], (D,), weight, 1e-6)[0]),
            self.record("torch.softmax (fp32)", f"D={D}", dtype, lambda m: torch.softmax(x[:m].float(), -1)[0]),
            self.record("torch.log_softmax (fp32)", f"D={D}", dtype,
                        lambda m: torch.log_softmax(x[:m].float(), -1)[0]),
            self.record("sum(dim=-1) (fp32)", f"D={D}", dtype, lambda m: x[:m].float().sum(-1)[:1]),
        ]

    def index_add(self, dtype: torch.dtype) -> list[Record]:
        """Output row 0 after adding ~rows/256 source rows into it, over repeated identical calls."""
        start = time.perf_counter()
        rows, runs = self.sizes.index_add_rows, max(10, self.sizes.runs)
        src = self.randn(rows, 64, dtype=dtype)                                    # [rows, 64]
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        idx = torch.randint(0, 256, (rows,), generator=g, device=self.device)
        row = lambda _: torch.zeros(256, 64, dtype=dtype, device=self.device).index_add_(0, idx, src)[0]
        n = over_runs(row, [rows], runs)
        return [Record("index_add_", f"{rows} rows into 256", _name(dtype), "identical runs", None, n, runs, [],
                       round(time.perf_counter() - start, 3))]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    (out / "variance.json").write_text(json.dumps(result, indent=1))
    saved = json.loads((out / "variance.json").read_text())
    (out / "variance.csv").write_text(csv_text(saved))
    (out / "variance_table.md").write_text(markdown_table(saved))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/variance_<device>)")
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
        table.write_text(markdown_table(json.loads(args.table_from.read_text())))
        print(table.read_text())
        return

    overrides = {name: value for name, value in (("max_batch", args.max_batch), ("runs", args.runs),
                                                 ("mm_k", args.mm_k and tuple(args.mm_k)),
                                                 ("mm_n", args.mm_n and tuple(args.mm_n))) if value is not None}
    sizes = dataclasses.replace(DEFAULTS[args.device], **overrides)
    out = args.out or Path("benchmarks/results") / f"variance_{args.device}"
    start = time.perf_counter()
    records = probe(args.device, sizes, args.seed)
    meta = environment(args.device)
    meta.update(seconds=round(time.perf_counter() - start, 1),
                command=shlex.join(["experiments.probe_variance"] + (sys.argv[1:] if argv is None else argv)),
                sizes=dict(dataclasses.asdict(sizes), batch=batch_sizes(sizes.max_batch)))
    write_outputs(dict(meta=meta, results=[dataclasses.asdict(r) for r in records]), out)
    print((out / "variance_table.md").read_text())
    print(f"{len(records)} probes in {meta['seconds']} s; wrote {out}/variance.json, variance.csv, variance_table.md")


if __name__ == "__main__":
    main()
