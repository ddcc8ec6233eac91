"""Batch-invariance checks for your own code, as assertions that say what broke (pytest fixtures of the same
names: detmoe/pytest_plugin.py).

    from detmoe.testing import assert_batch_invariant, assert_model_batch_invariant
    assert_batch_invariant(my_fn, row, [1, 7, 64])             # fn: [B, ...] -> [B, ...]
    assert_model_batch_invariant(hf_moe_model, input_ids, batch_sizes=[2, 7], padding_side="both")

`assert_batch_invariant` puts `row` first, in the middle and last of every batch and asks that its output
there have the bits of `fn(row[None])[0]`. Bits, not values: -0.0 against 0.0 and one NaN payload against
another count as differences (a reduction order shows up in them first). A failure names the batch and the
position, how many elements differ, the largest |difference|, the first differing element with both values
and bit patterns, and every other batch and position that failed.

`assert_model_batch_invariant` runs a `transformers` MoE model on a request alone and as a row of padded
batches of random requests, recorded with `detmoe.diagnose.record`; a failure is `Comparison.summary()`
(detmoe/diagnose/compare.py): the first divergent token, its first decoder layer and module, and the cause.

Random data comes from torch's global generator: `torch.manual_seed` replays a failure.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

# an element's bit patterns as integers of its width (complex128, 16 bytes, as two 8-byte words)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PADDING_SIDES = ("left", "right", "both")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns: [*t.shape, words]."""
    t = t.detach().contiguous()
    if t.dtype == torch.complex128:
        return torch.view_as_real(t).view(torch.int64)
    if t.dtype.itemsize not in _WORD:
        raise ValueError(f"cannot compare the bits of {t.dtype} outputs")
    return t.view(_WORD[t.dtype.itemsize]).unsqueeze(-1)


def _hex(t: torch.Tensor, index: tuple) -> str:
    words = _bits(t)[index].tolist()
    width = 2 * (8 if t.dtype == torch.complex128 else t.dtype.itemsize)
    return " ".join(f"0x{w & ((1 << 4 * width) - 1):0{width}x}" for w in words)


def _bitwise_difference(alone: torch.Tensor, batched: torch.Tensor) -> Optional[str]:
    """None when the two outputs have the same shape, dtype and bits; else what differs."""
    if alone.shape != batched.shape or alone.dtype != batched.dtype:
        return (f"its output is {batched.dtype} {tuple(batched.shape)} in the batch, {alone.dtype} "
                f"{tuple(alone.shape)} alone")
    differs = (_bits(alone) != _bits(batched)).any(-1)
    n = int(differs.sum())
    if n == 0:
        return None
    first = tuple(differs.nonzero()[0].tolist())
    wide = torch.complex128 if alone.is_complex() else torch.float64
    a, b = alone.detach().to(wide)[differs], batched.detach().to(wide)[differs]
    delta = (a - b).abs()
    numbers = ~torch.isnan(delta)
    largest = float(delta[numbers].max()) if numbers.any() else math.nan
    kinds = [(int(((delta == 0) & numbers).sum()), "-0.0 against 0.0"),       # equal values, other bits
             (int((torch.isnan(a) & torch.isnan(b)).sum()), "NaN against another NaN"),
             (int((torch.isnan(a) ^ torch.isnan(b)).sum()), "NaN against a number")]
    note = ", ".join(f"{k} {what}" for k, what in kinds if k)
    return (f"{n} of {alone.numel()} elements differ{f' ({note})' if note else ''}; max |delta| {largest:.3g}; "
            f"first at index "
            f"{first}: {alone[first].item()!r} (bits {_hex(alone, first)}) alone, {batched[first].item()!r} "
            f"(bits {_hex(batched, first)}) in the batch; output dtype {alone.dtype}")


def _outputs(value, batch: int, fn_name: str) -> list[torch.Tensor]:
    """fn's output as a list of [batch, ...] tensors (a tensor, or a tuple or list of them)."""
    outs = list(value) if isinstance(value, (tuple, list)) else [value]
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ValueError(f"fn ({fn_name}) must return a tensor or a tuple or list of tensors, got "
                         f"{type(value).__name__}")
    for i, o in enumerate(outs):
        if o.dim() == 0 or o.shape[0] != batch:
            raise ValueError(f"fn ({fn_name}) must return [batch, ...] outputs: given a batch of {batch} "
                             f"row{'s' * (batch > 1)}, its output {i} has shape {tuple(o.shape)}")
    return [o.detach() for o in outs]


