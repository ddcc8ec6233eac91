"""Training-inference consistency: are the sampler's log-probs the trainer's log-probs, bitwise?

Reinforcement learning samples with an inference engine (incremental decode, KV cache, continuous
batching) and trains with a full-sequence forward. If the two disagree, the policy is silently
off-policy. Here the engine samples completions under load; then the "trainer" recomputes every
completion's log-probs with full-sequence forwards over all samples, shuffled and packed into ragged
batches. Per router x backend it reports the per-token KL(sampler || trainer) over the vocabulary,
max |delta log-prob| of the sampled tokens, and the fraction of tokens whose log-prob differs.

    python -m detmoe.experiments.rl_consistency
    python -m detmoe.experiments.rl_consistency -m router=topk,capacity kernels=torch,batch_invariant

With batch_invariant kernels and a batch-invariant router (topk, sequence_capacity) the difference is
exactly zero; stock kernels or a capacity router make it non-zero. The sampler and the trainer may run
on different parallel layouts of the same weights (as an RL trainer on one layout and its sampler on
another do): still zero with batch_invariant kernels, whose sums do not depend on the layout.

    torchrun --nproc_per_node 2 -m detmoe.experiments.rl_consistency rl.sampler_layout=tp rl.trainer_layout=none \
        hydra.run.dir=outputs/rl_layouts
"""
from __future__ import annotations

import random
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from detmoe import kernels  # noqa: E402
from detmoe.lab.compositions import random_prompt  # noqa: E402
from detmoe.lab.distributed import is_main, layout_named  # noqa: E402
from detmoe.lab.hydra_utils import CONFIG_DIR, router_backend_grid, run_cells, run_dir, write_csv, write_json  # noqa: E402
from detmoe.lab.outputs import write_summary  # noqa: E402
from detmoe.lab.plot import save_figure  # noqa: E402
from detmoe.lab import config_checks as checks  # noqa: E402
from detmoe.moe import MoETransformer, cu_seqlens_of  # noqa: E402
from detmoe.moe.engine import Engine, Request, poisson  # noqa: E402
from detmoe.moe.generate import check_sampling  # noqa: E402
from detmoe.moe.parallel import shard_model  # noqa: E402


def sample(model: MoETransformer, rl: DictConfig, seed: int) -> list[Request]:
    """The sampler: requests arrive over time (Poisson, `load` per step) and are served with the
    KV cache and continuous batching; each samples from its own seeded generator."""
    rng = random.Random(seed)
    V = model.cfg.vocab_size
    requests, step = [], 0
    checks.check_span("rl.load", rl.load, "rl.n_samples", rl.n_samples)   # else the loop below would not end
    while len(requests) < rl.n_samples:
        for _ in range(poisson(rng, rl.load)):
            if len(requests) < rl.n_samples:
                prompt = random_prompt(rng, V, rng.randint(rl.prompt_min_len, rl.prompt_max_len))
                requests.append(Request(prompt, rl.max_new_tokens, arrival=step, order=len(requests), track=True,
                                        temperature=rl.temperature, top_p=rl.top_p, seed=seed * SEED_STRIDE + len(requests)))
        step += 1
    Engine(model, rl.max_slots, rl.prompt_max_len + rl.max_new_tokens + 1).run(requests)
    return requests


def sampler_logits(r: Request) -> torch.Tensor:
    """[n_gen, V] the logits the sampler drew each generated token from."""
    start = len(r.prompt) - 1
    return r.token_logits()[start:start + len(r.generated)]


def trainer_logits(model: MoETransformer, requests: list[Request], microbatches: int, seed: int) -> list[torch.Tensor]:
    """The trainer: full-sequence forwards (no cache) over prompt + completion, samples shuffled and
    packed into `microbatches` ragged batches. Returns each request's [n_gen, V] logits."""
    order = list(range(len(requests)))
    random.Random(seed + 1).shuffle(order)
    out: list[torch.Tensor] = [None] * len(requests)  # type: ignore[list-item]
    for chunk in (order[i::microbatches] for i in range(microbatches)):
        if not chunk:
            continue
        seqs = [requests[i].tokens[:-1] for i in chunk]  # the last sampled token predicts nothing
        logits, _ = model(*cu_seqlens_of(seqs, model.device))
        start = 0
        for i, s in zip(chunk, seqs):
            p = len(requests[i].prompt)
            out[i] = logits[start + p - 1:start + len(s)].cpu()
            start += len(s)
    return out


def compare(requests: list[Request], trainer: list[torch.Tensor], device: torch.device) -> dict:
    """Per-token KL(sampler || trainer), |delta log-prob| of the sampled tokens, bitwise differences,
    computed on the model's device (the backend's log-softmax runs where its kernels do)."""
    kls, deltas, differ, rows_differ = [], [], 0, 0
    for r, t in zip(requests, trainer):
        s, t = sampler_logits(r).to(device), t.to(device)
        ls, lt = kernels.log_softmax(s), kernels.log_softmax(t)
        kls.append((ls.exp() * (ls - lt)).sum(-1))
        chosen = torch.tensor(r.generated, device=device)[:, None]
        d = (ls.gather(1, chosen) - lt.gather(1, chosen)).squeeze(1)
        deltas.append(d.abs())
        differ += int((d != 0).sum())
        rows_differ += int((s != t).any(-1).sum())
    kl, delta = torch.cat(kls), torch.cat(deltas)
    n = delta.numel()
    return dict(tokens=n, mean_kl=float(kl.mean()), max_kl=float(kl.max()), max_abs_delta_logprob=float(delta.max()),
                mean_abs_delta_logprob=float(delta.mean()), frac_logprob_differ=differ / n,
                frac_logits_differ=rows_differ / n)


