"""Bad configs fail early, naming the field and what is allowed."""
import pytest

import moe


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
])
def test_bad_model_config(kw, field):
    with pytest.raises(ValueError, match=field):
        moe.ModelConfig.from_name("tiny", **kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        moe.ModelConfig.from_name("huge")
