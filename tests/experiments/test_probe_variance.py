"""The stock-op variance app: a run on the CPU at tiny sizes (the files it writes, the table made from its
JSON, and what the CPU guarantees). The probes' own counting is tested in tests/lab/test_op_variance.py."""
import csv
import json

import pytest
import torch

from detmoe.experiments import probe_variance as pv


def test_cuda_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device"):
        pv.probe("cuda", pv.DEFAULTS["cpu"])


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("variance_cpu")
    pv.main(["--device", "cpu", "--out", str(out), "--max-batch", "6", "--runs", "3",
             "--mm-k", "64", "96", "--mm-n", "32"])
    return out, json.loads((out / "variance.json").read_text())


def test_cpu_run_writes_json_csv_and_the_table_made_from_the_json(cpu_run):
    out, result = cpu_run
    meta, records = result["meta"], result["results"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["sizes"]["batch"] == [1, 2, 3, 4, 5, 6] and "--max-batch 6" in meta["command"]
    assert (out / "variance_table.md").read_text() == pv.markdown_table(result)
    with open(out / "variance.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["shape"], r["dtype"]) for r in rows] == [(r["op"], r["shape"], r["dtype"]) for r in records]
    # every op, both dtypes; the mm grid is K x N
    for dtype in ("bfloat16", "float32"):
        ops = [r["op"] for r in records if r["dtype"] == dtype]
        assert ops.count("torch.mm") == 2
        for op in ("torch._grouped_mm", "SDPA decode", "SDPA prefill vs decode", "SDPA key padding", "F.rms_norm",
                   "torch.softmax", "torch.log_softmax", "sum(dim=-1)", "index_add_"):
            assert sum(o.startswith(op) for o in ops) == 1, (op, dtype)
    # the table's lines are the records' (one per record, after a caption and the header)
    assert len((out / "variance_table.md").read_text().strip().splitlines()) == len(records) + 4
    # remade from the saved JSON alone
    (out / "variance_table.md").unlink()
    pv.main(["--table-from", str(out / "variance.json")])
    assert (out / "variance_table.md").read_text() == pv.markdown_table(result)


def test_cpu_run_counts_consistently(cpu_run):
    """One version exactly when no size differs; repeats counted over the runs asked for."""
    for r in cpu_run[1]["results"]:
        if r["status"] != "ok":
            continue
        assert 1 <= r["versions_over_runs"] <= r["runs"]
        if r["varies"] in ("batch size", "padded key length"):
            assert (r["versions"] == 1) == (r["differs_at"] == []), r


def test_cpu_facts_hold(cpu_run):
    """On the CPU a repeated call gives the same bits: torch.mm (one BLAS call on the same data) and
    index_add_ (no atomics; measured deterministic over 20 runs at 65536 rows)."""
    records = cpu_run[1]["results"]
    mm = [r for r in records if r["op"] == "torch.mm"]
    assert len(mm) == 4 and all(r["versions_over_runs"] == 1 for r in mm)
    index_add = [r for r in records if r["op"] == "index_add_"]
    assert len(index_add) == 2 and all(r["versions_over_runs"] == 1 and r["runs"] >= 10 for r in index_add)
