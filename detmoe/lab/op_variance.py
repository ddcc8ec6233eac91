"""Per-op probes: does one stock PyTorch op give a row other bits as its batch grows, or from one
call to the next? Each probe builds seeded random inputs on a device, computes row 0 of the op's result
inside batches of 1..max_batch rows (or one query, for attention), and counts the bitwise-distinct
versions of that row; then it repeats the same call `runs` times at batch 1 and at max_batch and counts
the versions across repeats. `Probe` holds one method per op family: `torch.mm` over a grid of K and N,
`torch._grouped_mm` (row 0's group grows; where it runs), SDPA decode over the batch, SDPA prefill vs
decode of the same query, SDPA with the key axis padded and masked, `F.rms_norm`, `softmax`,
`log_softmax`, a row `sum`, and `index_add_` over repeated runs. Each returns one `Record` per shape.

Dimensions: M = rows of the batch (1..max_batch), K = contraction, N = output columns, E = experts,
H = heads, L = keys per sequence, Dh = head dim, D = row length of the row-wise ops.
Not for: the model's own shapes through its backend (lab.stock_variance does that), or timing.
`experiments.probe_variance` runs every probe per device and writes the results.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Row = Callable[[int], torch.Tensor]   # batch size M -> row 0's result computed inside a batch of M


@dataclasses.dataclass(frozen=True)
class ProbeSizes:
    """The shapes one probe run uses (experiments.probe_variance keeps one per device kind)."""
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
