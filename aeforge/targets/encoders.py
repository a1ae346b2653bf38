"""Frozen representation encoders behind one interface (RAE's and FAE's encoder), and per-position latent
normalisation.

`FrozenEncoder(source=...)` maps images in the data's normalisation (`data_mean`/`data_std`; the default 0.5/0.5
means images in [-1, 1]) to patch tokens (B, N, D):
  * `hf:<repo id or local folder>` — a Hugging Face vision model: DINOv2 (with or without registers), SigLIP /
    SigLIP2 (fixed-resolution checkpoints), ViT-MAE, plain ViT. RAE's token handling: the last hidden state,
    CLS and register tokens dropped, the final LayerNorm kept but without its affine weight and bias.
  * `timm:<model name>` — a timm model (`forward_features`); weights from the timm/HF cache or `weights=<file>`.
  * `aeforge:<checkpoint>` — the ViT encoder of an aeforge MAE/CAE run (the offline path): the model is rebuilt
    from the run config saved next to the checkpoint (`<run>/.hydra/config.yaml`) and its weights loaded.
Pixels are mapped from the data's normalisation to [0, 1], resized (bicubic) to the encoder's input size and
normalised with the encoder's own mean/std. The encoder never trains: parameters have requires_grad=False, it
stays in eval mode, and its forward runs under no_grad, so its weights stay bit-identical through training.

Missing weights are an error, unless `missing_weights="random"`: then an encoder of the same shape with random
weights stands in and a warning says so (the full-size recipes' smoke runs use that where weights are absent):
the published shape of a known HF name, timm's architecture, or for `aeforge:` the ViT shape in `model_kwargs`.
`model_kwargs` otherwise go to `from_pretrained` (HF) or `timm.create_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.checkpoints import load_checkpoint, state_dict_of
from aeforge.nn.frozen import FrozenModule

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SOURCES = ("hf", "timm", "aeforge")
MISSING = ("error", "random")

# shapes of the released models, so that a random encoder of the same shape can stand in offline
# (model_type, config kwargs); sizes from the models' published config.json files
HF_SHAPES = {
    "facebook/dinov2-with-registers-small": ("dinov2_with_registers", dict(hidden_size=384, num_hidden_layers=12,
                                              num_attention_heads=6, patch_size=14, image_size=518)),
    "facebook/dinov2-with-registers-base": ("dinov2_with_registers", dict(hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, patch_size=14, image_size=518)),
    "facebook/dinov2-with-registers-large": ("dinov2_with_registers", dict(hidden_size=1024, num_hidden_layers=24,
                                              num_attention_heads=16, patch_size=14, image_size=518)),
    "facebook/dinov2-small": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                             patch_size=14, image_size=518)),
    "facebook/dinov2-base": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                            patch_size=14, image_size=518)),
    "google/siglip2-base-patch16-224": ("siglip_vision_model", dict(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224)),
    "google/siglip2-base-patch16-256": ("siglip_vision_model", dict(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=256)),
    "facebook/dino-vits8": ("vit", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                        intermediate_size=1536, patch_size=8, image_size=224)),
    "facebook/vit-mae-base": ("vit_mae", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072, patch_size=16, image_size=224)),
    "facebook/vit-mae-large": ("vit_mae", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, patch_size=16, image_size=224)),
}


def parse_source(source: str) -> tuple[str, str]:
    kind, sep, name = source.partition(":")
    if not sep or kind not in SOURCES or not name:
        raise ValueError(f"encoder source={source!r}: expected one of " + ", ".join(f"'{k}:<...>'" for k in SOURCES)
                         + " (hf:<repo or folder>, timm:<model name>, aeforge:<checkpoint path>)")
    return kind, name


def strip_affine(norm: nn.Module) -> None:
    """Keep the normalisation, drop its learned scale and shift (RAE's `normalize=True` token handling)."""
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"strip_final_norm_affine=true, but the final norm is {type(norm).__name__}, not a "
                         f"LayerNorm; set strip_final_norm_affine=false for this encoder")
    norm.weight, norm.bias, norm.elementwise_affine = None, None, False


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run_config(ckpt: str | Path, what: str):
    """The config of the run that wrote `ckpt`: <run>/.hydra/config.yaml (train.py), else the
    <run>/config_resolved.yaml every run writes (also runs started in-process, by tests and proofs)."""
    from omegaconf import OmegaConf

    import aeforge.cli  # noqa: F401  (registers the resolvers a saved config uses)

    run = run_dir_of(Path(ckpt))
    for path in (run / ".hydra" / "config.yaml", run / "config_resolved.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    raise FileNotFoundError(f"{what}: no run config next to {ckpt} ({run}/.hydra/config.yaml or "
                            f"{run}/config_resolved.yaml); it is needed to rebuild the model")


class FrozenEncoder(FrozenModule):
    """Images (B, C, H, W) in the data's normalisation -> patch tokens (B, N, D); attributes `dim` (D),
    `num_tokens` (N), `grid` (h, w) of the patches (N = h*w once prefix tokens are dropped), `input_size`,
    `stood_in` (True when random weights stand in)."""

    def __init__(
        self,
        source: str,
        drop_prefix_tokens: bool = True,
        strip_final_norm_affine: bool = True,
        input_size: int | None = None,
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        weights: str | None = None,
        missing_weights: str = "error",
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        kind, name = parse_source(source)
        if missing_weights not in MISSING:
            raise ValueError(f"missing_weights={missing_weights!r}: valid choices {list(MISSING)}")
        self.source, self.kind = source, kind
        self.drop_prefix_tokens = drop_prefix_tokens
        self.allow_random = missing_weights == "random"
        self.stood_in = False
        kwargs = dict(model_kwargs or {})
        own_mean, own_std, native = {"hf": self._build_hf, "timm": self._build_timm, "aeforge": self._build_aeforge}[
            kind](name, weights, kwargs)
        if strip_final_norm_affine:
            strip_affine(self.final_norm)
        self.input_size = int(input_size or native)
        col = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)
        # persistent: a checkpoint of a model holding this encoder fixes its pixel pipeline with its weights
        self.register_buffer("data_mean", col(data_mean or [0.5] * 3))
        self.register_buffer("data_std", col(data_std or [0.5] * 3))
        self.register_buffer("mean", col(mean or own_mean))
        self.register_buffer("std", col(std or own_std))
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, self.mean.shape[1], self.input_size, self.input_size))
        self.num_tokens, self.dim = probe.shape[1], probe.shape[2]
        patches = self.num_tokens - (0 if drop_prefix_tokens else self.num_prefix)
        side = int(round(patches ** 0.5))
        if side * side != patches:
            raise ValueError(f"encoder {source} gives {patches} patch tokens, not a square grid (check input_size)")
        self.grid = (side, side)

    # -- builders: each sets self.net, self.final_norm, self.num_prefix; returns (mean, std, native size) -----
    def _stand_in(self, what: str, err: Exception) -> None:
        if not self.allow_random:
            raise FileNotFoundError(f"encoder {self.source}: {what} ({err}). Give a local folder or file, or set "
                                    f"missing_weights=random for a random encoder of the same shape (tests only)")
        self.stood_in = True
        log.warning("encoder %s: %s; a RANDOM frozen encoder of the same shape stands in (missing_weights=random)",
                    self.source, what)

    def _build_hf(self, name: str, weights: str | None, kwargs: dict):
        from transformers import AutoConfig, AutoModel

        try:
            model = AutoModel.from_pretrained(weights or name, **kwargs)
        except OSError as e:
            self._stand_in("no weights found (offline, or not a folder)", e)
            if name in HF_SHAPES:
                model_type, shape = HF_SHAPES[name]
                config = AutoConfig.for_model(model_type, **{**shape, **kwargs})
            else:
                try:
                    config = AutoConfig.from_pretrained(name, **kwargs)
                except OSError:
                    raise FileNotFoundError(f"encoder {self.source}: neither weights nor a config are available, "
                                            f"and its shape is not among the known ones {sorted(HF_SHAPES)}") from e
            model = AutoModel.from_config(config)
        self.net = getattr(model, "vision_model", model)  # a full SigLIP/CLIP model: its vision tower
        cfg = getattr(model.config, "vision_config", model.config)
        self.model_type = cfg.model_type
        if "siglip" in self.model_type:
            self.num_prefix, norm_name, mean, std = 0, "post_layernorm", [0.5] * 3, [0.5] * 3
        else:
            self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
            norm_name, mean, std = "layernorm", IMAGENET_MEAN, IMAGENET_STD
        if "mae" in self.model_type:
            cfg.mask_ratio = 0.0  # HF's ViT-MAE masks inside its forward; the encoder must see every patch
        if not hasattr(self.net, norm_name):
            raise ValueError(f"encoder {self.source}: model type {self.model_type!r} has no final norm "
                             f"{norm_name!r}; supported: DINOv2 (+registers), SigLIP/SigLIP2, ViT-MAE, ViT")
        self.final_norm = getattr(self.net, norm_name)
        self.patch = cfg.patch_size
        return mean, std, 224 if "dinov2" in self.model_type else cfg.image_size

    def _build_timm(self, name: str, weights: str | None, kwargs: dict):
        import timm

        from aeforge.targets.teachers import load_state_dict_into

        try:
            self.net = timm.create_model(name, pretrained=weights is None, num_classes=0, **kwargs)
        except (OSError, RuntimeError) as e:  # not in the cache (offline)
            self._stand_in("no pretrained weights in the timm/HF cache", e)
            self.net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if weights:
            state = load_checkpoint(weights, what=f"encoder weights={weights}")
            state = state.get("state_dict", state.get("model", state))
            load_state_dict_into(self.net, {k: v for k, v in state.items() if not k.startswith("head.")})
        self.num_prefix = int(getattr(self.net, "num_prefix_tokens", 0))
        self.final_norm = getattr(self.net, "norm", None)
        cfg = self.net.pretrained_cfg
        embed = getattr(self.net, "patch_embed", None)
        native = embed.img_size[-1] if getattr(embed, "img_size", None) else cfg["input_size"][-1]
        return cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), native

    def _build_aeforge(self, name: str, weights: str | None, kwargs: dict):
        from hydra.utils import instantiate

        path = Path(name)
        if not path.is_file() and self.allow_random:
            return self._aeforge_stand_in(FileNotFoundError(f"no checkpoint {path}"), kwargs)
        cfg = run_config(path, f"encoder {self.source}")
        state = state_dict_of(load_checkpoint(path, what=f"encoder {self.source}"), path)
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if "encoder.patch_embed.proj.weight" not in state:
            raise ValueError(f"encoder {self.source}: the checkpoint has no ViT encoder (encoder.patch_embed.*); "
                             f"supported: aeforge MAE/CAE runs")
        dim, chans, p, _ = state["encoder.patch_embed.proj.weight"].shape
        side = int(round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5)) * p
        model = instantiate(cfg.model, input_shape=(chans, side, side))
        model.load_state_dict(state)
        self.net = model.encoder
        self.num_prefix, self.final_norm, self.patch = 1, self.net.norm, p
        data = cfg.get("data") or {}
        return list(data.get("mean", IMAGENET_MEAN)), list(data.get("std", IMAGENET_STD)), side

    def _aeforge_stand_in(self, err: Exception, kwargs: dict):
        """A random aeforge ViT encoder; its shape from model_kwargs (img_size, patch_size, in_chans, embed_dim,
        depth, num_heads, mlp_ratio), defaults: conf/model/mae.yaml's tiny MAE on 32 px RGB."""
        from aeforge.models.mae import ViTEncoder

        self._stand_in("the checkpoint is absent", err)
        shape = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 192, "depth": 6, "num_heads": 3,
                 "mlp_ratio": 4.0, **kwargs}
        size = shape.pop("img_size")
        self.net = ViTEncoder((size, size), **shape)
        self.num_prefix, self.final_norm, self.patch = 1, self.net.norm, shape["patch_size"]
        return IMAGENET_MEAN, IMAGENET_STD, size

    # -- forward -----------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Data normalisation -> [0, 1] -> encoder size -> the encoder's normalisation."""
        x = x.float() * self.data_std + self.data_mean
        if x.shape[1] != self.mean.shape[1]:
            x = x.expand(-1, self.mean.shape[1], -1, -1)  # grey data into an RGB encoder
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def _hf_kwargs(self, x: torch.Tensor) -> dict:
        extra = {}
        if "mae" in self.model_type:  # noise = arange keeps the patches in raster order
            n = (x.shape[-2] // self.patch) * (x.shape[-1] // self.patch)
            extra["noise"] = torch.arange(n, device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
        if "dinov2" not in self.model_type:  # DINOv2 always interpolates its positions
            extra["interpolate_pos_encoding"] = True
        return extra

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder-normalised pixels -> tokens (prefix tokens dropped when asked)."""
        if self.kind == "hf":
            h = self.net(pixel_values=x, **self._hf_kwargs(x)).last_hidden_state
        elif self.kind == "timm":
            h = self.net.forward_features(x)
            if h.ndim == 4:  # a CNN: (B, C, h, w) -> (B, hw, C)
                h = h.flatten(2).transpose(1, 2)
        else:
            h = self.net(x)
        return h[:, self.num_prefix:] if self.drop_prefix_tokens else h

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.prepare(x)).float()

    def hidden_states(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Patch tokens (B, N, D) after each block in `layers` (0-based, no final norm), for feature
        discriminators: runs WITH autograd so a loss on them reaches the input (the weights stay frozen)."""
        x = self.prepare(x)
        if self.kind == "hf":
            hs = self.net(pixel_values=x, output_hidden_states=True, **self._hf_kwargs(x)).hidden_states
            out = [hs[i + 1] for i in layers]
        elif self.kind == "timm":
            return list(self.net.forward_intermediates(x, indices=list(layers), intermediates_only=True,
                                                       output_fmt="NLC"))
        else:
            h, out = self.net.embed(x), []
            h = torch.cat([(self.net.cls_token + self.net.pos_embed[:, :1]).expand(h.shape[0], -1, -1), h], 1)
            for i, blk in enumerate(self.net.blocks):
                h = blk(h)
                if i in layers:
                    out.append(h)
        return [h[:, self.num_prefix:] for h in out]


class LatentNorm(nn.Module):
    """Per-position (token, channel) mean and variance of the latent, computed once over data and kept as
    buffers, so they travel in the checkpoint: `normalize` z -> (z - m) / sqrt(v + eps), `denormalize` inverts.
    `update` merges batches exactly (Chan et al.'s parallel variance), `ready` is set once a pass is done."""

    def __init__(self, num_tokens: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(num_tokens, dim))
        self.register_buffer("var", torch.ones(num_tokens, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))

    @property
    def ready(self) -> bool:
        return bool(self.done)

    def reset(self) -> None:
        self.mean.zero_()
        self.var.fill_(1.0)
        self.count.zero_()
        self.done.fill_(False)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        z = z.float()
        n, m = float(self.count), z.shape[0]
        bm, bv = z.mean(0), z.var(0, unbiased=False)
        total = n + m
        delta = bm - self.mean
        m2 = self.var * n + bv * m + delta.pow(2) * n * m / total
        self.mean.add_(delta * m / total)
        self.var.copy_(m2 / total)
        self.count.fill_(total)

    def finish(self) -> None:
        if float(self.count) < 2:
            raise ValueError("latent statistics need at least 2 samples")
        self.done.fill_(True)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / (self.var + self.eps).sqrt()

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * (self.var + self.eps).sqrt() + self.mean
