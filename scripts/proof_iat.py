"""CPU proof for FMAE-IAT on a real task/identity pair: FSDD spoken digits (task) vs speakers (identity).

1. FMAE step: MAE pretraining of the Bird-MAE CPU preset on FSDD (or --pretrained <state_dict .pt>).
2. Fine-tune twice from the same weights and seed: lambda = 0 (plain FMAE fine-tuning) and lambda > 0 (IAT).
3. On the frozen fine-tuned features: linear probes for the digit and for the speaker (train split -> val
   split; same speakers, different recordings), plus the model's own head accuracies on val.
IAT's claim: the speaker probe's accuracy drops while the digit accuracy holds.

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_iat.py --lambdas 0 1 --epochs 6
Prints one JSON object."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from proof_common import build_parts, compose, evaluate, fit, fit_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", default="/tmp/aeforge-proof/bird_mae_fsdd.pt")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blr", type=float, default=None, help="override optim.blr (paper: 5e-4)")
    args = ap.parse_args()


    import torch

    from aeforge.models.fmae_iat import HeadAccuracy, KeyedLinearProbe

    result: dict = {"config": vars(args)}
    path = Path(args.pretrained)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        result["pretrain"] = f"loaded {path}"
        dm = None
    else:
        cfg = compose(
            [
                "experiment=bird_mae_fsdd",
                f"trainer.max_epochs={args.pretrain_epochs}",
                f"seed={args.seed}",
                f"optim.warmup_epochs={max(1.0, 0.09375 * args.pretrain_epochs)}",
            ]
        )
        mae, dm, seconds = fit(cfg)
        state = mae.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        result["pretrain"] = f"{args.pretrain_epochs} epochs, {seconds:.0f} s"

    probes = {
        "digit_probe": KeyedLinearProbe(label_key="y", epochs=100, lr=1e-2),
        "speaker_probe": KeyedLinearProbe(label_key="speaker", epochs=100, lr=1e-2),
    }
    base = compose(["experiment=fmae_iat_finetune", f"seed={args.seed}"])
    dm, model, _ = build_parts(base, dm)
    model.load_encoder(state)
    result["pretrained_features"] = evaluate(model, dm, probes)
    for lam in args.lambdas:
        cfg = compose(
            [
                "experiment=fmae_iat_finetune",
                f"seed={args.seed}",
                f"model.grl_lambda={lam}",
                f"trainer.max_epochs={args.epochs}",
                *([f"optim.blr={args.blr}"] if args.blr else []),
            ]
        )
        _, model, module = build_parts(cfg, dm)
        model.load_encoder(state)
        seconds = fit_module(cfg, module, dm)
        metrics = evaluate(
            model, dm, {**probes, "heads": HeadAccuracy({"logits": "y", "id_logits": "speaker"})}
        )
        metrics["finetune_seconds"] = round(seconds, 1)
        result[f"lambda_{lam:g}"] = metrics
    lams = [f"lambda_{lam:g}" for lam in args.lambdas]
    if len(lams) >= 2:
        a, b = result[lams[0]], result[lams[-1]]
        result["speaker_probe_drop"] = a["speaker_probe/acc"] - b["speaker_probe/acc"]
        result["digit_probe_change"] = b["digit_probe/acc"] - a["digit_probe/acc"]
        result["digit_head_change"] = b["heads/logits_acc"] - a["heads/logits_acc"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
