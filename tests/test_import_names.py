"""The repository's top-level names never shadow an installed distribution's.

The repository root is the ``dimshard`` package, and Python puts the working directory first on
``sys.path``; so from the root, ``import kernels`` would reach our folder before the ``kernels``
distribution that transformers imports (``_shadow_guard.py``). Each check runs in a fresh
interpreter whose working directory is the repository root, as a user's shell or notebook would be.

A script's own folder goes first on ``sys.path`` too (``python benchmarks/x.py``, pytest's
``tests/``), so the modules beside a script must not take a distribution's name either.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"__init__", "__pycache__", "build", "dist", "runs", "gencode"}


def top_level_names() -> list[str]:
    """Every name under which something at the repository root could be imported."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and any(entry.rglob("*.py")):
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return sorted(names - SKIP)


def script_folders() -> list[Path]:
    """Folders outside the packages that hold Python files run as scripts (or as pytest's tests)."""
    packages = {ROOT / "planner", ROOT / "runtime", ROOT / "kernels"}
    # Hidden folders (.git, a virtual environment, scratch copies) and build output are not ours to run.
    folders = {p.parent for p in ROOT.rglob("*.py")
               if not any(part.startswith(".") or part == "build" for part in p.relative_to(ROOT).parts)}
    return sorted(f for f in folders if f != ROOT and not any(f.is_relative_to(p) for p in packages))


def import_from_root(name: str) -> dict:
    """Import ``name`` in a fresh interpreter started in the repository root; where it came from."""
    probe = (
        "import importlib, json, sys\n"
        f"name = {name!r}\n"
        "try:\n"
        "    m = importlib.import_module(name)\n"
        "except ModuleNotFoundError as e:\n"
        "    print(json.dumps({'missing': True, 'error': str(e)})); sys.exit(0)\n"
        "places = [getattr(m, '__file__', None) or ''] + list(getattr(m, '__path__', []))\n"
        "print(json.dumps({'missing': False, 'places': [p for p in places if p]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(place: str) -> bool:
    return Path(place).resolve().is_relative_to(ROOT)


def test_no_top_level_name_is_owned_by_an_installed_distribution_and_shadowed_by_us():
    owned = importlib.metadata.packages_distributions()
    clashes = [name for name in top_level_names() if name in owned]
    for name in clashes:
        found = import_from_root(name)
        assert not found["missing"], f"{name}: installed by {owned[name]} but not importable from the root"
        shadowed = [p for p in found["places"] if ours(p)]
        assert not shadowed, (
            f"`import {name}` in the repository root reaches our {shadowed} instead of the "
            f"{owned[name]} distribution")


def test_no_module_beside_a_script_takes_an_installed_distributions_name():
    owned = importlib.metadata.packages_distributions()
    folders = script_folders()
    assert ROOT / "benchmarks" in folders and ROOT / "tests" in folders  # the walk sees them
    clashes = [str(p.relative_to(ROOT)) for folder in folders for p in folder.iterdir()
               if (p.suffix == ".py" and p.stem in owned) or (p.is_dir() and p.name in owned and any(p.glob("*.py")))]
    assert not clashes, f"{clashes}: a script beside them imports these instead of the installed distribution"


@pytest.mark.parametrize("package", ["planner", "runtime", "kernels"])
def test_package_folders_never_import_under_their_bare_name(package):
    # Whether or not a distribution of that name is installed today, the bare name resolves as if
    # the folder held no package: to that distribution, or to an empty namespace package.
    found = import_from_root(package)
    assert not found["missing"], found
    assert not any(ours(p) for p in found["places"]), found


def test_transformers_and_every_dimshard_package_import_from_the_root():
    probe = (
        "import transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "import dimshard, dimshard.planner, dimshard.runtime, dimshard.kernels, dimshard.cli\n"
        "from dimshard.kernels import rms_norm\n"
        "from dimshard.runtime import ZeroAdamW\n"
        "from dimshard.planner import compile_model\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
