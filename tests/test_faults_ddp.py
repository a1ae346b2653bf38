"""Faults with several processes (2 gloo CPU ranks): a preemption signal reaching the ranks at different steps,
a rank killed or frozen mid-training, and two nodes simulated by two launchers on this machine.

The ranks are started either by Lightning (`trainer.devices=2`: rank 0 spawns rank 1, the usual one-node run) or
here, one train.py per rank with the variables torchrun or SLURM would set (`launch`), which shows every rank's
exit status and lets a rank die without Lightning's launcher cleaning up after it, as on a real cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_cfg, run_train

# 8 steps of the default tiny AE on 2 ranks, a checkpoint every 2 steps; no plots (they cost seconds, not faults)
COMMON = ["debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=8",
          "trainer.limit_train_batches=10", "evaluate=false", "callbacks.model_checkpoint.monitor=null",
          "++callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.reconstruction_grid=null",
          "callbacks.loss_curve=null", "trainer.enable_progress_bar=false", "trainer.strategy.timeout_s=30"]
ENV = {"OMP_NUM_THREADS": "1"}  # bit-identical runs, and no oversubscription of 2 cores by 2 ranks
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
             "LOCAL_WORLD_SIZE", "AEFORGE_RUN_DIR", "AEFORGE_SWEEP_DIR")


def free_port() -> int:
    """A port nothing listens on now (the kernel picks it), so these runs can go beside other tests' runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    """One launched train.py: its Popen, its output file, and when it ended."""

    def __init__(self, proc: subprocess.Popen, out: Path):
        self.proc, self.out, self.ended, self.frozen = proc, out, None, None

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def stopped(self) -> bool:  # frozen by SIGSTOP (state T in /proc)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        return stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "T"


def launch(args: list[str], log_dir: Path, ranks: list[dict], timeout: float = 300) -> list[Rank]:
    """Start one train.py per entry of `ranks` (NODE_RANK / LOCAL_RANK), all sharing MASTER_ADDR/PORT and
    WORLD_SIZE as a cluster launcher sets them, and wait for all of them (a frozen one is killed once the others
    ended). Returns them with return codes and end times."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    base.update(ENV, AEFORGE_LOG_DIR=str(log_dir), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(ranks)))
    launched = []
    for i, rank_env in enumerate(ranks):
        out = log_dir / f"launch{port}_{i}.log"
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, env={**base, **{k: str(v) for k, v in rank_env.items()}})
        launched.append(Rank(proc, out))
    deadline = time.monotonic() + timeout
    try:
        while any(r.ended is None for r in launched):
            for r in launched:
                if r.ended is None and r.proc.poll() is not None:
                    r.ended = time.monotonic()
                if r.frozen is None and r.ended is None and r.stopped():
                    r.frozen = time.monotonic()
            running = [r for r in launched if r.ended is None]
            if running and all(r.frozen for r in running):
                for r in running:  # nothing left to wait for: the frozen rank would never end by itself
                    r.proc.kill()
            if time.monotonic() > deadline:
                logs = "\n".join(r.output[-3000:] for r in launched)
                raise AssertionError(f"ranks still running after {timeout} s (hang):\n{logs}")
            time.sleep(0.2)
    finally:
        for r in launched:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
    return launched


def one_node(n: int = 2) -> list[dict]:
    return [{"NODE_RANK": 0, "LOCAL_RANK": i} for i in range(n)]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run every fault is compared with: 8 steps, one node running 2 processes (started here:
    both import at once, seconds faster on 2 cores than Lightning starting rank 1 after rank 0 has imported)."""
    log_dir = tmp_path_factory.mktemp("straight")
    run_dir = log_dir / "straight" / "runs" / "launched"
    ranks = launch([*COMMON, "task_name=straight", f"hydra.run.dir={run_dir}"], log_dir, one_node(), timeout=240)
    assert [r.proc.returncode for r in ranks] == [0, 0], "\n".join(r.output[-3000:] for r in ranks)
    return weights(run_dir)


