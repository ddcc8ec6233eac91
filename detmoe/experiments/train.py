"""Train a small MoE transformer on the Python standard library's sources (bytes), the default model of
the experiments: trained routers have the uneven, sometimes near-tied scores that make routing flip.

    python -m detmoe.experiments.train                      # preset "trained", ~3-4 min on 2 idle CPU cores
    python -m detmoe.experiments.train train.steps=50 model=tiny
    python -m detmoe.experiments.train export=true          # also refresh detmoe/moe/checkpoints/trained.pt

Loss = next-byte cross-entropy + aux_loss_coef * the Switch load-balancing loss (Fedus et al. 2021,
eq. 4). Training runs the model's own code (`forward_train`) on the stock `torch` backend, always with
the dropless `topk` router; the weights then serve every router, since routers have no parameters
besides `w_router`. Everything random comes from `TrainConfig.seed` and the model config's seed, so a
run on the same machine (same Python stdlib, same thread count) repeats its loss curve bitwise.
The run directory gets metrics.json, loss_curve.png and model.pt.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from detmoe import kernels
from detmoe.lab.hydra_utils import CONFIG_DIR, run_dir
from detmoe.lab import config_checks as checks
from detmoe.lab.outputs import atomic_path, write_json
from detmoe.lab.stdlib_text import Corpus, even_windows, load_corpus, random_windows
from detmoe.moe import ModelConfig, MoETransformer, Routing
from detmoe.moe.config import check_fields


@dataclass
class TrainConfig:
    """Mirrored by the `train:` section of detmoe/configs/train.yaml."""
    steps: int = 480
    batch_size: int = 8            # sequences per step
    seq_len: int = 128             # bytes per sequence
    lr: float = 3e-3
    min_lr: float = 3e-4           # cosine decay ends here
    warmup: int = 20               # steps of linear warm-up
    weight_decay: float = 0.1      # matrices only; norms are not decayed
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01    # Switch's alpha
    eval_every: int = 60
    val_windows: int = 32          # fixed validation windows of seq_len bytes
    max_bytes: int = 0             # cap on corpus bytes read (0: the whole stdlib)
    val_every_file: int = 10       # every n-th file is held out
    seed: int = 0
    threads: int = 2               # torch CPU threads (results depend on it)

    def __post_init__(self) -> None:
        # every field, named by its key in train.yaml (Hydra hands over `train.lr=nan` or `train.steps=1.5` as given)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "val_windows", "threads"):
            checks.check_int(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup", "max_bytes"):
            checks.check_int(f"train.{name}", getattr(self, name), 0)
        checks.check_int("train.val_every_file", self.val_every_file, 2)   # 1 would hold out every file
        checks.check_seed(self.seed, name="train.seed")
        for name in ("lr", "min_lr", "grad_clip"):
            checks.check_positive(f"train.{name}", getattr(self, name))
        for name in ("weight_decay", "aux_loss_coef"):
            checks.check_non_negative(f"train.{name}", getattr(self, name))
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr must be in (0, train.lr={self.lr}], got {self.min_lr}")


def load_balancing_loss(routing: Routing, n_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e: f_e is the fraction of the step's top-k
    assignments sent to expert e (no gradient), P_e the mean router probability of e. Equals 1 when
    routing is uniform, grows as it concentrates."""
    T, k = routing.experts.shape
    f = torch.bincount(routing.experts.flatten(), minlength=n_experts).float() / (T * k)   # [E]
    P = routing.probs.mean(0)                                                              # [E]
    return n_experts * (f * P).sum()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: MoETransformer, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) over windows [n, L+1], on the inference path."""
    n, L = windows.shape[0], windows.shape[1] - 1
    with kernels.use_backend("torch"):
        logits, _ = model(windows[:, :-1].reshape(-1), torch.arange(n + 1) * L)
    return float(F.cross_entropy(logits, windows[:, 1:].reshape(-1)))


def train(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Optional[Path] = None,
          corpus: Optional[Corpus] = None, progress: bool = True) -> tuple[MoETransformer, dict]:
    """Train from model_cfg's seeded initial weights; returns the model and its metrics (with the
    per-step loss curve). With out_dir, writes metrics.json, loss_curve.png and model.pt there."""
    torch.set_num_threads(cfg.threads)
    model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, router="topk"))
    corpus = corpus or load_corpus(cfg.max_bytes, cfg.val_every_file)
    model = MoETransformer(model_cfg)
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm")]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    val = even_windows(corpus.val, cfg.val_windows, cfg.seq_len + 1)
    B, L, E = cfg.batch_size, cfg.seq_len, model_cfg.moe.n_experts
    cu = torch.arange(B + 1) * L                                   # B equal sequences, no padding
    curve = dict(step=[], loss=[], aux=[], val_step=[], val_loss=[])
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress)
    for step in bar:
        batch = random_windows(corpus.train, B, L + 1, gen)        # [B, L+1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with kernels.use_backend("torch"):
            logits, routings = model.forward_train(batch[:, :-1].reshape(-1), cu)    # [B*L, V]
        ce = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
        aux = torch.stack([load_balancing_loss(r, E) for r in routings]).mean()
        opt.zero_grad(set_to_none=True)
        (ce + cfg.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        curve["step"].append(step)
        curve["loss"].append(ce.item())
        curve["aux"].append(aux.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve["val_step"].append(step + 1)
            curve["val_loss"].append(evaluate(model, val))
            bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}", val=f"{curve['val_loss'][-1]:.3f}")
    metrics = dict(val_loss=curve["val_loss"][-1], unigram_val_loss=corpus.unigram_loss(),
                   train_loss_last_20=sum(curve["loss"][-20:]) / len(curve["loss"][-20:]),
                   params=sum(p.numel() for p in model.parameters()), tokens_seen=cfg.steps * B * L,
                   seconds=round(time.time() - start, 1), corpus_bytes=dict(train=corpus.train.numel(),
                   val=corpus.val.numel()), python=corpus.python, torch=str(torch.__version__),
                   train_config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(model_cfg),
                   curve=curve)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        plot_curve(curve, metrics["unigram_val_loss"], out_dir / "loss_curve.png")
        save_checkpoint(model, metrics, out_dir / "model.pt")
    return model, metrics


def save_checkpoint(model: MoETransformer, metrics: dict, path: Path) -> None:
    """The weights, the config that shapes them, and the run's summary (not its per-step curve)."""
    summary = {k: v for k, v in metrics.items() if k != "curve"}
    with atomic_path(path) as tmp:
        torch.save(dict(model_config=dataclasses.asdict(model.cfg), state_dict=model.state_dict(),
                        metrics=summary), tmp)


