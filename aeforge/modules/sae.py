"""`module=sae`: the training loop of sparse autoencoders (aeforge/models/sae.py), an AEModule subclass.

What it adds to AEModule: b_dec may start at the geometric median of held-out data; Anthropic-style
dead-latent resampling (aeforge/models/sae_resample.py); site-parallel training (`distribute_sites` with
`trainer=ddp_sites`: each site's SAE on one rank, that site's activations of the global batch routed to
it, aeforge/models/sae_dist.py) with its checkpoint gathering; and at the end of fit the SAE export and the
headline metrics (`l0, fvu, mse, cosine, dead_frac, dense_frac, ce_recovered, kl`, prefixed by hookpoint
when there are several), which go into metrics.json unprefixed. Training logs what the objective returns
(its loss terms plus l0 / fvu / dead_frac).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aeforge.models.sae_dist import exchange_sites, gather_to_zero, owned_sites, rank_world
from aeforge.models.sae_resample import DeadLatentResampler
from aeforge.modules.base import AEModule


class SAEModule(AEModule):
    """`export`: sparsify | saelens | null, written to <run>/sae/<hookpoint>/. `final_metrics` on
    `eval_tokens` held-out tokens (batches of `eval_batch_size`) and `ce_sequences` sequences for the
    spliced-LM metrics. `resample_*`: see DeadLatentResampler (`resample_every: null` turns it off)."""

    def __init__(
        self,
        *args,
        final_metrics: bool = True,
        eval_tokens: int = 16384,
        ce_sequences: int = 16,
        eval_batch_size: int = 4096,
        export: str | None = "sparsify",
        distribute_sites: bool = False,
        resample_every: int | None = None,
        resample_max: int = 4,
        resample_window: int = 12500,
        resample_batches: int = 100,
        resample_dead_freq: float = 1e-6,
        resample_enc_scale: float = 0.2,
        resample_loss_power: float = 2.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if export not in (None, "sparsify", "saelens"):
            raise ValueError(f"module.export={export!r}; valid: null, sparsify, saelens")
        self.final_metrics, self.export = final_metrics, export
        self.eval_tokens, self.ce_sequences, self.eval_batch_size = eval_tokens, ce_sequences, eval_batch_size
        self.distribute_sites = distribute_sites
        self.resampler = None
        if resample_every is not None:
            self.resampler = DeadLatentResampler(
                resample_every, resample_max, resample_window, resample_batches, resample_dead_freq,
                resample_enc_scale, resample_loss_power,
            )

    @property
    def site_parallel(self) -> bool:
        return self.model.site_parallel

    @property
    def resamples_done(self) -> int:
        return self.resampler.done if self.resampler is not None else 0

    def _replicas(self) -> bool:
        """DDP replicas: several ranks holding the same SAEs."""
        return rank_world()[1] > 1 and not self.site_parallel

    def _site_names(self) -> list[str]:
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(dm, "hookpoint_names", None)
        return list(names) if names is not None else [f"site{s}" for s in range(self.model.n_sites)]

    def setup(self, stage: str) -> None:
        from aeforge.strategies import SiteParallelStrategy

        rank, world = rank_world()
        strategy = self.trainer.strategy if self._trainer is not None else None
        if world > 1 and self.distribute_sites:
            if not isinstance(strategy, SiteParallelStrategy):
                raise ValueError("module.distribute_sites=true needs trainer=ddp_sites (DDP without its wrapper)")
            if self.model.n_sites < world:
                raise ValueError(f"module.distribute_sites: {self.model.n_sites} sites for {world} ranks")
            if not self.site_parallel:
                self.model.keep_sites(owned_sites(self.model.n_sites, rank, world))
        elif world > 1 and isinstance(strategy, SiteParallelStrategy):
            raise ValueError("trainer=ddp_sites does not average gradients: set module.distribute_sites=true")

    def on_fit_start(self) -> None:
        if self.model.init_pre_bias and self.global_step == 0:
            dm = self.trainer.datamodule
            self.model.fit_pre_bias(dm.normalize(dm.val_activations()[:8192].to(self.device)))

    def on_train_start(self) -> None:
        super().on_train_start()  # the loader position and RNG states of a resumed run
        if self.resampler is not None:  # a resumed window was loaded on the CPU, before the module moved
            self.resampler.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        if self.resampler is not None:
            opt = self.optimizers()
            rank = rank_world()[0]
            self.resampler.maybe_resample(self.global_step, self.model.local_sites(), getattr(opt, "optimizer", opt),
                                          self._replicas(), rank, self._site_names())

    def _step(self, batch) -> dict[str, torch.Tensor]:
        if self.site_parallel and self.training:  # each site's tokens of the global batch to its owner
            n = self.model.n_sites
            routed = {k: exchange_sites(self.model.as_sites(batch[k]), n) for k in ("x", "grad") if k in batch}
            batch = {**batch, **routed}
        batch = self.with_progress(batch)
        out = self.model(batch)
        losses = self._losses(out, batch)
        if self.training and self.resampler is not None and self.resampler.active:
            self.resampler.track(self.global_step, self.model.local_sites(), out["sites"])
        return losses

    # -- checkpoints ----------------------------------------------------------------------------------
    # Called on every rank (Lightning builds the checkpoint everywhere, rank 0 writes it): the gathers below
    # are collectives.
    def on_save_checkpoint(self, checkpoint):
        from pytorch_lightning.utilities import move_data_to_device

        super().on_save_checkpoint(checkpoint)
        checkpoint["sae_resamples_done"] = self.resamples_done
        if self.resampler is not None:
            window = self.resampler.window_state(self._replicas())
            if window is not None:
                checkpoint["sae_resampling_window"] = window
        if self.site_parallel:  # rank 0 writes the file: hand it every rank's sites and optimiser states
            mine = {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith("model.saes.")}
            optim = [move_data_to_device(self.trainer.strategy.optimizer_state(o), "cpu")
                     for o in self.trainer.optimizers]
            parts = gather_to_zero((mine, optim))
            if parts is not None:
                for weights, _ in parts:
                    checkpoint["state_dict"].update(weights)
                checkpoint["sae_site_optimizer_states"] = [states for _, states in parts]  # index: rank
                checkpoint["sae_site_world"] = rank_world()[1]

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        rank, world = rank_world()
        written_by = checkpoint.get("sae_site_world")
        if self.site_parallel != (written_by is not None) or (self.site_parallel and written_by != world):
            were = f"a site-parallel run on {written_by} ranks" if written_by else "a run without site parallelism"
            now = f"a site-parallel run on {world} ranks" if self.site_parallel else "one without site parallelism"
            fix = (f"resume with trainer=ddp_sites module.distribute_sites=true on {written_by} ranks"
                   if written_by else "resume without module.distribute_sites")
            raise ValueError(f"resume: the checkpoint was written by {were}, this is {now}; {fix} (its weights "
                             "load into any layout with fit=false resume=<ckpt>)")
        if self.site_parallel:  # this rank's sites and its own optimiser state (same site assignment)
            held = {f"model.saes.{s}." for s, _ in self.model.local_sites()}
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items()
                if not k.startswith("model.saes.") or any(k.startswith(h) for h in held)
            }
            checkpoint["optimizer_states"] = checkpoint["sae_site_optimizer_states"][rank]
        if self.resampler is not None:
            self.resampler.done = int(checkpoint.get("sae_resamples_done", 0))
            window = checkpoint.get("sae_resampling_window")
            if window is not None:
                held = {s for s, _ in self.model.local_sites()}
                self.resampler.load_window(window, held, self._replicas(), rank)

    # -- end of fit: export and metrics --------------------------------------------------------------
    def on_train_end(self) -> None:
        if not self.site_parallel and not self.trainer.is_global_zero:
            return
        from aeforge.eval.sae import collect_site_metrics, report_site_metrics
        from aeforge.models.sae_export import save_saelens, save_sparsify

        out = Path(self.trainer.default_root_dir)
        # site parallel: each owner writes its own sites
        if self.export is not None:
            save = save_sparsify if self.export == "sparsify" else save_saelens
            save(self.model, out / "sae", self._site_names())
        if not self.final_metrics:
            return
        per_site = collect_site_metrics(
            self.model, self.trainer.datamodule, self.device, self.eval_tokens, self.eval_batch_size, self.ce_sequences
        )
        if self.site_parallel:
            parts = gather_to_zero(per_site)
            if parts is None:
                return
            per_site = [site for part in parts for site in part]
        m = report_site_metrics(per_site, histogram=out / "feature_density.png", zf_plot=out / "zf_plot.png")
        self.trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in m.items()})
