"""Distributed pieces of SAE training (docs/methods/sae.md, "Multi-GPU").

Two regimes, chosen by `module.distribute_sites`:

- data parallel (`trainer=ddp`, default): every rank holds every site's SAE, DDP all-reduces gradients.
  Each rank only sees its share of the tokens, so the dead-latent counters must be merged:
  `sync_dead_counters` sums every rank's "fired this step" masks and token counts in one small
  all-reduce per step (S·h + S int32 values, i.e. 1/d of one gradient all-reduce of the same SAEs);
  every rank then applies the same update, so the AuxK dead mask and `train_dead_frac` are the global
  view (a latent is dead only if it fired on no rank) and stay identical on all ranks by construction.
- site parallel (`trainer=ddp_sites module.distribute_sites=true`): with W ranks and H sites, site s lives
  on rank s mod W only (all sites of a bank have the same size, so round-robin balances memory). Every rank
  still runs the LM on its own share of the sequences; `exchange_sites` (one all_to_all per step) sends
  each site's activations to its owner, so each SAE trains on the global batch. The ranks then hold
  different parameters, which DDP cannot wrap (it checks that all ranks hold the same parameters and would
  average gradients of different SAEs), hence `aeforge.strategies.SiteParallelStrategy`: Lightning's DDP
  strategy minus the DDP wrapper. No gradient communication is needed: each owner's gradient already comes
  from the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def site_owner(site: int, world: int) -> int:
    return site % world


def owned_sites(n_sites: int, rank: int, world: int) -> list[int]:
    return [s for s in range(n_sites) if site_owner(s, world) == rank]


@torch.no_grad()
def exchange_sites(x: torch.Tensor, n_sites: int) -> torch.Tensor:
    """x: this rank's batch (B, S, d) of all S sites. Returns (W·B, S_mine, d): the global batch of the sites
    this rank owns (rank 0's tokens first). All ranks must pass the same B (aeforge loaders give equal
    batch counts and sizes per rank)."""
    rank, world = rank_world()
    per_rank = [owned_sites(n_sites, q, world) for q in range(world)]
    order = [s for sites in per_rank for s in sites]
    send = x[:, order].transpose(0, 1).contiguous()  # (S, B, d), grouped by owner rank
    mine = len(per_rank[rank])
    b, d = x.shape[0], x.shape[-1]
    recv = x.new_empty(world * mine, b, d)
    dist.all_to_all_single(recv, send, [mine] * world, [len(s) for s in per_rank])
    return recv.view(world, mine, b, d).permute(0, 2, 1, 3).reshape(world * b, mine, d)


@torch.no_grad()
def sync_dead_counters(saes) -> None:
    """Apply the fired masks / token counts that `saes` deferred this step, summed over ranks (one
    all-reduce for all sites). Without a process group the local values are applied."""
    saes = [s for s in saes if s.pending_fired is not None]
    if not saes:
        return
    dev = saes[0].pending_fired.device
    flat = torch.cat(
        [
            torch.cat([s.pending_fired.int(), torch.tensor([s.pending_tokens], dtype=torch.int32, device=dev)])
            for s in saes
        ]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
    i = 0
    for s in saes:
        fired, tokens = flat[i : i + s.h] > 0, int(flat[i + s.h])
        i += s.h + 1
        s.apply_fired(fired, tokens)
        s.pending_fired, s.pending_tokens = None, 0


def gather_to_zero(obj):
    """A picklable object from every rank, as a list on rank 0 (None elsewhere)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
