"""An installed wheel (not only an editable install) carries the data slim-trt reads at run time.

The wheel is built from a copy of the source tree (so the build leaves nothing in the checkout), installed with
--no-deps into a temporary --target, and imported from there in a fresh interpreter whose working directory has
no engines/ folder, so only the wheel's own files can answer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.trt.conftest import REPO

SHIPPED = ["ada", "ampere", "hopper", "jetson-orin", "jetson-thor"]
SOURCES = ("pyproject.toml", "README.md", "slim_trt", "plugins")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel file, --target folder it was installed into)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    wheels = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("slim_trt-*.whl")
    target = root / "site"
    proc = subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wheel, target


def run_installed(target: Path, cwd: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SLIM_TRT_PROFILES_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_wheel_contains_the_target_profiles(installed_wheel):
    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("slim_trt/targets/profiles/")) == \
        [f"slim_trt/targets/profiles/{t}.json" for t in SHIPPED]
    assert {"slim_trt/linter/tables/trt10.json", "slim_trt/linter/tables/sparse_math.json"} <= set(names)
    plugin = sorted(p.name for p in (REPO / "plugins" / "lowrank_add").iterdir() if p.is_file())
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("slim_trt/jetson/lowrank_add/")) == plugin


def test_installed_wheel_finds_its_profiles(installed_wheel, tmp_path):
    _, target = installed_wheel
    out = run_installed(target, tmp_path, (
        "import json, slim_trt\n"
        "from slim_trt.targets.profile import list_targets, load_target\n"
        "print(json.dumps({'package': slim_trt.__file__, 'targets': list_targets(),\n"
        "                  'orin': load_target('jetson-orin').memory_budget_gb,\n"
        "                  'source': load_target('hopper').source}))\n"))
    found = json.loads(out)
    assert Path(found["package"]).is_relative_to(target)  # the wheel's copy, not this checkout
    assert found["targets"] == SHIPPED and found["orin"] == 8
    assert Path(found["source"]).is_relative_to(target)
    listing = run_installed(target, tmp_path, "from slim_trt.cli import main; main(['build', '--list-targets'])")
    assert [line.split()[0] for line in listing.splitlines()[1:]] == SHIPPED


def test_installed_wheel_has_the_plugin_sources_for_jetson_bundles(installed_wheel, tmp_path):
    _, target = installed_wheel
    out = run_installed(target, tmp_path, "from slim_trt.jetson.bundle import PLUGIN_SOURCES as p\n"
                                          "print(p); print((p / 'CMakeLists.txt').is_file())")
    path, has_cmake = out.split()
    assert Path(path).is_relative_to(target) and has_cmake == "True"
