"""ZO-AE-DS (Zhang et al., ICLR 2022; method card 13): robustify a query-only black-box classifier by
prepending a trainable denoiser + encoder, trained with zeroth-order (ZO) gradient estimates.

The three models of the recipe chain, one per run:
- `ZOClassifier` (experiment=zo_cifar10_classifier): the small CNN aeforge trains itself and then treats
  as the black box `F`;
- `ZOAutoencoder` (experiment=zo_ae_cifar10): the card's `cifar_encoder_192_24` / `cifar_decoder_192_24`
  pair, pre-trained with MSE on clean images;
- `ZOAEDS` (experiment=zo_ae_ds_cifar10): `DnCNN -> Enc` (white box, trained) in front of the black box
  `z -> F(Dec(z))` (frozen decoder + classifier, queried only). The gradient of the loss w.r.t. the encoder
  output `z` is estimated with RGE or CGE from loss values alone and enters autograd through `_ZOGrad` (a
  custom autograd Function: value = the queried loss, gradient w.r.t. z = the estimate), so the surrogate
  `<z, sg(g)>` of the card back-propagates through the white box while the default AEModule keeps its
  logging, NaN guard and resume. `estimator=fo` is the white-box FO-AE-DS reference; `bottleneck=false`
  is ZO-DS (ZO over the full image: the black box is F alone, queried at the denoiser's output).

Inputs are in pixel space [0, 1] (the recipes use identity normalisation), so the Gaussian noise of
training and of randomized-smoothing certification is the paper's σ in pixel units.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.nn.frozen import FrozenModule

log = logging.getLogger("aeforge")

ESTIMATORS = ("fo", "rge", "cge")
DIRECTIONS = ("sphere", "gaussian")
TARGETS = ("clean_pred", "label")


def _check_cifar_shape(input_shape) -> None:
    if tuple(input_shape) != (3, 32, 32):
        raise ValueError(f"the ZO-AE-DS networks are the card's CIFAR-10 architectures: input_shape must be "
                         f"(3, 32, 32), got {tuple(input_shape)} (data=cifar10_subset)")


# -- the networks --------------------------------------------------------------------------------------
class ZOClassifier(AutoencoderModel):
    """Small CIFAR CNN (the black box once trained): `widths` stages of 3x3 conv + BN + ReLU + 2x2 max-pool
    (one conv per stage: the black box is queried thousands of times per step in ZO training), then global
    average pooling and a linear head. `noise_std` > 0 trains with Gaussian noise (Cohen et al.'s
    smoothing-aware base classifier); 0 is the clean black box of the paper."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, widths: list[int],
                 noise_std: float = 0.0):
        super().__init__()
        c = input_shape[0]
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        self.noise_std = noise_std

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, batch):
        x = batch["x"]
        if self.training and self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return {"logits": self.classify(x)}

    def encode(self, batch):
        return self.features(batch["x"])


def cifar_encoder(widths: list[int]) -> nn.Sequential:
    """3x32x32 -> widths[3] x 1 x 1 (the card's cifar_encoder_192_24 for widths [24, 48, 96, 192])."""
    a, b, c, d = widths
    return nn.Sequential(nn.Conv2d(3, a, 4, 4), nn.ReLU(), nn.Conv2d(a, b, 3, 3, padding=2), nn.ReLU(),
                         nn.Conv2d(b, c, 4, 2, padding=1), nn.ReLU(), nn.Conv2d(c, d, 2, 2), nn.ReLU(),
                         nn.Flatten())


class CifarDecoder(nn.Module):
    """(B, d) -> 3x32x32 in [0, 1]: the transposed mirror of `cifar_encoder` with a Sigmoid output."""

    def __init__(self, widths: list[int]):
        super().__init__()
        a, b, c, d = widths
        self.d = d
        self.net = nn.Sequential(nn.ConvTranspose2d(d, c, 2, 2), nn.ReLU(), nn.ConvTranspose2d(c, b, 4, 2, padding=1),
                                 nn.ReLU(), nn.ConvTranspose2d(b, a, 3, 3, padding=2), nn.ReLU(),
                                 nn.ConvTranspose2d(a, 3, 4, 4), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(-1, self.d, 1, 1))


def _check_widths(widths: list[int]) -> None:
    if len(widths) != 4:
        raise ValueError(f"ae_widths must list the 4 conv widths of the card's encoder (e.g. [24, 48, 96, 192]), "
                         f"got {widths}")


class ZOAutoencoder(AutoencoderModel):
    """The AE of stage 1 (card: white-box pre-training with MSE on clean images); latent d = widths[-1]."""

    def __init__(self, input_shape: tuple[int, int, int], widths: list[int]):
        super().__init__()
        _check_cifar_shape(input_shape)
        _check_widths(widths)
        self.encoder, self.decoder = cifar_encoder(widths), CifarDecoder(widths)

    def forward(self, batch):
        z = self.encoder(batch["x"])
        return {"z": z, "recon": self.decoder(z)}

    def encode(self, batch):
        return self.encoder(batch["x"])


