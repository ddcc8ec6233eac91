"""Each app checks its whole config before any work (`validate_config`, detmoe/lab/config_checks.py): a bad
value of any key is a ValueError naming the key and what is allowed, raised before a cell runs or a file is
written; the shipped configs pass."""
from __future__ import annotations

import importlib

import pytest
import torch
from hydra import compose, initialize_config_dir

from detmoe.lab.hydra_utils import CONFIG_DIR

APPS = ("ablate", "serve_sim", "rl_consistency", "train")
RUN = {"ablate": "run_ablation", "serve_sim": "run_serve_sim", "rl_consistency": "run_rl_consistency"}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the check for a machine without a GPU")

TABLE = [
    # ablate: experiment.*
    ("ablate", "experiment.n_probes=-1", r"experiment.n_probes must be an int >= 1, got -1"),
    ("ablate", "experiment.n_probes=0", r"experiment.n_probes must be an int >= 1, got 0"),
    ("ablate", "experiment.n_probes=1.5", r"experiment.n_probes must be an int >= 1, got 1.5"),
    ("ablate", "experiment.batch_sizes=[0]", r"experiment.batch_sizes\[0\] must be an int >= 1, got 0"),
    ("ablate", "experiment.batch_sizes=[]", r"experiment.batch_sizes must be a non-empty list"),
    ("ablate", "experiment.batch_sizes=[2,2]", r"experiment.batch_sizes must not repeat"),
    ("ablate", "experiment.probe_min_len=13", r"experiment.probe_max_len=12 must be >= experiment.probe_min_len=13"),
    ("ablate", "experiment.probe_min_len=0", r"experiment.probe_min_len must be an int >= 1"),
    ("ablate", "experiment.max_new_tokens=0", r"experiment.max_new_tokens must be an int >= 1, got 0"),
    ("ablate", "experiment.max_new_tokens=200", r"co_max_len with max_new_tokens .*max_seq_len=256"),
    ("ablate", "experiment.per_size=0", r"experiment.per_size must be an int >= 1"),
    ("ablate", "experiment.co_max_len=0", r"experiment.co_max_len must be an int >= 1"),
    ("ablate", "experiment.name=''", r"experiment.name must be a non-empty string"),
    ("ablate", "+experiment.seed=1", r"experiment has unknown keys \['seed'\]"),
    # ablate: the grid, the groups and the top-level keys
    ("ablate", "dtypes=[float17]", r"dtypes\[0\] must be one of \('float32', 'bfloat16'.*got 'float17'"),
    ("ablate", "combines=[]", r"combines must be a non-empty list of \['ordered', 'scatter_add'\]"),
    ("ablate", "router.names=[topk,topk]", r"router.names must not repeat an entry"),
    ("ablate", "router.names=[nope]", r"router.names\[0\] must be one of"),
    ("ablate", "router.capacity_factor=-1", r"router.capacity_factor must be a finite number > 0, got -1"),
    ("ablate", "+router.capacity=2", r"router has unknown keys \['capacity'\]"),
    ("ablate", "kernels.backends=[cuda]", r"kernels.backends\[0\] must be one of \('torch', 'batch_invariant'\)"),
    ("ablate", "model.d_model=64", r"model=trained takes the shipped weights.*model.d_model=64"),
    ("ablate", ("model=tiny", "model.moe.top_k=0"), r"model.moe.top_k must be an int in 1..n_experts=8, got 0"),
    ("ablate", ("model=tiny", "model.d_model=63"), r"model.d_model=63 must be divisible by n_heads=4"),
    ("ablate", "+model.seed=3", r"model.seed=3 would be ignored: the top-level seed"),
    ("ablate", "+model.colour=1", r"model has unknown fields \['colour'\]"),
    ("ablate", "extra_cells=[{router: topk, backend: torch, combine: ordered, dtype: float32, n_probes: 0}]",
     r"extra_cells\[0\].n_probes must be an int >= 1"),
    ("ablate", "layouts=[diagonal]", r"layouts\[0\] must be one of \('none', 'ep', 'tp', 'epGxtpP'\)"),
    ("ablate", "layouts=[tp]", r"layouts\[0\]='tp' needs several processes: launch with torchrun"),
    ("ablate", "graphs=sometimes", r"graphs must be True or False"),
    ("ablate", "jobs=0", r"jobs must be an int >= 1, got 0"),
    ("ablate", "device=tpu", r"device must be cpu or cuda\[:N\], got 'tpu'"),
    pytest.param("ablate", "device=cuda", r"device='cuda' but this machine has no CUDA device", marks=NO_CUDA),
    ("ablate", "pretrained=/no/such/folder", r"pretrained must be null or a Hugging Face checkpoint folder"),
    ("ablate", "seed=-1", r"seed must be an int in 0..\d+, got -1"),
    ("ablate", "+sede=1", r"the config has unknown keys \['sede'\]"),
    # serve_sim
    ("serve_sim", "serve.load=0", r"serve.load must be a finite number > 0, got 0"),
    ("serve_sim", "serve.load=-1.5", r"serve.load must be a finite number > 0, got -1.5"),
    ("serve_sim", "serve.load=1e-9", r"serve.load=1e-09 spreads serve.n_probe_runs=60 requests over 6e\+10 engine steps"),
    ("serve_sim", "serve.n_probe_runs=-1", r"serve.n_probe_runs must be an int >= 1, got -1"),
    ("serve_sim", "serve.n_probe_runs=0", r"serve.n_probe_runs must be an int >= 1, got 0"),
    ("serve_sim", "serve.probe_len=0", r"serve.probe_len must be an int >= 1"),
    ("serve_sim", "serve.max_new_tokens=0", r"serve.max_new_tokens must be an int >= 1"),
    ("serve_sim", "serve.max_slots=0", r"serve.max_slots must be an int >= 1"),
    ("serve_sim", "serve.traffic_max_len=0", r"serve.traffic_max_len must be an int >= 1"),
    ("serve_sim", "serve.traffic_max_new=0", r"serve.traffic_max_new must be an int >= 1"),
    ("serve_sim", "serve.chunk=0", r"serve.chunk must be an int >= 1, got 0 \(or null: the whole prompt"),
    ("serve_sim", "serve.load_period=0", r"serve.load_period must be an int >= 1, got 0 \(or null: constant load\)"),
    ("serve_sim", "serve.graphs=[sometimes]", r"serve.graphs\[0\] must be one of \('auto', 'on', 'off'\)"),
    ("serve_sim", "serve.graphs=[]", r"serve.graphs must be a non-empty list"),
    ("serve_sim", "serve.layout=diagonal", r"serve.layout must be one of"),
    ("serve_sim", "serve.name=''", r"serve.name must be a non-empty string"),
    # a request of max_seq_len tokens needs one cache position more (the engine's spare)
    ("serve_sim", "serve.probe_len=232", r"requests of up to 256 tokens.*257 positions, more than the model's max_seq_len=256"),
    ("serve_sim", "combine=sum", r"combine must be one of \('ordered', 'scatter_add'\), got 'sum'"),
    ("serve_sim", "dtype=float17", r"dtype must be one of"),
    ("serve_sim", "+serve.n_probes=5", r"serve has unknown keys \['n_probes'\]"),
    ("serve_sim", "router.drop_order=random", r"router.drop_order must be one of \('position', 'choice', 'score'\)"),
    # rl_consistency
    ("rl_consistency", "rl.n_samples=0", r"rl.n_samples must be an int >= 1, got 0"),
    ("rl_consistency", "rl.prompt_min_len=0", r"rl.prompt_min_len must be an int >= 1"),
    ("rl_consistency", "rl.prompt_min_len=20", r"rl.prompt_max_len=16 must be >= rl.prompt_min_len=20"),
    ("rl_consistency", "rl.max_new_tokens=0", r"rl.max_new_tokens must be an int >= 1"),
    ("rl_consistency", "rl.max_slots=0", r"rl.max_slots must be an int >= 1"),
    ("rl_consistency", "rl.trainer_microbatches=0", r"rl.trainer_microbatches must be an int in 1..rl.n_samples=16"),
    ("rl_consistency", "rl.trainer_microbatches=17", r"rl.trainer_microbatches must be an int in 1..rl.n_samples=16, got 17"),
    ("rl_consistency", "rl.temperature=-1", r"rl.temperature must be a finite number >= 0"),
    ("rl_consistency", "rl.top_p=0", r"rl.top_p must be a number in \(0, 1\]"),
    ("rl_consistency", "rl.load=0", r"rl.load must be a finite number > 0"),
    ("rl_consistency", "rl.sampler_layout=diagonal", r"rl.sampler_layout must be one of"),
    ("rl_consistency", "rl.trainer_layout=ep", r"rl.trainer_layout='ep' needs several processes"),
    ("rl_consistency", "rl.prompt_max_len=250", r"rl.prompt_max_len \+ max_new_tokens.*263 positions"),
    ("rl_consistency", "seed=100000000000000", r"seed must be an int in 0..\d+, got 100000000000000"),
    ("rl_consistency", "+rl.samples=3", r"rl has unknown keys \['samples'\]"),
    # train
    ("train", "train.steps=0", r"train.steps must be an int >= 1, got 0"),
    ("train", "train.steps=1.5", r"train.steps must be an int >= 1, got 1.5"),
    ("train", "train.batch_size=0", r"train.batch_size must be an int >= 1"),
    ("train", "train.seq_len=300", r"train.seq_len .*300 positions, more than the model's max_seq_len=256"),
    ("train", "train.lr=0", r"train.lr must be a finite number > 0, got 0"),
    ("train", "train.lr=nan", r"train.lr must be a finite number > 0, got nan"),
    ("train", "train.min_lr=0.1", r"train.min_lr must be in \(0, train.lr=0.003\], got 0.1"),
    ("train", "train.warmup=-1", r"train.warmup must be an int >= 0, got -1"),
    ("train", "train.weight_decay=-0.1", r"train.weight_decay must be a finite number >= 0"),
    ("train", "train.grad_clip=0", r"train.grad_clip must be a finite number > 0"),
    ("train", "train.aux_loss_coef=-1", r"train.aux_loss_coef must be a finite number >= 0"),
    ("train", "train.eval_every=0", r"train.eval_every must be an int >= 1"),
    ("train", "train.val_windows=0", r"train.val_windows must be an int >= 1"),
    ("train", "train.max_bytes=-1", r"train.max_bytes must be an int >= 0"),
    ("train", "train.val_every_file=1", r"train.val_every_file must be an int >= 2, got 1"),
    ("train", "train.seed=-1", r"train.seed must be an int in 0..\d+, got -1"),
    ("train", "train.threads=0", r"train.threads must be an int >= 1"),
    ("train", "+train.epochs=2", r"train has unknown fields \['epochs'\]"),
    ("train", "export=maybe", r"export must be True or False, got 'maybe'"),
    ("train", "model.n_heads=3", r"model.d_model=128 must be divisible by n_heads=3"),
    ("train", "+foo=1", r"the config has unknown keys \['foo'\]"),
]


