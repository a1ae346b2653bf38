"""FMAE-IAT (Ning, Salah, Onal Ertugrul, arXiv 2407.11243): identity-adversarial fine-tuning of MAE.

FMAE is plain MAE pretraining (any aeforge MAE run). IAT happens at fine-tuning time only:
- feature f = fc_norm(mean of patch tokens) of the unmasked ViT encoder (cls excluded, the encoder's final
  norm dropped, as MAE's global-pool fine-tuning);
- task head Linear(D -> num_classes) on f;
- identity head Linear(D -> num_identities) (or a D -> D/2 -> D/4 -> n MLP with GELU) on GRL_lambda(f):
  forward is the identity, backward multiplies the gradient by -lambda, with lambda fixed for the run
  (no DANN ramp; BP4D 2, BP4D+ 1, DISFA 0.5 in the paper);
- losses (conf/objective/fmae_iat.yaml): task loss + identity BCE on one-hot subjects.
So the heads minimise their own losses while the backbone gets grad(L_task) - lambda * grad(L_id).

With grl_lambda = 0 the identity head is still built (last, so every other parameter is initialised as in
plain fine-tuning) and still trains, but no gradient reaches the backbone: the backbone and task head are
bit-identical to a run with num_identities = 0 under the same seed (tests/test_fmae_iat.py checks it).

Elsewhere: `LayerDecayModule` (MAE/BEiT layer-wise lr decay for fine-tuning, identity-head extra steps) in
aeforge/modules/layer_decay.py; the evaluators FMAE-IAT's claim needs in aeforge/eval/ (`KeyedLinearProbe`
for identity probing, `HeadAccuracy`, and `AUF1`: the AU-detection F1 protocols of the paper's code for
multi-label task heads) and their per-validation form `AUF1Monitor` in aeforge/callbacks/au_f1.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.models.base import AutoencoderModel
from aeforge.models.mae import ViTEncoder
from aeforge.nn.vit import LayerNorm, init_weights, vit_layer_id

log = logging.getLogger("aeforge")


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by -lam in the backward pass."""
    return GradReverse.apply(x, lam)


class GradientReversal(nn.Module):
    def __init__(self, lam: float = 1.0):
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


def _encoder_state(state: Mapping) -> dict[str, torch.Tensor]:
    """Encoder weights from a Lightning checkpoint (model.encoder.*), an aeforge MAE state dict (encoder.*)
    or an official MAE checkpoint (patch_embed.*, blocks.*, ...)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    elif "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    out = {}
    for k, v in state.items():
        for prefix in ("model.encoder.", "encoder."):
            if k.startswith(prefix):
                out[k[len(prefix) :]] = v
                break
        else:
            if k.startswith(("patch_embed.", "blocks.", "cls_token", "pos_embed", "norm.")):
                out[k] = v
    return out


ADVERSARIES = ("grl", "confusion")


class IATClassifier(AutoencoderModel):
    """ViT classifier fine-tuned from an MAE encoder, with an optional identity-adversarial head.

    outputs: logits (B, num_classes), features (B, D) and, with num_identities > 0, id_logits.

    adversary: "grl" (the paper) — the identity head sits behind GRL_lambda, so the backbone maximises the
    identity loss; "confusion" (aeforge addition, the confusion loss of Alvi et al., ECCV-W 2018) — the
    head trains on detached features and the backbone minimises lambda x a loss to the uniform identity
    distribution through a frozen copy of the head (output id_confusion_logits; objective=fmae_iat_confusion
    adds that term). The reversed loss is unbounded and can be won by making the head confidently wrong;
    the confusion loss is smallest when the head cannot tell identities apart."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_identities: int = 0,
        grl_lambda: float = 1.0,
        id_head: str = "linear",
        adversary: str = "grl",
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        pretrained: str | None = None,
    ):
        super().__init__()
        c, h, w = input_shape
        if id_head not in ("linear", "mlp"):
            raise ValueError(f"model.id_head must be 'linear' or 'mlp', got {id_head!r}")
        if adversary not in ADVERSARIES:
            raise ValueError(f"model.adversary must be one of {ADVERSARIES}, got {adversary!r}")
        self.adversary = adversary
        self.encoder = ViTEncoder((h, w), patch_size, c, embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.grid, self.depth = self.encoder.grid, depth
        self.fc_norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        for name, m in self.named_modules():
            if name != "encoder.patch_embed.proj":
                init_weights(m)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning head init
        if pretrained:
            self.load_encoder(pretrained)
        self.encoder.norm = nn.Identity()  # global-pool fine-tuning: fc_norm replaces the final norm
        self.grl = GradientReversal(grl_lambda)
        self.id_head = None
        if num_identities:
            if id_head == "linear":
                self.id_head = nn.Linear(embed_dim, num_identities)
            else:
                self.id_head = nn.Sequential(
                    nn.Linear(embed_dim, embed_dim // 2),
                    nn.GELU(),
                    nn.Linear(embed_dim // 2, embed_dim // 4),
                    nn.GELU(),
                    nn.Linear(embed_dim // 4, num_identities),
                )
            self.id_head.apply(init_weights)

    def load_encoder(self, path_or_state) -> dict:
        state = path_or_state
        if isinstance(state, str):
            state = load_checkpoint(state, what="model.pretrained")
        enc = _encoder_state(state)
        if not enc:
            raise ValueError(
                "model.pretrained holds no encoder weights (expected model.encoder.*, encoder.* or "
                "official MAE keys)"
            )
        enc.pop("pos_embed", None)  # fixed sin-cos buffer, rebuilt for this grid
        result = self.encoder.load_state_dict(enc, strict=False)
        missing = [k for k in result.missing_keys if k != "pos_embed"]
        if missing:
            raise ValueError(f"pretrained encoder lacks {missing}")
        log.info("loaded pretrained encoder (%d tensors)", len(enc))
        return {"missing": missing, "unexpected": list(result.unexpected_keys)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.run_blocks(self.encoder.embed(x))  # final norm is Identity here
        return self.fc_norm(tokens[:, 1:].mean(1))

    def forward(self, batch):
        f = self.features(batch["x"])
        out = {"features": f, "logits": self.head(f)}
        if self.id_head is None:
            return out
        if self.adversary == "grl":
            out["id_logits"] = self.id_head(self.grl(f))
        else:
            # the head learns identity from detached features; the backbone, through a frozen copy of the head
            # and a gradient scaled by +lambda, is pulled towards a uniform identity posterior (a bounded loss)
            out["id_logits"] = self.id_head(f.detach())
            frozen = {k: v.detach() for k, v in self.id_head.named_parameters()}
            scaled = grad_reverse(f, -self.grl.lam)
            out["id_confusion_logits"] = torch.func.functional_call(self.id_head, frozen, (scaled,))
        return out

    def encode(self, batch):
        return self.features(batch["x"])

    @property
    def reconstruct(self):  # a classifier has no reconstructions: hasattr(model, "reconstruct") is False
        raise AttributeError("IATClassifier has no reconstruct()")

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block k -> k + 1, the rest depth + 1."""
        return vit_layer_id(name, self.depth)
