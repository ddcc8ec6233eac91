"""detmoe.diagnose.structure: the decoder layers, routers and experts of transformers' MoE models, found by
structure; a model without them gets an error that says what is missing."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detmoe.diagnose import find_structure
from detmoe.diagnose.tiny import MOE_LAYERS, available_archs, tiny_model


@pytest.mark.parametrize("arch", available_archs())
def test_every_moe_layer_is_found_with_its_router_and_experts(arch, seed):
    model = tiny_model(arch, seed)
    s = find_structure(model)
    n_layers = model.config.num_hidden_layers
    assert len(s.layers) == n_layers and s.head is model.get_output_embeddings()
    assert list(s.moe) == MOE_LAYERS.get(arch, list(range(n_layers)))
    for i, parts in s.moe.items():
        assert parts.block_name.startswith(f"{s.layers_name}.{i}.")
        assert parts.router is not parts.experts and "shared" not in parts.router_name
        weights = [p for p in parts.router.parameters() if p.dim() == 2]
        assert weights and weights[0].shape[0] == parts.n_experts


def test_a_dense_model_is_refused_naming_what_is_missing(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no MoE experts module found"):
        find_structure(transformers.AutoModelForCausalLM.from_config(cfg))


def test_an_encoder_decoder_model_is_refused(seed):
    if not hasattr(transformers, "SwitchTransformersConfig"):
        pytest.skip("this transformers has no Switch Transformers")
    cfg = transformers.SwitchTransformersConfig(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, num_experts=4)
    with pytest.raises(ValueError, match="encoder-decoder model"):
        find_structure(transformers.SwitchTransformersForConditionalGeneration(cfg))
