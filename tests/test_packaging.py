"""conf/ lives at the repository root and ships inside the package (pyproject.toml maps it to aeforge.conf):
a wheel built from the sources, installed into a fresh venv, runs a recipe from another directory."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "aeforge").rglob("__init__.py")}
    assert found | {"aeforge.conf"} == listed, "add new packages to [tool.setuptools] packages in pyproject.toml"


def test_conf_resolves_to_the_root_folder():
    from aeforge.config import CONF_DIR

    assert CONF_DIR.resolve() == (ROOT / "conf").resolve()
    assert not (ROOT / "aeforge" / "conf").exists(), "configs live in conf/ only"


@pytest.mark.slow
def test_wheel_install_runs_a_recipe(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("aeforge", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("aeforge-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    # reuse this environment's packages (it may itself be a venv, whose site-packages --system-site-packages
    # does not reach): plain path lines, so its editable aeforge finder is not loaded
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import aeforge.conf as c; print(c.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert str(venv) in where, f"aeforge.conf not from the wheel: {where}"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "AEFORGE_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([venv / "bin" / "aeforge-train", "experiment=mae_mnist", "debug=smoke"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = Path(proc.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
    assert metrics.is_file() and str(tmp_path / "logs" / "mae_mnist") in str(metrics)
