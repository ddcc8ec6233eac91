"""The structure finder on more of transformers' MoE architectures than the six the rest of the tests use:
each is found, recorded with its unhooked bits and no hook left, and a run compared with itself is
invariant. Architectures whose experts are called one by one are refused, saying so."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detmoe.diagnose import compare, find_structure, record  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, pad_token_id=0, eos_token_id=None, bos_token_id=None, intermediate_size=48)
ARCHS = {
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "jamba": dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                  attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                  use_mamba_kernels=False, num_hidden_layers=4),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=128,
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    "glm4_moe": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                     first_k_dense_replace=1, head_dim=16),
    "ernie4_5_moe": dict(moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                         moe_layer_start_index=0, moe_layer_interval=1),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=16),
    "dots1": dict(n_shared_experts=1, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, head_dim=16),
    "deepseek_v2": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, rotary_dim=8),
    "afmoe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16, num_dense_layers=1),
}
LOOPED = {"jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=16)}


def build(arch: str, opts: dict, seed: int):
    if arch not in transformers.CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {arch}")
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(arch, **{**BASE, **opts})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # zeros and ones at init (router biases, norms) would tie every choice
        for p in model.parameters():
            if p.dim() == 1 or p.abs().sum() == 0:
                p.copy_(torch.randn_like(p) * 0.1 + (1 if p.dim() == 1 and (p == 1).all() else 0))
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_found_recorded_bit_for_bit_and_invariant_against_itself(arch, seed):
    model = build(arch, ARCHS[arch], seed)
    assert find_structure(model).moe
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    trace = record(model, ids, mask, keep_tensors=True)
    assert torch.equal(trace.tensors["logits"], plain.float())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert ((trace.margin >= 0) | trace.margin.isnan()).all()
    assert compare(record(model, ids[:1]), record(model, ids[:1])).invariant


@pytest.mark.parametrize("arch", sorted(LOOPED))
def test_experts_called_one_by_one_are_refused_saying_so(arch, seed):
    with pytest.raises(ValueError, match="experts called one by one"):
        find_structure(build(arch, LOOPED[arch], seed))
