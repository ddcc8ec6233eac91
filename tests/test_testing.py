"""detmoe.testing: row-wise functions pass in every batch and position; a function whose row bits depend on
the batch fails with a diagnosis naming the batch, the position, the count, the largest difference, the
first differing element and the dtype; bits count, not values (-0.0, NaN payloads); a transformers MoE
model's failure is its Comparison summary (first token, layer, module, cause); bad arguments are refused
up front, naming the parameter."""
from __future__ import annotations

import re

import pytest
import torch

from detmoe.testing import assert_batch_invariant, assert_model_batch_invariant, random_rows_like


def _failure(*args, **kw) -> str:
    with pytest.raises(AssertionError) as info:
        assert_batch_invariant(*args, **kw)
    return str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int32, torch.bool])
def test_rowwise_functions_pass_in_every_batch_and_position(dtype, seed):
    shape = tuple(torch.randint(1, 9, (int(torch.randint(0, 3, ())),)).tolist())
    row = (torch.randint(-50, 50, shape, dtype=dtype) if dtype == torch.int32
           else random_rows_like(torch.zeros(shape, dtype=dtype))(1)[0])
    # IEEE +, *, sqrt and comparisons are correctly rounded: the bits of an element depend on it alone
    fn = ((lambda x: (x * 3 + 1, torch.sqrt(x.abs()) - x)) if dtype.is_floating_point
          else (lambda x: x ^ True) if dtype == torch.bool else (lambda x: x * 7 - 3))
    explicit = random_rows_like(row)(int(torch.randint(1, 6, ())))
    assert_batch_invariant(fn, row, [1, 2, int(torch.randint(3, 70, ())), explicit])


def test_a_batch_dependent_element_is_named_with_its_index_count_delta_and_dtype(seed):
    D = int(torch.randint(2, 40, ()))
    j = int(torch.randint(0, D, ()))

    def fn(x):   # element j one ulp up from 4 rows on: what a kernel that switches strategy with the batch does
        y = x * 2
        if x.shape[0] >= 4:
            y[:, j] = torch.nextafter(y[:, j], torch.tensor(float("inf")))
        return y
    row = torch.randn(D)
    message = _failure(fn, row, [1, 2, 7, 64])
    ulp = float(torch.nextafter(row[j] * 2, torch.tensor(float("inf"))) - row[j] * 2)
    first, second, *rest = message.split("\n")
    assert first.startswith("test_a_batch_dependent_element_is_named_with_its_index_count_delta_and_dtype.<locals>."
                            "fn is not batch-invariant: the row at position 0 of a batch of 7 ")
    assert f"1 of {D} elements differ; max |delta| {ulp:.3g}; first at index ({j},): " in second
    assert second.endswith("output dtype torch.float32")
    bits = [f"0x{int(v.view(torch.int32)) & 0xFFFFFFFF:08x}" for v in (row[j] * 2, fn(row.expand(4, D))[0, j])]
    assert f"(bits {bits[0]}) alone" in second and f"(bits {bits[1]}) in the batch" in second
    assert rest == ["  also differs: a batch of 7 at positions 3, 6; a batch of 64 at positions 0, 32, 63",
                    "  same bits: a batch of 1, a batch of 2"]


def test_bits_count_not_values_signed_zeros_and_nan_payloads(seed):
    other_nan = torch.tensor(0x7FC00001, dtype=torch.int32).view(torch.float32)

    def zeros(x):      # torch.equal calls these equal
        return x * 0.0 if x.shape[0] == 1 else -(x.abs() * 0.0)
    message = _failure(zeros, torch.randn(5).abs(), [3])
    assert "5 of 5 elements differ (5 -0.0 against 0.0); max |delta| 0;" in message

    def nans(x):
        return torch.where(torch.isnan(x), other_nan, x) if x.shape[0] > 1 else x
    row = torch.randn(6)
    row[2] = float("nan")
    message = _failure(nans, row, [2])
    assert "1 of 6 elements differ (1 NaN against another NaN); max |delta| nan; first at index (2,)" in message
    assert "(bits 0x7fc00000) alone" in message and "(bits 0x7fc00001) in the batch" in message


