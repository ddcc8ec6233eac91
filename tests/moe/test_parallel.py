"""Tensor- and expert-parallel models (moe/parallel.py) over gloo: CPU processes, Triton's interpreter.

With the batch_invariant backend a sharded model gives the single-process model's logits and greedy
completions bitwise, alone and inside ragged batches (prefill, decode, mixed and chunked steps); with the
stock backend its all-reduce changes the bits. Each check runs in every rank (spawned processes); a
failing assert in any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
import moe
from lab.compositions import Composition
from moe.engine import Engine, Request
from moe.parallel import Layout, Shard
from tests.conftest import random_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(seed: int) -> moe.ModelConfig:
    # tiny, with a shared expert (a third row-parallel matmul) and 4 KV heads so 4 ranks can split them
    base = moe.ModelConfig.from_name("tiny", seed=seed, n_kv_heads=4)
    return replace(base, moe=replace(base.moe, n_shared_experts=1))


def _probe_in(model, probe: list[int], comp: Composition | None) -> Request:
    if comp is None:
        req = Request(probe, 3, track=True)
        Engine(model, 1, 64).run([req])
        return req
    req, batch = comp.requests(probe, 3)
    Engine(model, len(batch), 64).run(batch, until_tracked_done=True)
    return req


def _worker(rank: int, world: int, port: int, seed: int, experts: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)                       # the same draws on every rank: the same batch
        cfg = _config(seed)
        single = moe.MoETransformer(cfg)
        layout = Layout(attention="tp", experts=experts)
        sharded = moe.MoETransformer(cfg, layout=layout)
        # layouts that cannot split the model are refused, naming the field
        with pytest.raises(ValueError, match="n_kv_heads=1 must be divisible"):
            moe.MoETransformer(replace(cfg, n_kv_heads=1), layout=layout)
        with pytest.raises(ValueError, match="qk_norm='full'"):
            moe.MoETransformer(replace(cfg, qk_norm="full"), layout=layout)
        if experts == "ep":
            with pytest.raises(ValueError, match=f"n_experts=3 must be divisible by the layout's {world}"):
                moe.MoETransformer(replace(cfg, moe=replace(cfg.moe, n_experts=3)), layout=layout)
        V = cfg.vocab_size
        prompts = random_prompts(5, V, 1, 12)
        tokens, cu = moe.cu_seqlens_of(prompts)
        probe = random_prompts(1, V, 3, 9)[0]
        comps = [Composition(batch_size=B, probe_index=int(torch.randint(0, B, ())), mode=mode,
                             co_prompts=(co := random_prompts(B - 1, V, 1, 10)),
                             co_new_tokens=[int(torch.randint(2, 5, ())) for _ in co],
                             chunk=3 if mode == "chunked" else None)
                 for B, mode in [(3, "prefill"), (4, "mixed"), (2, "chunked")]]
        with kernels.use_backend("batch_invariant"):
            assert torch.equal(sharded(tokens, cu)[0], single(tokens, cu)[0]), "ragged prefill"
            alone = _probe_in(single, probe, None)
            for comp in [None] + comps:
                got = _probe_in(sharded, probe, comp)
                assert got.generated == alone.generated, comp and comp.mode
                assert torch.equal(got.token_logits(), alone.token_logits()), comp and comp.mode
            assert moe.generate(sharded, prompts, 3) == moe.generate(single, prompts, 3)
        with kernels.use_backend("torch"):
            stock, ref = sharded(tokens, cu)[0], single(tokens, cu)[0]
            # the same function (each partial summed once, shared experts included), rounded otherwise
            torch.testing.assert_close(stock, ref, rtol=1e-4, atol=1e-4)
            stock_differs = not torch.equal(stock, ref)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps(dict(stock_differs=stock_differs)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world, experts", [(2, "ep"), (2, "tp"), (4, "ep")])
def test_ranks_give_the_single_process_bits(seed, tmp_path, world, experts):
    mp.spawn(_worker, args=(world, _free_port(), seed, experts, str(tmp_path)), nprocs=world, join=True)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    # fp32 on this CPU: a full-K mm and the all-reduce of two half-K mms round differently
    assert all(v["stock_differs"] for v in verdicts)


def test_layout_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    with pytest.raises(ValueError, match="init_process_group"):
        Layout()


def test_shard_takes_fused_blocks():
    full = torch.arange(2 * 8).view(2, 8)            # gate | up, 4 columns each
    parts = [Shard(dim=1, rank=r, size=2, parts=2).take(full) for r in range(2)]
    assert parts[0].tolist() == [[0, 1, 4, 5], [8, 9, 12, 13]]
    assert parts[1].tolist() == [[2, 3, 6, 7], [10, 11, 14, 15]]
    assert Shard(dim=1, rank=0, size=2, parts=2).full_shape(parts[0].shape) == full.shape


def test_ordered_sum_is_one_balanced_tree():
    from moe.parallel import ordered_sum
    p = torch.randn(4, 3, 5)
    assert torch.equal(ordered_sum(p, None, torch.float32), (p[0] + p[1]) + (p[2] + p[3]))
    with pytest.raises(ValueError, match="power-of-two"):
        ordered_sum(torch.randn(3, 2), None, torch.float32)


def _load_worker(rank: int, world: int, port: int, folder: str, experts: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        single = moe.from_pretrained(folder)
        sharded = moe.from_pretrained(folder, layout=Layout(attention="tp", experts=experts))
        assert sum(p.numel() for p in sharded.parameters()) < sum(p.numel() for p in single.parameters())
        tokens, cu = moe.cu_seqlens_of([[5, 17, 3, 90, 44], [2], [60, 61, 62, 63]])
        with kernels.use_backend("batch_invariant"):
            assert torch.equal(sharded(tokens, cu)[0], single(tokens, cu)[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("arch, experts", [("qwen2_moe", "tp"), ("qwen3_moe", "ep"), ("qwen3_moe_fused", "tp")])
def test_from_pretrained_keeps_each_ranks_shard(tmp_path, arch, experts):
    """A checkpoint loaded with a layout (each rank reading its slices of the files) gives the
    layout-free model's bits: qkv biases, a gated shared expert, per-head qk norms, per-expert and
    fused expert tensors."""
    pytest.importorskip("transformers")
    from tests.moe.test_pretrained import hf_model, write_fused
    model = hf_model(arch.removesuffix("_fused"))
    model.save_pretrained(tmp_path / "hub")
    folder = tmp_path / "hub"
    if arch.endswith("_fused"):
        (folder := tmp_path / "fused").mkdir()
        write_fused(tmp_path / "hub", folder, model.config)
    mp.spawn(_load_worker, args=(2, _free_port(), str(folder), experts), nprocs=2, join=True)


def _app_worker(rank: int, world: int, port: int, app: str, overrides: list[str], out_dir: str) -> None:
    """Rank `rank` of a torchrun-like launch of an experiment app (its run function, Hydra-composed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from hydra import compose, initialize_config_dir
    from experiments.ablate import run_ablation
    from experiments.rl_consistency import run_rl_consistency
    from experiments.serve_sim import run_serve_sim
    from lab.hydra_utils import CONFIG_DIR
    run = dict(ablate=run_ablation, rl_consistency=run_rl_consistency, serve_sim=run_serve_sim)[app]
    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = compose(app, overrides=overrides)
        run(cfg, Path(out_dir))                      # the process group starts inside (lab/distributed.py)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_rl_sampler_on_two_ranks_trainer_on_one(seed, tmp_path):
    """The RL consistency app with the sampler tensor-parallel over 2 ranks and the trainer on one
    device: bitwise equal log-probs with batch_invariant kernels; only rank 0 writes."""
    overrides = ["router=topk", "kernels=all", f"seed={seed}", "rl.n_samples=4", "rl.max_new_tokens=4",
                 "rl.max_slots=3", "rl.prompt_max_len=8", "rl.trainer_microbatches=2",
                 "rl.sampler_layout=tp", "rl.trainer_layout=none"]
    mp.spawn(_app_worker, args=(2, _free_port(), "rl_consistency", overrides, str(tmp_path)), nprocs=2, join=True)
    cells = {c["backend"]: c for c in json.loads((tmp_path / "results.json").read_text())["cells"]}
    inv = cells["batch_invariant"]
    assert inv["tokens"] == 4 * 4
    assert inv["frac_logits_differ"] == 0 and inv["max_abs_delta_logprob"] == 0.0
    assert (tmp_path / "rl_consistency.png").exists()


@pytest.mark.slow
def test_serving_simulation_sharded(seed, tmp_path):
    """serve_sim with the model expert-parallel over 2 ranks: one completion with batch_invariant."""
    overrides = ["router=topk", "kernels=batch_invariant", f"seed={seed}", "serve.n_probe_runs=4",
                 "serve.max_new_tokens=4", "serve.max_slots=4", "serve.traffic_max_new=4", "serve.layout=ep"]
    mp.spawn(_app_worker, args=(2, _free_port(), "serve_sim", overrides, str(tmp_path)), nprocs=2, join=True)
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["runs"] == 4 and cell["distinct"] == 1


@pytest.mark.slow
def test_ablation_layout_axis_names_the_collective(seed, tmp_path):
    """The ablation on 2 ranks with layouts none and tp: batch_invariant cells stay at zero on the
    layout; on the stock backend the probe alone in a batch of one, sharded, already differs from one
    device, and those tokens are counted as `collective`."""
    overrides = ["model=tiny", "router=topk", "kernels=all", "combines=[ordered]", f"seed={seed}",
                 "layouts=[none,tp]", "jobs=1", "experiment.batch_sizes=[1,3]", "experiment.max_new_tokens=3"]
    mp.spawn(_app_worker, args=(2, _free_port(), "ablate", overrides, str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {(c["backend"], c["layout"]): c for c in results["cells"]}
    assert cells["batch_invariant", "tp"]["frac_logits_differ"] == 0
    assert cells["torch", "tp"]["causes"]["collective"] > 0
    assert cells["torch", "none"]["causes"]["collective"] == 0
    assert results["claims"]["stock_collectives_diverge_on_a_parallel_layout"] is True