def random_rows_like(row: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """The default `others`: n rows of row's shape, dtype and device, standard normal for a float (or complex)
    row, uniform over [row.min(), row.max()] for an integer row, fair coins for a bool row."""
    shape, dtype, device = tuple(row.shape), row.dtype, row.device
    if dtype == torch.bool:
        return lambda n: torch.randint(0, 2, (n, *shape), device=device).bool()
    if dtype.is_floating_point or dtype.is_complex:
        # float8 has no randn: drawn in float32, then rounded
        wide = dtype if dtype.itemsize >= 2 or dtype.is_complex else torch.float32
        return lambda n: torch.randn((n, *shape), dtype=wide, device=device).to(dtype)
    if row.numel() == 0:
        return lambda n: torch.zeros((n, *shape), dtype=dtype, device=device)
    low, high = int(row.min()), int(row.max())
    return lambda n: torch.randint(low, high + 1, (n, *shape), dtype=dtype, device=device)


def _check_rows(rows, n: int, row: torch.Tensor, name: str) -> torch.Tensor:
    if (not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (n, *row.shape) or rows.dtype != row.dtype
            or rows.device != row.device):
        got = (f"{rows.dtype} {tuple(rows.shape)} on {rows.device}" if isinstance(rows, torch.Tensor)
               else type(rows).__name__)
        raise ValueError(f"{name} must give {n} rows like row: a {row.dtype} tensor of shape {(n, *row.shape)} on "
                         f"{row.device}, got {got}")
    return rows


def _positions(n: int) -> list[int]:
    """First, middle and last of n rows."""
    return sorted({0, n // 2, n - 1})


def assert_batch_invariant(fn: Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]],
                           row: torch.Tensor, batches: Iterable[Union[int, torch.Tensor]],
                           others: Optional[Callable[[int], torch.Tensor]] = None) -> None:
    """Assert that `row`'s output of `fn` has the same bits in every batch as alone.

    fn: maps a batch [B, *row.shape] to an output [B, ...] (or a tuple or list of them); row b of the output
        belongs to row b of the input. Its output for the row alone, `fn(row[None])[0]`, is the reference.
    row: one input row, without the batch dimension.
    batches: batch sizes (int n >= 1: the row and n - 1 rows made by `others`) and explicit batches (tensors
        [B, *row.shape] of row's dtype and device, the row put in place of one of theirs). In each, the row
        goes first, in the middle (B // 2) and last; a batch of 1 runs the row alone again.
    others: n -> n other rows ([n, *row.shape], row's dtype and device); default `random_rows_like(row)`.
    Raises AssertionError naming what differs (see the module docstring), ValueError for bad arguments.
    """
    __tracebackhide__ = True    # pytest shows the caller's line, not this function's
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(row, torch.Tensor):
        raise ValueError(f"row must be a tensor (one input row, no batch dimension), got {type(row).__name__}")
    if isinstance(batches, (int, torch.Tensor)) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be an iterable of batch sizes and/or batch tensors, got {batches!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must name at least one batch size or batch tensor, got none")
    for b in batches:
        if isinstance(b, torch.Tensor):
            if b.dim() == 0 or b.shape[0] < 1:
                raise ValueError(f"batches: a batch tensor must hold at least one row, got shape {tuple(b.shape)}")
            _check_rows(b, b.shape[0], row, "batches: a batch tensor")
        elif isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batches must hold batch sizes (ints >= 1) and batch tensors, got {b!r}")
    if others is not None and not callable(others):
        raise ValueError(f"others must be None or a callable n -> n rows, got {type(others).__name__}")
    others = random_rows_like(row) if others is None else others
    name = getattr(fn, "__qualname__", type(fn).__name__)

    reference = [o[0] for o in _outputs(fn(row[None].clone()), 1, name)]   # (a copy: fn may write to its input)
    failures, passed = [], []       # (what, position, why) and what
    for k, b in enumerate(batches):
        if isinstance(b, torch.Tensor):
            n, what = b.shape[0], f"the given batch batches[{k}] of {b.shape[0]}"
            rest = None
        else:
            n, what = b, f"a batch of {b}"
            rest = _check_rows(others(n - 1), n - 1, row, "others") if n > 1 else row.new_empty((0, *row.shape))
        failed = False
        for pos in _positions(n):
            if rest is None:
                batch = b.clone()
                batch[pos] = row
            else:
                batch = torch.cat([rest[:pos], row[None], rest[pos:]])
            outs = [o[pos] for o in _outputs(fn(batch), n, name)]
            if len(outs) != len(reference):
                raise ValueError(f"fn ({name}) returned {len(reference)} outputs for one row, {len(outs)} for {n}")
            for i, (alone, batched) in enumerate(zip(reference, outs)):
                why = _bitwise_difference(alone, batched)
                if why is not None:
                    failures.append((what, pos, (f"output {i}: " if len(reference) > 1 else "") + why))
                    failed = True
        if not failed:
            passed.append(what)
    if failures:
        what, pos, why = failures[0]
        lines = [f"{name} is not batch-invariant: the row at position {pos} of {what} gets other bits than alone "
                 f"(fn(row[None])[0]):", f"  {why}"]
        where: dict = {}                 # every other failing batch -> its failing positions, in order
        for w, p, _ in failures[1:]:
            if (w, p) != (what, pos) and p not in where.setdefault(w, []):   # (not another output of one)
                where[w].append(p)
        where = {w: ps for w, ps in where.items() if ps}
        if where:
            lines.append("  also differs: " + "; ".join(f"{w} at position{'s' * (len(ps) > 1)} "
                                                        f"{', '.join(map(str, ps))}" for w, ps in where.items()))
        if passed:
            lines.append("  same bits: " + ", ".join(passed))
        raise AssertionError("\n".join(lines))


def _request(input_ids, attention_mask) -> torch.Tensor:
    """The request's real tokens, [N] long."""
    if (not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool
            or not (input_ids.dim() == 1 or (input_ids.dim() == 2 and input_ids.shape[0] == 1))
            or input_ids.numel() == 0):
        raise ValueError("input_ids must be one request: a non-empty integer tensor [tokens] or [1, tokens], got "
                         + (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                            else type(input_ids).__name__))
    ids = input_ids.reshape(-1)
    if attention_mask is None:
        return ids
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be None or a tensor of input_ids' shape {tuple(input_ids.shape)}")
    real = attention_mask.reshape(-1)
    if not ((real == 0) | (real == 1)).all() or not real.any():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (a real token), with at least one 1")
    return ids[real.bool()]


def assert_model_batch_invariant(model: nn.Module, input_ids: torch.Tensor, batch_sizes: Iterable[int] = (2, 7),
                                 padding_side: str = "both", attention_mask: Optional[torch.Tensor] = None,
                                 positions_from_mask: bool = True) -> None:
    """Assert that a `transformers` MoE model gives a request's tokens the same logits' bits in padded batches
    as alone.

    model: a transformers MoE causal LM that detmoe.diagnose can record (detmoe/diagnose/structure.py), in eval
        mode.
    input_ids: one request, [tokens] or [1, tokens]; attention_mask (optional, same shape) marks its real
        tokens, and only those are the request.
    batch_sizes: for each B, the request runs as row B // 2 of B requests; the others are random tokens of
        the model's vocabulary, of random lengths up to twice the request's, one longer than it (so its row
        is padded too). A batch of 1 runs it alone again.
    padding_side: "left", "right" or "both".
    positions_from_mask: pass position ids counted over each row's real tokens, as `generate` does; False
        leaves them to the model, which (transformers' forward) counts them from the first column, padding
        included, so left padding moves every position (diagnosed as cause `padding`).
    Raises AssertionError with the diagnosis of the first batch that changed the request's bits, ValueError
    for bad arguments.
    """
    __tracebackhide__ = True
    from detmoe.diagnose import compare, record     # here: the function form needs none of it
    from detmoe.diagnose.batches import pad_rows, positions_from_mask as mask_positions

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a transformers MoE model (an nn.Module), got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode (its dropout draws at random): call model.eval() first")
    request = _request(input_ids, attention_mask)
    if isinstance(batch_sizes, (int, torch.Tensor)) or not isinstance(batch_sizes, Iterable):
        raise ValueError(f"batch_sizes must be an iterable of ints >= 1, got {batch_sizes!r}")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty iterable of ints >= 1, got {batch_sizes!r}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"model must have input embeddings or a config.vocab_size: {type(model).__name__} has "
                         "neither")
    low, high = int(request.min()), int(request.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be token ids in 0..{vocab - 1}, got {low}..{high}")
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    limit = getattr(config, "max_position_embeddings", None)
    N = len(request)
    longest = min(2 * N, limit) if isinstance(limit, int) else 2 * N

    def run(rows: list[torch.Tensor], side: str):
        ids, mask = pad_rows(rows, side, pad_id)
        kw = dict(position_ids=mask_positions(mask)) if positions_from_mask else {}
        return record(model, ids, mask, **kw)

    alone = run([request], "right")
    sides = ["left", "right"] if padding_side == "both" else [padding_side]
    failures, passed = [], []        # (batch description, Comparison) and batch descriptions
    for B in batch_sizes:
        lengths = torch.randint(1, longest + 1, (B - 1,)).tolist()
        if B > 1 and longest > N:
            lengths[-1] = int(torch.randint(N + 1, longest + 1, ()))
        others = [torch.randint(0, vocab, (L,), dtype=request.dtype, device=request.device) for L in lengths]
        pos = B // 2
        rows = others[:pos] + [request] + others[pos:]
        for side in sides:
            what = f"row {pos} of a {side}-padded batch of {B}"
            c = compare(alone, run(rows, side), reference_row=0, other_row=pos)
            if c.invariant:
                passed.append(what)
            else:
                failures.append((what, c))
    if failures:
        what, c = failures[0]
        positions = "counted from the attention mask" if positions_from_mask else "left to the model"
        lines = [f"{type(model).__name__} is not batch-invariant: the request ({N} tokens) as {what} gets other "
                 f"bits than alone (positions {positions}):", c.summary()]
        if len(failures) > 1:
            lines.append("also differs: " + "; ".join(w for w, _ in failures[1:]))
        if passed:
            lines.append("same bits: " + "; ".join(passed))
        raise AssertionError("\n".join(lines))
