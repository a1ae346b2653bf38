"""Evaluator of the prototype network (Li et al. 2018): test accuracy of the prototype classifier, the decoded
prototypes as an image grid (`prototypes.png` in the run dir), and which class each prototype stands for.

A prototype's class is the class the network predicts for its decoded image. (The paper reads it off W, whose
row is strongly negative at the prototype's own class after 1500 epochs, supplement Tables 4-5; after a few
CPU epochs W is not yet that clean: measured, its argmin disagreed with the decoded image for 9 of 15 prototypes.)
`classes_covered` counts the distinct classes so assigned (10 on MNIST = every digit has a prototype)."""

from __future__ import annotations

from pathlib import Path

import torch

from aeforge.eval.skips import skipped


class PrototypeNetEvaluation:
    def __init__(self, out_dir: str | None = None, filename: str = "prototypes.png", split: str = "val"):
        self.out_dir, self.filename, self.split = out_dir, filename, split

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model = ctx.model
        if not hasattr(model, "decode_prototypes"):
            return skipped(type(self).__name__, f"{type(model).__name__} has no prototypes to decode")
        correct = total = 0
        for batch in ctx.batches(self.split, "prototype accuracy"):
            if "y" not in batch:
                return skipped(type(self).__name__, "the data has no labels")
            correct += int((model(batch)["logits"].argmax(1) == batch["y"]).sum())
            total += len(batch["y"])
        images = model.decode_prototypes().float()
        # the decoder gives [0, 1] pixels; the encoder reads normalised inputs
        normalize = getattr(ctx.datamodule, "normalize", None)
        owner = model({"x": normalize(images) if normalize else images})["logits"].argmax(1).cpu()
        out = {"accuracy": correct / max(total, 1), "classes_covered": float(len(owner.unique()))}
        out.update({f"prototype_{j:02d}_class": float(c) for j, c in enumerate(owner.tolist())})
        if self.out_dir is not None:
            save_prototype_grid(images.cpu(), owner, Path(self.out_dir) / self.filename)
        return out


def save_prototype_grid(images: torch.Tensor, owner: torch.Tensor, path: Path, upscale: int = 2) -> Path:
    """The decoded prototypes in one row, sorted by their class, upscaled (nearest) for legibility."""
    from torchvision.utils import save_image

    order = torch.argsort(owner, stable=True)
    images = images[order].clamp(0, 1)
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=len(images), padding=2, pad_value=1.0)
    return path
