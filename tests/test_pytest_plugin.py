"""The `detmoe` pytest plugin (detmoe/pytest_plugin.py), as a user meets it: installed with the package, it
is loaded by pytest in another project, imports nothing heavy at start-up, and its fixtures pass a row-wise
function and a request run alone again, and fail a batch-dependent function and a left-padded model with
the diagnosis in pytest's report, pointing at the user's line."""
from __future__ import annotations

import textwrap
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import sys

def pytest_configure(config):      # after every plugin is loaded: what did start-up import?
    config.heavy_at_start = sorted(m for m in ("torch", "transformers", "detmoe.testing", "detmoe.diagnose")
                                   if m in sys.modules)
"""

USER_TESTS = """
import torch
import transformers


def test_start_up_imported_nothing_heavy(request):
    assert request.config.pluginmanager.has_plugin("detmoe")
    assert request.config.heavy_at_start == []


def test_rowwise(batch_invariant):
    batch_invariant(lambda x: x * 3 + 1, torch.randn(16), [1, 7, 64])


def test_batch_dependent(batch_invariant):
    batch_invariant(lambda x: x + 1e-6 * x.shape[0], torch.randn(16), [1, 7, 64])


def tiny_mixtral():
    cfg = transformers.MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_model_alone_again(model_batch_invariant):
    model_batch_invariant(tiny_mixtral(), torch.randint(1, 61, (7,)), batch_sizes=[1])


def test_model_left_padded(model_batch_invariant):
    model_batch_invariant(tiny_mixtral(), torch.randint(1, 61, (7,)), batch_sizes=[3], padding_side="left",
                          positions_from_mask=False)
"""


def test_the_plugin_defines_fixtures_only():
    import detmoe.pytest_plugin as plugin
    assert [n for n in vars(plugin) if n.startswith("pytest_")] == []
    assert {e.value for e in entry_points(group="pytest11") if e.name == "detmoe"} == {"detmoe.pytest_plugin"}, \
        "the detmoe pytest11 entry point is not installed: pip install -e '.[test]'"


def test_a_users_tests_get_the_fixtures_and_read_the_diagnosis(pytester, monkeypatch, seed):
    pytest.importorskip("transformers")
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)   # the entry point is what is tested
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mine=textwrap.dedent(USER_TESTS))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "addopts=")
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    # the function form: where, how many, how far, which element, which dtype; the user's line, not ours
    result.stdout.fnmatch_lines([
        "*def test_batch_dependent(batch_invariant):",
        ">*batch_invariant(lambda x: x + 1e-6 * x.shape*",           # (fnmatch reads [...] as a set)
        "E*AssertionError: test_batch_dependent.<locals>.<lambda> is not batch-invariant: the row at position 0 of "
        "a batch of 7 gets other bits than alone (fn(row*",
        "E*16 of 16 elements differ; max |delta| *; first at index (0,): * alone, * in the batch; output dtype "
        "torch.float32",
        "E*also differs: a batch of 7 at positions 3, 6; a batch of 64 at positions 0, 32, 63",
        "E*same bits: a batch of 1",
    ])
    assert "__tracebackhide__" not in out
    # the model form: the Comparison's summary under the batch it failed in
    result.stdout.fnmatch_lines([
        "E*AssertionError: MixtralForCausalLM is not batch-invariant: the request (7 tokens) as row 1 of a "
        "left-padded batch of 3 gets other bits than alone (positions left to the model):",
        "E*MixtralForCausalLM: * of 7 tokens diverge (padding *)",
        "E*first divergent token: position *, first in decoder layer *; cause: padding",
    ])
