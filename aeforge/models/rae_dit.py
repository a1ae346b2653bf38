"""RAE stage 2: a DiT / DiT^DH generator with flow matching in the (normalised) latent of a trained RAE.

Training (card 2, nn/flow.py's convention): z = the RAE's normalised tokens (B, N, D) of the image, ε ~ N(0, I),
t ~ logit-normal(0, 1) then shifted by s = sqrt(N·D / 4096) (`shift: null`; `use_shift: false` for s = 1),
x_t = (1 − t)·z + t·ε, the DiT predicts v = ε − z (objectives/flow.py's VelocityLoss). Labels are dropped with
p = class_dropout (the null class) for classifier-free guidance.

Sampling (`sample`, the generative-model contract of aeforge-sample and the `generation` evaluator): Euler or
Heun from noise at t = 1 to t = 0 on the grid shifted by the same s, guided by CFG (the null class as the weak
branch) or AutoGuidance (`guide_ckpt`: a weaker generator run of the same latent, its conditional velocity as the
weak branch), then the RAE decoder (after un-normalising). The RAE (frozen encoder + decoder + latent statistics)
comes from its checkpoint `rae_ckpt` and is never trained here; its architecture is the `rae` node, which must
match that run's model config (a `_partial_` node: the pipeline's input_shape completes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from aeforge.checkpoints import load_checkpoint
from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.models.rae import RAE
from aeforge.nn.dit import DiT
from aeforge.nn.flow import dimension_shift, euler_sample, guided, heun_sample, interpolate, sample_t
from aeforge.targets.encoders import run_config

log = logging.getLogger(__name__)
SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
GUIDANCE = ("cfg", "autoguidance")


class RAEDiT(AutoencoderModel):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        rae: Callable[..., RAE],
        rae_ckpt: str | None = None,
        allow_untrained_rae: bool = False,
        num_classes: int = 0,
        class_conditional: bool = True,
        width: int = 1152,
        depth: int = 28,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        lightning: bool = True,
        head_width: int = 2048,
        head_depth: int = 2,
        head_heads: int = 16,
        class_dropout: float = 0.1,
        t_schedule: str = "logit_normal",
        t_loc: float = 0.0,
        t_scale: float = 1.0,
        use_shift: bool = True,
        shift: float | None = None,
        shift_base: int = 4096,
        sampler: str = "euler",
        sample_steps: int = 50,
        guidance_mode: str = "cfg",
        guide_ckpt: str | None = None,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"model.sampler={sampler!r}; valid choices {sorted(SAMPLERS)}")
        if guidance_mode not in GUIDANCE:
            raise ValueError(f"model.guidance_mode={guidance_mode!r}; valid choices {list(GUIDANCE)}")
        if guidance_mode == "autoguidance" and guide_ckpt is None:
            raise ValueError("model.guidance_mode=autoguidance needs model.guide_ckpt (a weaker generator run)")
        if t_schedule not in ("uniform", "logit_normal"):
            raise ValueError(f"model.t_schedule={t_schedule!r}; valid choices ['logit_normal', 'uniform']")
        self.input_shape = tuple(input_shape)
        self.rae = rae if isinstance(rae, RAE) else rae(input_shape=input_shape)  # a partial node: the data's shape
        self._load_rae(rae_ckpt, allow_untrained_rae)
        self.rae.requires_grad_(False)
        n, d = self.rae.latent_shape
        self.num_classes = num_classes if class_conditional else 0
        self.dit = DiT(d, self.rae.encoder.grid, width, depth, heads, mlp_ratio, self.num_classes, class_dropout,
                       lightning, head_width, head_depth, head_heads)
        s = shift if shift is not None else dimension_shift(n * d, shift_base)
        self.shift = s if use_shift else 1.0
        self.t_schedule, self.t_loc, self.t_scale = t_schedule, t_loc, t_scale
        self.sampler, self.sample_steps = sampler, sample_steps
        self.guidance_mode, self.guide_ckpt = guidance_mode, guide_ckpt
        self._guide: list[DiT] = []  # loaded on first use, kept out of the state dict and the optimiser
        log.info("RAE-DiT: latent %dx%d, time shift s=%.3f (%s)", n, d, self.shift,
                 "dimension rule" if shift is None and use_shift else "given" if use_shift else "off")

    def _load_rae(self, path: str | None, allow_untrained: bool) -> None:
        if path is None:
            if not allow_untrained:
                raise ValueError("model.rae_ckpt is required: the checkpoint of a trained RAE run (python train.py "
                                 "experiment=rae_dit_dh_imagenet rae.ckpt=<run>/checkpoints/last.ckpt)")
            log.warning("no rae.ckpt: an UNTRAINED RAE decoder with identity latent statistics stands in "
                        "(allow_untrained_rae, debug=smoke / tests only)")
            return
        state = model_state_dict(load_checkpoint(path, what=f"rae.ckpt={path}"))
        missing, unexpected = self.rae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"rae.ckpt={path} does not fit the model.rae node (missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}); make model.rae match that run's model config")
        if not self.rae.latent_norm.ready:
            raise ValueError(f"rae.ckpt={path} has no latent statistics: train the RAE with stages=rae_latent_stats")
        log.info("RAE from %s (frozen encoder, decoder and latent statistics from the checkpoint)", path)

    def train(self, mode: bool = True):
        super().train(mode)
        self.rae.eval()  # frozen: no noise augmentation, no dropout
        return self

    # -- training -------------------------------------------------------------------------------------
    def labels(self, batch) -> torch.Tensor | None:
        return batch.get("y") if self.num_classes > 0 else None

    def forward(self, batch):
        with torch.no_grad():
            z = self.rae.latents(batch["x"])
        noise = torch.randn_like(z)
        t = sample_t(z.shape[0], self.t_schedule, self.t_loc, self.t_scale, self.shift, device=z.device)
        v = self.dit(interpolate(z, noise, t), t, self.labels(batch))
        return {"v_pred": v, "v_target": noise - z, "t": t}

    def encode(self, batch):
        return self.rae.encode(batch)

    @torch.no_grad()
    def reconstruct(self, batch):
        return self.rae.reconstruct(batch)

    # -- sampling -------------------------------------------------------------------------------------
    def guide(self) -> DiT:
        if not self._guide:
            from hydra.utils import instantiate

            cfg = run_config(self.guide_ckpt, "model.guide_ckpt")
            weak = instantiate(cfg.model, input_shape=self.input_shape, num_classes=self.num_classes)
            weak.load_state_dict(model_state_dict(load_checkpoint(self.guide_ckpt, what="model.guide_ckpt")))
            self._guide.append(weak.dit.eval().requires_grad_(False).to(next(self.dit.parameters()).device))
        return self._guide[0]

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, guidance: float = 1.0, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [-1, 1]. Labels: given, or uniformly random classes for a conditional model;
        guidance 1 is the conditional model alone."""
        device = next(self.dit.parameters()).device
        ntok, d = self.rae.latent_shape
        noise = torch.randn((n, ntok, d), generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(device)
        if self.num_classes > 0 and labels is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator,
                                   device=generator.device if generator else "cpu")
        y = labels.to(device) if labels is not None and self.num_classes > 0 else None
        was = self.dit.training
        self.dit.eval()
        strong = lambda x, t: self.dit(x, t, y)
        if guidance == 1.0:
            velocity = strong
        elif self.guidance_mode == "cfg":
            if y is None:
                raise ValueError("classifier-free guidance needs a class-conditional model (guidance=1 otherwise)")
            null = torch.full_like(y, self.num_classes)
            velocity = lambda x, t: guided(strong(x, t), self.dit(x, t, null), guidance)
        else:
            weak = self.guide()
            velocity = lambda x, t: guided(strong(x, t), weak(x, t, y), guidance)
        z = SAMPLERS[self.sampler](velocity, noise, steps or self.sample_steps, self.shift)
        self.dit.train(was)
        return self.rae.decode_latents(z).clamp(-1, 1)