class DnCNN(nn.Module):
    """Residual denoiser (Zhang et al. 2017, as in denoised smoothing): conv+ReLU, (depth-2) x conv+BN+ReLU,
    conv; returns x - predicted noise. The card's cifar_dncnn is depth 17, width 64. identity_init zeroes the
    last conv, so the denoiser starts as the identity (the front-end starts as the pre-trained AE; the card
    leaves the denoiser's start open: pre-training it is optional and may trap the ZO stage)."""

    def __init__(self, channels: int, depth: int, width: int, identity_init: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        if identity_init:
            nn.init.zeros_(layers[-1].weight), nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)


# -- the black box and the estimators ------------------------------------------------------------------
class BlackBox(FrozenModule):
    """Query-only access to `classifier(decoder(z))` (or `classifier(z as an image)` without a decoder):
    `query` evaluates a batch without autograd and counts every evaluated input in `queries`. Its parameters
    never require gradients. `white_box` (differentiable) exists only for the first-order reference."""

    def __init__(self, classifier: nn.Module, decoder: nn.Module | None, image_shape: tuple[int, int, int]):
        super().__init__()
        self.classifier, self.decoder, self.image_shape = classifier, decoder, tuple(image_shape)
        self.requires_grad_(False)
        self.queries = 0

    def _f(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier.classify(self.image_of(z))

    def image_of(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) if self.decoder is not None else z.view(-1, *self.image_shape)

    @torch.no_grad()
    def query(self, z: torch.Tensor) -> torch.Tensor:
        self.queries += len(z)
        return self._f(z.detach())

    @torch.no_grad()
    def query_images(self, x: torch.Tensor) -> torch.Tensor:
        """F on images directly (the clean prediction used as the training target)."""
        self.queries += len(x)
        return self.classifier.classify(x.detach())

    def white_box(self, z: torch.Tensor) -> torch.Tensor:
        return self._f(z)


def sample_directions(b: int, q: int, d: int, kind: str, device, dtype) -> torch.Tensor:
    u = torch.randn(b, q, d, device=device, dtype=dtype)
    return F.normalize(u, dim=-1) if kind == "sphere" else u


@torch.no_grad()
def rge(f, z: torch.Tensor, f0: torch.Tensor, queries: int, mu: float, directions: str = "sphere",
        chunk: int = 4096) -> torch.Tensor:
    """Random gradient estimate of per-row losses f at z (B, d), f0 = f(z):
    g = phi(d)/q * sum_k [f(z + mu u_k) - f(z)] / mu * u_k with phi(d) = d for u on the unit sphere, 1 for
    u ~ N(0, I) (both make E[g] the gradient of the mu-smoothed loss). Costs B*q queries."""
    b, d = z.shape
    u = sample_directions(b, queries, d, directions, z.device, z.dtype)
    pts = (z.unsqueeze(1) + mu * u).reshape(-1, d)
    vals = torch.cat([f(p) for p in pts.split(chunk)]).view(b, queries)
    scale = d if directions == "sphere" else 1.0
    diffs = (vals - f0.unsqueeze(1)) / mu
    return scale / queries * torch.bmm(diffs.unsqueeze(1), u).squeeze(1)


@torch.no_grad()
def cge(f, z: torch.Tensor, mu: float, chunk: int = 4096) -> torch.Tensor:
    """Coordinate-wise estimate: g_i = [f(z + mu e_i) - f(z - mu e_i)] / (2 mu). Costs 2*B*d queries."""
    b, d = z.shape
    eye = torch.eye(d, device=z.device, dtype=z.dtype) * mu
    pts = torch.cat([z.unsqueeze(1) + eye, z.unsqueeze(1) - eye], 1).reshape(-1, d)
    vals = torch.cat([f(p) for p in pts.split(chunk)]).view(b, 2, d)
    return (vals[:, 0] - vals[:, 1]) / (2 * mu)


class _ZOGrad(torch.autograd.Function):
    """Value: the queried per-row loss; gradient w.r.t. z: upstream gradient x the ZO estimate. Autograd then
    computes J_theta(z)^T g for the white-box front-end (the card's surrogate <z, sg(g)>) and never reaches
    the black box (its outputs were computed without autograd)."""

    @staticmethod
    def forward(ctx, z, loss, grad_estimate):
        ctx.save_for_backward(grad_estimate)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out.unsqueeze(1) * g, None, None


# -- the defended model ----------------------------------------------------------------------------------
def _load_part(module: nn.Module, path: str, prefix: str, what: str) -> None:
    state = model_state_dict(load_checkpoint(path, what=what))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what}={path}: its weights do not fit the configured network (check the widths keys "
                         f"against the run that wrote it): {str(e).splitlines()[0]}") from None


