"""Smoke test: the default ablation at tiny size, read back from its saved files, shows the claims the
design predicts and writes its figures and report; the claims are judged on the run's own data, the
device-dependent ones only where the stock kernels vary."""
import json

import pytest
from hydra import compose, initialize_config_dir

from detmoe.experiments.ablate import STOCK_INVARIANT, extra_cell_points, judge_claims, run_ablation
from detmoe.lab.hydra_utils import CONFIG_DIR
from detmoe.lab.plot import FIGURES, plot_run
from tests.lab.fake_cells import factorial_cells

TINY = ["router.names=[topk,capacity]", "combines=[ordered]", "dtypes=[float32]",
        "experiment.n_probes=1", "experiment.batch_sizes=[2,5,9]", "experiment.max_new_tokens=3",
        "experiment.probe_min_len=3", "experiment.probe_max_len=8", "experiment.co_max_len=8",
        "extra_cells=[{router: topk, backend: torch, combine: ordered, dtype: bfloat16, n_probes: 2}]"]


def tiny_config(seed: int, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("ablate", overrides=[*TINY, f"seed={seed % 1000}", *overrides])


@pytest.mark.cpu_blas_dependent  # the torch backend's arithmetic divergence is this CPU's fp32 mm
def test_default_ablation_at_tiny_size_shows_the_claims(tmp_path, seed):
    cfg = tiny_config(seed)
    run_ablation(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    claims = saved["claims"]
    assert claims["invariant_kernels_and_router_give_zero_divergence"] is True
    assert claims["capacity_router_diverges_structurally_with_invariant_kernels"] is True
    assert claims["torch_backend_diverges_arithmetically_with_topk"] is True
    assert {k: v["holds"] for k, v in saved["claim_verdicts"].items()} == claims
    assert max(saved["stock_kernel_versions"]["float32"].values()) > 1   # the premise of the marker above
    cells = {(c["router"], c["backend"], c["dtype"]): c for c in saved["cells"]}
    assert cells[("topk", "batch_invariant", "float32")]["tokens"] > 0
    assert cells[("capacity", "batch_invariant", "float32")]["causes"]["arithmetic"] == 0  # invariant kernels: no arithmetic cause
    # the extra cell: its own probes, the first of the run's (the factorial cells' one among them)
    extra = cells[("topk", "torch", "bfloat16")]
    assert extra["n_probes"] == extra["probes"] == 2 and cells[("topk", "torch", "float32")]["probes"] == 1
    assert extra["tokens"] > cells[("topk", "torch", "float32")]["tokens"]
    for name in ("cells.csv", "by_batch_size.csv", "report.md", *FIGURES):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    for v in saved["claim_verdicts"].values():
        assert f"| {v['statement']} | **{v['verdict']}** |" in report
    # a re-run in the same directory skips every finished cell: a mark left in a cell file survives
    cell_file = tmp_path / "cells" / "topk-torch-ordered-float32.json"
    cell_file.write_text(json.dumps({**json.loads(cell_file.read_text()), "mark": 1}))
    rerun = run_ablation(cfg, tmp_path)
    assert [c.get("mark") for c in rerun["cells"] if c["router"] == "topk" and c["backend"] == "torch"
            and c["dtype"] == "float32"] == [1]
    # ... and a re-run with other settings is refused, naming the change: the finished cells are kept
    cfg.experiment.max_new_tokens = 2
    with pytest.raises(ValueError, match=r"other settings \(changed: experiment.max_new_tokens: 3 -> 2\).*new folder"):
        run_ablation(cfg, tmp_path)
    assert json.loads(cell_file.read_text())["mark"] == 1
    assert len(plot_run(tmp_path)) == len(FIGURES)


def test_device_dependent_claims_are_not_applicable_where_stock_kernels_are_invariant():
    cells = [c for c in factorial_cells() if c["dtype"] == "float32"]
    for c in cells:   # a device whose stock kernels gave the same bits at every batch size
        c["causes"]["arithmetic"] = 0
        c["frac_logits_differ"] = sum(c["causes"].values()) / c["tokens"]
    verdicts = judge_claims(cells, {"float32": {"matmul": 1, "attention": 1}})
    for name in ("torch_backend_diverges_arithmetically_with_topk", "amplified_routing_observed_with_stock_kernels"):
        assert verdicts[name]["holds"] is None and verdicts[name]["verdict"] == STOCK_INVARIANT
    # where they vary, the same data refutes the arithmetic claim; other claims do not depend on the device
    assert judge_claims(cells, {"float32": {"matmul": 2}})["torch_backend_diverges_arithmetically_with_topk"]["holds"] is False
    assert verdicts["capacity_router_diverges_structurally_with_invariant_kernels"]["holds"] is True
    assert verdicts["invariant_kernels_and_router_give_zero_divergence"]["holds"] is True


def test_amplified_claim_holds_only_on_the_runs_amplified_tokens():
    stock = {"float32": {"matmul": 2}, "bfloat16": {"attention": 3}}
    cells = factorial_cells()   # 4 amplified tokens in its bf16 stock cell
    assert judge_claims(cells, stock)["amplified_routing_observed_with_stock_kernels"]["holds"] is True
    assert judge_claims(cells[:-1], stock)["amplified_routing_observed_with_stock_kernels"]["holds"] is False
    # amplified with the batch-invariant kernels (ordered combine) would contradict the design
    invariant = next(c for c in cells if c["backend"] == "batch_invariant" and c["combine"] == "ordered")
    invariant["causes"]["amplified"] = 1
    assert judge_claims(cells, stock)["amplified_routing_observed_with_stock_kernels"]["holds"] is False


@pytest.mark.parametrize("entry, match", [
    ("{router: topk, backend: torch, combine: ordered}", "must have the keys"),
    ("{router: topk, backend: cuda, combine: ordered, dtype: float32}", r"extra_cells\[0\].backend must be one of"),
    ("{router: topk, backend: torch, combine: ordered, dtype: float32, n_probes: 0}", "n_probes must be an int >= 1"),
])
def test_extra_cells_refuse_bad_entries(entry, match):
    with pytest.raises(ValueError, match=match):
        extra_cell_points(tiny_config(0, f"extra_cells=[{entry}]"))


def test_a_cell_with_padded_decode_steps_keeps_invariant_routing_at_zero(seed):
    """graphs=true: every composition's decode steps run padded to a bucket (eagerly on a CPU); with the
    batch_invariant kernels and topk, the probe still diverges nowhere."""
    from detmoe import kernels
    from detmoe.experiments.ablate import run_cell
    from detmoe.lab.compositions import make_compositions, make_probes
    from tests.conftest import tiny_config as tiny_model_config
    from detmoe import moe
    model = moe.MoETransformer(tiny_model_config("topk"))
    V = model.cfg.vocab_size
    probes = make_probes(1, V, 3, 8, seed)
    comps = make_compositions([3, 5], 1, V, 8, 3, seed)
    with kernels.use_backend("batch_invariant"):
        cell = run_cell(model, probes, comps, 3, graphs=True)
    assert cell["tokens"] > 0 and cell["frac_logits_differ"] == 0 and sum(cell["causes"].values()) == 0
