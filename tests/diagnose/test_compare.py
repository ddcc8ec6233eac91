"""detmoe.diagnose.compare: a perturbation injected at a chosen layer, token and module is found there and
given its cause; padding that moves positions is `padding`; a run compared with itself is invariant."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detmoe.diagnose import compare, find_structure, record
from detmoe.diagnose.tiny import available_archs, tiny_model


def _ids(n: int) -> torch.Tensor:
    return torch.randint(1, 97, (1, n))


def _recorded_with(model, hook_module, hook, ids, pre: bool = False, **kw):
    """A trace of `model` on ids with `hook` on `hook_module` (registered first: it runs before the
    recorder's, which then sees what it did)."""
    handle = (hook_module.register_forward_pre_hook(hook, with_kwargs=True) if pre
              else hook_module.register_forward_hook(hook))
    try:
        return record(model, ids, **kw)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", available_archs())
def test_a_run_compared_with_itself_is_invariant(arch, seed):
    model = tiny_model(arch, seed)
    ids = _ids(9)
    c = compare(record(model, ids), record(model, ids))
    assert c.invariant and c.n_compared == 9 and c.cause_counts() == dict.fromkeys(c.cause_counts(), 0)
    assert "all 9 tokens have the reference's bits" in c.summary()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_drift_in_a_chosen_layers_experts_is_arithmetic_there(arch, seed):
    model = tiny_model(arch, seed)
    s = find_structure(model)
    layer = list(s.moe)[int(torch.randint(0, len(s.moe), ()))]
    parts, n = s.moe[layer], 10
    j = int(torch.randint(0, n, ()))

    def nudge(module, args, output):   # the experts' output for token j, a little off (as another sum order)
        out = output.clone()
        out[j] *= 1.001
        return out
    ids = _ids(n)
    c = compare(record(model, ids), _recorded_with(model, parts.experts, nudge, ids))
    first = c.divergent[0]
    assert first.position == j and first.first_layer == layer and first.first_module == parts.experts_name
    assert all(d.position >= j for d in c.divergent)
    if not c.routes_differ.any():          # (a later top-k may flip at a near tie: then amplified)
        assert {d.cause for d in c.divergent} == {"arithmetic"}
    if layer == len(s.layers) - 1:         # the last layer's output reaches only its own token
        assert [d.position for d in c.divergent] == [j]


def test_a_flipped_top_k_choice_is_amplified_with_its_reference_margin(seed):
    model = tiny_model("mixtral", seed)
    s = find_structure(model)
    layer = int(torch.randint(0, len(s.layers), ()))
    parts, n, k = s.moe[layer], 10, model.config.num_experts_per_tok
    j = int(torch.randint(0, n, ()))

    def flip(module, args, output):        # token j's best unchosen expert overtakes its last chosen one
        logits, _, _ = output
        logits = logits.clone()
        top = logits[j].topk(k + 1).indices
        logits[j, top[k]] = logits[j, top[k - 1]] + 1.0
        probs = torch.softmax(logits.float(), dim=-1)
        values, indices = torch.topk(probs, k, dim=-1)
        return logits, values / values.sum(-1, keepdim=True), indices
    ids = _ids(n)
    ref = record(model, ids)
    c = compare(ref, _recorded_with(model, parts.router, flip, ids))
    # other tokens may move too, with routing of their own unchanged: the experts' eager loop multiplies
    # each expert's rows in one GEMM, whose bits (on this CPU's BLAS) depend on how many rows it got
    first = next(d for d in c.divergent if d.position == j)
    assert first.cause == "amplified" and first.decided_at == (j, layer)
    assert first.first_layer == layer and first.first_module == parts.router_name
    m = ref.moe_layers.index(layer)
    assert first.margin == pytest.approx(float(ref.margin[0, j, m])) and first.margin > 0
    assert float(ref.margin[0, j, m]) in c.flipped_margins.tolist()
    assert all(d.cause in ("amplified", "arithmetic") for d in c.divergent)
    assert "amplified" in c.summary() and f"position {j}" in c.summary()


def test_a_lost_expert_slot_is_structural(seed):
    model = tiny_model("mixtral", seed)
    s = find_structure(model)
    layer = int(torch.randint(0, len(s.layers), ()))
    parts, n = s.moe[layer], 10
    j = int(torch.randint(0, n, ()))

    def drop(module, args, kwargs):        # token j's second slot dropped (id E: "no expert")
        hidden, index, weights = args
        index = index.clone()
        index[j, 1] = parts.n_experts
        return (hidden, index, weights), kwargs
    ids = _ids(n)
    c = compare(record(model, ids), _recorded_with(model, parts.experts, drop, ids, pre=True))
    first = next(d for d in c.divergent if d.position == j)      # (others may move: see above)
    assert first.cause == "structural" and first.decided_at == (j, layer)
    assert first.first_module == parts.experts_name


def test_left_padding_with_shifted_positions_is_padding_and_with_positions_from_the_mask_is_not(seed):
    model = tiny_model("mixtral", seed)
    ids = _ids(8)
    batch = torch.randint(1, 97, (3, 11))
    mask = torch.ones_like(batch)
    batch[1, :3], batch[1, 3:], mask[1, :3] = 0, ids[0], 0
    alone = record(model, ids)
    shifted = compare(alone, record(model, batch, mask), other_row=1)   # positions counted from the pads
    assert shifted.divergent and {d.cause for d in shifted.divergent} == {"padding"}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                     # what generate passes
    fixed = compare(alone, record(model, batch, mask, position_ids=positions), other_row=1)
    assert all(d.cause != "padding" for d in fixed.divergent)
    right = torch.zeros(2, 12, dtype=torch.long)
    right[0, :8], right[1] = ids[0], torch.randint(1, 97, (12,))
    rmask = (right != 0).long()
    rmask[1] = 1
    assert all(d.cause != "padding" for d in compare(alone, record(model, right, rmask)).divergent)


def test_compare_refuses_other_requests_and_other_models(seed):
    model = tiny_model("mixtral", seed)
    a = record(model, torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="not the same request"):
        compare(a, record(model, torch.tensor([[8, 6, 7]])))
    with pytest.raises(ValueError, match="different models"):
        compare(a, record(tiny_model("qwen3_moe", seed), torch.tensor([[5, 6, 7]])))
    with pytest.raises(ValueError, match="row must be in 0..0"):
        compare(a, a, other_row=1)


def test_two_dtypes_compare_without_calling_it_padding(seed):
    """Positions are recorded as the integers the layers were given: an fp32 run and a bf16 run of one
    request differ in their arithmetic (every rotary table, every product), not in their positions."""
    ids = _ids(9)
    c = compare(record(tiny_model("mixtral", seed), ids), record(tiny_model("mixtral", seed, torch.bfloat16), ids))
    assert c.divergent and all(d.cause != "padding" for d in c.divergent)


def test_a_flip_in_the_last_moe_layer_reaches_later_tokens_through_the_dense_layers_after_it(seed):
    """Qwen3-MoE with a dense last layer: a top-k flip in the last MoE layer reaches later tokens through
    that dense layer's attention, so it decides their cause too (amplified, not arithmetic)."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                                      num_experts=8, num_experts_per_tok=2, head_dim=16, mlp_only_layers=[2])
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    s = find_structure(model)
    assert list(s.moe) == [0, 1]
    parts, n, j = s.moe[1], 8, 2

    def flip(module, args, output):        # token j's choice in layer 1: its experts' ids moved by one
        logits, scores, indices = output
        indices = indices.clone()
        indices[j] = (indices[j] + 1) % parts.n_experts
        if indices[j, 0] == indices[j, 1]:
            indices[j, 1] = (indices[j, 1] + 1) % parts.n_experts
        return logits, scores, indices
    ids = _ids(n)
    c = compare(record(model, ids), _recorded_with(model, parts.router, flip, ids))
    # every later token that moved was decided by the flip (some first differ in layer 2, through its
    # attention; others already in layer 1, where the flip changed the experts' group sizes)
    later = [d for d in c.divergent if d.position > j]
    assert later, "the flip reached no later token"
    assert all(d.cause == "amplified" and d.decided_at == (j, 1) for d in later)