def test_a_tuple_output_and_a_given_batch_are_named(seed):
    given = torch.randn(5, 4)
    lines = _failure(lambda x: (x * 2, x + 1e-6 * x.shape[0]), torch.randn(4), [1, given]).split("\n")
    assert lines[0] == ("test_a_tuple_output_and_a_given_batch_are_named.<locals>.<lambda> is not batch-invariant: "
                        "the row at position 0 of the given batch batches[1] of 5 gets other bits than alone "
                        "(fn(row[None])[0]):")
    assert lines[1].startswith("  output 1: 4 of 4 elements differ; max |delta| ")
    assert lines[2:] == ["  also differs: the given batch batches[1] of 5 at positions 2, 4",
                         "  same bits: a batch of 1"]


def test_the_row_goes_first_middle_and_last_among_others_and_explicit_batches_keep_their_rows(seed):
    seen, asked = [], []
    row = torch.randn(3, 2)

    def others(n):
        asked.append(n)
        return torch.randn(n, 3, 2)

    def fn(x):
        seen.append(x.clone())
        return x
    explicit = torch.randn(5, 3, 2)
    assert_batch_invariant(fn, row, [1, 6, explicit], others=others)
    assert asked == [5]
    places = [[int(i) for i in range(len(b)) if torch.equal(b[i], row)] for b in seen]
    assert places == [[0], [0], [0], [3], [5], [0], [2], [4]]
    rest_of_6 = [b[[i for i in range(6) if i != p]] for b, p in zip(seen[2:5], (0, 3, 5))]
    assert all(torch.equal(r, rest_of_6[0]) for r in rest_of_6)           # the same others at every place
    for b, p in zip(seen[5:], (0, 2, 4)):
        keep = [i for i in range(5) if i != p]
        assert torch.equal(b[keep], explicit[keep])


def test_default_others_are_like_the_row(seed):
    ints = torch.randint(-20, 20, (2, 50))
    drawn = random_rows_like(ints)(64)
    assert drawn.dtype == ints.dtype and drawn.shape == (64, 2, 50)
    assert int(drawn.min()) >= int(ints.min()) and int(drawn.max()) <= int(ints.max())
    assert random_rows_like(torch.zeros(4, dtype=torch.bfloat16))(3).dtype == torch.bfloat16


@pytest.mark.parametrize("call, parameter", [
    (lambda: assert_batch_invariant(None, torch.zeros(3), [2]), "fn must be callable"),
    (lambda: assert_batch_invariant(torch.neg, [1.0, 2.0], [2]), "row must be a tensor"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), 7), "batches must be an iterable"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), []), "batches must name at least one"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [0]), "batches must hold batch sizes"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [True]), "batches must hold batch sizes"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [torch.zeros(2, 4)]), "batches: a batch tensor must"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [torch.zeros(2, 3).long()]), "batches: a batch tensor"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [3], others=lambda n: torch.zeros(n, 4)),
     "others must give 2 rows"),
    (lambda: assert_batch_invariant(torch.neg, torch.zeros(3), [3], others=5), "others must be None or a callable"),
    (lambda: assert_batch_invariant(lambda x: x.sum(), torch.zeros(3), [3]),
     r"fn \(.*\) must return \[batch, ...\] outputs"),
    (lambda: assert_batch_invariant(lambda x: [1], torch.zeros(3), [3]), r"fn \(.*\) must return a tensor"),
])
def test_bad_arguments_are_refused_naming_the_parameter(call, parameter):
    with pytest.raises(ValueError, match=parameter):
        call()


# -- the model form, on tiny random transformers MoE models --

def _tiny(seed: int):
    try:
        from detmoe.diagnose.tiny import tiny_model
    except ImportError:
        from tests.diagnose.hf_models import tiny_model
    pytest.importorskip("transformers")
    return tiny_model("mixtral", seed)


