"""detmoe.diagnose.record: hooks that only read. A recorded run has the bits of an unrecorded one (forward and
generate), the hooks are gone afterwards, and the trace holds every token's fingerprints and routing."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detmoe.diagnose import fingerprint_rows, record, recording
from detmoe.diagnose.tiny import MOE_LAYERS, available_archs, tiny_model


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", available_archs())
def test_recording_changes_no_bit_and_leaves_no_hook(arch, seed):
    model = tiny_model(arch, seed)
    ids = torch.randint(1, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                              # a left-padded row
    before = hooks_of(model)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    trace = record(model, ids, mask, keep_tensors=True)
    assert torch.equal(trace.tensors["logits"], plain.float()) and hooks_of(model) == before
    assert torch.equal(trace.next_token, plain.argmax(-1)) and torch.equal(trace.logits, fingerprint_rows(plain))
    L, M = model.config.num_hidden_layers, len(MOE_LAYERS.get(arch, range(3)))
    assert trace.hidden.shape == (L, 3, 11) and trace.moe_layers == MOE_LAYERS.get(arch, list(range(L)))
    assert trace.kept.shape[:3] == (3, 11, M) and trace.preferred.shape[:3] == (3, 11, M)
    assert trace.real[1].tolist() == [False] * 4 + [True] * 7 and trace.tokens(1) == ids[1, 4:].tolist()
    # every token keeps its own choice (no capacity) and the margin is that of the recorded probabilities
    kept_ids = trace.kept.nonzero()
    assert kept_ids.shape[0] == trace.preferred.numel()
    # a softmax margin, >= 0, where the router chose the softmax's top k; NaN where it chose by other
    # scores (DeepSeek's biased, grouped ones), never a negative number that would pass for a near tie
    assert ((trace.margin >= 0) | trace.margin.isnan()).all()
    assert not trace.margin.isnan().any() or arch == "deepseek_v3"
    assert trace.tensors["hidden"].shape == (L, 3, 11, model.config.hidden_size)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_a_recorded_generate_gives_the_same_tokens_and_traces_every_step(arch, seed):
    model = tiny_model(arch, seed)
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)
    with recording(model) as rec:
        recorded = model.generate(ids, **kw)
    assert torch.equal(plain, recorded)
    trace = rec.trace()
    assert trace.input_ids.shape == (2, 6 + 4)                  # the last new token is never fed back
    for row in range(2):
        assert trace.tokens(row) == recorded[row][mask[row].bool().tolist() + [True] * 5][:-1].tolist()
        # each fed token's greedy next token is the one generate chose
        assert trace.next_token[row, -4:].tolist() == recorded[row, -4:].tolist()


def test_record_refuses_bad_input(seed):
    model = tiny_model("mixtral", seed)
    with pytest.raises(ValueError, match="input_ids must be a"):
        record(model, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be None or a tensor of input_ids' shape"):
        record(model, torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))


def test_a_swapped_module_is_found_again(seed):
    model = tiny_model("mixtral", seed)
    ids = torch.randint(1, 97, (1, 6))
    record(model, ids)                                          # the structure is cached here
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    trace = record(model, ids, keep_tensors=True)
    with torch.no_grad():
        assert torch.equal(trace.tensors["logits"], model(input_ids=ids).logits.float())
