"""Lightning strategies of aeforge's own, the home of the `trainer` config group's `strategy._target_`s
besides pytorch_lightning's (conf/trainer/ddp.yaml, ddp_sites.yaml)."""

from aeforge.strategies.ddp import TimeoutDDPStrategy
from aeforge.strategies.site_parallel import SiteParallelStrategy

__all__ = ["SiteParallelStrategy", "TimeoutDDPStrategy"]
