"""The roofline accounting (benchmarks/roofline.py): bytes and FLOPs of a step checked against numbers
worked out by hand for a toy config, the weight bytes of a step that touches everything against the
model's own parameters, the distinct experts of a known routing, and the bound arithmetic."""
import pytest
import torch

from detmoe import moe
from benchmarks.roofline import (DeviceBounds, assignments, experts_hit, fraction_of_bound,
                                 measure_device_bounds, step_cost)

# D=8, 2 layers, H=2, Hkv=1, Dh=4, V=16, E=4 experts of F=4, top 2, bf16 (2 bytes)
TOY = moe.ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, dtype="bfloat16",
                      moe=moe.MoEConfig(n_experts=4, top_k=2, d_expert=4))


def test_decode_step_by_hand():
    """3 sequences with 5, 0 and 2 cached tokens decode one token each; layer 0 hit 3 experts, layer 1
    two; 6 kept assignments per layer; 2 distinct tokens."""
    c = step_cost(TOY, q_lens=[1, 1, 1], context_lens=[5, 0, 2], hit=[3, 2], kept=[6, 6], distinct_tokens=2,
                  elt_bytes=2)
    assert c.expert_weights == 960          # 5 experts x (8*8 gate/up + 4*8 down = 96) x 2 bytes
    assert c.attention_weights == 768       # 2 layers x (wq 64 + wk 32 + wv 32 + wo 64) x 2
    assert c.router_weights == 128          # 2 x 8*4 x 2
    assert c.norm_weights == 80             # (2 x 2 + 1) norms of 8 x 2
    assert c.embedding_rows == 32           # 2 rows of 8 x 2
    assert c.lm_head == 256                 # 8*16 x 2
    assert c.kv_read == 224                 # 7 cached positions x 2 layers x (k, v) x 4 x 2
    assert c.kv_write == 96                 # 3 new positions x 2 layers x (k, v) x 4 x 2
    assert c.shared_expert_weights == 0
    assert c.bytes == 2544
    # 2 x (3 tokens x 2 layers x (192 attention + 32 router) + 12 assignments x 96 + 3 x 128 head) = 5760
    assert c.matmul_flops == 5760
    # keys seen: 6 + 1 + 3 = 10 per layer, x 4*H*Dh = 32, x 2 layers
    assert c.attention_flops == 640
    assert c.flops == 6400


def test_prefill_step_by_hand():
    """One sequence of 3 tokens, nothing cached, fp32: causal keys 1 + 2 + 3; no cache read."""
    c = step_cost(TOY, q_lens=[3], context_lens=[0], hit=[4, 4], kept=[6, 6], distinct_tokens=3, elt_bytes=4)
    assert c.kv_read == 0
    assert c.kv_write == 192                # 3 positions x 2 layers x (k, v) x 4 x 4 bytes
    assert c.expert_weights == 3072         # 8 experts x 96 x 4
    assert c.attention_flops == 384         # 6 keys x 32 x 2 layers
    assert c.matmul_flops == 5760           # as the decode step: 3 tokens, 12 assignments


CONFIGS = [
    moe.ModelConfig.from_name("tiny"),
    moe.ModelConfig.from_name("small"),                                      # a shared expert
    moe.ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, qkv_bias=True,
                    qk_norm="full", tie_embeddings=True,
                    moe=moe.MoEConfig(n_experts=6, top_k=2, d_expert=8, n_shared_experts=2,
                                      shared_expert_gate=True)),
    moe.ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4, qk_norm="head",
                    attn_head_dim=8, moe=moe.MoEConfig(n_experts=5, top_k=1, d_expert=4)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny", "small", "tied-bias-fullnorm-gate", "headnorm"])
def test_a_step_touching_every_weight_reads_the_whole_model(cfg):
    """Every expert hit and every vocabulary row embedded: the weight bytes are the model's parameters."""
    model = moe.MoETransformer(cfg, device="meta")
    params = sum(p.numel() for p in model.parameters())
    E, L = cfg.moe.n_experts, cfg.n_layers
    c = step_cost(cfg, q_lens=[1], context_lens=[0], hit=[E] * L, kept=[1] * L,
                  distinct_tokens=cfg.vocab_size, elt_bytes=2)
    weights = c.bytes - c.kv_read - c.kv_write
    assert weights == 2 * params


def test_flops_of_one_token_are_twice_its_matmul_weights():
    """One token, no cache, top-k experts each: 2 FLOPs per weight it meets; attention over 1 key."""
    cfg = moe.ModelConfig.from_name("tiny")          # D 64, H 4, Hkv 2, Dh 16, V 256, E 8, k 2, F 64
    c = step_cost(cfg, q_lens=[1], context_lens=[0], hit=[2, 2], kept=[2, 2], distinct_tokens=1, elt_bytes=4)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 * 8 + 2 * 3 * 64 * 64   # attn, router, 2 experts
    assert c.matmul_flops == 2 * (2 * per_layer + 64 * 256)
    assert c.attention_flops == 2 * 4 * 4 * 16


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="q_lens and context_lens"):
        step_cost(TOY, [1, 1], [0], [1, 1], [1, 1], 1, 2)
    with pytest.raises(ValueError, match="one count per layer"):
        step_cost(TOY, [1], [0], [1], [1, 1], 1, 2)


def test_distinct_experts_of_a_known_routing():
    """3 tokens, top 2: experts {0, 1}, {1, 3}, {0, 1}; then with token 1's expert 3 dropped."""
    experts = torch.tensor([[0, 1], [1, 3], [0, 1]])
    probs = torch.full((3, 4), 0.25)
    kept_all = moe.Routing(experts, torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.bool), probs)
    dropped = torch.tensor([[False, False], [False, True], [False, False]])
    one_dropped = moe.Routing(experts, torch.ones(3, 2), dropped, probs)
    assert experts_hit([kept_all, one_dropped]) == [3, 2]
    assert assignments([kept_all, one_dropped]) == [6, 5]


def test_bound_arithmetic():
    bounds = DeviceBounds(hbm_bytes_per_s=2e12, matmul_flops_per_s=1e15, how="given")
    assert bounds.hbm_ms(4e9) == pytest.approx(2.0)           # 4 GB at 2 TB/s
    assert bounds.matmul_ms(5e12) == pytest.approx(5.0)       # 5 TFLOP at 1 PFLOP/s
    assert fraction_of_bound(2.0, 8.0) == pytest.approx(0.25)
    assert fraction_of_bound(5.0, 5.0) == 1.0
    with pytest.raises(ValueError, match="measured_ms"):
        fraction_of_bound(1.0, 0.0)


def test_measured_bounds_count_a_copy_as_read_plus_write():
    """A timer that says the copy took 0.5 ms and the matmul 2 ms: 2 x 1 MiB / 0.5 ms, 2 x 64^3 / 2 ms;
    and the timed functions do copy and multiply."""
    said = iter([0.5, 2.0])
    results = []

    def timer(fn):
        results.append(fn())
        return next(said)

    b = measure_device_bounds("cpu", timer, copy_bytes=1 << 20, mm_n=64)
    assert b.hbm_bytes_per_s == pytest.approx(2 * 2**20 / 0.5e-3)
    assert b.matmul_flops_per_s == pytest.approx(2 * 64**3 / 2e-3)
    assert results[0].shape == (1 << 20,) and bool((results[0] == 1).all())
    assert results[1].shape == (64, 64) and results[1].dtype == torch.bfloat16
    assert "read + write" in b.how
