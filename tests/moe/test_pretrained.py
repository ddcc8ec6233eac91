"""moe.from_pretrained against transformers' own forward: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE models saved to a temporary folder (once sharded), loaded by us, fp32 logits within 1e-4 of HF's
on the same prompts (each prompt alone through HF; ours as one ragged batch). Then the ablation's core
(engine + attribution) on a loaded model. Skipped when transformers is not installed."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detmoe import kernels  # noqa: E402
from detmoe import moe  # noqa: E402
from detmoe.lab.attribution import attribute_divergence  # noqa: E402
from detmoe.moe.engine import Engine, Request  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2)
# name -> (config class, its options); odd vocab, GQA, non-default head_dim and rope_theta where the arch has them
ARCHS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=64,
                                        norm_topk_prob=False, rope_parameters=dict(rope_type="default",
                                                                                  rope_theta=5000.0))),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                        num_experts_per_tok=3, norm_topk_prob=True, head_dim=24)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  norm_topk_prob=False)),
}
PROMPTS = [[5, 17, 3, 90, 44, 1, 8], [2], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72], [33, 9, 9]]


def hf_model(arch: str, seed: int = 0):
    cls, opts = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**COMMON, **opts)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zeros: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (folder, HF model); OLMoE is saved in shards."""
    out = {}
    for arch in ARCHS:
        model = hf_model(arch)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder, max_shard_size="20KB" if arch == "olmoe" else "100MB")
        out[arch] = (folder, model)
    return out


def hf_logits(model, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).logits[0].float() for p in prompts])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(saved, arch):
    folder, hf = saved[arch]
    ours = moe.from_pretrained(folder, dtype="float32")
    with kernels.use_backend("torch"):
        logits, routings = ours(*moe.cu_seqlens_of(PROMPTS))
    torch.testing.assert_close(logits, hf_logits(hf, PROMPTS), atol=1e-4, rtol=0)
    assert routings[0].experts.shape[1] == ARCHS[arch][1]["num_experts_per_tok"]


def test_sharded_folder_is_read_through_its_index(saved):
    folder, _ = saved["olmoe"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_dtype_device_and_router_overrides(saved):
    folder, _ = saved["qwen2_moe"]
    model = moe.from_pretrained(folder, dtype=torch.bfloat16, device="cpu", router="capacity", capacity_factor=1.0)
    assert model.embed.dtype == torch.bfloat16 and model.cfg.moe.router == "capacity"
    assert model.cfg.moe.n_shared_experts == 2 and model.cfg.moe.shared_expert_gate
    assert not any(p.is_meta for p in model.parameters())


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ValueError, match="mixtral.*qwen2_moe.*qwen3_moe.*olmoe"):
        moe.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        moe.from_pretrained(tmp_path / "missing")


def test_unmodelled_options_fail_clearly(saved, tmp_path):
    folder, _ = saved["mixtral"]
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    with pytest.raises(ValueError, match="sliding-window"):
        moe.pretrained_config(tmp_path)


def write_fused(folder, out, config) -> None:
    """The Qwen3-MoE checkpoint in `folder` rewritten to `out` with its experts fused."""
    from safetensors.torch import load_file, save_file
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}.mlp.experts."
        take = lambda n: torch.stack([state.pop(f"{pre}{e}.{n}.weight") for e in range(config.num_experts)])
        state[pre + "gate_up_proj"] = torch.cat([take("gate_proj"), take("up_proj")], dim=1)
        state[pre + "down_proj"] = take("down_proj")
    save_file(state, out / "model.safetensors")


