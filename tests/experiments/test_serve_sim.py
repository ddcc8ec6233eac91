"""The serving simulation: traffic as designed, long prompts within the model's max_seq_len, and the
record of how the running batch varied."""
import csv
import random

import pytest
from hydra import compose, initialize_config_dir

from detmoe.lab.compositions import random_prompt
from detmoe.moe.engine import poisson
from detmoe.lab.hydra_utils import CONFIG_DIR
from detmoe.experiments.serve_sim import arrival_rates, make_traffic, run_serve_sim


def config(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("serve_sim", overrides=list(overrides))


def test_constant_load_traffic_is_the_original_design():
    """Without load_period the draws are those of the first design (published results replay)."""
    serve = config("serve.n_probe_runs=7", "serve.load=1.5").serve
    probe, copies, every = make_traffic(serve, 256, seed=3)
    rng = random.Random(3)
    assert probe == random_prompt(rng, 256, serve.probe_len)
    span = int(7 / 1.5 * 2)
    assert [c.arrival for c in copies] == [rng.randrange(span) for _ in range(7)]
    lens = []
    for step in range(span):
        for _ in range(poisson(rng, 1.5)):
            lens.append(len(random_prompt(rng, 256, rng.randint(1, serve.traffic_max_len))))
            rng.randint(1, serve.traffic_max_new)
    assert sorted(len(r.prompt) for r in every if r not in copies) == sorted(lens)


def test_load_wave_sweeps_from_empty_to_twice_the_mean():
    serve = config("serve.load=2.0", "serve.load_period=50").serve
    rates = arrival_rates(serve, 200)
    assert rates[0] == 0.0 and max(rates) == pytest.approx(4.0) and sum(rates) / 200 == pytest.approx(2.0)
    # probe copies follow the wave: none arrive at its troughs
    serve = config("serve.n_probe_runs=200", "serve.load=2.0", "serve.load_period=50").serve
    _, copies, _ = make_traffic(serve, 256, seed=0)
    assert not any(c.arrival % 50 == 0 for c in copies)


def test_load_wave_with_few_runs_spans_a_whole_wave():
    """One probe run at a high load would make a one-step span whose only rate is the trough (0)."""
    serve = config("serve.n_probe_runs=1", "serve.load=4.0", "serve.load_period=100").serve
    _, copies, _ = make_traffic(serve, 256, seed=0)
    assert len(copies) == 1 and 0 < copies[0].arrival < 100


def test_long_prompts_run_and_record_the_load(tmp_path):
    """A probe prompt of 200 tokens (near tiny's max_seq_len 256, far above the traffic's) through the
    engine, with the load swinging: every copy completes, and the batch record covers every step."""
    cfg = config("router.names=[topk]", "kernels=torch", "serve.n_probe_runs=4", "serve.probe_len=200",
                 "serve.max_new_tokens=4", "serve.load=1.0", "serve.load_period=6", "serve.max_slots=8")
    results = run_serve_sim(cfg, tmp_path)
    (cell,) = results["cells"]
    assert cell["runs"] == 4 and all(len(v["completion"]) == 4 for v in cell["variants"])
    record = cell["engine"]
    assert record["steps"] == sum(record["batch_size_steps"].values()) > 0
    assert (tmp_path / "distinct_completions.png").exists() and (tmp_path / "step_times.png").exists()
    # one row a step, in order, adding up to the cell's totals by kind
    with open(tmp_path / "steps" / "topk-torch-auto.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(record["steps"]))
    times = record["step_times"]
    for kind in ("graph", "eager"):
        mine = [r for r in steps if r["kind"] == kind]
        assert len(mine) == times[f"{kind}_steps"]
        assert sum(float(r["seconds"]) for r in mine) == pytest.approx(times[f"{kind}_seconds"], abs=2e-3)
    assert sum(int(r["tokens"]) for r in steps if r["kind"] == "eager") == times["eager_tokens"]


def test_requests_longer_than_max_seq_len_are_refused(tmp_path):
    cfg = config("router.names=[topk]", "kernels=torch", "serve.probe_len=250", "serve.max_new_tokens=24")
    with pytest.raises(ValueError, match="max_seq_len=256"):
        run_serve_sim(cfg, tmp_path)


def test_graphs_axis_runs_each_configuration_padded_and_unpadded(tmp_path):
    """serve.graphs=[off,on]: on a CPU "on" runs the padded static-buffer decode step eagerly; with the
    batch_invariant backend padding cannot change a completion, so both cells agree copy for copy."""
    cfg = config("router.names=[topk]", "kernels=batch_invariant", "serve.n_probe_runs=3", "serve.probe_len=6",
                 "serve.max_new_tokens=4", "serve.load=1.0", "serve.max_slots=5", "serve.traffic_max_len=8",
                 "serve.traffic_max_new=4", "serve.graphs=[off,on]")
    off, on = run_serve_sim(cfg, tmp_path)["cells"]
    assert (off["graphs_used"], on["graphs_used"]) == (False, True)
    assert off["variants"] == on["variants"] and on["distinct"] == 1
    # step times by kind: unpadded, every step is eager; padded, the all-decode steps are graph steps
    # (nothing is recorded on a CPU) and their tokens (one a request) leave the eager count
    t_off, t_on = off["engine"]["step_times"], on["engine"]["step_times"]
    assert t_off["graph_steps"] == 0 and t_off["eager_steps"] == off["engine"]["steps"]
    assert t_on["graph_steps"] > 0 and t_on["graph_steps"] + t_on["eager_steps"] == on["engine"]["steps"]
    assert t_on["capture_seconds"] == 0.0
    assert t_off["eager_tokens"] - t_on["eager_tokens"] >= t_on["graph_steps"]
    with pytest.raises(ValueError, match="serve.graphs"):
        run_serve_sim(config("serve.graphs=[sometimes]"), tmp_path)