class ZOAEDS(AutoencoderModel):
    """Denoiser (+ encoder) trained in front of a query-only black box; see the module docstring.

    estimator: fo (white-box gradient) | rge | cge; queries: q for RGE (CGE uses 2d); mu: smoothing radius;
    directions: sphere | gaussian (RGE); noise_std: sigma of the training noise; target: clean_pred (the
    black box's argmax on the clean image, the paper's default) | label; bottleneck: false = ZO-DS (no AE).
    classifier_ckpt / ae_ckpt: aeforge runs of zo_cifar10_classifier / zo_ae_cifar10; null is refused unless
    allow_random (debug=smoke), which stands in random networks with a warning."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, classifier_ckpt: str | None,
                 ae_ckpt: str | None, classifier_widths: list[int], ae_widths: list[int], denoiser_depth: int,
                 denoiser_width: int, denoiser_identity_init: bool = True, bottleneck: bool = True,
                 estimator: str = "cge", queries: int = 192, mu: float = 0.005, directions: str = "sphere",
                 noise_std: float = 0.25, target: str = "clean_pred",
                 query_chunk: int = 4096, allow_random: bool = False):
        super().__init__()
        _check_cifar_shape(input_shape)
        _check_widths(ae_widths)
        for key, value, valid in (("estimator", estimator, ESTIMATORS), ("directions", directions, DIRECTIONS),
                                  ("target", target, TARGETS)):
            if value not in valid:
                raise ValueError(f"model.{key}={value!r}: valid choices are {valid}")
        if mu <= 0:
            raise ValueError(f"model.mu={mu}: the smoothing radius must be > 0")
        self.estimator, self.queries, self.mu, self.directions = estimator, queries, mu, directions
        self.noise_std, self.target, self.bottleneck, self.query_chunk = noise_std, target, bottleneck, query_chunk
        classifier = ZOClassifier(input_shape, num_classes, classifier_widths)
        self._load_or_random(classifier, classifier_ckpt, "", "model.classifier_ckpt", "zo_cifar10_classifier",
                             allow_random)
        self.denoiser = DnCNN(input_shape[0], denoiser_depth, denoiser_width, denoiser_identity_init)
        decoder = None
        if bottleneck:
            ae = ZOAutoencoder(input_shape, ae_widths)
            self._load_or_random(ae, ae_ckpt, "", "model.ae_ckpt", "zo_ae_cifar10", allow_random)
            self.encoder, decoder = ae.encoder, ae.decoder
        self.blackbox = BlackBox(classifier, decoder, input_shape)

    @staticmethod
    def _load_or_random(module, path, prefix, key, recipe, allow_random) -> None:
        if path is not None:
            _load_part(module, str(path), prefix, key)
        elif allow_random:
            log.warning("%s=null with allow_random=true (debug=smoke sets it): a RANDOMLY INITIALISED network "
                        "stands in; plumbing checks only, never results", key)
        else:
            raise ValueError(f"{key} is null: train it first with `python train.py experiment={recipe}` and pass "
                             f"{key}=<run dir>/checkpoints/last.ckpt")

    def front_end(self, x: torch.Tensor) -> torch.Tensor:
        """The white box: (B, d) encoder output, or the flattened denoised image without the bottleneck."""
        h = self.denoiser(x)
        return self.encoder(h) if self.bottleneck else h.flatten(1)

    def _loss_fn(self, y: torch.Tensor):
        def f(points: torch.Tensor) -> torch.Tensor:
            reps = len(points) // len(y)
            return F.cross_entropy(self.blackbox.query(points), y.repeat_interleave(reps), reduction="none")
        return f

    def forward(self, batch):
        x, labels = batch["x"], batch["y"]
        y = labels if self.target == "label" else self.blackbox.query_images(x).argmax(1)
        noisy = x + self.noise_std * torch.randn_like(x) if self.noise_std > 0 else x
        z = self.front_end(noisy)
        if self.estimator == "fo":
            logits = self.blackbox.white_box(z)
            return {"zo_loss": F.cross_entropy(logits, y, reduction="none"), "logits": logits, "z": z}
        logits = self.blackbox.query(z)
        loss = F.cross_entropy(logits, y, reduction="none")
        if self.training and torch.is_grad_enabled() and z.requires_grad:
            zd = z.detach()
            f = self._loss_fn(y)
            if self.estimator == "rge":
                g = rge(f, zd, loss, self.queries, self.mu, self.directions, self.query_chunk)
            else:
                g = cge(f, zd, self.mu, self.query_chunk)
            loss = _ZOGrad.apply(z, loss, g)
        return {"zo_loss": loss, "logits": logits, "z": z}

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The defended base classifier F(Dec(Enc(Den(x)))) (F(Den(x)) without the bottleneck), by queries."""
        return self.blackbox.query(self.front_end(x))

    def encode(self, batch):
        return self.front_end(batch["x"])

    @torch.no_grad()
    def reconstruct(self, batch):
        """The image the black box classifies: Dec(Enc(Den(x))), or Den(x) without the bottleneck."""
        return self.blackbox.image_of(self.front_end(batch["x"]))