def _model_failure(*args, **kw) -> str:
    with pytest.raises(AssertionError) as info:
        assert_model_batch_invariant(*args, **kw)
    return str(info.value)


def test_a_request_run_alone_again_keeps_its_bits_on_either_side(seed):
    model = _tiny(seed)
    ids = torch.randint(1, 97, (1, int(torch.randint(2, 12, ()))))
    mask = torch.ones_like(ids)
    mask[0, : int(torch.randint(0, ids.shape[1] - 1, ()))] = 0         # a request given with its padding
    assert_model_batch_invariant(model, ids, batch_sizes=[1], padding_side="both", attention_mask=mask)


def test_left_padding_with_positions_from_the_first_column_is_diagnosed_as_padding(seed):
    model = _tiny(seed)
    n = int(torch.randint(3, 12, ()))
    message = _model_failure(model, torch.randint(1, 97, (n,)), batch_sizes=[1, 3], padding_side="left",
                             positions_from_mask=False)
    lines = message.split("\n")
    assert lines[0] == (f"MixtralForCausalLM is not batch-invariant: the request ({n} tokens) as row 1 of a "
                        "left-padded batch of 3 gets other bits than alone (positions left to the model):")
    # (a token's output may still round to the same bits: the shift changes its rotations, not what it sees)
    assert re.fullmatch(rf"MixtralForCausalLM: (\d+) of {n} tokens diverge \(padding \1\)", lines[1])
    assert lines[2].startswith("first divergent token: position ") and lines[2].endswith("cause: padding")
    assert lines[-1] == "same bits: row 0 of a left-padded batch of 1"


def test_a_batch_dependent_module_is_named_with_its_layer_and_the_cause(seed):
    """Layer 0's first module nudged whenever it sees a batch: the module that runs first, so that this
    CPU's own variance (in attention, in the experts' GEMMs) cannot come before it."""
    model = _tiny(seed)
    n = int(torch.randint(3, 12, ()))
    norm = model.model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: out * 1.001 if out.shape[0] > 1 else out)
    try:
        message = _model_failure(model, torch.randint(1, 97, (n,)), batch_sizes=[4], padding_side="both")
    finally:
        handle.remove()
    lines = message.split("\n")
    assert lines[0] == (f"MixtralForCausalLM is not batch-invariant: the request ({n} tokens) as row 2 of a "
                        "left-padded batch of 4 gets other bits than alone (positions counted from the attention "
                        "mask):")
    assert re.fullmatch(rf"MixtralForCausalLM: {n} of {n} tokens diverge \(.*\)", lines[1])
    assert re.fullmatch(r"first divergent token: position 0 \(id \d+\), first in decoder layer 0, module "
                        r"model\.layers\.0\.input_layernorm; cause: (arithmetic|amplified.*)", lines[2])
    assert lines[-1] == "also differs: row 2 of a right-padded batch of 4"


def test_the_model_form_refuses_bad_arguments_naming_the_parameter(seed):
    model = _tiny(seed)
    ids = torch.randint(1, 97, (5,))
    for kw, parameter in [(dict(input_ids=ids.float()), "input_ids must be one request"),
                          (dict(input_ids=ids.reshape(1, 5).expand(2, 5)), "input_ids must be one request"),
                          (dict(input_ids=ids + 200), r"input_ids must be token ids in 0\.\.96"),
                          (dict(attention_mask=torch.ones(4)), "attention_mask must be None or a tensor"),
                          (dict(attention_mask=torch.zeros(5)), "attention_mask must hold 0"),
                          (dict(batch_sizes=4), "batch_sizes must be an iterable"),
                          (dict(batch_sizes=[2, 0]), "batch_sizes must be a non-empty"),
                          (dict(padding_side="middle"), "padding_side must be one of"),
                          (dict(model=torch.neg), "model must be a transformers MoE model")]:
        with pytest.raises(ValueError, match=parameter):
            assert_model_batch_invariant(**{"model": model, "input_ids": ids, **kw})
    model.train()
    with pytest.raises(ValueError, match="model is in training mode"):
        assert_model_batch_invariant(model, ids)
