"""Bad configs fail early, naming the field and what is allowed."""
import dataclasses

import pytest
import torch

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


# --- every field of both dataclasses checks its type and range: (field, bad value, message)
NAN, INF = float("nan"), float("inf")
_INT = lambda name, bound: rf"{name} must be an int {bound}, got"
_POS = lambda name: rf"{name} must be a finite number > 0, got"
_BOOL = lambda name: rf"{name} must be True or False, got"

MOE_BAD = [
    ("n_experts", 8.0, _INT("n_experts", ">= 1")), ("n_experts", True, _INT("n_experts", ">= 1")),
    ("n_experts", "8", _INT("n_experts", ">= 1")),
    ("top_k", 2.0, _INT("top_k", "in 1..n_experts=8")), ("top_k", -1, _INT("top_k", "in 1..n_experts=8")),
    ("d_expert", 16.0, _INT("d_expert", ">= 1")), ("d_expert", 0, _INT("d_expert", ">= 1")),
    ("d_expert", True, _INT("d_expert", ">= 1")),
    ("n_shared_experts", -1, _INT("n_shared_experts", ">= 0")),
    ("n_shared_experts", 1.0, _INT("n_shared_experts", ">= 0")),
    ("router", None, "router must be one of"), ("router", ["topk"], "router must be one of"),
    ("capacity_factor", NAN, _POS("capacity_factor")), ("capacity_factor", INF, _POS("capacity_factor")),
    ("capacity_factor", "1.25", _POS("capacity_factor")), ("capacity_factor", True, _POS("capacity_factor")),
    ("combine", "sum", "combine must be one of"), ("combine", None, "combine must be one of"),
    ("renormalize", "no", _BOOL("renormalize")), ("renormalize", 1, _BOOL("renormalize")),
    ("drop_order", "random", "drop_order must be one of"),
    ("group_size", 64.0, _INT("group_size", ">= 1")), ("group_size", 0, _INT("group_size", ">= 1")),
    ("min_capacity", -1, _INT("min_capacity", ">= 0")), ("min_capacity", 0.5, _INT("min_capacity", ">= 0")),
    ("shared_expert_gate", "no", _BOOL("shared_expert_gate")), ("shared_expert_gate", 1, _BOOL("shared_expert_gate")),
    ("shared_expert_gate", True, "shared_expert_gate=True needs n_shared_experts >= 1"),
]

MODEL_BAD = [
    ("vocab_size", 256.0, _INT("vocab_size", ">= 2")), ("vocab_size", 1, _INT("vocab_size", ">= 2")),
    ("d_model", 64.0, _INT("d_model", ">= 1")), ("d_model", 0, _INT("d_model", ">= 1")),
    ("d_model", -64, _INT("d_model", ">= 1")), ("d_model", True, _INT("d_model", ">= 1")),
    ("d_model", 66, "d_model=66 must be divisible by n_heads=4"),
    ("n_layers", 2.5, _INT("n_layers", ">= 1")), ("n_layers", 0, _INT("n_layers", ">= 1")),
    ("n_heads", 4.0, _INT("n_heads", ">= 1")), ("n_heads", 0, _INT("n_heads", ">= 1")),
    ("n_kv_heads", 2.0, _INT("n_kv_heads", ">= 1")), ("n_kv_heads", 0, _INT("n_kv_heads", ">= 1")),
    ("n_kv_heads", 3, "n_heads=4 must be a multiple of n_kv_heads=3"),
    ("moe", None, "moe must be a MoEConfig or a dict of its fields"), ("moe", 8, "moe must be a MoEConfig"),
    ("moe", dict(n_experts=8, top_k=2, d_expert=64, topk=2), r"moe has unknown fields \['topk'\]"),
    ("moe", dict(n_experts=8, top_k=2), r"moe lacks the required fields \['d_expert'\]"),
    ("moe", dict(n_experts=8, top_k=2, d_expert=64.0), _INT("d_expert", ">= 1")),
    ("rope_theta", 0, _POS("rope_theta")), ("rope_theta", -1e4, _POS("rope_theta")),
    ("rope_theta", NAN, _POS("rope_theta")), ("rope_theta", "1e4", _POS("rope_theta")),
    ("norm_eps", 0.0, _POS("norm_eps")), ("norm_eps", -1e-6, _POS("norm_eps")), ("norm_eps", NAN, _POS("norm_eps")),
    ("norm_eps", INF, _POS("norm_eps")),
    ("max_seq_len", 0, _INT("max_seq_len", ">= 1")), ("max_seq_len", 256.0, _INT("max_seq_len", ">= 1")),
    ("dtype", "int8", "dtype must be one of"), ("dtype", torch.float32, "dtype must be one of"),
    ("dtype", ["float32"], "dtype must be one of"),
    ("tie_embeddings", "no", _BOOL("tie_embeddings")), ("tie_embeddings", "false", _BOOL("tie_embeddings")),
    ("tie_embeddings", 0, _BOOL("tie_embeddings")),
    ("init_std", 0, _POS("init_std")), ("init_std", -0.02, _POS("init_std")), ("init_std", NAN, _POS("init_std")),
    ("seed", -1, _INT("seed", "in 0..18446744073709551615")), ("seed", 1.5, _INT("seed", r"in 0..\d+")),
    ("seed", True, _INT("seed", r"in 0..\d+")), ("seed", 2**64, _INT("seed", r"in 0..\d+")),
    ("attn_head_dim", 0, _INT("attn_head_dim", ">= 1")), ("attn_head_dim", 16.0, _INT("attn_head_dim", ">= 1")),
    ("attn_head_dim", 15, "head dim must be even for RoPE"),
    ("qkv_bias", "no", _BOOL("qkv_bias")), ("qkv_bias", 1, _BOOL("qkv_bias")),
    ("qk_norm", "all", "qk_norm must be None or one of"), ("qk_norm", True, "qk_norm must be None or one of"),
    ("qk_norm", ["head"], "qk_norm must be None or one of"),
    ("reduce_chunks", 3, "reduce_chunks must be a power of two"),
    ("reduce_chunks", True, "reduce_chunks must be a power of two"),
    ("reduce_chunks", 4.0, "reduce_chunks must be a power of two"),
]


