"""bench_steps: the cell labels, the inputs' layout, and the decode step's reset of the cached lengths."""
import torch

from benchmarks.bench_steps import Shape, build_model, decode_inputs, decode_step, prefill_inputs, shape_of


def test_shape_labels_and_round_trip():
    decode, prefill = Shape("tiny", "decode", 3, 1, 16), Shape("tiny", "prefill", 2, 8, 0)
    assert decode.label == "tiny decode B=3 ctx=16" and prefill.label == "tiny prefill 2x8"
    assert decode.tokens == 3 and prefill.tokens == 16
    assert shape_of(dict(preset="tiny", mode="prefill", batch=2, seq_len=8, context=0, backend="torch")) == prefill


def test_inputs_and_the_decode_step_reset():
    model = build_model("tiny", 8, "cpu")
    tokens, cu, slots, cache = decode_inputs(model, 3, 5)
    assert tokens.shape == (3,) and cu.tolist() == [0, 1, 2, 3] and slots.tolist() == [0, 1, 2]
    assert cache.lengths.shape == (4,) and cache.max_len == 6   # a padding slot; room for context + 1
    assert torch.equal(tokens, decode_inputs(model, 3, 5)[0])    # the same tokens every call
    step = decode_step(lambda: cache.lengths.clone(), cache, 5)
    cache.lengths.fill_(7)
    assert step().tolist() == [5, 5, 5, 5]
    tokens, cu = prefill_inputs(model, 3, 4)
    assert tokens.shape == (12,) and cu.tolist() == [0, 4, 8, 12]
