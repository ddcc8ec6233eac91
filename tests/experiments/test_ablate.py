"""Smoke test: the default ablation at tiny size, read back from its saved files, shows the three
claims the design predicts."""
import json

import pytest
from hydra import compose, initialize_config_dir

from experiments.ablate import run_ablation
from lab.hydra_utils import CONFIG_DIR
from lab.plot import plot_run


@pytest.mark.cpu_blas_dependent  # the torch backend's arithmetic divergence is this CPU's fp32 mm
def test_default_ablation_at_tiny_size_shows_the_claims(tmp_path, seed):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("ablate", overrides=[
            "router.names=[topk,capacity]", "combines=[ordered]", "dtypes=[float32]", f"seed={seed % 1000}",
            "experiment.n_probes=1", "experiment.batch_sizes=[2,5,9]", "experiment.max_new_tokens=3",
            "experiment.probe_min_len=3", "experiment.probe_max_len=8", "experiment.co_max_len=8"])
    run_ablation(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    claims = saved["claims"]
    assert claims["invariant_kernels_and_router_give_zero_divergence"] is True
    assert claims["capacity_router_diverges_structurally_with_invariant_kernels"] is True
    assert claims["torch_backend_diverges_arithmetically_with_topk"] is True
    cells = {(c["router"], c["backend"]): c for c in saved["cells"]}
    assert cells[("topk", "batch_invariant")]["tokens"] > 0
    assert cells[("capacity", "batch_invariant")]["causes"]["arithmetic"] == 0  # invariant kernels: no arithmetic cause
    for name in ("cells.csv", "by_batch_size.csv", "divergence_heatmap.png", "divergence_by_batch_size.png",
                 "router_margins.png"):
        assert (tmp_path / name).exists(), name
    # a re-run in the same directory skips every finished cell: a mark left in a cell file survives
    cell_file = tmp_path / "cells" / "topk-torch-ordered-float32.json"
    cell_file.write_text(json.dumps({**json.loads(cell_file.read_text()), "mark": 1}))
    rerun = run_ablation(cfg, tmp_path)
    assert [c.get("mark") for c in rerun["cells"] if c["router"] == "topk" and c["backend"] == "torch"] == [1]
    # ... but a re-run with other settings does not reuse it
    cfg.experiment.max_new_tokens = 2
    rerun = run_ablation(cfg, tmp_path)
    assert [c.get("mark") for c in rerun["cells"] if c["router"] == "topk" and c["backend"] == "torch"] == [None]
    assert len(plot_run(tmp_path)) == 3
