"""The diagnosis app (detmoe/experiments/diagnose.py) on tiny random transformers models, on the CPU: every output
file is written and its rows add up, a rerun resumes, bad config keys are refused by name before any file is
written, and a model folder saved by transformers (with a tokenizer, for text probes) runs through its own code."""
from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize

transformers = pytest.importorskip("transformers")

from detmoe.diagnose import CAUSES  # noqa: E402
from detmoe.diagnose.tiny import tiny_model  # noqa: E402
from detmoe.experiments.diagnose import CONFIG_NAME, run_diagnosis, summary, validate_config  # noqa: E402
from detmoe.lab.diagnose_report import FIGURES  # noqa: E402

SMALL = ["diagnose.n_probes=2", "diagnose.batch_sizes=[1,3]", "diagnose.max_new_tokens=3", "diagnose.probe_min_len=3",
         "diagnose.probe_max_len=8", "diagnose.co_max_len=8"]


def config(*overrides: str):
    with initialize(config_path=None, version_base=None):   # the app's config lives in Hydra's store
        return compose(CONFIG_NAME, overrides=list(overrides))


def run(tmp_path, *overrides: str) -> dict:
    results = run_diagnosis(config(*overrides), tmp_path)
    summary(results, tmp_path)
    return results


def test_the_app_on_tiny_mixtral_writes_every_output_and_its_rows_add_up(tmp_path, seed):
    results = run(tmp_path, *SMALL, "diagnose.keep_tensors=true", f"seed={seed % 10**6}")
    for name in ("results.json", "cells.csv", "summary.txt", "report.md", "cell_settings.json", *FIGURES):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = list(csv.DictReader((tmp_path / "cells.csv").open()))
    # per probe: the batch of 1 (no padding) and the batch of 3 padded left and right, each by generate and forward
    assert len(rows) == len(saved["cells"]) == len(list((tmp_path / "cells").glob("*.json"))) == 2 * (1 + 2) * 2
    assert {(r["probe"], r["batch_size"], r["padding_side"], r["call"]) for r in rows} == {
        (str(p), b, side, call) for p in range(2) for b, side in [("1", "none"), ("3", "left"), ("3", "right")]
        for call in ("generate", "forward")}
    for r, c in zip(rows, saved["cells"]):
        assert int(r["divergent"]) == sum(int(r[k]) for k in CAUSES) == len(c["divergences"]) <= int(r["tokens"])
        assert r["max_abs_delta_logit"] != ""                      # keep_tensors: the logits' deltas are known
        if r["batch_size"] == "1":                                 # the probe alone again, on the CPU: its own bits
            assert r["divergent"] == "0" and r["greedy_differs"] == "False"
        if r["call"] == "generate" and r["padding_side"] == "left":   # positions come from the mask
            assert r["padding"] == "0"
        # generate reads a right-padded row's next token at the batch's last column: a pad where it is shorter
        assert r["read_at_padding"] == str(r["call"] == "generate" and r["padding_side"] == "right"
                                           and c["probe_len"] < c["batch_width"])
        if r["call"] == "forward" and r["padding_side"] == "left" and c["probe_len"] < c["batch_width"]:
            assert all(d["cause"] == "padding" for d in c["divergences"])   # positions counted from the pads
        if int(r["divergent"]):
            assert r["first_layer"] != "" or r["first_module"] == ""
    text = (tmp_path / "summary.txt").read_text()
    assert "attention sdpa" in text and results["model"]["model_class"] == "MixtralForCausalLM"
    totals = {k: sum(int(r[k]) for r in rows) for k in ("divergent", "tokens", *CAUSES)}
    report = (tmp_path / "report.md").read_text()
    assert f"{totals['divergent']} of {totals['tokens']} probe tokens" in report
    assert "| attention (transformers' `attn_implementation`) | `sdpa` (transformers' default) |" in report
    assert "`grouped_mm`" in report and all(f"]({f})" in report for f in FIGURES)
    # a rerun in the folder reuses every cell (a mark left in one survives); other settings are refused
    cell = next((tmp_path / "cells").glob("*.json"))
    cell.write_text(json.dumps({**json.loads(cell.read_text()), "mark": 1}))
    assert [c.get("mark") for c in run(tmp_path, *SMALL, "diagnose.keep_tensors=true", f"seed={seed % 10**6}")["cells"]
            ].count(1) == 1
    with pytest.raises(ValueError, match=r"other settings \(changed: diagnose.max_new_tokens: 3 -> 2\)"):
        run(tmp_path, *SMALL, "diagnose.keep_tensors=true", f"seed={seed % 10**6}", "diagnose.max_new_tokens=2")


