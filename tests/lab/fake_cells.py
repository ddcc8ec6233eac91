"""Ablation cells with chosen numbers, shaped like detmoe/experiments/ablate.py's records, for tests of the
figures, the report and the claims that need no model run."""
from __future__ import annotations

from detmoe.lab.attribution import CAUSES


def fake_cell(router: str = "topk", backend: str = "torch", combine: str = "ordered", dtype: str = "float32",
              tokens: int = 20, flipped: tuple = (), **causes: int) -> dict:
    """One cell: `causes` gives divergent tokens by cause (the others 0); flipped: primary-flip margins."""
    counts = {c: causes.get(c, 0) for c in CAUSES}
    frac = sum(counts.values()) / tokens
    return dict(router=router, backend=backend, combine=combine, dtype=dtype, probes=1, tokens=tokens,
                frac_logits_differ=frac, frac_routes_differ=0.0, max_abs_delta_logit=1e-5 if frac else 0.0,
                mean_abs_delta_logit=1e-6 if frac else 0.0, completions=3, frac_completions_differ=0.0,
                first_divergence=[], causes=counts,
                by_batch_size={"1": dict(tokens=tokens // 3, frac_logits_differ=0.0, frac_completions_differ=0.0),
                               "4": dict(tokens=tokens // 3, frac_logits_differ=frac, frac_completions_differ=0.0),
                               "16": dict(tokens=tokens // 3, frac_logits_differ=frac, frac_completions_differ=0.0)},
                flipped_margins=list(flipped), cascade_flips=0,
                unflipped_margins=[0.0, 1e-4, 3e-3, 0.02, 0.1, 0.3])


def factorial_cells() -> list[dict]:
    """Two routers x both backends x both combines in float32, and one bf16 stock cell with 48 probes."""
    cells = []
    for router in ("topk", "capacity"):
        for backend in ("torch", "batch_invariant"):
            for combine in ("ordered", "scatter_add"):
                causes = dict(arithmetic=12 if backend == "torch" else 0,
                              structural=5 if router == "capacity" else 0)
                cells.append(fake_cell(router, backend, combine, **causes))
    cells.append({**fake_cell("topk", "torch", "ordered", "bfloat16", tokens=200, flipped=(1e-3, 1.3e-3),
                              arithmetic=60, amplified=4), "n_probes": 48, "probes": 48})
    return cells


def slow_cell(model, point: dict, out: str, seconds: float) -> dict:
    """A `measure` for hydra_utils.run_cells that takes `seconds`: marks OUT/started/<pid> (which worker runs
    it), then sleeps. Module-level, so that joblib's worker processes can import it."""
    import os
    import time
    from pathlib import Path
    started = Path(out) / "started"
    started.mkdir(parents=True, exist_ok=True)
    (started / str(os.getpid())).touch()
    time.sleep(seconds)
    return dict(pid=os.getpid())