def config(app: str, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose(app, overrides=list(overrides))


def nothing_may_run(module, monkeypatch):
    """Fail the test if the app gets as far as running a cell (or training)."""
    def ran(*args, **kwargs):
        raise AssertionError("work started before the config was checked")
    for name in ("run_cells", "train", "stock_kernel_versions_of_run"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, ran)


@pytest.mark.parametrize("app, override, message", TABLE)
def test_a_bad_value_is_refused_by_key_before_any_cell(app, override, message, tmp_path, monkeypatch):
    module = importlib.import_module(f"detmoe.experiments.{app}")
    nothing_may_run(module, monkeypatch)
    cfg = config(app, *(override if isinstance(override, tuple) else (override,)))
    with pytest.raises(ValueError, match=message):
        if app in RUN:
            getattr(module, RUN[app])(cfg, tmp_path)
        else:
            module.validate_config(cfg)
    assert not any(tmp_path.iterdir()), "a file was written before the check"


@pytest.mark.parametrize("app", APPS)
def test_every_app_checks_its_whole_shipped_config_and_main_checks_first(app):
    """The shipped configs (every key they hold) pass; each app's main checks before run_dir records the run."""
    import inspect
    module = importlib.import_module(f"detmoe.experiments.{app}")
    module.validate_config(config(app))
    main = inspect.getsource(module.main)
    assert main.index("validate_config(cfg)") < main.index("run_dir(cfg)")