def test_preempted_at_different_steps_then_rank_killed_then_resumed(tmp_path, straight):
    """One job through two faults, each resumed with resume=auto, ends on the weights of the uninterrupted run.

    1. SIGTERM on rank 0 after step 2, on rank 1 after step 5 (a scheduler signalling a job's tasks one by one).
       Every rank votes after every step, so both stop together after step 3: one last.ckpt, both exit 0.
       Before, only rank 0 entered the vote; its all-reduce met rank 1's gradient all-reduce and both hung until
       the collective timeout, then failed.
    2. The resumed job loses rank 1 to SIGKILL after step 5 (the periodic checkpoint of step 4 is on disk): rank 0
       exits non-zero within seconds (gloo sees the closed connection) instead of waiting in the next collective.
    3. resume=auto, on Lightning's own launcher this time, continues from step 4 to step 8."""
    run_dir = tmp_path / "cut" / "runs" / "launched"
    kill = "+callbacks.kill._target_=tests.helpers.SignalAtStep"
    common = [*COMMON, "task_name=cut", f"hydra.run.dir={run_dir}", kill]
    ranks = launch([*common, "+callbacks.kill.at_step=[2,5]"], tmp_path, one_node(), timeout=240)
    assert [r.proc.returncode for r in ranks] == [0, 0], "\n".join(r.output[-3000:] for r in ranks)
    assert "received SIGTERM" in ranks[0].output and "received SIGTERM" not in ranks[1].output
    assert "after a signal on another rank" in ranks[1].output
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert weights(run_dir)["global_step"] == 3

    ranks = launch([*common, "resume=auto", "+callbacks.kill.at_step=[null,5]", "+callbacks.kill.sig=SIGKILL"],
                   tmp_path, one_node(), timeout=240)
    assert ranks[1].proc.returncode == -signal.SIGKILL
    assert ranks[0].proc.returncode not in (0, None), ranks[0].output[-3000:]
    assert ranks[0].ended - ranks[1].ended < 30  # less than timeout_s: the closed connection ends the wait
    assert weights(run_dir)["global_step"] == 4

    run_train([*COMMON, "task_name=cut", "resume=auto"], tmp_path, timeout=300, env=ENV)
    assert list((tmp_path / "cut" / "runs").iterdir()) == [run_dir]  # continued in place, each time
    assert_same_weights(straight, weights(run_dir))


@pytest.mark.benchmark
def test_frozen_rank_times_out(tmp_path):
    """SIGSTOP rank 1 after step 5 (a hung process or a node cut off the network: no connection is closed, so
    only the collective timeout can end the wait): rank 0 fails after trainer.strategy.timeout_s."""
    run_dir = tmp_path / "frozen" / "runs" / "launched"
    ranks = launch([*COMMON, "task_name=frozen", f"hydra.run.dir={run_dir}", "trainer.strategy.timeout_s=15",
                    "+callbacks.kill._target_=tests.helpers.SignalAtStep", "+callbacks.kill.at_step=[null,5]",
                    "+callbacks.kill.sig=SIGSTOP"], tmp_path, one_node(), timeout=240)
    assert ranks[0].proc.returncode not in (0, None), ranks[0].output[-3000:]
    assert "timeout" in ranks[0].output.lower()
    assert 15 <= ranks[0].ended - ranks[1].frozen < 15 + 20  # the timeout, plus teardown on a busy machine
    assert ranks[1].proc.returncode == -signal.SIGKILL  # still frozen when rank 0 had ended: killed by launch()
    assert weights(run_dir)["global_step"] == 4


@pytest.mark.benchmark  # ~8-10 s on 2 cores: make bench (make test keeps the suite under 10 minutes)
def test_two_nodes_equal_one_node(tmp_path, straight):
    """trainer.num_nodes=2 trainer.devices=1: two launchers (NODE_RANK 0 and 1, as two SLURM nodes would run
    them) train to the same weights as one node running both processes."""
    run_dir = tmp_path / "nodes" / "runs" / "launched"
    ranks = launch([*COMMON, "trainer.num_nodes=2", "trainer.devices=1", "task_name=nodes",
                    f"hydra.run.dir={run_dir}"], tmp_path, [{"NODE_RANK": n, "LOCAL_RANK": 0} for n in (0, 1)],
                   timeout=240)
    assert [r.proc.returncode for r in ranks] == [0, 0], "\n".join(r.output[-3000:] for r in ranks)
    assert_same_weights(straight, weights(run_dir))


def test_collective_timeout_comes_from_the_config(tmp_path):
    from aeforge.train import build

    cfg = compose_cfg([*COMMON, "trainer.strategy.timeout_s=7"], tmp_path)
    assert build(cfg.trainer.strategy)._timeout.total_seconds() == 7  # what init_process_group gets
    default = compose_cfg(["trainer=ddp"], tmp_path).trainer.strategy
    assert default.timeout_s == 1800


def test_signal_handler_off_the_main_thread_warns(caplog):
    """A launcher that runs fit off the main thread cannot install signal handlers: say so, loudly."""
    from aeforge.callbacks import PreemptionCheckpoint

    cb = PreemptionCheckpoint()

    class Trainer:
        global_step = 0

    with caplog.at_level("WARNING", logger="aeforge.callbacks.checkpointing"):
        worker = threading.Thread(target=cb.on_train_start, args=(Trainer(), None))
        worker.start()
        worker.join()
    assert "preemption checkpoints are disabled" in caplog.text and "main thread" in caplog.text
