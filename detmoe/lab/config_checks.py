"""The checks the apps' `validate_config` share: each app checks its whole Hydra config before any work,
so a bad value is a ValueError naming its key (`experiment.n_probes`, `serve.load`, ...) and what is allowed,
not a crash, a hang or a run that reports nonsense an hour later.

The value checks themselves are the library's (detmoe/moe/routers/base.py: check_int, check_positive,
check_bool, check_choice), given the dotted key as the name; the model and router groups are checked by
building their ModelConfig, as a cell will.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from detmoe import kernels
from detmoe.lab.distributed import check_layout
from detmoe.lab.hydra_utils import CONFIG_DIR, model_config, router_group_options, router_options
from detmoe.moe import COMBINES, ModelConfig, MoEConfig, pretrained_config
from detmoe.moe.config import DTYPES, PRESETS, check_fields
from detmoe.moe.routers import check_bool, check_choice, check_int, check_positive, registry  # noqa: F401
from detmoe.moe.trained import PRESET as TRAINED_PRESET

# torch.Generator.manual_seed's range, kept non-negative (as moe.generate.SEED_RANGE)
SEED_MAX = 2**63 - 1

# The most engine steps a load may spread its requests over: a load near 0 made serve_sim allocate one
# rate per step (a MemoryError at load=1e-9) and rl_consistency's sampler loop for as long
MAX_SPAN = 10**7


@contextlib.contextmanager
def named(prefix: str) -> Iterator[None]:
    """Re-raise a library ValueError with the config key it came from ("rl." + "temperature must be ...")."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from e


