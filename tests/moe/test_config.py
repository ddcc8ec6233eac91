"""Bad configs fail early, naming the field and what is allowed."""
import pytest

from detmoe import moe


@pytest.mark.parametrize("kw, field", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router="switch"), "router"),
    (dict(combine="sum"), "combine"),
    (dict(drop_order="random"), "drop_order"),
    (dict(n_experts=0, top_k=0), "n_experts"),
    (dict(group_size=0), "group_size"),
])
def test_bad_moe_config(kw, field):
    base = dict(n_experts=8, top_k=2, d_expert=16)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        moe.MoEConfig(**base)


def test_unknown_router_lists_the_allowed_names():
    with pytest.raises(ValueError, match="expert_choice"):
        moe.MoEConfig(n_experts=4, top_k=1, d_expert=8, router="nope")
    with pytest.raises(ValueError, match="sequence_capacity"):
        moe.build_router("nope", n_experts=4, top_k=1)


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=65), "d_model"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(dtype="int8"), "dtype"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(reduce_chunks=3), "reduce_chunks must be a power of two"),
    (dict(reduce_chunks=0), "reduce_chunks must be a power of two"),
    (dict(reduce_chunks=128), "attention_width=64 must be divisible by reduce_chunks"),
])
def test_bad_model_config(kw, field):
    with pytest.raises(ValueError, match=field):
        moe.ModelConfig.from_name("tiny", **kw)


def test_moe_layer_alone_checks_reduce_chunks():
    cfg = moe.MoEConfig(n_experts=4, top_k=2, d_expert=24)
    with pytest.raises(ValueError, match="d_expert=24 must be divisible by reduce_chunks=16"):
        moe.MoELayer(cfg, 32, reduce_chunks=16)
    with pytest.raises(ValueError, match="power of two"):
        moe.MoELayer(cfg, 32, reduce_chunks=6)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        moe.ModelConfig.from_name("huge")


def test_wide_preset_has_mixtral_layer_shapes():
    """`wide` exists for its contraction sizes (K >= 4096, where stock bf16 cuBLAS varies on the H100);
    built on the meta device (no memory): about 12 B parameters, 24 GB in bf16."""
    cfg = moe.ModelConfig.from_name("wide")
    assert (cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dtype) == (4096, 128, 32, 8, "bfloat16")
    assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.d_expert, cfg.moe.router) == (8, 2, 14336, "topk")
    model = moe.MoETransformer(cfg, device="meta")
    assert 11.5e9 < sum(p.numel() for p in model.parameters()) < 12.5e9
    layer = model.blocks[0]
    assert min(layer.attn.wq.shape[0], layer.attn.wo.shape[0], layer.moe.w_gate_up.shape[1],
               layer.moe.w_down.shape[1]) >= 4096
