"""Every command the README shows runs here exactly as written, shrunk only by `debug=smoke` (and a tiny dataset in
the ImageNet layout where the command needs ImageNet), so a documented command cannot break unseen.

The commands are read from the README's ```bash blocks at collection time; each must match one rule below (a new
command without a rule fails `test_every_readme_command_has_a_rule`). They run in README order and share one log
folder: `resume=auto` and `aeforge-eval` use the run an earlier command left, as a user's would."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, ROOT, run_command

BIN = Path(sys.executable).parent  # aeforge-eval and torchrun, as the venv installs them


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme_logs")


def _run(argv: list[str], logs: Path, **kwargs):
    return run_command(argv, logs, timeout=900, **kwargs)


def _python(argv: list[str]) -> list[str]:
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def _last_run(logs: Path, task: str) -> Path:
    runs = sorted((logs / task / "runs").glob("*/checkpoints/last.ckpt"))
    assert runs, f"no {task} run under {logs}: an earlier README command should have left one"
    return runs[-1].parent.parent


# -- one runner per kind of command ---------------------------------------------------------------------------
def run_make(argv, logs, ctx):
    if argv[1] == "test":  # the suite cannot start itself; check it is the suite make would run
        proc = _run(["make", "-n", "test"], logs)
        assert "pytest" in proc.stdout and '-m "not benchmark"' in proc.stdout
        return
    proc = _run([*argv, "ARGS=debug=smoke"], logs)
    assert "final metrics" in proc.stdout


def run_source(argv, logs, ctx):
    """`source .venv/bin/activate`: the tests themselves run in that venv (make test), or in another env."""
    assert (ROOT / ".venv" / "bin" / "activate").is_file() or sys.prefix != sys.base_prefix


def run_train(argv, logs, ctx):
    args = list(dict.fromkeys([*argv[2:], "debug=smoke"]))  # a command that already says debug=smoke keeps one
    needs_imagenet = "data=imagenet" in args or any("imagenet" in a for a in args if a.startswith("experiment="))
    if needs_imagenet:
        args.append(f"data.path={ctx['imagenet']}")
    if "data=mnist" in args and not (DATA_DIR / "mnist" / "mnist.npz").is_file():
        pytest.skip(f"needs staged data {DATA_DIR / 'mnist'} (set AEFORGE_DATA_DIR)")
    if "experiment=scgc_acm" in args and not (DATA_DIR / "acm").is_dir():
        pytest.skip(f"needs staged data {DATA_DIR / 'acm'} (set AEFORGE_DATA_DIR)")
    if "hydra/launcher=slurm" in args:
        return run_slurm(args, logs)
    ran = ctx.setdefault("ran", set())
    if "resume=auto" not in args and tuple(args) in ran:
        pytest.skip("the same run as an earlier README command once debug=smoke is appended")
    ran.add(tuple(args))
    runs_before = set(logs.glob("*/runs/*"))
    proc = _run(_python(argv[:2]) + args, logs)
    if "--cfg" in args:
        assert "task_name: mae_mnist" in proc.stdout
        return
    paths = [Path(line.removeprefix("metrics: ")) for line in proc.stdout.splitlines() if line.startswith("metrics: ")]
    assert paths and all(p.is_file() for p in paths), proc.stdout[-2000:]
    if "-m" in args:
        sweeps = {p.parent.parent for p in paths}
        assert len(sweeps) == 1, f"one sweep, one folder: {sweeps}"
        jobs = [a for a in args if "," in a]
        expected = 1
        for a in jobs:
            expected *= len(a.split("=", 1)[1].split(","))
        if "hparams_search=optuna" in args:
            expected = 2  # debug=smoke: 2 trials
            assert "best_params" in (next(iter(sweeps)) / "optimization_results.yaml").read_text()
        assert len(paths) == expected
        ctx.setdefault("sweeps", []).append(next(iter(sweeps)))
    if "trainer=ddp" in args:  # the workers reuse rank 0's run dir: one run, not one per process
        assert len(paths) == 1 and json.loads(paths[0].read_text())["steps"] == 3
        assert set(logs.glob("*/runs/*")) - runs_before == {paths[0].parent}
    if "resume=auto" in args:
        assert "resume=auto: continuing" in proc.stdout + proc.stderr


def run_slurm(args, logs):
    """No SLURM here: a stand-in `sbatch` records the job script submitit writes and refuses it."""
    fake = logs / "fake_bin"
    fake.mkdir(exist_ok=True)
    record = logs / "sbatch_calls.txt"
    (fake / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\ncat \"$1\" >> {record}\n"
                                 "echo 'sbatch: error: not a cluster' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for it before it submits
    (fake / "srun").chmod(0o755)
    proc = _run([sys.executable, "train.py", *args], logs, check=False,
                env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode != 0 and record.is_file(), proc.stderr[-2000:]
    script = record.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=gpu"):
        assert line in script, line


def run_aggregate(argv, logs, ctx):
    assert ctx.get("sweeps"), "the sweep commands above should have left sweep folders"
    sweep = ctx["sweeps"][0]
    args = [str(sweep) if "<task>" in a else a for a in argv[1:]]
    proc = _run([sys.executable, *args], logs)
    assert "val/loss" in proc.stdout and "±" in proc.stdout


def run_eval(argv, logs, ctx):
    run = _last_run(logs, "mae_mnist")
    args = [a.replace("logs/mae_mnist/runs/<time>", str(run)).replace("<run>", str(run)) for a in argv[1:]]
    if argv[0] == "torchrun":
        args = [a.replace("scripts/", f"{ROOT}/scripts/") for a in args]
    proc = _run([str(BIN / argv[0]), *args, "debug=smoke"], logs)
    assert "eval: " in proc.stdout
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1].removeprefix("eval: ")).read_text())
    assert "finetune/acc" in result or any(k.startswith("finetune") for k in result), result


RULES = [
    (r"^make (train|test)$", run_make),
    (r"^source \.venv/bin/activate$", run_source),
    (r"^python train\.py", run_train),
    (r"^python scripts/aggregate_runs\.py", run_aggregate),
    (r"^(aeforge-eval|torchrun) ", run_eval),
]


def rule_for(command: str):
    for pattern, fn in RULES:
        if re.search(pattern, command):
            return fn
    return None


def test_every_readme_command_has_a_rule():
    assert COMMANDS, "no ```bash blocks in README.md"
    assert [c for c in COMMANDS if rule_for(c) is None] == []


@pytest.fixture(scope="module")
def ctx(hf_imagenet_layout) -> dict:
    return {"imagenet": hf_imagenet_layout}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, logs, ctx):
    rule_for(command)(shlex.split(command), logs, ctx)
