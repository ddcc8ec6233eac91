"""Tensor- and expert-parallel models (detmoe/moe/parallel.py) over gloo: CPU processes, Triton's interpreter.

With the batch_invariant backend a sharded model gives the single-process model's logits and greedy
completions bitwise, alone and inside ragged batches (prefill, decode, mixed and chunked steps), on the
one-dimensional layouts and on the two-dimensional "ep2xtp2" (experts over 2 pairs of ranks, each expert
split inside its pair); with the stock backend its all-reduce changes the bits. Each check runs in
every rank (spawned processes); a failing assert in any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detmoe import kernels
from detmoe import moe
from detmoe.lab.compositions import Composition
from detmoe.lab.distributed import layout_named
from detmoe.moe.engine import Engine, Request
from detmoe.moe import parallel
from detmoe.moe.parallel import Layout, Shard, shard_model, shards_of
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


def _worker(rank: int, world: int, port: int, seed: int, experts: str, ep_runs: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if ep_runs == "host":   # every step takes the prefill path: runs' bounds read on the host
        moe.layer.EP_DEVICE_RUN_MAX = 0
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
            # decode steps padded to a bucket (detmoe/moe/graphs.py; eager on a CPU) under the layout: same tokens
            if ep_runs == "device":
                assert moe.generate(sharded, prompts, 3, graphs=True) == moe.generate(single, prompts, 3)
            if experts == "ep":   # a bucket too large to place its rows without a host sync is refused
                with pytest.raises(ValueError, match="use smaller buckets"):
                    moe.DecodeGraphs(sharded, sharded.new_cache(2, 8), buckets=(moe.layer.EP_DEVICE_RUN_MAX + 1,))
        with kernels.use_backend("torch"):
            stock, ref = sharded(tokens, cu)[0], single(tokens, cu)[0]
            # the same function (each partial summed once, shared experts included), rounded otherwise
            torch.testing.assert_close(stock, ref, rtol=1e-4, atol=1e-4)
            stock_differs = not torch.equal(stock, ref)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps(dict(stock_differs=stock_differs)))
    finally:
        dist.destroy_process_group()


def _ordered_sum_worker(rank: int, world: int, port: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layout = Layout(attention="tp", experts="tp")
        gen = torch.Generator().manual_seed(seed)               # the same leaves on every rank
        for shape, threshold in itertools.product([(1, 24), (5, 24), (33, 7), (0, 24)], [0, 1 << 30]):
            # mixed magnitudes, so that another order of the additions gives other bits
            leaves = torch.randn(8, *shape, generator=gen) * torch.exp2(torch.randint(-10, 10, (8, *shape),
                                                                                       generator=gen).float())
            mine = leaves.view(world, 8 // world, *shape)[rank]    # this rank's subtree of the one tree
            parallel.GATHER_BELOW_BYTES = threshold             # 0: all-to-all + all-gather; 2**30: all-gather
            for dtype in (torch.float32, torch.bfloat16):
                with kernels.use_backend("batch_invariant"):
                    subtree = kernels.tree_sum(mine, torch.float32)
                    got, ref = parallel.cross_rank_sum(subtree, layout, dtype), kernels.tree_sum(leaves, dtype)
                assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), \
                    (shape, threshold, dtype)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [4])   # (2 ranks: the model-level tests above)
def test_ordered_sum_is_one_tree_on_any_ranks(seed, world):
    """Both forms of the cross-rank sum (one all-gather for small sums; all-to-all, then all-gather for
    large ones) give the bits of one process summing all leaves in the same tree, for sizes that do and
    do not split evenly over the ranks, and for no rows (an expert group without tokens)."""
    mp.spawn(_ordered_sum_worker, args=(world, _free_port(), seed), nprocs=world, join=True)


@pytest.mark.slow
@pytest.mark.parametrize("world, experts, ep_runs", [(2, "ep", "device"), (2, "tp", "device"), (4, "ep", "host")])
def test_ranks_give_the_single_process_bits(seed, tmp_path, world, experts, ep_runs):
    """ep_runs: where an expert-parallel rank finds its run of rows, on the device (decode-sized steps,
    capturable) or on the host (above moe.layer.EP_DEVICE_RUN_MAX assignments)."""
    mp.spawn(_worker, args=(world, _free_port(), seed, experts, ep_runs, str(tmp_path)), nprocs=world, join=True)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    # fp32 on this CPU: a full-K mm and the all-reduce of two half-K mms round differently
    assert all(v["stock_differs"] for v in verdicts)


def _worker_2d(rank: int, world: int, port: int, seed: int, out_dir: str) -> None:
    """ep2xtp2 on 4 ranks: its refusals, its shards, and the single-process bits (a leaner cut of
    `_worker`'s checks: the 2-D layout adds a sub-group sum and a sub-group gather to the same paths)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)
        cfg = _config(seed)
        for bad, why in [(dict(expert_tp=3), "expert_tp=3 must divide the layout's 4 ranks"),
                         (dict(expert_tp=0), "expert_tp must be a positive int"),
                         (dict(experts="tp", expert_tp=2), "expert_tp=2 needs experts='ep'")]:
            with pytest.raises(ValueError, match=why):
                Layout(**{"attention": "tp", "experts": "ep", **bad})
        layout = Layout(attention="tp", experts="ep", expert_tp=2)
        assert str(layout) == "attention=tpx4,experts=ep2xtp2" and layout_named("ep2xtp2") == layout
        with pytest.raises(ValueError, match="needs 3 x 2 = 6 ranks"):
            layout_named("ep3xtp2")
        # TP partners are neighbours; the EP sub-group ranks the pairs
        assert (layout.expert_tp_layout.rank, layout.expert_ep_layout.rank) == (rank % 2, rank // 2)
        with pytest.raises(ValueError, match="n_experts=6 must be divisible by the layout's 4 ranks"):
            moe.MoETransformer(replace(cfg, moe=replace(cfg.moe, n_experts=6)), layout=Layout(experts="ep"))
        moe.MoETransformer(replace(cfg, moe=replace(cfg.moe, n_experts=6)), layout=layout)  # 3 per pair
        with pytest.raises(ValueError, match="n_experts=3 must be divisible by the layout's 2 expert-parallel"):
            moe.MoETransformer(replace(cfg, moe=replace(cfg.moe, n_experts=3)), layout=layout)
        single = moe.MoETransformer(cfg)
        sharded = moe.MoETransformer(cfg, layout=layout)
        moe_layer, full = sharded.blocks[0].moe, single.blocks[0].moe
        E, F = cfg.moe.n_experts, cfg.moe.d_expert
        assert moe_layer.w_down.shape == (E // 2, F // 2, cfg.d_model)
        assert {s.dim for s in shards_of(sharded)["blocks.0.moe.w_gate_up"].splits} == {0, 2}
        # the 4 ranks' blocks, put back by (pair, position), are the single-process weights
        downs = [torch.empty_like(moe_layer.w_down) for _ in range(world)]
        dist.all_gather(downs, moe_layer.w_down)
        assert torch.equal(torch.cat([torch.cat(downs[2 * g:2 * g + 2], dim=1) for g in range(2)]), full.w_down)
        gate_ups = [torch.empty_like(moe_layer.w_gate_up) for _ in range(world)]
        dist.all_gather(gate_ups, moe_layer.w_gate_up)
        halves = [[t.chunk(2, dim=2) for t in gate_ups[2 * g:2 * g + 2]] for g in range(2)]   # gate | up
        assert torch.equal(torch.cat([torch.cat([h[0] for h in pair] + [h[1] for h in pair], dim=2)
                                      for pair in halves]), full.w_gate_up)
        assert all(torch.equal(a, b) for a, b in zip(shard_model(single, layout).parameters(), sharded.parameters()))
        V = cfg.vocab_size
        prompts = random_prompts(5, V, 1, 12)
        tokens, cu = moe.cu_seqlens_of(prompts)
        probe = random_prompts(1, V, 3, 9)[0]
        mixed = Composition(batch_size=3, probe_index=int(torch.randint(0, 3, ())), mode="mixed",
                            co_prompts=(co := random_prompts(2, V, 1, 10)),
                            co_new_tokens=[int(torch.randint(2, 5, ())) for _ in co])
        with kernels.use_backend("batch_invariant"):
            assert torch.equal(sharded(tokens, cu)[0], single(tokens, cu)[0]), "ragged prefill"
            # the probe's prefill in a step with the others' decode, then its decode steps
            alone, got = _probe_in(single, probe, None), _probe_in(sharded, probe, mixed)
            assert got.generated == alone.generated
            assert torch.equal(got.token_logits(), alone.token_logits())
        with kernels.use_backend("torch"):
            stock, ref = sharded(tokens, cu)[0], single(tokens, cu)[0]
            torch.testing.assert_close(stock, ref, rtol=1e-4, atol=1e-4)
            stock_differs = not torch.equal(stock, ref)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(dict(stock_differs=stock_differs)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_dimensional_layout_gives_the_single_process_bits(seed, tmp_path):
    """ep2xtp2: experts over 2 pairs of ranks, each expert's d_expert split inside its pair."""
    mp.spawn(_worker_2d, args=(4, _free_port(), seed, str(tmp_path)), nprocs=4, join=True)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(v["stock_differs"] for v in verdicts)


def test_layout_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    with pytest.raises(ValueError, match="init_process_group"):
        Layout()


@pytest.mark.parametrize("name", ["ep2xtp", "ep0xtp2", "tp2xep2", "EP2xTP2"])
def test_bad_layout_names_are_refused(name):
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_named(name)


def test_shard_takes_fused_blocks():
    full = torch.arange(2 * 8).view(2, 8)            # gate | up, 4 columns each
    parts = [Shard(dim=1, rank=r, size=2, parts=2).take(full) for r in range(2)]
    assert parts[0].tolist() == [[0, 1, 4, 5], [8, 9, 12, 13]]
    assert parts[1].tolist() == [[2, 3, 6, 7], [10, 11, 14, 15]]
    assert Shard(dim=1, rank=0, size=2, parts=2).full_shape(parts[0].shape) == full.shape


def test_shard_along_two_dims():
    """An expert weight in ep2xtp2: experts (dim 0) by pair, gate|up columns (dim 2) by place in the pair."""
    full = torch.arange(2 * 1 * 8).view(2, 1, 8)    # 2 experts, gate | up of 4 columns each
    shard = lambda g, p: Shard(dim=2, rank=p, size=2, parts=2, then=Shard(dim=0, rank=g, size=2))
    assert shard(0, 1).take(full).tolist() == [[[2, 3, 6, 7]]]
    assert shard(1, 0).take(full).tolist() == [[[8, 9, 12, 13]]]
    assert shard(1, 1).full_shape(torch.Size([1, 1, 4])) == full.shape
    assert [s.dim for s in shard(0, 0).splits] == [2, 0]
    with pytest.raises(ValueError, match="splits each dim once"):
        Shard(dim=0, rank=0, size=2, then=Shard(dim=0, rank=1, size=2))


@pytest.mark.parametrize("fused", [False, True])
def test_checkpoint_slices_of_a_two_dim_shard(fused):
    """moe.from_pretrained's slice reading: per-expert gate and up tensors (or the whole fused one), read
    in the pieces that fall in each rank's 2-D block, fill exactly `Shard.take` of the full weight."""
    from detmoe.moe.pretrained import _rank_parts
    E, D, F = 4, 3, 6
    full = torch.randn(E, D, 2 * F)
    placed = [((), full)] if fused else [((e, slice(None), slice(h * F, (h + 1) * F)), full[e, :, h * F:(h + 1) * F])
                                        for e in range(E) for h in range(2)]
    for g, p in itertools.product(range(2), range(2)):
        shard = Shard(dim=2, rank=p, size=2, parts=2, then=Shard(dim=0, rank=g, size=2))
        local = torch.full((E // 2, D, F), float("nan"))
        for index, tensor in placed:
            for where, part in _rank_parts(index, local.shape, shard):
                local[where] = tensor if part is None else tensor[tuple(part)]
        assert torch.equal(local, shard.take(full)), (g, p)


def _load_worker(rank: int, world: int, port: int, folders: list[str], layout_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layout = layout_named(layout_name)
        tokens, cu = moe.cu_seqlens_of([[5, 17, 3, 90, 44], [2], [60, 61, 62, 63]])
        for folder in folders:
            single = moe.from_pretrained(folder)
            sharded = moe.from_pretrained(folder, layout=layout)
            assert sum(p.numel() for p in sharded.parameters()) < sum(p.numel() for p in single.parameters())
            with kernels.use_backend("batch_invariant"):
                assert torch.equal(sharded(tokens, cu)[0], single(tokens, cu)[0]), folder
    finally:
        dist.destroy_process_group()


def _qwen3_moe_with_four_kv_heads():
    """tests/moe/test_pretrained.py's tiny Qwen3-MoE with 4 KV heads, so that 4 ranks can split them."""
    import transformers
    from tests.moe.test_pretrained import ARCHS, COMMON
    cls, opts = ARCHS["qwen3_moe"]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**{**COMMON, "num_key_value_heads": 4}, **opts)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", [("qwen2_moe", "tp"), ("qwen3_moe", "ep"), ("qwen3_moe_fused", "tp"),
                                          ("qwen3_moe+fused", "ep2xtp2")])
def test_from_pretrained_keeps_each_ranks_shard(tmp_path, arch, layout):
    """A checkpoint loaded with a layout (each rank reading its slices of the files) gives the
    layout-free model's bits: qkv biases, a gated shared expert, per-head qk norms, per-expert and
    fused expert tensors; on ep2xtp2 (4 ranks, one launch) both expert formats, cut along two dims."""
    pytest.importorskip("transformers")
    from tests.moe.test_pretrained import hf_model, write_fused
    world = 4 if layout == "ep2xtp2" else 2
    model = _qwen3_moe_with_four_kv_heads() if world == 4 else hf_model(arch.removesuffix("_fused"))
    model.save_pretrained(tmp_path / "hub")
    folders = [tmp_path / "hub"]
    if "fused" in arch:
        (fused := tmp_path / "fused").mkdir()
        write_fused(tmp_path / "hub", fused, model.config)
        folders = folders + [fused] if arch.endswith("+fused") else [fused]
    mp.spawn(_load_worker, args=(world, _free_port(), [str(f) for f in folders], layout), nprocs=world, join=True)


def _app_worker(rank: int, world: int, port: int, app: str, overrides: list[str], out_dir: str) -> None:
    """Rank `rank` of a torchrun-like launch of an experiment app (its run function, Hydra-composed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from hydra import compose, initialize_config_dir
    from detmoe.experiments.ablate import run_ablation
    from detmoe.experiments.rl_consistency import run_rl_consistency
    from detmoe.experiments.serve_sim import run_serve_sim
    from detmoe.lab.hydra_utils import CONFIG_DIR
    run = dict(ablate=run_ablation, rl_consistency=run_rl_consistency, serve_sim=run_serve_sim)[app]
    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = compose(app, overrides=overrides)
        run(cfg, Path(out_dir))                      # the process group starts inside (detmoe/lab/distributed.py)
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
                 "layouts=[none,tp]", "extra_cells=[]", "jobs=1", "experiment.batch_sizes=[1,3]", "experiment.max_new_tokens=3"]
    mp.spawn(_app_worker, args=(2, _free_port(), "ablate", overrides, str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {(c["backend"], c["layout"]): c for c in results["cells"]}
    assert cells["batch_invariant", "tp"]["frac_logits_differ"] == 0
    assert cells["torch", "tp"]["causes"]["collective"] > 0
    assert cells["torch", "none"]["causes"]["collective"] == 0
    assert results["claims"]["stock_collectives_diverge_on_a_parallel_layout"] is True


def _random_config(gen: torch.Generator, world: int) -> tuple[moe.ModelConfig, str]:
    """A model every layout of `world` ranks can split, at widths drawn from ranges: reduce_chunks a multiple
    of the ranks, heads and KV heads in multiples of them, an expert width an odd multiple of the chunk
    count (below and above the interpreter's tiles), a shared expert with or without its gate."""
    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]
    C = pick([c for c in (1, 2, 4, 8) if c % world == 0])
    n_kv = world * pick([1, 2])
    head_dim = pick([8, 16, 24])                 # n_heads * head_dim divisible by C <= 8
    experts = pick(["ep", "tp"] + (["ep2xtp2"] if world == 4 else []))
    n_experts = world * pick([1, 2, 3])
    shared = pick([0, 1])
    base = moe.ModelConfig.from_name("tiny", seed=int(torch.randint(0, 2**20, (1,), generator=gen)),
                                     d_model=8 * pick([4, 6, 9, 16]), n_heads=n_kv * pick([1, 2]), n_kv_heads=n_kv,
                                     attn_head_dim=head_dim, reduce_chunks=C)
    d_expert = C * pick(range(1, 50, 2))
    cfg = replace(base, moe=replace(base.moe, n_experts=n_experts, top_k=pick([1, 2]), d_expert=d_expert,
                                    n_shared_experts=shared, shared_expert_gate=bool(shared and pick([0, 1]))))
    return cfg, experts


def _random_widths_worker(rank: int, world: int, port: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(seed)            # the same draws on every rank
        cfg, experts = _random_config(gen, world)
        torch.manual_seed(seed)
        single, sharded = moe.MoETransformer(cfg), moe.MoETransformer(cfg, layout=layout_named(experts))
        prompts = random_prompts(4, cfg.vocab_size, 1, 10)
        what = f"{experts} on {world} ranks, {cfg}"
        with kernels.use_backend("batch_invariant"):
            assert torch.equal(sharded(*moe.cu_seqlens_of(prompts))[0], single(*moe.cu_seqlens_of(prompts))[0]), what
            assert moe.generate(sharded, prompts, 3) == moe.generate(single, prompts, 3), what
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_give_the_single_process_bits_at_widths_drawn_at_random(seed, world):
    """Layout invariance as a property, not at one shape: a fresh model of random widths each run (the
    seed printed replays it), sharded by a random layout, gives the one-process logits and tokens."""
    mp.spawn(_random_widths_worker, args=(world, _free_port(), seed), nprocs=world, join=True)
