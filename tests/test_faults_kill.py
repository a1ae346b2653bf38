"""kill -9 at seeded random points of a short real run (mid-step, mid-validation, mid-checkpoint-write), each
followed by `resume=auto` until the run completes: the final weights, optimizer and scheduler states are
bit-identical to an uninterrupted run's, and every checkpoint left behind loads.

The run: the default tiny config (MLP autoencoder, MNIST subset) as `debug=smoke` over 4 epochs of 3 steps, a
checkpoint at every epoch end (written at validation end). One thread per process: with two, two straight
runs already differ in the last bits on a loaded 2-core machine (tests/test_scgc.py), hiding what resuming
changes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.conftest import run_train

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COMMON = ["debug=smoke", "trainer.max_steps=-1", "trainer.max_epochs=4", "evaluate=false"]
STEPS = 12  # 4 epochs x limit_train_batches=3 (debug=smoke)
PHASES = ("step", "validation", "checkpoint")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's final last.ckpt, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("reference")
    run_train([*COMMON, "task_name=ref"], root, env=ONE_THREAD)
    return _load(_final_run(root / "ref"))


def _load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _final_run(task_dir: Path) -> Path:
    done = [p.parent for p in (task_dir / "runs").glob("*/metrics.json")]
    assert len(done) == 1, f"expected one completed run under {task_dir}, found {done}"
    return done[0]


def _assert_identical(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"weights differ: {k}"
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for i, sa in oa["state"].items():
            for k, v in sa.items():
                assert torch.equal(v, ob["state"][i][k]), f"optimizer state differs: param {i} {k}"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _assert_resumable(task_dir: Path) -> None:
    """Every run dir holds a complete last.ckpt (resume=auto continues it) or none (nothing was saved yet:
    resume=auto starts afresh); never a truncated or unloadable one."""
    for ckpt in (task_dir / "runs").glob("*/checkpoints/*.ckpt"):
        loaded = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert 0 < loaded["global_step"] <= STEPS, ckpt


def kill_and_resume(root: Path, task: str, kills: list[tuple[str, int]]) -> tuple[dict, list[str]]:
    """Runs `task` with a SIGKILL at each (phase, step) in turn, every restart being `resume=auto`, then
    once more to completion. Returns the final checkpoint and the phases of the kills that happened."""
    killed = []
    for phase, step in kills:
        proc = run_train([*COMMON, f"task_name={task}", "resume=auto", "+callbacks.kill._target_=tests.helpers.KillAt",
                          f"+callbacks.kill.at_step={step}", f"+callbacks.kill.phase={phase}"],
                         root, env=ONE_THREAD, check=False)
        assert proc.returncode in (-9, 0), proc.stderr[-3000:]
        killed += [phase] if proc.returncode == -9 else []
        _assert_resumable(root / task)
    run_train([*COMMON, f"task_name={task}", "resume=auto"], root, env=ONE_THREAD)
    return _load(_final_run(root / task)), killed


def test_kill_9_at_each_kind_of_point_then_resume_is_exact(tmp_path, reference):
    """Three kills in one run's life, one of each kind, at seeded random steps in order: mid-step in the first
    two epochs, mid-validation, mid-checkpoint-write in the last two."""
    rng = random.Random(0)
    a = rng.randrange(0, 6)
    b = rng.randrange(a, 9)
    c = rng.randrange(max(b, 6), STEPS + 1)
    final, killed = kill_and_resume(tmp_path, "cut", [("step", a), ("validation", b), ("checkpoint", c)])
    assert killed == list(PHASES)
    _assert_identical(reference, final)


@pytest.mark.benchmark
def test_kill_9_at_random_points_benchmark(tmp_path, reference):
    """>= 20 kills: lineages of up to 3 kills each at seeded random (phase, step), each resumed to the end and
    compared with the uninterrupted run. Prints the figures for docs/reliability.md."""
    rng = random.Random(12)
    killed, lineages, exact = [], 0, 0
    while len(killed) < 20:
        phases = [rng.choice(PHASES) for _ in range(rng.randint(1, 3))]
        # no optimizer step starts at step STEPS: a "step" kill there would never happen
        points = sorted((rng.randrange(0, STEPS + (phase != "step")), phase) for phase in phases)
        final, n = kill_and_resume(tmp_path, f"cut{lineages}", [(phase, step) for step, phase in points])
        lineages, killed = lineages + 1, killed + n
        _assert_identical(reference, final)
        exact += 1
    by_phase = ", ".join(f"{killed.count(p)} {p}" for p in PHASES)
    print(f"\nkill -9: {len(killed)} kills ({by_phase}) in {lineages} runs; {exact} of {lineages} finished "
          f"bit-identical to the uninterrupted run; 0 runs lost")
