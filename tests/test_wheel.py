"""The package as a user installs it: one import namespace, `detmoe`, that lives beside transformers.

A wheel built from this checkout (`pip wheel .`, not an editable install) holds one top-level import
package with every module, the shipped checkpoint and the Hydra configs. Installed into a fresh folder and
run from a directory outside the repository, it imports in one process with transformers (and Hugging
Face's `kernels` package, which transformers imports), and `detmoe.from_pretrained` reads a folder saved by
transformers to the same logits as transformers' own forward. From the repository root (where pytest and
`python -m` put the root on sys.path) `import kernels` is Hugging Face's, never a folder of this checkout.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# names an installed distribution can have (Hugging Face's `kernels` is one transformers needs): no import
# package of this checkout may carry them at the root
TAKEN_NAMES = ("kernels", "moe", "lab", "experiments", "benchmarks", "configs")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a clean copy: an in-tree build/ keeps files deleted since, and they would reach the wheel
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "detmoe", src / "detmoe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src))
    (path,) = tmp.glob("detmoe-*.whl")
    return path


def test_wheel_installs_one_namespace_with_every_module_the_checkpoint_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"detmoe"}, f"the wheel installs other top-level names: {sorted(top - {'detmoe'})}"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detmoe").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert {"detmoe/moe/checkpoints/trained.pt", "detmoe/moe/checkpoints/trained.json"} <= names
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detmoe" / "configs").rglob("*.yaml")}
    assert configs and configs <= names, f"configs missing from the wheel: {sorted(configs - names)}"


def test_no_import_package_at_the_root_takes_an_installable_name():
    found = [n for n in TAKEN_NAMES if (ROOT / n / "__init__.py").exists() or (ROOT / f"{n}.py").exists()]
    assert not found, f"import packages at the repository root shadow installed ones: {found}"


def test_installed_wheel_runs_beside_transformers_from_another_directory(wheel, tmp_path):
    pytest.importorskip("transformers")
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel))
    code = textwrap.dedent("""
        import sys, tempfile
        import torch, transformers, kernels
        import detmoe as dm
        from detmoe.lab.hydra_utils import CONFIG_DIR
        from detmoe.moe.trained import load_trained_model
        load_trained_model()
        torch.manual_seed(0)
        cfg = transformers.MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=64)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
        folder = tempfile.mkdtemp()
        hf.save_pretrained(folder)
        prompt = [3, 14, 15, 9, 26, 5]
        with torch.no_grad():
            theirs = hf(torch.tensor([prompt])).logits[0].float()
        ours, _ = dm.from_pretrained(folder, dtype="float32")(*dm.cu_seqlens_of([prompt]))
        print((ours - theirs).abs().max().item())
        print(dm.__file__)
        print(kernels.__file__)
        print(CONFIG_DIR)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    err, detmoe_file, hf_kernels_file, config_dir = run(sys.executable, "-c", code, cwd=tmp_path,
                                                        env=env).stdout.split()
    assert float(err) < 1e-4
    assert detmoe_file == str(site / "detmoe" / "__init__.py")
    assert config_dir == str(site / "detmoe" / "configs")
    assert installed(hf_kernels_file), hf_kernels_file


def test_kernels_imported_from_the_repository_root_is_hugging_faces():
    """`python -m` and `python -c` put the working directory first on sys.path: from the root of a checkout
    `import kernels` must still find the installed package (or nothing), never a folder of ours."""
    code = ("import sys\ntry:\n    import kernels\nexcept ImportError:\n    print('absent')\n"
            "else:\n    print(kernels.__file__ or 'namespace:' + str(list(kernels.__path__)))")
    where = run(sys.executable, "-c", code, cwd=ROOT).stdout.strip()
    assert where == "absent" or installed(where), where
    try:
        import kernels
    except ImportError:
        return
    assert kernels.__file__ and installed(kernels.__file__), kernels.__file__


def installed(file: str) -> bool:
    """Is this module file an installed distribution's (under site-packages), not a folder of a checkout?"""
    parts = Path(file).parts
    return "site-packages" in parts or "dist-packages" in parts
