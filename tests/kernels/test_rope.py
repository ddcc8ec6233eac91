"""The fused RoPE + cache store (detmoe/kernels/ops/rope.py): the stock form's bits (q returned, k and v in their
cache cells, nothing else written), for every float dtype, on fresh random data; and the stock form's
rotation of q and k together equals each alone (the layer rotates their concatenation)."""
import pytest
import torch

from detmoe import kernels
from detmoe.kernels.ops.rope import rope_and_store
from detmoe.kernels.torch_backend import rope_and_store_torch, rope_torch
from detmoe.moe.attention import rope_tables
from tests.kernels.conftest import DEVICE, assert_same_bits, randn


def _case(gen, dtype, T, H=8, Hkv=2, Dh=64, slots=5, L=40):
    q = randn(gen, T, H, Dh, dtype=dtype)
    k, v = randn(gen, T, Hkv, Dh, dtype=dtype), randn(gen, T, Hkv, Dh, dtype=dtype)
    # distinct (slot, position) cells, positions up to ~5000 so the angles are large
    cells = torch.randperm(slots * L, generator=gen)[:T]
    token_slots, pos_in_cache = cells // L, cells % L
    positions = pos_in_cache.to(DEVICE)
    cos, sin = rope_tables(positions * 125, Dh, 10000.0)   # the angles of far positions, stored at near cells
    cache = randn(gen, slots, L, Hkv, Dh, dtype=dtype)
    return q, k, v, cos, sin, cache, token_slots.to(DEVICE), positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_and_store_is_the_stock_form(gen, dtype):
    q, k, v, cos, sin, cache, token_slots, positions = _case(gen, dtype, T=37)
    k_ref, v_ref, k_got, v_got = cache.clone(), cache.clone() + 1, cache.clone(), cache.clone() + 1
    ref = rope_and_store_torch(q, k, v, cos, sin, k_ref, v_ref, token_slots, positions)
    got = rope_and_store(q, k, v, cos, sin, k_got, v_got, token_slots, positions)
    assert_same_bits(got, ref.contiguous())
    assert_same_bits(k_got, k_ref)          # the step's cells rotated, every other cell untouched
    assert_same_bits(v_got, v_ref)
    # the rotated key really is in its cell (not only equal to a reference that might skip it)
    assert not torch.equal(k_got[token_slots, positions], k)


def test_rope_and_store_through_both_backends(gen):
    q, k, v, cos, sin, cache, token_slots, positions = _case(gen, torch.bfloat16, T=9)
    outs = []
    for backend in kernels.BACKENDS:
        kc, vc = cache.clone(), cache.clone()
        with kernels.use_backend(backend):
            outs.append((kernels.rope_and_store(q, k, v, cos, sin, kc, vc, token_slots, positions), kc, vc))
    for a, b in zip(*outs):
        assert_same_bits(a.contiguous(), b.contiguous())


def test_rope_and_store_reads_strided_indices_and_empty_steps(gen):
    q, k, v, cos, sin, cache, token_slots, positions = _case(gen, torch.bfloat16, T=9)
    k_ref, v_ref, k_got, v_got = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    ref = rope_and_store_torch(q, k, v, cos, sin, k_ref, v_ref, token_slots, positions)
    strided = lambda t: torch.stack([t, t], 1)[:, 0]     # noqa: E731  (the same values, stride 2)
    got = rope_and_store(q, k, v, cos, sin, k_got, v_got, strided(token_slots), strided(positions))
    assert_same_bits(got, ref.contiguous())
    assert_same_bits(k_got, k_ref)
    assert_same_bits(v_got, v_ref)
    for backend in kernels.BACKENDS:             # a step of no tokens: nothing written, an empty q
        with kernels.use_backend(backend):
            out = kernels.rope_and_store(q[:0], k[:0], v[:0], cos[:0], sin[:0], k_got, v_got,
                                         token_slots[:0], positions[:0])
        assert out.shape == (0,) + q.shape[1:]


def test_rope_and_store_checks_its_inputs(gen):
    q, k, v, cos, sin, cache, token_slots, positions = _case(gen, torch.bfloat16, T=4)
    with pytest.raises(ValueError, match="share one dtype"):
        rope_and_store(q, k.float(), v, cos, sin, cache, cache.clone(), token_slots, positions)
    with pytest.raises(ValueError, match="k_cache"):
        rope_and_store(q, k, v, cos, sin, cache[:, :, :1], cache[:, :, :1], token_slots, positions)
    with pytest.raises(ValueError, match="token_slots"):
        rope_and_store(q, k, v, cos, sin, cache, cache.clone(), token_slots[:3], positions)
    with pytest.raises(ValueError, match="integer"):
        rope_and_store(q, k, v, cos, sin, cache, cache.clone(), token_slots, positions.float())
    if DEVICE == "cpu":   # index values are read where that costs no device sync
        with pytest.raises(ValueError, match="positions must be in 0..39"):
            rope_and_store(q, k, v, cos, sin, cache, cache.clone(), token_slots, positions + 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_of_q_and_k_together_equals_each_alone(seed, dtype):
    T, H, Hkv, Dh = 37, 8, 2, 64
    positions = torch.randint(0, 5000, (T,))
    cos, sin = rope_tables(positions, Dh, 10000.0)
    q, k = torch.randn(T, H, Dh).to(dtype), torch.randn(T, Hkv, Dh).to(dtype)
    together = rope_torch(torch.cat([q, k], dim=1), cos, sin)
    assert torch.equal(together[:, :H], rope_torch(q, cos, sin))
    assert torch.equal(together[:, H:], rope_torch(k, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_gpu_rope_and_store_at_model_sizes(gen, T):
    """The presets' heads (large: 16/4, wide: 32/8, head dim 128) in bf16."""
    for H, Hkv in ((16, 4), (32, 8)):
        q, k, v, cos, sin, cache, token_slots, positions = _case(gen, torch.bfloat16, T, H, Hkv, 128,
                                                                  slots=max(2, T // 64 + 1), L=128)
        k_ref, v_ref, k_got, v_got = cache.clone(), cache.clone(), cache.clone(), cache.clone()
        ref = rope_and_store_torch(q, k, v, cos, sin, k_ref, v_ref, token_slots, positions)
        assert_same_bits(rope_and_store(q, k, v, cos, sin, k_got, v_got, token_slots, positions), ref.contiguous())
        assert_same_bits(k_got, k_ref)
        assert_same_bits(v_got, v_ref)
