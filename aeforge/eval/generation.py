"""Generation and reconstruction quality (`eval=generation`): FID / IS / precision-recall of samples (gFID) and of
reconstructions (rFID), PSNR / SSIM of reconstructions, and how often samples show the class they were
conditioned on.

Feature networks:
- **Inception** (`features=inception|both`, or `auto` with `inception_weights`): torch-fidelity's FID Inception-v3
  (the TF-ported `pt_inception-2015-12-05` weights) read from `inception_weights=<path>` — nothing is downloaded.
  Keys: fid, is, precision, recall, rfid, ….
- **Proxy** (`features=proxy|both`, or `auto` without weights — the offline default): a small CNN classifier
  trained here, seeded, on the real training split of the same data (cached in `cache_dir` when given). FID /
  IS / PR on its penultimate features and softmax are NOT comparable with published Inception numbers; every
  such key ends in `_proxy` (fid_proxy, is_proxy, precision_proxy, recall_proxy, rfid_proxy,
  class_acc_proxy, real_acc_proxy).

The generative-model contract: `model.sample(n, labels, guidance, steps, generator) -> (n, C, H, W)` in [-1, 1]
(pixel space, decoded). A class-conditional model exposes `num_classes` (int); it then gets balanced labels
0..K−1 and `class_acc_proxy` is the share of samples the proxy classifier reads as their label (`real_acc_proxy`:
the classifier on real val images, the ceiling; `chance` = 1/K). A model without `sample` gets the
reconstruction metrics only; one without `reconstruct` the sample metrics only. Images only (a 5-D video
dataset is skipped with a message). The real images are the DataModule's, denormalised to [0, 1]; gFID is
measured against `reference_split` (train, as ImageNet gFID), rFID on the val split."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from aeforge.checkpoints import load_checkpoint
from aeforge.eval.skips import skipped

log = logging.getLogger(__name__)
FEATURES = ("auto", "inception", "proxy", "both")


class ProxyClassifier(nn.Module):
    """[0, 1] images → stride-2 conv/BN/ReLU stack → `dim`-wide ReLU features → class logits."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, channels: list[int], dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, h, w = shape
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
            c, h, w = ch, (h + 1) // 2, (w + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (torch-fidelity's statistics and formula)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    sa, sb = (fid_features_to_statistics(f.double().cpu()) for f in (a, b))
    return float(fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"])


def inception_score(logits: torch.Tensor, splits: int = 1) -> float:
    from torch_fidelity.metric_isc import isc_features_to_metric

    return float(isc_features_to_metric(logits.cpu(), splits=splits)["inception_score_mean"])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 k-NN manifold precision / recall (torch-fidelity's implementation)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    p, r = calculate_precision_recall_full(fake.float().cpu(), real.float().cpu(), neighborhood=k)
    return float(p), float(r)


class _Inception:
    """torch-fidelity's FID Inception-v3 from a local weights file: `(feats 2048, logits)` of [0, 1] images."""

    def __init__(self, weights: str, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # checked through the one safe loader first: torch-fidelity itself unpickles with weights_only=False
        load_checkpoint(weights, what="eval generation inception_weights")
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
        ).to(device)

    @torch.no_grad()
    def __call__(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)
        feats, logits = self.net((x01.clamp(0, 1) * 255).round().to(torch.uint8))
        return feats.float(), logits.float()


class _Proxy:
    def __init__(self, clf: ProxyClassifier):
        self.clf = clf

    @torch.no_grad()
    def __call__(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.clf.features(x01.float())
        return f, self.clf.head(f)


class GenerationMetrics:
    def __init__(
        self,
        num_samples: int = 10000,
        steps: int = 50,
        guidance: float = 1.0,
        features: str = "auto",
        inception_weights: str | None = None,
        reference_split: str = "train",
        proxy_epochs: int = 5,
        proxy_channels: list[int] = (32, 64, 128),
        proxy_dim: int = 128,
        proxy_lr: float = 1e-3,
        proxy_batch_size: int = 128,
        cache_dir: str | None = None,
        prc_k: int = 3,
        seed: int = 0,
        grid: int = 64,
        out_dir: str | None = None,
    ):
        if features not in FEATURES:
            raise ValueError(f"eval generation features={features!r}; valid: {list(FEATURES)}")
        if features == "inception" and inception_weights is None:
            raise ValueError("eval generation features=inception needs inception_weights=<path to the "
                             "pt_inception-2015-12-05 weights>; offline, use features=proxy")
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise ValueError(f"eval generation inception_weights={inception_weights!r}: no such file")
        if reference_split not in ("train", "val"):
            raise ValueError(f"eval generation reference_split={reference_split!r}; valid: ['train', 'val']")
        self.num_samples, self.steps, self.guidance = num_samples, steps, guidance
        self.features, self.inception_weights, self.reference_split = features, inception_weights, reference_split
        self.proxy_epochs, self.proxy_channels, self.proxy_dim = proxy_epochs, list(proxy_channels), proxy_dim
        self.proxy_lr, self.proxy_batch_size, self.cache_dir = proxy_lr, proxy_batch_size, cache_dir
        self.prc_k, self.seed, self.grid, self.out_dir = prc_k, seed, grid, out_dir

    # -- real data ----------------------------------------------------------------------------------
    def _real(self, ctx, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[0, 1] images of `split` (and labels), the first `limit` (default num_samples; also capped by
        eval.max_samples)."""
        limit = self.num_samples if limit is None else limit
        key = ("generation_real", split, limit)
        if key not in ctx.cache:
            xs, ys, seen = [], [], 0
            for batch in ctx.batches(split, f"real images ({split})"):
                xs.append(ctx.datamodule.denormalize(batch["x"].float()).clamp(0, 1).cpu())
                if "y" in batch:
                    ys.append(batch["y"].cpu())
                seen += len(xs[-1])
                if seen >= limit:
                    break
            x = torch.cat(xs)[:limit] if xs else torch.empty(0)
            ctx.cache[key] = (x, torch.cat(ys)[: len(x)] if ys else None)
        return ctx.cache[key]

    # -- the proxy classifier -------------------------------------------------------------------------
    def _cache_file(self, x: torch.Tensor, y: torch.Tensor, k: int) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256()
        h.update(repr((tuple(x.shape), k, self.seed, self.proxy_epochs, self.proxy_channels, self.proxy_dim,
                       self.proxy_lr, self.proxy_batch_size)).encode())
        h.update((x[:: max(len(x) // 256, 1)] * 255).round().to(torch.uint8).numpy().tobytes())
        h.update(y.numpy().tobytes())
        return Path(self.cache_dir) / f"proxy_classifier_{h.hexdigest()[:16]}.pt"

    def proxy_classifier(self, ctx) -> ProxyClassifier | None:
        """Trained on the whole train split (up to eval.max_samples), not only num_samples images."""
        x, y = self._real(ctx, "train", limit=ctx.max_samples or 10**9)
        k = getattr(ctx.datamodule, "num_classes", None)
        if y is None or not k:
            return None
        clf = ProxyClassifier(tuple(x.shape[1:]), k, self.proxy_channels, self.proxy_dim)
        path = self._cache_file(x, y, k)
        if path is not None and path.is_file():
            clf.load_state_dict(load_checkpoint(path, what="eval generation proxy classifier cache"))
            log.info("generation: proxy classifier from cache %s", path)
            return clf.to(ctx.device).eval()
        with torch.random.fork_rng(devices=[]):  # training the proxy does not move the run's RNG
            torch.manual_seed(self.seed)
            clf = clf.to(ctx.device)
            opt = torch.optim.Adam(clf.parameters(), lr=self.proxy_lr)
            g = torch.Generator().manual_seed(self.seed)
            clf.train()
            with torch.enable_grad():
                for _ in range(ctx.epochs(self.proxy_epochs)):
                    for idx in torch.randperm(len(x), generator=g).split(self.proxy_batch_size):
                        loss = F.cross_entropy(clf(x[idx].to(ctx.device)), y[idx].to(ctx.device))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
        clf.eval()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({k_: v.cpu() for k_, v in clf.state_dict().items()}, tmp)
            tmp.replace(path)
        return clf

    def extractors(self, ctx) -> dict[str, object]:
        """suffix → feature function; "" is Inception, "_proxy" the proxy classifier."""
        out: dict[str, object] = {}
        use_inception = self.features in ("inception", "both") or (
            self.features == "auto" and self.inception_weights is not None)
        if use_inception:
            out[""] = _Inception(self.inception_weights, ctx.device)
        if self.features in ("proxy", "both") or (self.features == "auto" and not use_inception):
            clf = self.proxy_classifier(ctx)
            if clf is not None:
                out["_proxy"] = _Proxy(clf)
        return out

    # -- evaluation ---------------------------------------------------------------------------------
    @staticmethod
    def _embed(fn, x01: torch.Tensor, device, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for chunk in x01.split(bs):
            f, lg = fn(chunk.to(device))
            feats.append(f.cpu())
            logits.append(lg.cpu())
        return torch.cat(feats), torch.cat(logits)

    @torch.no_grad()
    def _reconstructions(self, ctx) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(ctx.device)
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(ctx.device)
        reals, recons, seen = [], [], 0
        for batch in ctx.batches("val", "reconstructions"):
            a = ctx.datamodule.denormalize(ctx.model.reconstruct(batch).float()).clamp(0, 1)
            b = ctx.datamodule.denormalize(batch["x"].float()).clamp(0, 1)
            if a.shape[-1] < 11:  # SSIM's 11x11 window
                a_s, b_s = (F.interpolate(t, size=11, mode="nearest") for t in (a, b))
            else:
                a_s, b_s = a, b
            psnr.update(a_s, b_s)
            ssim.update(a_s, b_s)
            reals.append(b.cpu())
            recons.append(a.cpu())
            seen += len(a)
            if seen >= self.num_samples:
                break
        return {"psnr": psnr.compute().item(), "ssim": ssim.compute().item()}, torch.cat(reals), torch.cat(recons)

    @torch.no_grad()
    def generate(self, ctx, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n samples in [0, 1] (cpu) and their labels (None for an unconditional model)."""
        k = getattr(ctx.model, "num_classes", None)
        labels = torch.arange(n) % k if isinstance(k, int) and k > 0 else None
        g = torch.Generator(device=ctx.device).manual_seed(self.seed)
        out = []
        for start in range(0, n, ctx.batch_size):
            m = min(ctx.batch_size, n - start)
            lab = labels[start:start + m].to(ctx.device) if labels is not None else None
            s = ctx.model.sample(m, lab, self.guidance, self.steps, g).float()
            out.append(((s.clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out), labels

    def __call__(self, ctx) -> dict[str, float]:
        who = type(self).__name__
        model = ctx.model
        if len(ctx.datamodule.input_shape) != 3:
            return skipped(who, f"images only; the data's input_shape is {tuple(ctx.datamodule.input_shape)}")
        has_sample, has_recon = hasattr(model, "sample"), hasattr(model, "reconstruct")
        if not (has_sample or has_recon):
            return skipped(who, f"{type(model).__name__} has neither sample() nor reconstruct()")
        n = self.num_samples if ctx.max_samples is None else min(self.num_samples, ctx.max_samples)
        extract = self.extractors(ctx)
        metrics: dict[str, float] = {}
        if not extract:
            metrics.update(skipped(who, "the data has no labels to train the proxy classifier on and no "
                                        "inception_weights were given", "fid"))
        if not has_sample:
            metrics.update(skipped(who, f"{type(model).__name__} has no sample()", "samples"))
        bs = ctx.batch_size
        if has_recon:
            rec_metrics, reals, recons = self._reconstructions(ctx)
            metrics.update(rec_metrics)
            for tag, fn in extract.items():
                fr, _ = self._embed(fn, reals, ctx.device, bs)
                fc, _ = self._embed(fn, recons, ctx.device, bs)
                metrics[f"rfid{tag}"] = fid_from_features(fc, fr)
        if has_sample:
            samples, labels = self.generate(ctx, n)
            ref, _ = self._real(ctx, self.reference_split)
            for tag, fn in extract.items():
                f_fake, logits = self._embed(fn, samples, ctx.device, bs)
                f_real, _ = self._embed(fn, ref, ctx.device, bs)
                metrics[f"fid{tag}"] = fid_from_features(f_fake, f_real)
                metrics[f"is{tag}"] = inception_score(logits)
                if min(len(f_fake), len(f_real)) > self.prc_k:
                    p, r = precision_recall(f_fake, f_real, self.prc_k)
                    metrics[f"precision{tag}"], metrics[f"recall{tag}"] = p, r
                if tag == "_proxy":
                    xv, yv = self._real(ctx, "val")
                    _, lv = self._embed(fn, xv, ctx.device, bs)
                    metrics["real_acc_proxy"] = (lv.argmax(1) == yv).float().mean().item()
                    metrics["chance"] = 1.0 / lv.shape[1]
                    if labels is not None:
                        metrics["class_acc_proxy"] = (logits.argmax(1) == labels).float().mean().item()
            metrics["num_samples"] = float(len(samples))
            self._save_grid(samples)
        return metrics

    def _save_grid(self, samples: torch.Tensor) -> None:
        if not self.out_dir or not self.grid:
            return
        from torchvision.utils import save_image

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        m = min(self.grid, len(samples))
        save_image(samples[:m], Path(self.out_dir) / "samples_grid.png", nrow=int(np.ceil(np.sqrt(m))), padding=2,
                   pad_value=1.0)
