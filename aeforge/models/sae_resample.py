"""Dead-latent resampling (Anthropic / Kissane, card 7.1 and 5.4), the alternative to AuxK for ReLU SAEs.

`resample_latents` re-initialises given latents of one SAE on given tokens; `DeadLatentResampler` decides
when and which (firing counts over a window of steps) and on which tokens (a weighted reservoir of recent
high-error tokens), and carries its open window through checkpoints. SAEModule (aeforge/modules/sae.py)
drives it: `track` every training step, `maybe_resample` at the start of every step.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from aeforge.models.sae import SiteOutput, SparseAutoencoder
from aeforge.models.sae_dist import gather_to_zero

log = logging.getLogger("aeforge")


@torch.no_grad()
def resample_latents(
    sae: SparseAutoencoder, dead: torch.Tensor, inputs: torch.Tensor | None, optimizer=None, enc_scale: float = 0.2
) -> None:
    """Re-initialise the latents in `dead` (bool (h,)) on `inputs` (n_dead, d; SAE input space, one token
    per dead latent, drawn with probability rising with its loss): decoder row = unit (x - b_dec), encoder
    row = the encoder's input direction × enc_scale × mean alive encoder norm, b_enc = 0, so each latent
    fires on the token it was drawn from. Adam moments of those rows are zeroed (stale moments would kick
    the fresh rows) and their dead counters restart. inputs=None: only the optimiser state and counters
    (a DDP rank whose weights are then broadcast from rank 0)."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return
    if inputs is not None:
        alive = ~dead
        inputs = inputs.to(sae.W_dec.dtype)
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else sae.W_enc.new_tensor(1.0)
        dec_norm = sae.W_dec[alive].norm(dim=1).mean() if alive.any() and not sae.unit_norm_decoder else 1.0
        x_c = inputs - sae.b_dec
        sae.W_dec[idx] = F.normalize(x_c, dim=1) * dec_norm
        enc_in = x_c if sae.pre_bias else inputs
        sae.W_enc[idx] = F.normalize(enc_in, dim=1) * enc_norm * enc_scale
        sae.b_enc[idx] = 0
    sae.tokens_since_fired[idx] = 0
    if optimizer is not None:
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == sae.h:  # moments; not Adam's step
                    v[idx] = 0


