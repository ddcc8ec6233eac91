"""Dense matmul: a row's bits do not depend on the batch; accuracy against float64."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from detmoe.kernels import runtime
from detmoe.kernels.ops.matmul import (CHUNK_SUM_LEAVES, CHUNK_SUM_TILES, TILES_GPU, Tiles, fit_for_chunk_sum, matmul,
                                matmul_chunk_sum, matmul_partials, matmul_three, matmul_widened, reduction_for)
from detmoe.kernels.ops.tree_sum import tree_sum
from tests.kernels.conftest import DEVICE, TOL, assert_same_bits, batches_with_probe, randn, rel_err

SIZES = [1, 2, 3, 4, 5, 7, 8, 13, 31, 64, 67, 97]          # odd and prime sizes included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(96, 80), (200, 37)])
def test_row_invariant_and_accurate(gen, dtype, K, N):
    w = randn(gen, K, N, dtype=dtype)
    probe = randn(gen, K, dtype=dtype)
    alone = matmul(probe[None], w)
    assert rel_err(alone, probe[None].double() @ w.double()) < TOL[dtype]
    for batch, pos in batches_with_probe(gen, probe, SIZES, lambda m: randn(gen, m, K, dtype=dtype)):
        out = matmul(batch, w)
        assert torch.equal(out[pos], alone[0]), f"row changed at batch {len(batch)}, position {pos}"
    assert rel_err(out, batch.double() @ w.double()) < TOL[dtype]


def test_tiles_do_not_change_bits(gen):
    """Output tiles (chosen per M) only group rows and columns into programs, with masked edges (N=37).
    Under the interpreter each row is its own BLAS call, so this checks the masking and tile arithmetic;
    the GPU test forces the real table (TILES_GPU) on the compiled kernel."""
    x, w = randn(gen, 70, 200, dtype=torch.bfloat16), randn(gen, 200, 37, dtype=torch.bfloat16)
    ref = matmul(x, w)
    for bm, bn in [(16, 16), (64, 32), (128, 64)]:
        assert torch.equal(matmul(x, w, tiles=Tiles(BLOCK_M=bm, BLOCK_N=bn)), ref), (bm, bn)


def test_bad_shapes_name_the_parameter():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="w must be"):
        matmul(x, torch.randn(7, 4, device=DEVICE))
    with pytest.raises(ValueError, match="x must be"):
        matmul(x.int(), torch.randn(8, 4, device=DEVICE))


# --- GPU: real sizes, M swept densely -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (14336, 4096), (2048, 768), (4096, 14336)])
def test_gpu_row_invariant_dense_m(gen, K, N):
    w = randn(gen, K, N, dtype=torch.bfloat16)
    x = randn(gen, 4096, K, dtype=torch.bfloat16)
    ref = matmul(x[:1], w)[0]
    for m in list(range(1, 301)) + [512, 1000, 1024, 2047, 4096]:
        out = matmul(x[:m], w)
        assert torch.equal(out[0], ref), f"row 0 changed at M={m} (reduction {reduction_for(N, K, x.dtype)})"
    assert rel_err(out, x.double() @ w.double()) < 1e-2
    # a row in the last position too
    assert torch.equal(matmul(x[:257], w)[256], matmul(x[256:257], w)[0])
    # every tile of the M buckets gives the same bits at one M (so no bucket edge can move a row)
    at_300 = matmul(x[:300], w)
    for table in TILES_GPU.values():
        for _, tiles in table:
            assert torch.equal(matmul(x[:300], w, tiles=tiles), at_300), f"tiles {tiles} changed bits"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_row_invariant_other_dtypes(gen, dtype):
    """fp16 takes bf16's tiles and K steps; fp32 its own K step with an ieee (FMA) dot."""
    K = N = 4096
    w, x = randn(gen, K, N, dtype=dtype), randn(gen, 4096, K, dtype=dtype)
    ref = matmul(x[:1], w)[0]
    for m in list(range(1, 65)) + list(range(65, 301, 7)) + [1024, 4096]:
        out = matmul(x[:m], w)
        assert torch.equal(out[0], ref), f"row 0 changed at M={m} ({dtype})"
    assert rel_err(out[:1024], x[:1024].double() @ w.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_are_the_chunks_of_any_k_shard(gen, dtype):
    """matmul_partials: chunk c of K is summed the same way whichever K shard holds it (a rank of a
    row-parallel layer holds chunks c0..c1), and the same for every row whatever the batch."""
    M, K, N, C = 37, 256, 48, 4
    x, w = randn(gen, M, K, dtype=dtype), randn(gen, K, N, dtype=dtype)
    full = matmul_partials(x, w, C)                                        # [C, M, N] fp32
    assert full.dtype == torch.float32 and full.shape == (C, M, N)
    Kc = K // C
    for lo, hi in [(0, 2), (2, 4), (1, 2), (3, 4)]:
        shard = matmul_partials(x[:, lo * Kc:hi * Kc].contiguous(), w[lo * Kc:hi * Kc].contiguous(), hi - lo)
        assert torch.equal(shard, full[lo:hi]), (lo, hi)
    assert torch.equal(matmul_partials(x[5:6], w, C)[:, 0], full[:, 5])
    assert rel_err(full.sum(0), x.double() @ w.double()) < TOL[dtype]
    with pytest.raises(ValueError, match="chunks"):
        matmul_partials(x, w, 3)


def per_loop_tiles(tiles: Tiles, per_loop: int) -> Tiles:
    """tiles walking per_loop chunks side by side, with the fewer stages or shorter K steps that the
    shared memory of several chunks' loads needs on the largest tiles (as the tuned tables pair them)."""
    if per_loop == 1:
        return dataclasses.replace(tiles, chunks_per_loop=1)
    return dataclasses.replace(tiles, chunks_per_loop=per_loop, num_stages=2,
                               BLOCK_K=32 if per_loop == 4 else tiles.BLOCK_K)


def integers(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integers: exact products whose sums pass bf16's 256, so rounding ties come up often."""
    return torch.randint(-3, 4, shape, generator=gen).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("values", ["normal", "integers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", CHUNK_SUM_LEAVES)
def test_chunk_sum_is_the_tree_of_the_partials(gen, dtype, chunks, values):
    """matmul_chunk_sum: tree_sum of matmul_partials in one kernel, bit for bit, rounded to the input's
    dtype or kept in fp32 (a rank's subtree), and a row's bits whatever its batch. K = 192: chunks of
    24-192, none a whole number of the interpreter's K steps (the masked loop)."""
    M, K, N = 37, 192, 48
    draw = randn if values == "normal" else integers
    x, w = draw(gen, M, K, dtype=dtype), draw(gen, K, N, dtype=dtype)
    partials = matmul_partials(x, w, chunks)
    for out_dtype in sorted({dtype, torch.float32}, key=str):
        got = matmul_chunk_sum(x, w, chunks, out_dtype)
        assert_same_bits(got, tree_sum(partials, out_dtype))
        assert_same_bits(matmul_chunk_sum(x[5:6], w, chunks, out_dtype)[0], got[5])
    assert rel_err(got, x.double() @ w.double()) < TOL[dtype]
    with pytest.raises(ValueError, match="chunks"):
        matmul_chunk_sum(x, w, 3, dtype)          # not a power of two (it divides K)


@pytest.mark.parametrize("K", [192, 256])
@pytest.mark.parametrize("per_loop", [2, 4])
@pytest.mark.parametrize("chunks", [2, 4, 8])
def test_chunks_per_loop_keep_the_tree_bits(gen, chunks, per_loop, K):
    """Chunks walked side by side in one loop (Tiles.chunks_per_loop) give the bits of the chunks one
    after another: the tree of the partials, fp32 and bf16 out, with a masked K loop (K = 192: chunks of
    24-96) and whole K steps (K = 256: chunks of 32-128, the EVEN_K loads)."""
    M, N = 21, 40
    x, w = randn(gen, M, K, dtype=torch.bfloat16), randn(gen, K, N, dtype=torch.bfloat16)
    tiles = Tiles(16, 16, chunks_per_loop=per_loop)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = tree_sum(matmul_partials(x, w, chunks), out_dtype)
        assert_same_bits(matmul_chunk_sum(x, w, chunks, out_dtype, tiles=tiles), ref)
    with pytest.raises(ValueError, match="chunks_per_loop"):
        Tiles(16, 16, chunks_per_loop=3)


def test_one_kernel_form_and_its_accumulators(monkeypatch):
    """Where the tree runs inside the GEMM (K <= 2048, or 16-1024 rows) and how far fit_for_chunk_sum cuts
    a tile: four chunks per loop hold one accumulator more (4 leaves: 4 live, 8 leaves: 5)."""
    from detmoe.kernels.ops import matmul as mm
    assert mm.one_kernel_sum(4, 2048, 8192) and mm.one_kernel_sum(8, 768, 1)
    assert [mm.one_kernel_sum(4, 4096, m) for m in (15, 16, 1024, 1025)] == [False, True, True, False]
    assert not mm.one_kernel_sum(16, 768, 64)          # a tree the kernels do not unroll
    monkeypatch.setattr(mm.runtime, "interpreting", lambda: False)
    wide = Tiles(128, 128, 8, 3, chunks_per_loop=2)     # 3 live x 64 registers: fits 192 as it is
    assert fit_for_chunk_sum(wide, 4).BLOCK_N == 128
    assert fit_for_chunk_sum(dataclasses.replace(wide, chunks_per_loop=4), 4).BLOCK_N == 64    # 4 live
    assert fit_for_chunk_sum(dataclasses.replace(wide, chunks_per_loop=4), 8).BLOCK_N == 64    # 5 x 32
    assert fit_for_chunk_sum(wide, 8).BLOCK_N == 64                                            # 4 x 32
    assert fit_for_chunk_sum(wide, 1) == wide


@pytest.mark.parametrize("backend", ["batch_invariant", "torch"])
def test_backends_chunk_sums_are_the_tree_of_their_partials(gen, backend):
    """Through the backend switch, for a tree the kernels unroll and for a longer one (16 leaves: the
    partials and tree_sum), dense and grouped."""
    from detmoe import kernels
    from tests.kernels.test_grouped_gemm import _offsets
    x, w = randn(gen, 9, 64, dtype=torch.bfloat16), randn(gen, 64, 24, dtype=torch.bfloat16)
    wg, offs = randn(gen, 3, 64, 24, dtype=torch.bfloat16), _offsets([4, 0, 5])
    with kernels.use_backend(backend):
        for chunks in (4, 16):
            assert_same_bits(kernels.matmul_chunk_sum(x, w, chunks, torch.bfloat16),
                             kernels.tree_sum(kernels.matmul_partials(x, w, chunks), torch.bfloat16))
            assert_same_bits(kernels.grouped_matmul_chunk_sum(x, wg, offs, chunks, torch.bfloat16),
                             kernels.tree_sum(kernels.grouped_matmul_partials(x, wg, offs, chunks), torch.bfloat16))
    with pytest.raises(ValueError, match="tiles"):
        matmul_chunk_sum(x, w, 16, torch.bfloat16, tiles=Tiles(16, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(2048, 2048), (768, 2048), (4096, 4096), (14336, 4096)])
def test_gpu_chunk_sum_is_the_tree_of_the_partials(gen, K, N):
    """At the row-parallel projections' sizes (attention output, expert and shared-expert down), for
    every tree the kernel unrolls, every M bucket's tiles (cut to fit the tree's accumulators) and rows
    alone or in a batch."""
    x, w = randn(gen, 4096, K, dtype=torch.bfloat16), randn(gen, K, N, dtype=torch.bfloat16)
    for chunks in CHUNK_SUM_LEAVES:
        for m in (1, 17, 64, 300, 4096):
            got = matmul_chunk_sum(x[:m], w, chunks, torch.bfloat16)
            assert_same_bits(got, tree_sum(matmul_partials(x[:m], w, chunks), torch.bfloat16))
            assert_same_bits(got[-1:], matmul_chunk_sum(x[m - 1:m], w, chunks, torch.bfloat16))
        # every bucket's tiles, forced into the one-kernel form (also where the default writes partials:
        # K > 2048 outside 16-1024 rows)
        for out_dtype in (torch.float32, torch.bfloat16):
            ref = tree_sum(matmul_partials(x[:300], w, chunks), out_dtype)
            # (and the chunk-sum table's own, and one tile walking 1, 2 or 4 chunks per loop)
            tables = list(TILES_GPU.values()) + [CHUNK_SUM_TILES]
            variants = [per_loop_tiles(Tiles(64, 64, 4, 4), per_loop) for per_loop in (1, 2, 4)]
            for t in [tiles for table in tables for _, tiles in table] + variants:
                t = fit_for_chunk_sum(t, chunks)
                assert_same_bits(matmul_chunk_sum(x[:300], w, chunks, out_dtype, tiles=t), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_weights_in_one_launch_are_each_matmul(gen, dtype):
    """matmul_three: each product has matmul's bits (one launch over the three weights' columns), also
    where the widths force three launches, and with tiles whose BLOCK_N the widths are multiples of."""
    K = 96
    x = randn(gen, 37, K, dtype=dtype)
    for widths, tiles in (((64, 32, 32), Tiles(32, 32)), ((512, 128, 128), None), ((40, 24, 24), None)):
        ws = [randn(gen, K, n, dtype=dtype) for n in widths]
        got = matmul_three(x, *ws, tiles=tiles)
        for g, w in zip(got, ws):
            assert torch.equal(g, matmul(x, w))
        assert torch.equal(matmul_three(x[4:5], *ws, tiles=tiles)[2][0], got[2][4])
    # widths whose own tiles differ from the joint ones, and a weight with another column stride
    w_t = randn(gen, 32, K, dtype=dtype).t()
    for ws in ([randn(gen, K, n, dtype=dtype) for n in (512, 512, 8)],
               [randn(gen, K, 32, dtype=dtype), w_t, randn(gen, K, 32, dtype=dtype)]):
        for g, w in zip(matmul_three(x, *ws), ws):
            assert torch.equal(g, matmul(x, w))


def test_torch_backends_three_weights_go_through_its_matmul(gen):
    """A backend that overrides matmul (tests/lab's row-at-a-time backend) gets q, k and v through it."""
    from detmoe.kernels.torch_backend import TorchBackend
    calls = []

    class Counting(TorchBackend):
        def matmul(self, x, w):
            calls.append(w.shape)
            return super().matmul(x, w)
    x = randn(gen, 3, 16)
    Counting().matmul_three(x, randn(gen, 16, 8), randn(gen, 16, 4), randn(gen, 16, 4))
    assert calls == [(16, 8), (16, 4), (16, 4)]


@pytest.mark.gpu
def test_gpu_three_weights_are_each_matmul(gen):
    """The presets' query, key and value projections (large: 2048 -> 2048, 512, 512; wide: 4096 -> 4096,
    1024, 1024) at decode and prefill row counts: each product has matmul's bits."""
    for K, widths in ((2048, (2048, 512, 512)), (4096, (4096, 1024, 1024))):
        ws = [randn(gen, K, n, dtype=torch.bfloat16) for n in widths]
        x = randn(gen, 4096, K, dtype=torch.bfloat16)
        for M in (1, 16, 64, 256, 4096):
            for g, w in zip(matmul_three(x[:M], *ws), ws):
                assert torch.equal(g, matmul(x[:M], w)), f"K={K} M={M}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_widened_is_matmul_then_float(gen, dtype):
    """matmul_widened: matmul's rounding to x's dtype, stored as fp32, bit for bit; the one-pass kernel
    forced where the interpreter converts as the GPU does (fp16, fp32), and a row's bits whatever its
    batch. bf16 on the CPU runs the composition, so there it checks the plumbing only (the bf16 kernel,
    the model's case, is the GPU test's)."""
    x, w = randn(gen, 37, 64, dtype=dtype), randn(gen, 64, 48, dtype=dtype)
    ref = matmul(x, w).float()
    fused = dtype != torch.bfloat16 or not runtime.interpreting()
    got = matmul_widened(x, w, fused=fused)
    assert got.dtype == torch.float32
    assert_same_bits(got, ref)
    assert_same_bits(matmul_widened(x[5:6], w, fused=fused)[0], got[5])
    if dtype == torch.float16:   # not a plain fp32 product: the rounding to fp16 is there
        assert not torch.equal(got, (x.float() @ w.float()))


def test_backends_widened_logits(gen):
    """Both backends' matmul_widened is their matmul, widened (the torch one through self.matmul): the
    plumbing (bf16 on the CPU is the composition on both)."""
    from detmoe import kernels
    x, w = randn(gen, 9, 32, dtype=torch.bfloat16), randn(gen, 32, 24, dtype=torch.bfloat16)
    for backend in ("batch_invariant", "torch"):
        with kernels.use_backend(backend):
            assert_same_bits(kernels.matmul_widened(x, w), kernels.matmul(x, w).float())


@pytest.mark.gpu
def test_gpu_widened_is_matmul_then_float(gen):
    """The presets' LM heads (2048 and 4096 -> 32768) at decode and prefill row counts: the logits stored
    widened from the launch equal matmul's bf16 output converted, bit for bit."""
    for K in (2048, 4096):
        w = randn(gen, K, 32768, dtype=torch.bfloat16)
        x = randn(gen, 4096, K, dtype=torch.bfloat16)
        for M in (1, 16, 64, 256, 4096):
            assert torch.equal(matmul_widened(x[:M], w), matmul(x[:M], w).float()), f"K={K} M={M}"
