"""The Hydra YAML mirrors the dataclasses: every model preset equals moe.config.PRESETS, every router
entry builds a valid MoEConfig, and every backend named exists."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import kernels
import moe
from lab.hydra_utils import model_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(moe.PRESETS))
def test_model_yaml_mirrors_preset(name):
    data = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())
    assert data.pop("preset") == name
    assert data == moe.PRESETS[name]


def test_every_preset_has_a_yaml():
    assert {p.stem for p in (CONFIGS / "model").glob("*.yaml")} == set(moe.PRESETS)


@pytest.mark.parametrize("router", sorted(p.stem for p in (CONFIGS / "router").glob("*.yaml")))
def test_router_entries_build_valid_models(router):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("ablate", overrides=[f"router={router}"])
    for name in cfg.router.names:
        assert name in moe.ROUTERS
        mcfg = model_config(cfg.model, cfg.router, name, "ordered", "float32")
        assert mcfg.moe.router == name


def test_kernels_entries_name_known_backends():
    for p in (CONFIGS / "kernels").glob("*.yaml"):
        for b in yaml.safe_load(p.read_text())["backends"]:
            assert b in kernels.BACKENDS