def test_fused_expert_layout(saved, tmp_path):
    """transformers >= 5 keeps experts fused in memory ([E, 2F, D] gate_up, [E, D, F] down); a folder
    written in that layout loads to the same model as the Hub's one-Linear-per-expert layout."""
    folder, hf = saved["qwen3_moe"]
    write_fused(folder, tmp_path, hf.config)
    a, b = moe.from_pretrained(folder), moe.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_ablation_core_on_a_loaded_model(saved):
    """The ablation's core on a real architecture: a probe alone vs inside a batch (torch backend),
    compared and attributed token by token."""
    folder, _ = saved["olmoe"]
    model = moe.from_pretrained(folder, dtype="float32")
    probe, others = PROMPTS[0], [PROMPTS[2], PROMPTS[3], [7] * 11]
    with kernels.use_backend("torch"):
        ref = Request(probe, 4, track=True)
        Engine(model, 1, 32).run([ref])
        test = Request(probe, 4, track=True)
        Engine(model, 4, 32).run([Request(p, 4) for p in others[:2]] + [test] + [Request(others[2], 4)])
    d = attribute_divergence(ref, test)
    assert d.n_compared >= len(probe)
    assert all((c is None) == (not bool(x)) for c, x in zip(d.causes, d.logits_differ))
    assert d.max_abs_delta < 1e-3  # dropless top-k: only reduction order can differ


def test_ablation_app_takes_a_pretrained_folder(saved, tmp_path):
    """`python -m detmoe.experiments.ablate pretrained=<folder>`: every cell's model is the checkpoint's, its
    vocabulary sets the probes', and the routers still swap."""
    from hydra import compose, initialize_config_dir

    from detmoe.experiments.ablate import run_ablation
    from detmoe.lab.hydra_utils import CONFIG_DIR

    folder, _ = saved["qwen3_moe"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("ablate", overrides=[
            f"pretrained={folder}", "kernels=torch", "router.names=[topk,capacity]", "combines=[ordered]",
            "extra_cells=[]", "jobs=1", "experiment.batch_sizes=[1,3]", "experiment.max_new_tokens=2"])
    cells = run_ablation(cfg, tmp_path)["cells"]
    assert [c["router"] for c in cells] == ["topk", "capacity"]
    assert all(c["tokens"] > 0 for c in cells)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["pretrained"] == str(folder)


# --- corrupted folders: every tensor's shape, the files and config.json are checked before anything is copied

def copy_of(saved, arch: str, out):
    """`saved[arch]`'s folder copied to `out` ("qwen3_moe_fused": the Qwen3-MoE one with fused experts)."""
    import shutil
    folder, hf = saved[arch.removesuffix("_fused")]
    if arch.endswith("_fused"):
        write_fused(folder, out, hf.config)
    else:
        shutil.copytree(folder, out, dirs_exist_ok=True)
    return out


def file_of(folder, key: str) -> str:
    index = folder / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"


def rewrite(folder, key: str, shape_of) -> tuple[str, tuple, tuple]:
    """Tensor `key` replaced by fresh random data of shape `shape_of(its shape)`, in the file that holds it;
    returns (file, old shape, new shape)."""
    from safetensors.torch import load_file, save_file
    name = file_of(folder, key)
    state = load_file(folder / name)
    old = tuple(state[key].shape)
    state[key] = torch.randn(shape_of(old))
    save_file(state, folder / name, metadata={"format": "pt"})
    return name, old, tuple(state[key].shape)


def shape_error(key: str, name: str, got: tuple, expected: tuple) -> str:
    import re
    return re.escape(f"{key} in {name} has shape {got}, expected {expected}")


# (arch, tensor, wrong shape from the right one): shapes that copy_ would broadcast into the parameter
BROADCASTABLE = [
    ("qwen3_moe", "model.norm.weight", lambda s: (1,)),
    ("qwen3_moe", "model.layers.1.post_attention_layernorm.weight", lambda s: ()),
    ("olmoe", "model.layers.0.input_layernorm.weight", lambda s: (1,)),
    ("qwen3_moe", "model.layers.0.self_attn.q_norm.weight", lambda s: (1,)),
    ("qwen2_moe", "model.layers.1.self_attn.k_proj.bias", lambda s: (1,)),
    ("qwen3_moe", "model.layers.0.mlp.gate.weight", lambda s: (1, s[1])),
    ("olmoe", "model.layers.1.mlp.gate.weight", lambda s: (1, s[1])),               # a sharded folder
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", lambda s: (1, s[1])),
    ("qwen3_moe", "model.layers.0.mlp.experts.3.gate_proj.weight", lambda s: (1, s[1])),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.1.w3.weight", lambda s: (1, s[1])),
    ("qwen3_moe", "model.layers.1.mlp.experts.0.down_proj.weight", lambda s: (s[0], 1)),
    ("qwen3_moe_fused", "model.layers.0.mlp.experts.gate_up_proj", lambda s: (1, *s[1:])),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", lambda s: (1, s[1])),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", lambda s: (1, 1)),
    ("qwen3_moe", "lm_head.weight", lambda s: (1, s[1])),
    ("olmoe", "model.embed_tokens.weight", lambda s: (s[0], 1)),
]


