"""Training: a fixed-seed run repeats its loss curve bitwise on the CPU; the Switch auxiliary loss is 1 for
uniform routing; the shipped default model loads with any router and beats the unigram baseline."""
from __future__ import annotations

import json

import pytest
import torch

from detmoe import moe
from detmoe.moe.trained import CHECKPOINT, load_trained_model
from detmoe.lab.stdlib_text import load_corpus
from detmoe.experiments.train import TrainConfig, load_balancing_loss, train

SMALL = TrainConfig(steps=4, batch_size=2, seq_len=24, eval_every=2, val_windows=3, warmup=2, max_bytes=300_000)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(SMALL.max_bytes, SMALL.val_every_file)


def test_fixed_seed_run_repeats_its_loss_curve_bitwise(corpus, tmp_path):
    cfg = moe.ModelConfig.from_name("tiny")
    _, a = train(cfg, SMALL, tmp_path, corpus=corpus, progress=False)
    model, b = train(cfg, SMALL, corpus=corpus, progress=False)
    assert a["curve"] == b["curve"]                        # python floats: equal means bitwise
    assert len(a["curve"]["loss"]) == SMALL.steps and a["curve"]["val_step"] == [2, 4]
    assert a["curve"]["loss"][-1] < a["curve"]["loss"][0]  # it learns
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "loss_curve.png", "model.pt"}
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(saved[k], v) for k, v in moe.MoETransformer(cfg).state_dict().items())


def test_load_balancing_loss_is_one_when_uniform():
    T, E, k = 8, 4, 2
    experts = torch.tensor([[e % E, (e + 1) % E] for e in range(T)])
    routing = moe.Routing(experts, torch.full((T, k), 0.5), torch.zeros(T, k, dtype=torch.bool),
                          torch.full((T, E), 1.0 / E))
    assert float(load_balancing_loss(routing, E)) == pytest.approx(1.0)


def test_corpus_split_is_deterministic_and_disjoint(corpus):
    again = load_corpus(SMALL.max_bytes, SMALL.val_every_file)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.val.numel() > 0 and 2.0 < corpus.unigram_loss() < 5.5


def test_default_model_loads_with_any_router():
    metrics = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert metrics["val_loss"] < metrics["unigram_val_loss"] - 0.5
    topk = load_trained_model()
    cap = load_trained_model(router="capacity", capacity_factor=1.0, dtype="bfloat16")
    assert cap.cfg.moe.router == "capacity" and cap.embed.dtype == torch.bfloat16
    assert torch.equal(topk.embed.bfloat16(), cap.embed)
    with pytest.raises(ValueError, match="n_experts"):
        load_trained_model(n_experts=4)
    text = b"def __init__(self"
    out = moe.generate(topk, [list(text)], max_new_tokens=8)[0]
    assert len(out) == 8 and all(0 <= t < 256 for t in out)


def test_train_yaml_mirrors_train_config():
    import dataclasses
    from pathlib import Path

    import yaml

    from detmoe.lab.hydra_utils import CONFIG_DIR
    data = yaml.safe_load((Path(CONFIG_DIR) / "train.yaml").read_text())
    assert data["train"] == dataclasses.asdict(TrainConfig())
    assert data["defaults"][0] == {"model": "trained"}