def plot(cells: list[dict], path: Path) -> Path:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.5 * len(cells) + 2.5))
    labels = [f"{c['router']} / {c['backend']}" for c in cells]
    y = range(len(cells))
    ax.barh(y, [c["frac_logprob_differ"] for c in cells], color="#C44E52")
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of sampled tokens whose log-prob differs (sampler vs trainer)")
    floor = 1e-12  # zero is drawn at the floor, labelled
    bx.barh(y, [max(c["max_abs_delta_logprob"], floor) for c in cells], color="#4C72B0", label="max |delta log-prob|")
    bx.scatter([max(c["max_kl"], floor) for c in cells], y, color="k", zorder=3, label="max per-token KL")
    bx.set_xscale("log")
    bx.set_yticks(y, [""] * len(cells))
    bx.set_xlabel(f"size of the difference (log scale; {floor:g} means exactly 0)")
    bx.legend(fontsize=8)
    fig.suptitle("Trainer vs sampler: is the RL policy on-policy?")
    return save_figure(fig, path)


# Request i samples with seed * SEED_STRIDE + i (`sample`)
SEED_STRIDE = 100_003


def validate_config(cfg: DictConfig) -> None:
    """Every key of the trainer-vs-sampler config, before any work: a ValueError naming the first bad one."""
    c, models = checks.check_common(cfg, "rl_consistency", lists=False)
    rl = checks.check_keys(c["rl"], checks.yaml_keys("rl_consistency.yaml", "rl"), "rl")
    checks.check_name("rl.name", rl["name"])
    for key in ("n_samples", "prompt_min_len", "prompt_max_len", "max_new_tokens", "max_slots"):
        checks.check_int(f"rl.{key}", rl[key], 1)
    checks.check_order("rl.prompt_min_len", rl["prompt_min_len"], "rl.prompt_max_len", rl["prompt_max_len"])
    # more microbatches than samples would pack fewer, silently
    checks.check_int("rl.trainer_microbatches", rl["trainer_microbatches"], 1, rl["n_samples"], "rl.n_samples")
    with checks.named("rl."):
        check_sampling(rl["temperature"], rl["top_p"])
    checks.check_span("rl.load", rl["load"], "rl.n_samples", rl["n_samples"])
    checks.check_layouts({"rl.sampler_layout": rl["sampler_layout"], "rl.trainer_layout": rl["trainer_layout"]})
    checks.check_seed(c["seed"], scale=SEED_STRIDE + rl["n_samples"])
    checks.check_fits(rl["prompt_max_len"] + rl["max_new_tokens"] + 1, "rl.prompt_max_len + max_new_tokens (and a spare)",
                      models[0].max_seq_len)


def run_rl_consistency(cfg: DictConfig, out: Path) -> dict:
    validate_config(cfg)
    # the sampler and the trainer may spread the same weights over different layouts (torchrun)
    sampler_layout, trainer_layout = layout_named(cfg.rl.sampler_layout), layout_named(cfg.rl.trainer_layout)

    def measure(model: MoETransformer, point: dict) -> dict:
        sampler = model if sampler_layout is None else shard_model(model, sampler_layout)
        trainer = (sampler if cfg.rl.trainer_layout == cfg.rl.sampler_layout else
                   model if trainer_layout is None else shard_model(model, trainer_layout))
        requests = sample(sampler, cfg.rl, cfg.seed)
        return compare(requests, trainer_logits(trainer, requests, cfg.rl.trainer_microbatches, cfg.seed),
                       model.device)

    grid = router_backend_grid(cfg)
    cells = run_cells(cfg, out, grid, measure, desc="router x backend")
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), cells=cells)
    write_json(out / "results.json", results)
    write_csv(out / "rl_consistency.csv", cells)
    plot(cells, out / "rl_consistency.png")
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="rl_consistency", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)   # before run_dir records the run
    out = run_dir(cfg)
    results = run_rl_consistency(cfg, out)
    lines = [f"{'router':18} {'backend':16} {'frac lp differ':>14} {'max |dlp|':>10} {'mean KL':>10}"]
    lines += [f"{c['router']:18} {c['backend']:16} {c['frac_logprob_differ']:14.3f} {c['max_abs_delta_logprob']:10.3g} "
              f"{c['mean_kl']:10.3g}" for c in results["cells"]]
    text = write_summary(out, lines + [f"results and plot: {out.resolve()}"])
    if is_main():
        print(text)


if __name__ == "__main__":
    from detmoe.experiments.rl_consistency import main as importable_main  # see detmoe/experiments/ablate.py
    importable_main()