def _ids(table):
    return [f"{field}={value!r}" for field, value, _ in table]


def test_the_tables_cover_every_field():
    assert {f for f, _, _ in MOE_BAD} == {f.name for f in dataclasses.fields(moe.MoEConfig)}
    assert {f for f, _, _ in MODEL_BAD} == {f.name for f in dataclasses.fields(moe.ModelConfig)}


@pytest.mark.parametrize("field, value, message", MOE_BAD, ids=_ids(MOE_BAD))
def test_every_moe_field_is_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        moe.MoEConfig(**{**dict(n_experts=8, top_k=2, d_expert=16), field: value})


@pytest.mark.parametrize("field, value, message", MODEL_BAD, ids=_ids(MODEL_BAD))
def test_every_model_field_is_checked(field, value, message):
    kw = {**moe.PRESETS["tiny"], field: value}
    with pytest.raises(ValueError, match=message):
        moe.ModelConfig(**kw)
    if field != "moe":  # from_name merges moe overrides into the preset's instead
        with pytest.raises(ValueError, match=message):
            moe.ModelConfig.from_name("tiny", **{field: value})


def test_valid_values_of_every_kind_build():
    """The checks take what they should: ints for float fields, None for the optional ones, any preset."""
    cfg = moe.ModelConfig.from_name("tiny", rope_theta=500000, norm_eps=1e-5, init_std=1, seed=2**64 - 1,
                                    tie_embeddings=True, qkv_bias=True, qk_norm="head", attn_head_dim=8,
                                    moe=dict(n_shared_experts=1, shared_expert_gate=True, capacity_factor=2))
    assert (cfg.head_dim, cfg.moe.n_shared_experts, cfg.moe.shared_expert_gate) == (8, 1, True)
    moe_cfg = moe.MoEConfig(n_experts=8, top_k=2, d_expert=16)
    assert moe.ModelConfig(**{**moe.PRESETS["tiny"], "moe": moe_cfg}).moe is moe_cfg


@pytest.mark.parametrize("name", sorted(moe.PRESETS))
def test_presets_build(name):
    cfg = moe.ModelConfig.from_name(name)
    preset = dict(moe.PRESETS[name])
    assert dataclasses.asdict(cfg.moe).items() >= preset.pop("moe").items()
    assert dataclasses.asdict(cfg).items() >= {k: v for k, v in preset.items()}.items()


def test_from_name_rejects_unknown_overrides():
    with pytest.raises(ValueError, match=r"model config has unknown fields \['d_modle'\]"):
        moe.ModelConfig.from_name("tiny", d_modle=32)
    with pytest.raises(ValueError, match="moe overrides must be a dict of MoEConfig fields"):
        moe.ModelConfig.from_name("tiny", moe=moe.MoEConfig(n_experts=8, top_k=2, d_expert=16))
    with pytest.raises(ValueError, match="preset must be one of"):
        moe.ModelConfig.from_name(["tiny"])


@pytest.mark.parametrize("override, message", [
    ("+model.tie_embeddings=no", _BOOL("tie_embeddings") + " 'no'"),
    ("+model.qkv_bias=no", _BOOL("qkv_bias") + " 'no'"),
    ("model.d_model=64.0", _INT("d_model", ">= 1") + " 64.0"),
    ("model.n_layers=2.5", _INT("n_layers", ">= 1") + " 2.5"),
    ("+model.norm_eps=nan", _POS("norm_eps") + " nan"),
    ("+model.rope_theta=0", _POS("rope_theta") + " 0"),
    ("model.moe.d_expert=64.0", _INT("d_expert", ">= 1") + " 64.0"),
    ("router.renormalize=no", _BOOL("renormalize") + " 'no'"),
    ("+model.tie_embedding=true", r"model config has unknown fields \['tie_embedding'\]"),
    ("+model.moe.topk=2", r"moe has unknown fields \['topk'\]"),
])
def test_hydra_values_get_the_same_checks(override, message):
    """Hydra parses `no` as the string "no" (truthy): it reaches model_config as it is and is rejected there."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    from detmoe.lab.hydra_utils import CONFIG_DIR, model_config
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("ablate", overrides=["model=tiny", "router=topk", override])
    assert isinstance(cfg.model, DictConfig)
    with pytest.raises(ValueError, match=message):
        model_config(cfg.model, cfg.router, "topk")


def test_hydra_model_group_still_builds():
    from hydra import compose, initialize_config_dir

    from detmoe.lab.hydra_utils import CONFIG_DIR, model_config
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("ablate", overrides=["model=tiny", "router=topk", "+model.tie_embeddings=true"])
    assert model_config(cfg.model, cfg.router, "topk").tie_embeddings is True
