"""A wheel built from this checkout (`pip wheel .`, not an editable install) is whole: every module, the
shipped checkpoint and the Hydra configs, so the installed package loads the trained model and finds its
configs from any directory."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moe", "kernels", "lab", "experiments", "benchmarks")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_wheel_holds_every_module_the_checkpoint_and_the_configs(tmp_path):
    # built from a clean copy: an in-tree build/ keeps files deleted since, and they would reach the wheel
    src = tmp_path / "src"
    for name in PACKAGES + ("configs",):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src))
    (wheel,) = tmp_path.glob("detmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {p.relative_to(src).as_posix() for name in PACKAGES for p in (src / name).rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert {"moe/checkpoints/trained.pt", "moe/checkpoints/trained.json"} <= names
    configs = {"lab/configs/" + p.relative_to(src / "configs").as_posix() for p in (src / "configs").rglob("*.yaml")}
    assert configs and configs <= names, f"configs missing from the wheel: {sorted(configs - names)}"

    # installed (into a folder first on the path), run from elsewhere: the installed copy is the one used
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel))
    code = ("import moe, lab.hydra_utils as h\nfrom moe.trained import load_trained_model\nload_trained_model()\n"
            "print(moe.__file__)\nprint(h.CONFIG_DIR)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    moe_file, config_dir = run(sys.executable, "-c", code, cwd=tmp_path, env=env).stdout.split()
    assert moe_file == str(site / "moe" / "__init__.py") and config_dir == str(site / "lab" / "configs")
