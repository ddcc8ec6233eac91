"""Compiled variants: a kernel must not be compiled again because a step has a different number of rows.

Triton compiles a kernel once per class of each int argument's value (1, a multiple of 16, other; see
detmoe/kernels/runtime.py). Under the interpreter nothing is compiled, so the test computes the key Triton's JIT
would look its binary up by, with Triton's own specialization function, for every launch of a model step
at several token counts whose row counts fall in different classes. Block shapes do not depend on the
row count under the interpreter, so every kernel must ask for the same variants at each count (tree_sum
keeps its element count specialized on purpose, and picks its block by size: left out), except that the
matmul keeps one row apart (a batch-1 decode's GEMV). The GPU attention
kernel runs only by its test hook here (the interpreter's own schedule is another kernel): at sequence
counts from 2 to 64, which share one tile map of MIN_SEQ_LANES lanes (a larger batch adds a variant per
power of two, by design: its lanes must cover every sequence)."""
from __future__ import annotations

import collections
import contextlib
import inspect

import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.kernels import runtime
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not runtime.interpreting(), reason="counts launches under the interpreter")

SPECIALIZED_ON_PURPOSE = {"_tree_sum_kernel", "_expert_sort_kernel"}
# kernels that keep a row count of 1 specialized on purpose (do_not_specialize_on_alignment)
ONE_ROW_VARIANT = {"_matmul_kernel"}


@contextlib.contextmanager
def recorded_variants():
    """{kernel name: set of specialization keys} of every launch inside the block."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, set] = collections.defaultdict(set)
    run = InterpretedFunction.run

    def key(fn: InterpretedFunction, args, kwargs) -> tuple:
        sig = inspect.signature(fn.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        bound.apply_defaults()
        dns = set(fn.kwargs.get("do_not_specialize") or ())
        dns_alignment = set(fn.kwargs.get("do_not_specialize_on_alignment") or ())
        out = []
        for name, p in sig.parameters.items():
            v = bound.arguments[name]
            if p.annotation in (tl.constexpr, "tl.constexpr"):
                out.append((name, getattr(v, "value", v)))
            elif v is not None:
                out.append((name, *native_specialize_impl(BaseBackend, v, False, name not in dns,
                                                          name not in dns_alignment)))
        return tuple(out)

    def recording_run(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__].add(key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


def test_row_counts_compile_no_new_variant():
    cfg = tiny_config("topk")
    model = moe.MoETransformer(cfg)
    per_count = {}
    with kernels.use_backend("batch_invariant"):
        for T in (1, 16, 17, 48, 49):     # rows (and rows x top_k): 1, a multiple of 16, other
            with recorded_variants() as seen:
                model(torch.randint(0, cfg.vocab_size, (T,)), torch.tensor([0, T]))
            per_count[T] = {k: v for k, v in seen.items() if k not in SPECIALIZED_ON_PURPOSE}
    # one row may have its own variant of the kernels that keep the value 1 specialized (the one-token
    # GEMV of a batch-1 decode step); every larger count must share one
    first = per_count[16]
    assert {"_matmul_kernel", "_rms_norm_kernel"} <= first.keys()
    for T, variants in per_count.items():
        same = {k for k in first if variants.get(k) == first[k]}
        allowed = same | (ONE_ROW_VARIANT if T == 1 else set())
        assert variants.keys() == first.keys() and allowed >= first.keys(), f"{T} rows compile other variants: " + \
            ", ".join(k for k in first if k not in allowed)
    assert per_count[1]["_matmul_kernel"] != first["_matmul_kernel"], "matmul lost its one-row variant"


@pytest.mark.parametrize("schedule", ["fold", "split"])
def test_sequence_counts_compile_no_new_attention_variant(gen, schedule):
    """The GPU attention kernel (run here by its fold and split schedules) at 3, 17 and 32 decoding
    sequences: powers of two 4 and 32 below its MIN_SEQ_LANES, counts of two classes, one variant."""
    from detmoe.kernels.ops.attention import attention
    S, L, Hkv, G, Dh = 32, 40, 1, 2, 16
    k, v = (torch.randn(S, L, Hkv, Dh, generator=gen) for _ in range(2))
    seen_by_count = {}
    for B in (3, 17, 32):
        q = torch.randn(B, Hkv * G, Dh, generator=gen)
        cu, kv = torch.arange(B + 1, dtype=torch.int32), torch.randint(1, L + 1, (B,), generator=gen).int()
        with recorded_variants() as seen:
            attention(q, k, v, cu, kv, torch.randperm(S, generator=gen)[:B].int(), Dh ** -0.5, schedule=schedule)
        seen_by_count[B] = seen["_attention_kernel"]
    assert seen_by_count[3] == seen_by_count[17] == seen_by_count[32]
