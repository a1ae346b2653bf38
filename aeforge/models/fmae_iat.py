"""FMAE-IAT (Ning, Salah, Onal Ertugrul, arXiv 2407.11243): identity-adversarial fine-tuning of MAE.

FMAE is plain MAE pretraining (any aeforge MAE run). IAT happens at fine-tuning time only:
- feature f = fc_norm(mean of patch tokens) of the unmasked ViT encoder (cls excluded, the encoder's final
  norm dropped, as MAE's global-pool fine-tuning);
- task head Linear(D -> num_classes) on f;
- identity head Linear(D -> num_identities) (or a D -> D/2 -> D/4 -> n MLP with GELU) on GRL_lambda(f):
  forward is the identity, backward multiplies the gradient by -lambda, with lambda fixed for the run
  (no DANN ramp; BP4D 2, BP4D+ 1, DISFA 0.5 in the paper);
- losses (aeforge/conf/objective/fmae_iat.yaml): task loss + identity BCE on one-hot subjects.
So the heads minimise their own losses while the backbone gets grad(L_task) - lambda * grad(L_id).

With grl_lambda = 0 the identity head is still built (last, so every other parameter is initialised as in
plain fine-tuning) and still trains, but no gradient reaches the backbone: the backbone and task head are
bit-identical to a run with num_identities = 0 under the same seed (tests/test_mim_b.py checks it).

Also here: `LayerDecayModule` (MAE/BEiT layer-wise lr decay for fine-tuning) and the evaluators that
FMAE-IAT's claim needs (`KeyedLinearProbe` for identity probing, `HeadAccuracy`, and `AUF1`: the AU-detection
F1 protocols of the paper's code for multi-label task heads).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from aeforge.eval import EvalContext
from aeforge.eval.probes import LinearProbe
from aeforge.models.base import AutoencoderModel
from aeforge.models.mae import ViTEncoder
from aeforge.modules.base import AEModule
from aeforge.modules.optim import layer_decay_groups
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
            state = torch.load(state, map_location="cpu", weights_only=False)
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


class LayerDecayModule(AEModule):
    """AEModule with MAE's fine-tuning param groups: lr scale layer_decay ** (num_layers - layer_id) with
    num_layers = depth + 1 (the model provides `layer_id(name)` and `depth`); no decay on 1-D params.

    Two knobs for a stronger adversary in the GRL min-max, both aeforge additions (not in the FMAE-IAT paper
    or code; their defaults are the paper):
    - id_head_lr_mult: the identity head's parameters (`id_head.*`) get their own param groups with lr (and
      lr_scale) times this factor. The warmup/cosine schedule scales every group alike.
    - id_head_steps: identity-head updates per backbone update (as a GAN's critic steps). Before each
      training step the head takes id_head_steps - 1 extra steps, alone, on the previous batch's detached
      features, with the run's optimizer (so its lr, schedule and Adam state); the reversed gradient the
      backbone then gets comes from a head that is closer to the best identity classifier of the current
      features. id_loss_term names the objective term that is the identity loss."""

    def __init__(self, layer_decay: float = 0.75, id_head_lr_mult: float = 1.0, id_head_steps: int = 1,
                 id_loss_term: str = "identity", **kwargs):
        super().__init__(**kwargs)
        if id_head_lr_mult <= 0:
            raise ValueError(f"module.id_head_lr_mult must be > 0, got {id_head_lr_mult}")
        if id_head_steps < 1:
            raise ValueError(f"module.id_head_steps must be >= 1 (1 = the paper), got {id_head_steps}")
        if id_head_steps > 1:
            if getattr(self.model, "id_head", None) is None:
                raise ValueError("module.id_head_steps > 1 needs an identity head (model.num_identities > 0)")
            if id_loss_term not in self.objective.terms:
                raise ValueError(f"module.id_loss_term={id_loss_term!r} is not an objective term; valid: "
                                 f"{sorted(self.objective.terms)}")
        confusion = getattr(self.model, "adversary", "grl") == "confusion" and self.model.id_head is not None
        if confusion and not any(getattr(t, "pred_key", None) == "id_confusion_logits"
                                 for t in self.objective.terms.values()):
            raise ValueError("model.adversary=confusion needs a loss on id_confusion_logits, or the backbone gets no "
                             "adversarial gradient at all: add objective=fmae_iat_confusion")
        self.layer_decay, self.id_head_lr_mult = layer_decay, float(id_head_lr_mult)
        self.id_head_steps, self.id_loss_term = int(id_head_steps), id_loss_term
        self._adversary_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_groups(self, lr: float) -> list[dict]:
        model = self.model
        if not hasattr(model, "layer_id"):
            return super().param_groups(lr)
        o = self.optim
        skip = set(getattr(model, "no_weight_decay", lambda: set())())
        out = layer_decay_groups(model, lr, o.weight_decay, self.layer_decay, lambda name, p: o.no_decay_1d and (
            p.ndim <= 1 or name.endswith(".bias") or name in skip))
        if self.id_head_lr_mult != 1.0:
            out = _split_id_head_groups(out, self.id_head_lr_mult)
        if self.probe is not None:
            out.append({"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": self.probe_lr})
        return out

    # -- extra identity-head steps --------------------------------------------------------------------
    def on_fit_start(self):
        if self.id_head_steps > 1 and self.trainer.accumulate_grad_batches > 1:
            raise ValueError("module.id_head_steps > 1 cannot be combined with trainer.accumulate_grad_batches > 1 "
                             "(the extra head steps would step on the accumulated gradients)")

    def _step(self, batch) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        if self.training and self.id_head_steps > 1:
            target = batch[self.objective.terms[self.id_loss_term].target_key]
            self._adversary_batch = (out["features"].detach(), target.detach())
        return self._losses(out, batch)

    def training_step(self, batch, batch_idx):
        if self._adversary_batch is not None:
            features, target = (t.to(self.device) for t in self._adversary_batch)
            self.train_identity_head(features, target, steps=self.id_head_steps - 1)
        return super().training_step(batch, batch_idx)

    def train_identity_head(self, features: torch.Tensor, target: torch.Tensor, steps: int) -> None:
        """`steps` updates of the identity head alone on fixed features. Gradients come from autograd.grad
        (nothing accumulates into the backbone or reaches DDP's hooks) and are averaged over ranks by hand;
        the optimizer skips every parameter without a gradient."""
        term = self.objective.terms[self.id_loss_term]
        params = [p for p in self.model.id_head.parameters() if p.requires_grad]
        opt = self.optimizers().optimizer
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        opt.zero_grad(set_to_none=True)  # the previous step's gradients, already applied
        for _ in range(steps):
            loss = term({term.pred_key: self.model.id_head(features)}, {term.target_key: target})
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                if distributed:
                    torch.distributed.all_reduce(g)
                    g /= torch.distributed.get_world_size()
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        if self._adversary_batch is not None:  # the next step's extra head updates use it: exact resume
            checkpoint["iat_adversary_batch"] = [t.cpu() for t in self._adversary_batch]

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("iat_adversary_batch")
        self._adversary_batch = tuple(saved) if saved else None


def _split_id_head_groups(groups: list[dict], mult: float, prefix: str = "id_head.") -> list[dict]:
    """Move the parameters named prefix* of each group into a copy of that group with lr and lr_scale * mult."""
    out = []
    for g in groups:
        names = g.get("names", [])
        idx = [i for i, n in enumerate(names) if n.startswith(prefix)]
        if not idx:
            out.append(g)
            continue
        rest = [i for i in range(len(names)) if i not in set(idx)]
        for keep, m in ((rest, 1.0), (idx, mult)):
            if keep:
                sub = {**g, "params": [g["params"][i] for i in keep], "names": [names[i] for i in keep]}
                sub["lr"], sub["lr_scale"] = g["lr"] * m, g.get("lr_scale", 1.0) * m
                out.append(sub)
    return out


# -- evaluators -------------------------------------------------------------------------------------------
class _KeyedContext:
    """An EvalContext view whose labels are batch[label_key] instead of batch["y"]."""

    def __init__(self, ctx, label_key: str):
        self.ctx, self.label_key = ctx, label_key
        self.has_labels = True

    @torch.no_grad()
    def features(self, split: str):
        key = f"keyed/{split}/{self.label_key}"
        if key not in self.ctx.cache:
            feats, labels = [], []
            for batch in self.ctx.batches(split, f"features ({split}, {self.label_key})"):
                feats.append(self.ctx.model.encode(batch).float().flatten(1).cpu())
                labels.append(batch[self.label_key].cpu())
            self.ctx.cache[key] = (torch.cat(feats), torch.cat(labels))
        return self.ctx.cache[key]


class KeyedLinearProbe(LinearProbe):
    """The MAE linear probe (BN + linear on frozen features) on another label, e.g. `speaker`: FMAE-IAT's
    identity probe (lower accuracy = less identity information in the features)."""

    def __init__(self, label_key: str = "speaker", **kwargs):
        super().__init__(**kwargs)
        self.label_key = label_key

    def __call__(self, ctx) -> dict[str, float]:
        return super().__call__(_KeyedContext(ctx, self.label_key))


class HeadAccuracy:
    """Top-1 accuracy of the model's own heads on the val split (outputs[pred_key] vs batch[label_key])."""

    def __init__(self, heads: dict[str, str] | None = None):
        self.heads = dict(heads or {"logits": "y"})

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        correct = {k: 0 for k in self.heads}
        n = 0
        for batch in ctx.batches("val", "head accuracy"):
            out = ctx.model(batch)
            for pred_key, label_key in self.heads.items():
                if pred_key in out:
                    correct[pred_key] += (out[pred_key].argmax(1) == batch[label_key]).sum().item()
            n += len(batch["x"])
        return {f"{k}_acc": v / max(n, 1) for k, v in correct.items()}


def multilabel_f1(probs: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(T, A) binary F1 of every label a at every threshold t: pred = probs >= t; F1 = 2TP / (2TP + FP + FN),
    0 where a label has neither positives nor predictions (sklearn's zero_division=0)."""
    pred = probs[None] >= thresholds.view(-1, 1, 1).to(probs)
    pos = target.bool()[None]
    tp = (pred & pos).sum(1).double()
    denom = 2 * tp + (pred & ~pos).sum(1) + (~pred & pos).sum(1)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def au_metrics(probs: torch.Tensor, target: torch.Tensor, tune: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, float]:
    """FMAE-IAT's AU-detection numbers for sigmoid outputs probs (N, A) and multi-hot targets (N, A):
    f1_at_0.5 (mean over AUs at threshold 0.5, what the official code prints); f1_best_threshold and
    best_threshold (one global threshold swept over 0.01..0.99 on *these* targets, the number the official
    code returns: test-tuned); auc (mean per-AU ROC AUC, AUs with one class skipped); with tune = (probs,
    targets) of another split, f1_tuned_threshold: this split's F1 at the threshold best on that split (a
    clean protocol)."""
    from sklearn.metrics import roc_auc_score

    thresholds = torch.linspace(0.01, 0.99, 99)
    mean_f1 = multilabel_f1(probs, target, thresholds).mean(1)
    best = int(mean_f1.argmax())
    out = {
        "f1_at_0.5": float(multilabel_f1(probs, target, torch.tensor([0.5])).mean()),
        "f1_best_threshold": float(mean_f1[best]),
        "best_threshold": float(thresholds[best]),
    }
    aucs = [roc_auc_score(target[:, a].numpy(), probs[:, a].numpy()) for a in range(target.shape[1])
            if 0 < target[:, a].sum() < len(target)]
    out["auc"] = float(sum(aucs) / len(aucs)) if aucs else float("nan")
    if tune is not None:
        t = thresholds[int(multilabel_f1(*tune, thresholds).mean(1).argmax())]
        out["f1_tuned_threshold"] = float(multilabel_f1(probs, target, t.view(1)).mean())
        out["tuned_threshold"] = float(t)
    return out


class AUF1:
    """Evaluator for a multi-label task head (objective.terms.task.kind=bce, multi-hot batch[label_key]):
    au_metrics of sigmoid(outputs[pred_key]) on the val split, with the threshold also tuned on `tune_split`
    (the train split by default; null: skip) for the clean protocol."""

    def __init__(self, pred_key: str = "logits", label_key: str = "y", tune_split: str | None = "train"):
        self.pred_key, self.label_key, self.tune_split = pred_key, label_key, tune_split

    @torch.no_grad()
    def _outputs(self, ctx, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        probs, targets = [], []
        for batch in ctx.batches(split, f"AU F1 ({split})"):
            out = ctx.model(batch)
            if self.pred_key not in out:
                raise KeyError(f"AUF1: the model's outputs have no {self.pred_key!r} (has {sorted(out)})")
            probs.append(out[self.pred_key].float().sigmoid().cpu())
            targets.append(batch[self.label_key].cpu())
        probs, targets = torch.cat(probs), torch.cat(targets)
        if targets.shape != probs.shape:
            raise ValueError(f"AUF1 needs multi-hot {self.label_key!r} of the head's shape {tuple(probs.shape)}, got "
                             f"{tuple(targets.shape)} (single-label data: use HeadAccuracy)")
        return probs, targets

    def __call__(self, ctx) -> dict[str, float]:
        tune = self._outputs(ctx, self.tune_split) if self.tune_split else None
        return au_metrics(*self._outputs(ctx, "val"), tune=tune)


class AUF1Monitor(pl.Callback):
    """After every validation, the AU-detection numbers of the multi-label task head on the val split (as AUF1,
    without a tuning split) logged as val/au/<name>: f1_at_0.5, f1_best_threshold, best_threshold, auc. A
    ModelCheckpoint on val/au/f1_best_threshold then keeps the best epoch by F1 (callbacks=au_f1 adds both):
    on the test fold that is the official code's selection (test-tuned, "paper protocol"), on a held-out
    validation split a clean one. Costs one more forward pass over the val split per validation."""

    def __init__(self, pred_key: str = "logits", label_key: str = "y", batch_size: int = 256):
        self.metric = AUF1(pred_key, label_key, tune_split=None)
        self.batch_size = batch_size

    def on_fit_start(self, trainer, pl_module):
        # fail before the first epoch rather than at its end
        batch = next(iter(trainer.datamodule.eval_dataloader("val", 2)))
        label_key = self.metric.label_key
        if label_key not in batch or batch[label_key].ndim != 2:
            got = tuple(batch[label_key].shape) if label_key in batch else f"no {label_key!r} (has {sorted(batch)})"
            raise ValueError(f"callbacks=au_f1 needs multi-hot labels batch[{label_key!r}] of shape (B, num_AUs); this "
                             f"data gives {got}. Single-label data: drop callbacks=au_f1")

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        ctx = EvalContext(model=pl_module.model, datamodule=trainer.datamodule, device=pl_module.device,
                          batch_size=self.batch_size, max_samples=None)
        pl_module.log_dict({f"val/au/{k}": v for k, v in self.metric(ctx).items()})