@pytest.mark.parametrize("arch, key, shape_of", BROADCASTABLE, ids=[f"{a}:{k}" for a, k, _ in BROADCASTABLE])
def test_broadcastable_wrong_shape_is_named(saved, tmp_path, arch, key, shape_of):
    """A [1, D] router or a [] norm would load silently (copy_ broadcasts it): the shape is checked first."""
    folder = copy_of(saved, arch, tmp_path)
    name, old, new = rewrite(folder, key, shape_of)
    with pytest.raises(ValueError, match=shape_error(key, name, new, old)):
        moe.from_pretrained(folder)


NOT_BROADCASTABLE = [
    ("qwen3_moe", "model.layers.0.mlp.gate.weight", lambda s: (s[0] + 1, s[1])),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w2.weight", lambda s: (s[0], s[1] + 3)),
    ("olmoe", "model.embed_tokens.weight", lambda s: (s[0], s[1] + 1)),
    ("qwen3_moe", "lm_head.weight", lambda s: (s[1], s[0])),
    ("qwen3_moe", "model.norm.weight", lambda s: (s[0], s[0])),
]


@pytest.mark.parametrize("arch, key, shape_of", NOT_BROADCASTABLE, ids=[f"{a}:{k}" for a, k, _ in NOT_BROADCASTABLE])
def test_other_wrong_shape_is_named(saved, tmp_path, arch, key, shape_of):
    """Not a bare "size of tensor a (64) must match": the tensor, its file and both shapes."""
    folder = copy_of(saved, arch, tmp_path)
    name, old, new = rewrite(folder, key, shape_of)
    with pytest.raises(ValueError, match=shape_error(key, name, new, old)):
        moe.from_pretrained(folder)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("keep", [5, 0.5, -1], ids=["header", "half", "last-byte"])
def test_truncated_file_is_named(saved, tmp_path, arch, keep):
    folder = copy_of(saved, arch, tmp_path)
    name = file_of(folder, "model.layers.1.mlp.gate.weight")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{name} in .* is not a readable safetensors file"):
        moe.from_pretrained(folder)


MISSING = [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts"), ("olmoe", "num_experts_per_tok"),
           ("mixtral", "intermediate_size"), ("qwen2_moe", "moe_intermediate_size"),
           ("qwen2_moe", "shared_expert_intermediate_size"), ("olmoe", "vocab_size"), ("qwen3_moe", "hidden_size"),
           ("mixtral", "num_hidden_layers"), ("olmoe", "num_attention_heads"), ("qwen2_moe", "rms_norm_eps")]


@pytest.mark.parametrize("arch, field", MISSING)
def test_missing_config_field_is_named(saved, tmp_path, arch, field):
    folder, _ = saved[arch]
    cfg = json.loads((folder / "config.json").read_text())
    assert field in cfg
    del cfg[field]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json lacks the field .*'{field}'"):
        moe.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("tie_word_embeddings", "false", "tie_embeddings must be True or False, got 'false'"),
    ("norm_topk_prob", "no", "renormalize must be True or False, got 'no'"),
    ("hidden_size", 64.0, "d_model must be an int >= 1, got 64.0"),
    ("rms_norm_eps", 0, "norm_eps must be a finite number > 0, got 0"),
    ("rope_parameters", dict(rope_type="default", rope_theta="1e4"),
     "rope_theta must be a finite number > 0, got '1e4'"),
])
def test_bad_config_value_is_named(saved, tmp_path, field, value, message):
    """bool("false") is True: config.json's values reach ModelConfig's checks as they are."""
    folder, _ = saved["qwen3_moe"]
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=f"config.json is invalid: {message}"):
        moe.pretrained_config(tmp_path)
