"""benchmarks/results: every result folder has its meta.json, the committed README is the one the generator
makes from them, and the generator's tables for a small tree drawn afresh each run."""
import json
import random

import pytest

from benchmarks import results_index as ri


def test_every_result_folder_has_its_meta():
    """Each result is a folder <section>/<name>/ with a meta.json holding every required field, and every
    file of benchmarks/results (the README aside) lies in such a folder."""
    assert ri.result_folders(ri.RESULTS), "no results found"
    assert ri.problems(ri.RESULTS) == []
    for folder in ri.result_folders(ri.RESULTS):
        meta = ri.load(ri.RESULTS, folder)
        assert set(ri.REQUIRED) <= set(meta), folder
        assert meta["shows"] and meta["command"] and meta["device"] and meta["date"], folder


def test_committed_readme_is_what_the_generator_makes():
    readme = (ri.RESULTS / ri.README).read_text()
    assert readme == ri.render(ri.RESULTS), "stale: run python -m benchmarks.results_index"
    assert ri.main(["--check"]) == 0


def _fake_meta(rng: random.Random, n: int) -> dict:
    commit = "".join(rng.choice("0123456789abcdef") for _ in range(40))
    return dict(shows=f"result {n}: {rng.randint(0, 10**6)} cells",
                command=[f"python -m benchmarks.bench_model --out DIR{n}", "bash benchmarks/gpu_checks.sh tests | tee x"]
                if n % 2 else f"python -m benchmarks.tune_kernels --only `{n}` --out DIR",
                device=rng.choice(["NVIDIA H100 80GB HBM3", "NVIDIA H200", "4 x NVIDIA H200", "cpu"]),
                torch=f"2.{rng.randint(0, 20)}.{rng.randint(0, 9)}", triton=rng.choice([None, "3.6.0"]),
                date=f"20{rng.randint(10, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00+00:00",
                git_commit=commit + ("-dirty" if rng.random() < 0.5 else ""), notes=f"note {n}" if n % 3 else None)


def test_generator_on_a_fresh_tree(tmp_path, seed):
    rng = random.Random(seed)
    sections = ["kernels", "gpu_tests", "zz_new_section"]
    made = {}
    for n in range(rng.randint(3, 8)):
        folder = f"{rng.choice(sections)}/result_{n}"
        meta = {k: v for k, v in _fake_meta(rng, n).items() if v is not None or k == "triton"}
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "meta.json").write_text(json.dumps(meta))
        (tmp_path / folder / "data.csv").write_text("a,b\n1,2\n")
        made[folder] = meta
    (tmp_path / "kernels" / "nested" / "inner").mkdir(parents=True)      # a result may sit deeper
    nested = _fake_meta(rng, 100)
    (tmp_path / "kernels" / "nested" / "inner" / "meta.json").write_text(json.dumps(nested))
    made["kernels/nested/inner"] = nested
    assert ri.problems(tmp_path) == []

    text = ri.render(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert len(rows) == len(made)
    for folder, meta in made.items():
        section, rel = folder.split("/", 1)
        row = next(r for r in rows if r.startswith(f"| [{rel}/]({folder}/) |"))
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 7, row                         # no cell's own "|" split the row
        assert cells[1].startswith(meta["shows"])
        if meta.get("notes"):
            assert cells[1].endswith(meta["notes"] + ".")
        commands = meta["command"] if isinstance(meta["command"], list) else [meta["command"]]
        for c in commands:
            assert c.replace("|", "\\|") in cells[2]
        assert cells[3] == meta["device"]
        assert cells[4] == f"{meta['torch']} / {meta['triton'] or '-'}"
        assert cells[5] == meta["date"][:10]
        head = meta["git_commit"].removesuffix("-dirty")[:10]
        assert cells[6] == f"`{head}{'-dirty' if meta['git_commit'].endswith('-dirty') else ''}`"
        # the row sits in its section's table
        assert text.index(f"## {section}\n") < text.index(row)
    present = [s for s in sections if any(f.startswith(s + "/") for f in made)]
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == present   # known first, then new

    # --check: stale before the README is written, current after, stale again once a meta.json changes
    assert ri.main(["--root", str(tmp_path), "--check"]) == 1
    assert ri.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == text
    assert ri.main(["--root", str(tmp_path), "--check"]) == 0
    some = next(iter(made))
    (tmp_path / some / "meta.json").write_text(json.dumps({**made[some], "shows": "changed"}))
    assert ri.main(["--root", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("damage, expected", [
    ("loose_file", "in no result folder"),
    ("missing_field", "missing git_commit"),
    ("empty_shows", "`shows`"),
    ("outside_a_section", "inside a section"),
    ("not_json", "not JSON"),
])
def test_problems_are_named(tmp_path, seed, damage, expected):
    rng = random.Random(seed)
    meta = _fake_meta(rng, 1)
    (tmp_path / "kernels" / "a").mkdir(parents=True)
    path = tmp_path / "kernels" / "a" / "meta.json"
    if damage == "loose_file":
        path.write_text(json.dumps(meta))
        (tmp_path / "kernels" / "stray.log").write_text("x")
    elif damage == "missing_field":
        path.write_text(json.dumps({k: v for k, v in meta.items() if k != "git_commit"}))
    elif damage == "empty_shows":
        path.write_text(json.dumps({**meta, "shows": ""}))
    elif damage == "outside_a_section":
        path.write_text(json.dumps(meta))
        (tmp_path / "meta.json").write_text(json.dumps(meta))           # the results folder itself
    else:
        path.write_text("{")
    found = ri.problems(tmp_path)
    assert len(found) == 1 and expected in found[0], found
    assert ri.main(["--root", str(tmp_path), "--check"]) == 1
