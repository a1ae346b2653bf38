"""ARD-VAE's "lagged" hyper-prior update (Saha et al. 2025; card section 4, training step 2): at the start of
every epoch, encode a fresh random subset of the training set (eval mode: BatchNorm running statistics are not
touched), draw one reparameterised posterior sample per image (the official code's scatter_use_var=True),
estimate sigma_hat^2 = (b0 + 1/2 sum z^2) / (a0 + n/2) and hand it to the model through `model.set_prior`,
the model's own method (aeforge/models/ard_vae.py). The prior then stays fixed for the epoch.

The samples use a generator of their own, seeded from (seed, epoch): the refresh consumes none of the training
RNG, and a run is reproducible. A run resumed mid-epoch keeps the prior its checkpoint holds for that epoch.
Deviation: the official code keeps the hyper-prior subset out of that epoch's SGD set; here SGD sees the whole
training set (the subset is resampled every epoch either way)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import default_collate

from aeforge.models.ard_vae import hyper_prior_variance


def subset_batches(dataset, indices: torch.Tensor, batch_size: int):
    """Batches (uint8, as the loaders give them) of dataset[indices]."""
    for s in range(0, len(indices), batch_size):
        chunk = indices[s : s + batch_size].tolist()
        if hasattr(dataset, "__getitems__"):
            yield dataset.__getitems__(chunk)
        else:
            yield default_collate([dataset[i] for i in chunk])


@torch.no_grad()
def encoded_samples(model, batches, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior samples, posterior means), each (n, L), of normalised batches, with the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        zs, mus = [], []
        for batch in batches:
            mu, logvar = model.posterior(batch["x"])
            zs.append(model.posterior_sample(mu, logvar, generator).float())
            mus.append(mu.float())
    finally:
        model.train(was_training)
    return torch.cat(zs), torch.cat(mus)


class ARDPriorRefresh(pl.Callback):
    """num_samples: hyper-prior set size (10,000 in the official config; capped at the training set);
    a0, b0: the Gamma hyper-prior (0, 0: the non-informative choice of the paper)."""

    def __init__(self, num_samples: int = 10000, batch_size: int = 500, seed: int = 0, a0: float = 0.0,
                 b0: float = 0.0):
        if a0 < 0 or b0 < 0:
            raise ValueError(f"ARDPriorRefresh: a0 and b0 must be >= 0, got a0={a0}, b0={b0}")
        self.num_samples, self.batch_size, self.seed, self.a0, self.b0 = num_samples, batch_size, seed, a0, b0

    def estimate(self, model, datamodule, device: torch.device, epoch: int) -> torch.Tensor:
        dataset = datamodule.train_set
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        idx = torch.randperm(len(dataset), generator=g)[: self.num_samples]
        device_gen = torch.Generator(device=device).manual_seed(self.seed * 100_003 + epoch)
        batches = (datamodule.device_batch(b, device) for b in subset_batches(dataset, idx, self.batch_size))
        z, _ = encoded_samples(model, batches, device_gen)
        return hyper_prior_variance(z, self.a0, self.b0)

    def on_train_epoch_start(self, trainer, pl_module):
        model, epoch = pl_module.model, trainer.current_epoch
        if not hasattr(model, "set_prior"):
            raise TypeError(f"callbacks.ard_prior needs an ARD-VAE model (with set_prior), got {type(model).__name__}")
        if int(model.prior_epoch) == epoch:  # resumed inside this epoch: its prior came with the checkpoint
            return
        model.set_prior(self.estimate(model, trainer.datamodule, pl_module.device, epoch), epoch)
