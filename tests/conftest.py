"""Shared test helpers: compose configs in-process, run train.py in a process of its own, locate staged data."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from omegaconf import open_dict

from aeforge.compose import compose_config

# the repository root is on sys.path through pytest's `pythonpath` (pyproject.toml), so configs can point
# _target_ at tests.helpers
ROOT = Path(__file__).resolve().parents[1]

# Larger real datasets: AEFORGE_DATA_DIR, else the ../shared/data checkout beside the repo (CI has it).
_shared = ROOT.parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("AEFORGE_DATA_DIR", _shared))
if DATA_DIR.is_dir():
    os.environ.setdefault("AEFORGE_DATA_DIR", str(DATA_DIR))


def needs_data(*parts: str):
    path = DATA_DIR.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs staged data {path} (set AEFORGE_DATA_DIR)")


def compose_cfg(overrides: list[str], tmp_path: Path | None = None):
    """Compose the full config as train.py would, with run paths pointed at tmp_path."""
    cfg = compose_config(overrides, output_dir=tmp_path or Path("/tmp/aeforge-test"), task_name="test")
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def load_script(name: str):
    """A module of scripts/ (not a package), imported by file path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train(args: list[str], log_dir: Path, timeout: int = 600, env: dict | None = None, check: bool = True,
              fresh: bool = False):
    """`python train.py args` with runs under log_dir, in a process of its own forked from a warm interpreter
    (tests/forkserver.py; fresh=True: a new interpreter); returns the CompletedProcess."""
    return run_command([sys.executable, str(ROOT / "train.py"), *args], log_dir, timeout, env, check, fresh=fresh)


class ForkServer:
    """Client of tests/forkserver.py: one warm interpreter per test session, started on first use."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.pending = b""
        if self.readline(None) != "ready":
            raise RuntimeError("tests/forkserver.py did not start")
        self.env = env  # what the server imported its libraries under
        atexit.register(self.proc.kill)

    def accepts(self, cmd: list[str], env: dict) -> bool:
        """train.py in this interpreter, with the import-time environment the server was started with."""
        from tests.forkserver import IMPORT_TIME_PREFIXES

        if len(cmd) < 2 or cmd[0] != sys.executable or Path(cmd[1]) != ROOT / "train.py":
            return False
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        keys = {k for k in {*env, *self.env} if k.startswith(IMPORT_TIME_PREFIXES) and k != "PYTHONUNBUFFERED"}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def readline(self, timeout: float | None) -> str | None:
        """The server's next line, or None after `timeout` seconds without one."""
        while b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("tests/forkserver.py exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="aeforge-forked-") as tmp:
            stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": [str(c) for c in cmd[1:]], "cwd": str(ROOT), "env": env, "stdout": str(stdout),
                       "stderr": str(stderr)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self.readline(None))
            code = self.readline(timeout)
            if code is None:
                os.kill(pid, signal.SIGKILL)
                self.readline(None)
                raise subprocess.TimeoutExpired(cmd, timeout, stdout.read_text(), stderr.read_text())
            return subprocess.CompletedProcess(cmd, int(code), stdout.read_text(), stderr.read_text())


FORK_SERVER = ForkServer()


def run_command(cmd: list[str], log_dir: Path, timeout: int = 600, env: dict | None = None, check: bool = True,
                fresh: bool = True):
    """Any aeforge command (train.py, scripts/..., under torchrun) in the repo root, runs under log_dir;
    fresh=False: train.py runs in a child of the fork server when its environment allows (ForkServer)."""
    # a process group started in this pytest process (in-process DDP runs) leaves MASTER_PORT etc. behind,
    # still bound by its store: a child must pick its own
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                 "AEFORGE_RUN_DIR", "AEFORGE_SWEEP_DIR"}
    full_env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    full_env.update({"AEFORGE_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"})
    full_env.update(env or {})
    if not fresh and FORK_SERVER.accepts(cmd, full_env):
        proc = FORK_SERVER.run(cmd, full_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        shown = " ".join(str(c) for c in cmd[1:])
        raise AssertionError(f"{shown} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def fast_args():
    """Overrides that shrink the default run to a few seconds."""
    return ["debug=smoke", "eval.max_samples=64"]


@pytest.fixture(scope="session")
def hf_imagenet_layout(tmp_path_factory) -> Path:
    """A tiny dataset in the Hugging Face ImageNet-1k parquet layout (image + label, train/validation)."""
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("validation", 8)):
        sizes = [(int(rng.integers(40, 80)), 64, 3) for _ in range(n)]
        imgs = [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in sizes]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
        ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=features)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root.parent


# -- time budgets per test file (tests/budgets.py): reported at the end of every run, never asserted ---------------
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    name = Path(report.nodeid.split("::")[0]).name
    _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    from tests.budgets import over_budget_lines

    lines = over_budget_lines(_FILE_SECONDS)
    if lines:
        terminalreporter.section("test files over their time budget (tests/budgets.py)")
        for line in lines:
            terminalreporter.write_line(line)
