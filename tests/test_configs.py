"""The Hydra configs mirror the library: every model preset's YAML equals moe.config.PRESETS, the router
group is generated from the router registry and each entry builds a valid MoEConfig, and every backend
named exists."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from detmoe import kernels
from detmoe import moe
from detmoe.lab.hydra_utils import model_config, router_group, router_group_options
from detmoe.moe.routers import Router, register_router, registry

CONFIGS = Path(__file__).resolve().parent.parent / "detmoe" / "configs"


@pytest.mark.parametrize("name", sorted(moe.PRESETS))
def test_model_yaml_mirrors_preset(name):
    data = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())
    assert data.pop("preset") == name
    assert data == moe.PRESETS[name]


def test_every_preset_has_a_yaml():
    assert {p.stem for p in (CONFIGS / "model").glob("*.yaml")} == set(moe.PRESETS)


@pytest.mark.parametrize("router", sorted(router_group()))
def test_router_entries_build_valid_models(router):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("ablate", overrides=[f"router={router}"])
    for name in cfg.router.names:
        assert name in moe.ROUTERS
        mcfg = model_config(cfg.model, cfg.router, name, "ordered", "float32")
        assert mcfg.moe.router == name


def test_router_group_is_the_registry():
    """One entry per registered router and `all`; no YAML file that would shadow a generated entry."""
    assert not (CONFIGS / "router").exists()
    group = router_group()
    assert set(group) == {*moe.ROUTERS, "all"}
    assert all(group[name]["names"] == [name] for name in moe.ROUTERS)
    every = group["all"]["names"]
    assert sorted(every) == sorted(moe.ROUTERS)
    flags = [registry.router_class(n).batch_invariant for n in every]
    assert flags == sorted(flags, reverse=True), "batch-invariant routers come first"
    fields = {f.name: f.default for f in dataclasses.fields(moe.MoEConfig)}
    for entry in group.values():
        assert {k: v for k, v in entry.items() if k != "names"} == router_group_options()
    assert all(fields[k] == v for k, v in router_group_options().items())
    assert set(router_group_options()) == {"capacity_factor", "drop_order", "group_size", "min_capacity",
                                           "renormalize"}


def test_a_new_router_gets_its_entry(monkeypatch):
    monkeypatch.setattr(registry, "_ROUTERS", dict(registry._ROUTERS))

    @register_router
    class Dependent(Router):
        name = "dependent_test"
    group = router_group()
    assert group["dependent_test"]["names"] == ["dependent_test"]
    assert group["all"]["names"][-1] == "dependent_test"   # batch-dependent: after the invariant ones


def test_kernels_entries_name_known_backends():
    for p in (CONFIGS / "kernels").glob("*.yaml"):
        for b in yaml.safe_load(p.read_text())["backends"]:
            assert b in kernels.BACKENDS
