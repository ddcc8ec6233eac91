"""Grouped expert GEMM: a token's bits do not depend on its group's size or its place in the group."""
from __future__ import annotations

import pytest
import torch

from detmoe.kernels.ops.grouped_gemm import (CHUNK_SUM_TILES_GPU, SWIGLU_TILES_GPU, TILES_GPU, grouped_matmul,
                                      grouped_matmul_chunk_sum, grouped_matmul_partials, grouped_swiglu)
from detmoe.kernels.ops.matmul import CHUNK_SUM_LEAVES, Tiles, fit_for_chunk_sum
from detmoe.kernels.ops.tree_sum import tree_sum
from detmoe.kernels.torch_backend import TorchBackend
from tests.kernels.conftest import DEVICE, TOL, assert_same_bits, randn, rel_err
from tests.kernels.test_matmul import integers, per_loop_tiles


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, device=DEVICE).cumsum(0).to(torch.int32)


def _reference(x, w, sizes):
    outs, start = [], 0
    for e, n in enumerate(sizes):
        outs.append(x[start:start + n].double() @ w[e].double())
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_invariant_to_group_size_and_position(gen, dtype):
    E, K, N = 5, 64, 48
    w = randn(gen, E, K, N, dtype=dtype)
    probe = randn(gen, K, dtype=dtype)
    e = 3
    alone = grouped_matmul(probe[None], w, _offsets([0, 0, 0, 1, 0]))[0]
    for n in [1, 2, 5, 31, 64, 67, 130]:
        for pos in sorted({0, n // 2, n - 1}):
            sizes = torch.randint(0, 40, (E,), generator=gen).tolist()
            sizes[e] = n
            x = randn(gen, sum(sizes), K, dtype=dtype)
            row = sum(sizes[:e]) + pos
            x[row] = probe
            out = grouped_matmul(x, w, _offsets(sizes))
            assert torch.equal(out[row], alone), f"token changed: group size {n}, position {pos}, {sizes}"
    if DEVICE == "cpu":   # the interpreter's packed kernel gives the per-tile kernel's bits
        assert torch.equal(out, grouped_matmul(x, w, _offsets(sizes), packed=False))
    assert rel_err(out, _reference(x, w, sizes)) < TOL[dtype]


def test_bad_offsets_named():
    with pytest.raises(ValueError, match="offsets"):
        grouped_matmul(torch.randn(4, 8, device=DEVICE), torch.randn(3, 8, 5, device=DEVICE),
                       torch.tensor([4], device=DEVICE, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_past_the_last_group_are_left_alone(gen, dtype):
    """offsets[-1] < T (an expert-parallel rank's buffer of every row, of which it owns a run): the rows
    of the groups give the bits they give when they are all the rows, and the rest are not written."""
    E, K, N, T, owned = 4, 64, 48, 40, 22
    x, w = randn(gen, T, K, dtype=dtype), randn(gen, E, K, N, dtype=dtype)
    ends = torch.tensor([5, 9, 9, owned], device=DEVICE, dtype=torch.int32)
    out = grouped_matmul(x, w, ends)
    assert torch.equal(out[:owned], grouped_matmul(x[:owned], w, ends))
    assert torch.isnan(out[owned:]).all()            # NaN-poisoned outputs (conftest): never written
    partials = grouped_matmul_partials(x, w, ends, 2)
    assert torch.equal(partials[:, :owned], grouped_matmul_partials(x[:owned], w, ends, 2))


@pytest.mark.skipif(DEVICE != "cpu", reason="on the GPU offsets' values are not read back (a sync per call)")
@pytest.mark.parametrize("offsets", [[2, 1, 5], [2, 3, 6], [-1, 3, 5], [2.0, 3.0, 5.0]],
                         ids=["decreasing", "last-long", "negative", "float"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_offset_values_named(offsets, backend):
    run = grouped_matmul if backend == "triton" else TorchBackend().grouped_matmul
    with pytest.raises(ValueError, match="offsets"):
        run(torch.randn(5, 8), torch.randn(3, 8, 4), torch.tensor(offsets))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,K,N", [(64, 2048, 768), (8, 4096, 14336)])
def test_gpu_token_invariant(gen, E, K, N, dtype):
    w = randn(gen, E, K, N, dtype=dtype)
    probe = randn(gen, K, dtype=dtype)
    sizes0 = [0] * E
    sizes0[E // 2] = 1
    alone = grouped_matmul(probe[None], w, _offsets(sizes0))[0]
    for total in [64, 300, 1024, 8192, 65536]:
        sizes = torch.multinomial(torch.ones(E), total, replacement=True, generator=gen).bincount(
            minlength=E).tolist()
        sizes[E // 2] = max(sizes[E // 2], 1)
        x = randn(gen, sum(sizes), K, dtype=dtype)
        for pos in sorted({0, sizes[E // 2] - 1}):
            row = sum(sizes[:E // 2]) + pos
            x[row] = probe
            out = grouped_matmul(x, w, _offsets(sizes))
            assert torch.equal(out[row], alone), f"token changed: {total} tokens, position {pos}"
    assert rel_err(out[:4096], _reference(x, w, sizes)[:4096]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_are_the_chunks_of_any_k_shard(gen, dtype):
    """grouped_matmul_partials: chunk c of K gives the same bits whichever K shard holds it (the experts'
    down projection split by tensor parallelism), and a token's partials do not depend on its group."""
    E, K, N, C = 4, 64, 40, 4
    sizes = [3, 0, 11, 6]
    x, w = randn(gen, sum(sizes), K, dtype=dtype), randn(gen, E, K, N, dtype=dtype)
    full = grouped_matmul_partials(x, w, _offsets(sizes), C)                 # [C, T, N] fp32
    Kc = K // C
    for lo, hi in [(0, 2), (2, 4), (3, 4)]:
        shard = grouped_matmul_partials(x[:, lo * Kc:hi * Kc].contiguous(), w[:, lo * Kc:hi * Kc].contiguous(),
                                        _offsets(sizes), hi - lo)
        assert torch.equal(shard, full[lo:hi]), (lo, hi)
    alone = grouped_matmul_partials(x[3:4], w, _offsets([0, 0, 1, 0]), C)     # a row of expert 2, alone
    assert torch.equal(alone[:, 0], full[:, 3])
    assert rel_err(full.sum(0), _reference(x, w, sizes)) < TOL[dtype]


@pytest.mark.parametrize("values", ["normal", "integers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", CHUNK_SUM_LEAVES)
def test_chunk_sum_is_the_tree_of_the_partials(gen, dtype, chunks, values):
    """grouped_matmul_chunk_sum: tree_sum of grouped_matmul_partials, bit for bit, by the per-tile kernel
    that sums the chunks itself (packed=False; on the GPU the default) and by the interpreter's default
    (the composition); a row's bits whatever its group."""
    E, K, N = 4, 64, 40
    sizes = [3, 0, 11, 6]
    draw = randn if values == "normal" else integers
    x, w = draw(gen, sum(sizes), K, dtype=dtype), draw(gen, E, K, N, dtype=dtype)
    partials = grouped_matmul_partials(x, w, _offsets(sizes), chunks)
    for out_dtype in sorted({dtype, torch.float32}, key=str):
        ref = tree_sum(partials, out_dtype)
        got = grouped_matmul_chunk_sum(x, w, _offsets(sizes), chunks, out_dtype, packed=False)
        assert_same_bits(got, ref)
        assert_same_bits(grouped_matmul_chunk_sum(x, w, _offsets(sizes), chunks, out_dtype), ref)
        alone = grouped_matmul_chunk_sum(x[3:4], w, _offsets([0, 0, 1, 0]), chunks, out_dtype, packed=False)
        assert_same_bits(alone[0], got[3])
    assert rel_err(got, _reference(x, w, sizes)) < TOL[dtype]
    with pytest.raises(ValueError, match="chunks"):
        grouped_matmul_chunk_sum(x, w, _offsets(sizes), 3, dtype)
    with pytest.raises(ValueError, match="packed"):
        grouped_matmul_chunk_sum(x, w, _offsets(sizes), chunks, dtype, tiles=TILES_GPU[0][1], packed=True)


@pytest.mark.parametrize("per_loop", [2, 4])
@pytest.mark.parametrize("chunks", [2, 4, 8])
def test_chunks_per_loop_keep_the_tree_bits(gen, chunks, per_loop):
    """The per-tile kernel with chunks walked side by side in one loop (Tiles.chunks_per_loop): the
    tree of the partials, bit for bit, and a row's bits whatever its group."""
    E, K, N = 4, 64, 40
    sizes = [3, 0, 11, 6]
    x, w = randn(gen, sum(sizes), K, dtype=torch.bfloat16), randn(gen, E, K, N, dtype=torch.bfloat16)
    tiles = Tiles(16, 16, chunks_per_loop=per_loop)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = tree_sum(grouped_matmul_partials(x, w, _offsets(sizes), chunks), out_dtype)
        got = grouped_matmul_chunk_sum(x, w, _offsets(sizes), chunks, out_dtype, tiles=tiles, packed=False)
        assert_same_bits(got, ref)
        alone = grouped_matmul_chunk_sum(x[3:4], w, _offsets([0, 0, 1, 0]), chunks, out_dtype, tiles=tiles,
                                         packed=False)
        assert_same_bits(alone[0], got[3])


@pytest.mark.gpu
@pytest.mark.parametrize("E,K,N", [(64, 768, 2048), (8, 14336, 4096)])
def test_gpu_chunk_sum_is_the_tree_of_the_partials(gen, E, K, N):
    """The experts' down projections of the GPU presets: every tree the kernel unrolls, decode- and
    prefill-sized row counts, every row bucket's tiles (cut to fit the tree's accumulators)."""
    w = randn(gen, E, K, N, dtype=torch.bfloat16)
    for total in (8, 512, 16384):
        sizes = torch.multinomial(torch.ones(E), total, replacement=True, generator=gen).bincount(minlength=E)
        x = randn(gen, total, K, dtype=torch.bfloat16)
        offs = _offsets(sizes.tolist())
        for chunks in CHUNK_SUM_LEAVES:
            for out_dtype in (torch.float32, torch.bfloat16):
                ref = tree_sum(grouped_matmul_partials(x, w, offs, chunks), out_dtype)
                assert_same_bits(grouped_matmul_chunk_sum(x, w, offs, chunks, out_dtype), ref)
                # every bucket's tiles, forced into the one-kernel form (also where the default writes
                # partials: K > 2048 outside 16-1024 rows),
                # and one tile walking 1, 2 or 4 chunks per loop
                variants = [per_loop_tiles(Tiles(64, 128, 4, 3), per_loop) for per_loop in (1, 2, 4)]
                for t in [tiles for _, tiles in TILES_GPU + CHUNK_SUM_TILES_GPU] + variants:
                    t = fit_for_chunk_sum(t, chunks)
                    assert_same_bits(grouped_matmul_chunk_sum(x, w, offs, chunks, out_dtype, tiles=t), ref)


def _swiglu_numpy(h32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up from the fp32 products h32 as torch rounds it on the GPU (h rounded to dtype, silu
    g / (1 + exp(-g)) in fp32 rounded, the product rounded), with numpy's float32 exp: the
    interpreter's stand-in for libdevice's."""
    import numpy as np
    h = h32.to(dtype)
    F_ = h.shape[1] // 2
    g = h[:, :F_].float().numpy()
    silu = torch.from_numpy(g / (np.float32(1) + np.exp(-g))).to(dtype)
    return (silu.float() * h[:, F_:].float()).to(dtype)


def _assignments(gen, T, S, E):
    """A router's output for T tokens, S slots each: the cells t*S+j sorted by expert, and group ends."""
    experts = torch.stack([torch.randperm(E, generator=gen)[:S] for _ in range(T)])
    order = torch.argsort(experts.flatten(), stable=True)
    ends = torch.searchsorted(experts.flatten()[order], torch.arange(E), right=True)
    return order.to(DEVICE), ends.to(torch.int32).to(DEVICE)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's exp (numpy's) is the reference here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_reads_the_assignments_rows_and_rounds_as_torch(gen, dtype):
    E, K, F_, T, S = 4, 64, 24, 13, 2
    x, w = randn(gen, T, K, dtype=dtype), randn(gen, E, K, 2 * F_, dtype=dtype) / 4
    order, ends = _assignments(gen, T, S, E)
    # the products in fp32 (one chunk of partials: the plain GEMM's sum, unrounded)
    h32 = grouped_matmul_partials(x[order // S], w, ends, 1)[0]
    got = grouped_swiglu(x, w, ends, order, S)
    assert_same_bits(got, _swiglu_numpy(h32, dtype))
    # no rows: x's own rows in order; rows given as a strided view: the same
    assert_same_bits(grouped_swiglu(x[order // S], w, ends), got)
    assert_same_bits(grouped_swiglu(x, w, ends, torch.stack([order, order], 1)[:, 0], S), got)
    with pytest.raises(ValueError, match="rows must be in 0..25"):
        grouped_swiglu(x, w, ends, order + T * S, S)
    with pytest.raises(ValueError, match="2F"):
        grouped_swiglu(x, w[:, :, 1:], ends, order, S)


@pytest.mark.gpu
@pytest.mark.parametrize("E,K,F_,S", [(64, 2048, 768, 8), (8, 4096, 14336, 2)])
def test_gpu_swiglu_is_the_composition(gen, E, K, F_, S):
    """The fused kernel gives the stock composition's bits (gathered rows, one grouped GEMM, torch's silu
    and product) at the presets' expert shapes, for decode and prefill token counts and every tile bucket."""
    from detmoe.kernels.torch_backend import grouped_swiglu_torch
    w = randn(gen, E, K, 2 * F_, dtype=torch.bfloat16) / 8
    for T in (1, 16, 256, 4096):
        x = randn(gen, T, K, dtype=torch.bfloat16)
        order, ends = _assignments(gen, T, S, E)
        ref = grouped_swiglu_torch(grouped_matmul, x, w, ends, order, S)
        assert_same_bits(grouped_swiglu(x, w, ends, order, S), ref)
        if T == 256:
            for _, tiles in SWIGLU_TILES_GPU + TILES_GPU:
                assert_same_bits(grouped_swiglu(x, w, ends, order, S, tiles=tiles), ref)
