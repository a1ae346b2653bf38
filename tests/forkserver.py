"""A warm interpreter that forks one child per `python train.py ...` a test runs.

Starting Python and importing torch + Lightning + Hydra costs ~5 s of CPU per process on the CI machine; the
suite runs train.py dozens of times. This server imports them once; each request forks a child that sets its
own argv, cwd, environment and output files and runs train.py as `__main__` — a separate process (its own
pid, signals, exit status, run dir, DDP workers started afresh by Lightning), only the imports are shared.
The README's commands, the packaging test and the data-source checks (which assert what a fresh interpreter
has imported) still start new interpreters (tests/conftest.py).

Protocol, one line each way: the test sends a JSON request; the server answers the child's pid, then its exit
code (negative: killed by that signal), as subprocess.run reports it."""

from __future__ import annotations

import json
import os
import runpy
import sys

# read by libraries when they are imported: a request that sets one of these differently runs fresh
IMPORT_TIME_PREFIXES = ("HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "PYTHON", "CUDA_", "LD_", "WANDB_", "TOKENIZERS_")


def _child(request: dict) -> None:
    """In the forked child: become `python <argv>` and run it; exits like a fresh interpreter would."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads:  # torch sized its thread pool from the server's environment at import
        import torch

        torch.set_num_threads(int(threads))
    script = os.path.abspath(request["argv"][0])
    sys.argv = [script, *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)  # an exception above propagates out of serve(): Python reports it and exits 1


def serve() -> None:
    # what most runs import (~1-2 s each beyond torch + Lightning); the plots use Agg, as aeforge sets it
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import aeforge.callbacks  # noqa: F401
    import aeforge.cli  # noqa: F401
    import aeforge.data  # noqa: F401
    import aeforge.eval  # noqa: F401
    import aeforge.models  # noqa: F401
    import aeforge.train  # noqa: F401

    channel = sys.stdout
    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        channel.write(f"{pid}\n")
        channel.flush()
        _, status = os.waitpid(pid, 0)
        channel.write(f"{os.waitstatus_to_exitcode(status)}\n")
        channel.flush()


if __name__ == "__main__":
    serve()