class DeadLatentResampler:
    """Every `every` steps, at most `max_times` times: latents whose firing frequency over the last `window`
    steps is <= `dead_freq` are re-initialised (`resample_latents`, encoder rows at `enc_scale`) on tokens
    of the last `batches` steps drawn with probability ∝ (per-token squared error)^`loss_power`.

    Sites are indexed as in the bank (`held`: its (site, SAE) pairs). `replicas`: DDP ranks holding the
    same SAEs on different tokens: firing counts are summed over ranks and rank 0's tokens and weights are
    broadcast; otherwise (one process, or site parallel) each rank decides for the sites it holds."""

    def __init__(
        self,
        every: int,
        max_times: int = 4,
        window: int = 12500,
        batches: int = 100,
        dead_freq: float = 1e-6,
        enc_scale: float = 0.2,
        loss_power: float = 2.0,
    ):
        if every < 1:
            raise ValueError(f"module.resample_every={every}; a positive step count or null")
        self.every, self.max_times, self.window, self.batches = every, max_times, window, batches
        self.dead_freq, self.enc_scale, self.loss_power = dead_freq, enc_scale, loss_power
        self.done = 0
        self.fires: dict[int, torch.Tensor] = {}  # per site: firing counts since the window opened
        self.tokens = 0
        self.pool: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per site: candidate tokens, keys

    @property
    def active(self) -> bool:
        return self.done < self.max_times

    def to(self, device: torch.device) -> None:
        self.fires = {s: f.to(device) for s, f in self.fires.items()}
        self.pool = {s: (x.to(device), k.to(device)) for s, (x, k) in self.pool.items()}

    def _reset_window(self) -> None:
        self.fires, self.tokens = {}, 0

    @torch.no_grad()
    def track(self, step: int, held: list[tuple[int, SparseAutoencoder]], sites: list[SiteOutput]) -> None:
        """Firing counts for the dead test, and a weighted reservoir (keys log(u)/w, the largest kept: a
        draw without replacement ∝ w) of at most h candidate tokens from the last `batches` steps."""
        collect = self.every - step % self.every <= self.batches
        for (s, sae), o in zip(held, sites):
            counts = o.firing_counts(sae.h)
            self.fires[s] = self.fires[s] + counts if s in self.fires else counts
            if collect:
                w = (o.recon - o.x).pow(2).sum(-1).float().pow(self.loss_power)
                keys = torch.rand_like(w).log() / w
                x = o.x.detach()
                if s in self.pool:
                    x, keys = torch.cat([self.pool[s][0], x]), torch.cat([self.pool[s][1], keys])
                top = keys.topk(min(sae.h, len(keys))).indices
                self.pool[s] = (x[top], keys[top])
        self.tokens += len(sites[0].x)

    @torch.no_grad()
    def maybe_resample(
        self, step: int, held: list[tuple[int, SparseAutoencoder]], optimizer, replicas: bool, rank: int,
        names: list[str],
    ) -> None:
        """At the start of step `step` (after any checkpoint of the previous one, so a run resumed from a
        checkpoint written at a resampling step still resamples there)."""
        every = self.every
        if not self.active or step == 0:
            return
        if self.window < every and step % every == every - self.window:
            self._reset_window()  # the dead test looks at the last `window` steps only
        if step % every:
            return
        for s, sae in held:
            fires = self.fires.get(s, torch.zeros(sae.h, dtype=torch.long, device=sae.W_enc.device))
            counts = torch.cat([fires, fires.new_tensor([self.tokens])])
            if replicas:
                dist.all_reduce(counts)
            dead = counts[:-1].float() / max(int(counts[-1]), 1) <= self.dead_freq
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            inputs = None
            if (rank == 0 or not replicas) and s in self.pool:
                x, keys = self.pool[s]
                order = keys.argsort(descending=True)
                inputs = x[order[torch.arange(n_dead, device=order.device) % len(order)]]
            resample_latents(sae, dead, inputs, optimizer, self.enc_scale)
            if replicas:
                for p in (sae.W_enc, sae.W_dec, sae.b_enc):
                    dist.broadcast(p.data, 0)
            log.info("step %d: resampled %d dead latents of %s", step, n_dead, names[s])
        self.done += 1
        self._reset_window()
        self.pool = {}

    # -- checkpoints: called on every rank (the gather is a collective) ----------------------------------
    def window_state(self, replicas: bool) -> dict | None:
        """The open window of every rank, merged on rank 0 (None elsewhere): firing counts (summed over
        replicas, whose tokens differ; site parallel: each owner's sites), the token count, and the
        candidate pool (replicas: rank 0's, the one a resampling draws from)."""
        local = {"fires": {s: f.cpu() for s, f in self.fires.items()}, "tokens": self.tokens,
                 "pool": {s: (x.cpu(), k.cpu()) for s, (x, k) in self.pool.items()}}
        parts = gather_to_zero(local)
        if parts is None:
            return None
        fires: dict[int, torch.Tensor] = {}
        for part in parts:
            for s, f in part["fires"].items():
                fires[s] = fires[s] + f if s in fires else f
        return {
            "fires": fires,
            "tokens": sum(p["tokens"] for p in parts) if replicas else parts[0]["tokens"],
            "pool": parts[0]["pool"] if replicas else {s: v for p in parts for s, v in p["pool"].items()},
        }

    def load_window(self, window: dict, held: set[int], replicas: bool, rank: int) -> None:
        # replicas: rank 0 takes the merged counts, the others start from zero, so the all-reduce at the
        # next resampling sums to the same totals as without the interruption
        if replicas and rank != 0:
            self.fires, self.tokens, self.pool = {}, 0, {}
            return
        self.fires = {s: f for s, f in window["fires"].items() if s in held}
        self.tokens = int(window["tokens"])
        self.pool = {s: v for s, v in window["pool"].items() if s in held}