def plot_curve(curve: dict, unigram: float, path: Path) -> None:
    from detmoe.lab.plot import plt, save_figure  # pyplot on the Agg backend
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["step"], curve["loss"], lw=0.8, alpha=0.6, label="train (per step)")
    ax.plot(curve["val_step"], curve["val_loss"], "o-", label="validation")
    ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.legend()
    save_figure(fig, path)


def validate_config(cfg: DictConfig) -> tuple[ModelConfig, TrainConfig]:
    """Every key of the training config, before any work: a ValueError naming the first bad one. Returns
    the model's and the training's configs."""
    c = checks.plain(cfg)
    checks.check_keys(c, checks.yaml_keys("train.yaml") + ["hydra"], "the config")
    checks.check_bool("export", c["export"])
    model_kw = checks.check_model_group(c["model"])
    with checks.model_keys():
        model_cfg = ModelConfig(**model_kw)
    check_fields(TrainConfig, c["train"], "train")   # an unknown key: TrainConfig's own TypeError would not name it
    train_cfg = TrainConfig(**c["train"])
    checks.check_fits(train_cfg.seq_len, "train.seq_len (bytes per training sequence)", model_cfg.max_seq_len)
    return model_cfg, train_cfg


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    model_cfg, train_cfg = validate_config(cfg)   # before run_dir records the run
    out = run_dir(cfg)
    model, metrics = train(model_cfg, train_cfg, out)
    print(f"val loss {metrics['val_loss']:.4f} nats/byte (unigram {metrics['unigram_val_loss']:.4f}), "
          f"{metrics['seconds']} s; results in {out}")
    if cfg.export:
        from detmoe.moe.trained import CHECKPOINT
        save_checkpoint(model, metrics, CHECKPOINT)
        write_json(CHECKPOINT.with_suffix(".json"), {k: v for k, v in metrics.items() if k != "curve"})
        print(f"exported to {CHECKPOINT}")


if __name__ == "__main__":
    main()