@contextlib.contextmanager
def model_keys(suffix: str = "") -> Iterator[None]:
    """Re-raise a ModelConfig / MoEConfig ValueError ("capacity_factor must be ...") with the config key of
    the field it names: router.<option>, model.moe.<field> or model.<field>."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        field = text.split(" ", 1)[0].split("=", 1)[0]
        moe = {f.name for f in dataclasses.fields(MoEConfig)}
        key = (f"router.{field}" if field in router_group_options() else f"model.moe.{field}" if field in moe
               else f"model.{field}" if field in {f.name for f in dataclasses.fields(ModelConfig)} else None)
        raise ValueError((f"{key}{text[len(field):]}" if key else f"model: {text}") + suffix) from e


def plain(cfg: DictConfig) -> dict:
    """The config as plain data (lists and dicts), resolved: what the checks below read."""
    return OmegaConf.to_container(cfg, resolve=True)


def yaml_keys(name: str, section: Optional[str] = None) -> list[str]:
    """The keys a YAML file of detmoe/configs sets (a group's or an app's own, less `defaults`), and the
    groups its defaults list selects: the keys the app's config may hold. With `section`, that section's keys."""
    data = yaml.safe_load((Path(CONFIG_DIR) / name).read_text()) or {}
    if section is not None:
        return list(data[section])
    groups = [next(iter(d)) for d in data.get("defaults", []) if isinstance(d, dict)]
    return [k for k in data if k != "defaults"] + [g for g in groups if not g.startswith("override ")]


def check_keys(node: Any, allowed: Sequence[str], where: str) -> dict:
    """`node` a mapping with only `allowed` keys (a `+key=...` typo is not ignored); returns it."""
    if not isinstance(node, dict):
        raise ValueError(f"{where} must be a mapping with the keys {sorted(allowed)}, got {node!r}")
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(set(allowed))}")
    return node


def check_list(name: str, value: Any, allowed: Optional[Sequence] = None, lo: Optional[int] = None) -> list:
    """A non-empty list without repeats (a repeat would run or count a cell twice), each item one of
    `allowed` or an int >= lo (where given)."""
    if not isinstance(value, list) or not value:
        what = f" of {list(allowed)}" if allowed is not None else f" of ints >= {lo}" if lo is not None else ""
        raise ValueError(f"{name} must be a non-empty list{what}, got {value!r}")
    for i, item in enumerate(value):
        if allowed is not None:
            check_choice(f"{name}[{i}]", item, allowed)
        elif lo is not None:
            check_int(f"{name}[{i}]", item, lo)
    repeated = sorted({str(v) for v in value if value.count(v) > 1})
    if repeated:
        raise ValueError(f"{name} must not repeat an entry, got {value!r} (repeated: {', '.join(repeated)})")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """A finite number >= 0 (check_positive's rule, with 0 allowed)."""
    try:
        return value if value == 0 and not isinstance(value, bool) else check_positive(name, value)
    except ValueError:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None


def check_optional_int(name: str, value: Any, lo: int, none_means: str) -> None:
    if value is not None:
        try:
            check_int(name, value, lo)
        except ValueError as e:
            raise ValueError(f"{e} (or null: {none_means})") from None


def check_name(name: str, value: Any) -> None:
    """A run name (a folder of the output path): a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string (it names the output folder), got {value!r}")


def check_order(lo_name: str, lo: int, hi_name: str, hi: int) -> None:
    if hi < lo:
        raise ValueError(f"{hi_name}={hi} must be >= {lo_name}={lo}")


def check_span(load_name: str, load: float, count_name: str, count: int) -> None:
    """A load (requests per engine step, > 0) that spreads `count` requests over at most MAX_SPAN steps."""
    check_positive(load_name, load)
    if count / load > MAX_SPAN:
        raise ValueError(f"{load_name}={load} spreads {count_name}={count} requests over {count / load:.3g} engine "
                         f"steps, more than {MAX_SPAN:.0e}: raise {load_name}")


def check_fits(positions: int, what: str, limit: int) -> None:
    """`positions` (a sequence's, or a KV-cache slot's) within the model's max_seq_len."""
    if positions > limit:
        raise ValueError(f"{what}: {positions} positions, more than the model's max_seq_len={limit}: "
                         "shorten them, or raise model.max_seq_len")


def check_device(value: Any) -> torch.device:
    """`device`: cpu, or cuda[:N] where there is such a GPU."""
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={value!r} but this machine has no CUDA device: use device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_seed(value: Any, scale: int = 1, name: str = "seed") -> None:
    """An int seed whose derived seeds (up to seed x scale) stay in torch's generator range."""
    check_int(name, value, 0, SEED_MAX // scale)


# The fields that give the model's weights their shapes: model=trained must keep the shipped weights' ones
WEIGHT_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "attn_head_dim", "qkv_bias",
                       "qk_norm", "tie_embeddings", "moe.n_experts", "moe.d_expert", "moe.n_shared_experts",
                       "moe.shared_expert_gate")


def check_model_group(model: dict) -> dict:
    """The model group's keys: `preset` (one of PRESETS, where given) and ModelConfig's fields, named as the
    `model` group's. Returns the fields, less `preset`."""
    if model.get("preset") is not None:
        check_choice("model.preset", model["preset"], tuple(PRESETS))
    fields = {k: v for k, v in model.items() if k != "preset"}
    check_fields(ModelConfig, fields, "model")
    return fields


def check_models(cfg: DictConfig, routers: list[str], combines: list[str], dtypes: list[str]) -> list[ModelConfig]:
    """The model and router groups (or `pretrained`), built as a cell builds them (hydra_utils.model_config,
    from_pretrained's config): one ModelConfig per router x combine x dtype, each checked by ModelConfig
    itself (every field, every router option)."""
    check_keys(plain(cfg.router), ["names", *router_group_options()], "router")
    configs = []
    points = [(r, cb, dt) for r in routers for cb in combines for dt in dtypes]
    if cfg.get("pretrained") is not None:
        path = cfg.pretrained
        if not isinstance(path, str) or not Path(path).is_dir():
            raise ValueError(f"pretrained must be null or a Hugging Face checkpoint folder, got {path!r}")
        for r, cb, dt in points:
            with named(f"pretrained={path}, router={r}: "):
                configs.append(pretrained_config(path, dtype=dt, router=r, combine=cb, **router_options(cfg.router)))
        return configs
    model = plain(cfg.model)
    check_model_group(model)
    if "seed" in model:
        raise ValueError(f"model.seed={model['seed']!r} would be ignored: the top-level seed sets the weights "
                         f"(seed={cfg.seed})")
    for r, cb, dt in points:
        with model_keys(f" (router={r})"):
            configs.append(dataclasses.replace(model_config(cfg.model, cfg.router, r, cb, dt), seed=cfg.seed))
    if model.get("preset") == TRAINED_PRESET:
        def shapes(m: ModelConfig) -> dict:
            flat = {**dataclasses.asdict(m), **{f"moe.{k}": v for k, v in dataclasses.asdict(m.moe).items()}}
            return {k: flat[k] for k in WEIGHT_SHAPE_FIELDS}
        want, got = shapes(ModelConfig.from_name(TRAINED_PRESET)), shapes(configs[0])
        diff = [f"model.{k}={got[k]!r} (the weights': {want[k]!r})" for k in want if got[k] != want[k]]
        if diff:
            raise ValueError(f"model=trained takes the shipped weights, whose shapes are fixed: {', '.join(diff)}; "
                             "pick another model group (e.g. model=tiny) for other shapes")
    return configs


def check_common(cfg: DictConfig, app: str, lists: bool) -> tuple[dict, list[ModelConfig]]:
    """The keys every cell-running app has: its top-level keys (only those its YAML and groups give), the
    model and router groups or `pretrained`, kernels.backends, `combines`/`dtypes` (lists: `lists`) or
    `combine`/`dtype`, device and seed. Returns the config as plain data and the model configs of its cells."""
    c = plain(cfg)
    check_keys(c, yaml_keys(f"{app}.yaml") + ["hydra"], "the config")
    routers = check_list("router.names", c["router"].get("names"), registry.router_names())
    check_keys(c["kernels"], ["backends"], "kernels")
    check_list("kernels.backends", c["kernels"]["backends"], kernels.BACKENDS)
    if lists:
        combines, dtypes = check_list("combines", c["combines"], COMBINES), check_list("dtypes", c["dtypes"], tuple(DTYPES))
    else:
        combines, dtypes = [check_choice("combine", c["combine"], COMBINES)], [check_choice("dtype", c["dtype"], tuple(DTYPES))]
    check_device(c["device"])
    check_seed(c["seed"])
    return c, check_models(cfg, routers, combines, dtypes)


def check_layouts(names: dict[str, Any]) -> None:
    """Each `key: layout name` of the config (`none`, ep, tp, epGxtpP), and that the launch can run it."""
    for key, name in names.items():
        check_layout(name, key)
