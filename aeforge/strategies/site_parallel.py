"""`trainer=ddp_sites`: DDP's process group and launcher without the DistributedDataParallel wrapper.

Site-parallel SAE training (`module=sae module.distribute_sites=true`, aeforge/models/sae_dist.py) puts each
hookpoint's SAE on one rank, so the ranks hold different parameters: DDP cannot wrap them (it checks that
every rank holds the same parameters and would average gradients of different SAEs). The module does its
own communication (one all_to_all of activations per step); everything else of Lightning's DDP strategy
(process group, launcher, rank-aware logging and checkpoint writing) is kept.
"""

from __future__ import annotations

from aeforge.strategies.ddp import TimeoutDDPStrategy


class SiteParallelStrategy(TimeoutDDPStrategy):
    """DDP without the wrapper; only for a LightningModule that communicates itself (SAEModule with
    `distribute_sites: true`)."""

    def configure_ddp(self) -> None:
        pass  # the LightningModule stays unwrapped: each rank optimises only the SAEs it owns
