"""`trainer=ddp`: Lightning's DDP with the process group's collective timeout set from YAML, in seconds.

A collective that a dead or stuck peer never joins waits this long, then raises on every surviving rank, so a
job whose rank died exits non-zero (and can be resumed) instead of holding its nodes until the wall-clock
limit. 1800 s (PyTorch's default) leaves room for the slow single-rank work real jobs do between collectives
(a first torch.compile, a large checkpoint written by rank 0, evaluation on rank 0 only); tests set seconds.
"""

from __future__ import annotations

from datetime import timedelta

from pytorch_lightning.strategies import DDPStrategy


class TimeoutDDPStrategy(DDPStrategy):
    """`DDPStrategy` whose `timeout` is a number of seconds (a timedelta cannot be written in YAML)."""

    def __init__(self, timeout_s: float = 1800.0, **kwargs):
        super().__init__(timeout=timedelta(seconds=float(timeout_s)), **kwargs)