@pytest.mark.parametrize("override, message", [
    ("+diagnose.n_probe=2", r"diagnose has unknown keys \['n_probe'\]"),
    ("+probes=2", r"the config has unknown keys \['probes'\]"),
    ("diagnose.n_probes=0", r"diagnose.n_probes must be an int >= 1, got 0"),
    ("diagnose.probe_min_len=20", r"diagnose.probe_max_len=16 must be >= diagnose.probe_min_len=20"),
    ("diagnose.batch_sizes=[2,2]", r"diagnose.batch_sizes must not repeat"),
    ("diagnose.padding_sides=[middle]", r"diagnose.padding_sides\[0\] must be one of \('left', 'right'\)"),
    ("diagnose.calls=[]", r"diagnose.calls must be a non-empty list of \['generate', 'forward'\]"),
    ("diagnose.keep_tensors=maybe", r"diagnose.keep_tensors must be"),
    ("diagnose.max_new_tokens=200", r"max_new_tokens: 216 positions, more than the model's max_position_embeddings"),
    ("diagnose.probe_text=hello", r"diagnose.probe_text needs the model folder's tokenizer"),
    ("diagnose.name=''", r"diagnose.name must be a non-empty string"),
    ("model=tiny-llama", r"model='tiny-llama': a tiny model must be one of \['tiny-mixtral'"),
    ("model=/no/such/folder", r"model='/no/such/folder' is neither tiny-<arch> nor a folder saved by transformers"),
    ("dtype=float17", r"dtype must be one of \('float32', 'bfloat16', 'float16', 'auto'\), got 'float17'"),
    ("device=tpu", r"device must be cpu or cuda\[:N\], got 'tpu'"),
    ("attn_implementation=fastest", r"attn_implementation must be null \(transformers' default\) or one of \['eager'"),
    ("experts_implementation=loop", r"experts_implementation must be null \(transformers' default\) or one of"),
    ("seed=-1", r"seed must be an int in 0\.\.\d+, got -1"),
])
def test_bad_config_keys_are_refused_by_name_before_any_file(tmp_path, override, message):
    cfg = config(override)
    with pytest.raises(ValueError, match=message):
        run_diagnosis(cfg, tmp_path)
    assert not any(tmp_path.iterdir()), "a file was written before the check"


def test_the_shipped_config_passes():
    validate_config(config())


def _word_tokenizer(folder) -> None:
    """A word-level tokenizer over the tiny models' 97 ids ("w1".."w95"), saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, 96)}, "[UNK]": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


def test_a_model_folder_saved_by_transformers_runs_its_own_code_with_text_probes(tmp_path, seed):
    folder, out = tmp_path / "model", tmp_path / "run"
    tiny_model("qwen2_moe", seed).save_pretrained(folder)
    _word_tokenizer(folder)
    out.mkdir()
    texts = ["w5 w17 w3 w44 w9", "w2 w80"]
    results = run(out, f"model={folder}", f"diagnose.probe_text=[{texts[0]},{texts[1]}]", "diagnose.batch_sizes=[1,2]",
                  "diagnose.calls=[generate]", "diagnose.padding_sides=[left]", "diagnose.max_new_tokens=3",
                  "diagnose.co_max_len=6", "attn_implementation=eager", "experts_implementation=eager")
    m = results["model"]
    assert (m["model_class"], m["attn_implementation"], m["experts_implementation"], m["dtype"]) == (
        "Qwen2MoeForCausalLM", "eager", "eager", "float32")
    assert results["probes"] == [[int(w[1:]) for w in t.split()] for t in texts]
    assert len(results["cells"]) == 2 * 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for c in results["cells"]:   # the answers as text too, by the folder's tokenizer
        assert len(c["completion"]) == 3 and c["completion_text"] == tokenizer.decode(c["completion"])
        assert c["reference_text"] == tokenizer.decode(c["reference_completion"])
    report = (out / "report.md").read_text()
    assert f"`{folder}`: Qwen2MoeForCausalLM" in report and "`eager` (set)" in report
