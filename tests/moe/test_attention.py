"""RoPE on q and k together (one pass over their concatenation, as the attention layer runs it) gives
each the bits of its own call: the rotation is elementwise per token and head."""
import pytest
import torch

from moe.attention import rope, rope_tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_of_q_and_k_together_equals_each_alone(seed, dtype):
    T, H, Hkv, Dh = 37, 8, 2, 64
    positions = torch.randint(0, 5000, (T,))
    cos, sin = rope_tables(positions, Dh, 10000.0)
    q, k = torch.randn(T, H, Dh).to(dtype), torch.randn(T, Hkv, Dh).to(dtype)
    together = rope(torch.cat([q, k], dim=1), cos, sin)
    assert torch.equal(together[:, :H], rope(q, cos, sin))
    assert torch.equal(together[:, H:], rope(k, cos, sin))
