"""CPU proof for FMAE-IAT on a real task/identity pair: FSDD spoken digits (task) vs speakers (identity).

1. FMAE step: MAE pretraining of the Bird-MAE CPU preset on FSDD (or --pretrained <state_dict .pt>).
2. Fine-tune from the same weights and seed for every lambda: lambda = 0 (plain FMAE fine-tuning) and
   lambda > 0 (IAT).
3. On the frozen fine-tuned features: linear probes for the digit and for the speaker, plus the model's own
   head accuracies. IAT's claim: the speaker probe's accuracy drops while the digit accuracy holds.

--split recording (default): the official FSDD split (recordings 0-4 of every speaker/digit = val); all
  probes train on the train split and test on val (same speakers, other recordings).
--split speaker (identity-exclusive, as the method card's CPU reproduction asks): fine-tuning sees only
  the official-train recordings of the speakers other than --held-speaker. Digit accuracy (head and probe)
  is measured on every clip of the unseen held-out speaker; the speaker probe trains on the fine-tuning
  clips and tests on the held-out (official-test) recordings of the training speakers.

Knobs beyond the paper's defaults: --id-head mlp (the paper's ID-head ablation), --id-loss ce (softmax CE
instead of the official BCE on one-hot), --id-lr-mult, --id-steps and --adversary confusion (aeforge additions:
identity-head lr multiplier, identity-head updates per backbone update, the confusion loss instead of the GRL).

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_iat.py --lambdas 0 1 --epochs 6
Prints one JSON object."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from proof_common import build_parts, compose, evaluate, fit, fit_module


def _subset(ds, mask):
    from aeforge.data.audio import WaveformDataset

    return WaveformDataset(ds.wave[mask], {k: v[mask] for k, v in ds.labels.items()})


def _cat(a, b):
    import torch

    from aeforge.data.audio import WaveformDataset

    return WaveformDataset(torch.cat([a.wave, b.wave]), {k: torch.cat([a.labels[k], b.labels[k]]) for k in a.labels})


def _with_sets(dm, train_set, val_set):
    out = copy.copy(dm)
    out.train_set, out.val_set = train_set, val_set
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", default="/tmp/aeforge-proof/bird_mae_fsdd.pt")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--blr", type=float, default=None, help="override optim.blr (paper: 5e-4)")
    ap.add_argument("--split", choices=["recording", "speaker"], default="recording")
    ap.add_argument("--held-speaker", type=int, default=5)
    ap.add_argument("--id-head", choices=["linear", "mlp"], default="linear")
    ap.add_argument("--id-loss", choices=["bce_onehot", "ce"], default="bce_onehot")
    ap.add_argument("--id-lr-mult", type=float, default=1.0, help="aeforge addition; 1 = the paper")
    ap.add_argument("--id-steps", type=int, default=1, help="aeforge addition; 1 = the paper")
    ap.add_argument("--adversary", choices=["grl", "confusion"], default="grl", help="confusion: aeforge addition")
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--skip-pretrained-eval", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every fine-tuning run")
    args = ap.parse_args()

    import torch

    from aeforge.eval.heads import HeadAccuracy
    from aeforge.eval.keyed_probe import KeyedLinearProbe

    result: dict = {"config": vars(args)}
    path = Path(args.pretrained)
    dm = None
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        result["pretrain"] = f"loaded {path}"
    else:
        cfg = compose(
            [
                "experiment=bird_mae_fsdd",
                f"trainer.max_epochs={args.pretrain_epochs}",
                f"seed={args.seeds[0]}",
                f"optim.warmup_epochs={max(1.0, 0.09375 * args.pretrain_epochs)}",
            ]
        )
        mae, _, seconds = fit(cfg)
        state = mae.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        result["pretrain"] = f"{args.pretrain_epochs} epochs, {seconds:.0f} s"

    digit_probe = KeyedLinearProbe(label_key="y", epochs=args.probe_epochs, lr=1e-2)
    speaker_probe = KeyedLinearProbe(label_key="speaker", epochs=args.probe_epochs, lr=1e-2)
    base = compose(["experiment=fmae_iat_finetune", f"seed={args.seeds[0]}"])
    dm, model, _ = build_parts(base, dm)  # official recording split
    num_ids = dm.num_speakers
    if args.split == "speaker":
        h = args.held_speaker
        tr, va = dm.train_set, dm.val_set
        ft_train = _subset(tr, tr.labels["speaker"] != h)
        unseen = _cat(_subset(tr, tr.labels["speaker"] == h), _subset(va, va.labels["speaker"] == h))
        seen_heldout = _subset(va, va.labels["speaker"] != h)
        # speakers above h shift down by one so the identity head has exactly the training speakers
        for ds in (ft_train, seen_heldout):
            s = ds.labels["speaker"]
            ds.labels["speaker"] = torch.where(s > h, s - 1, s)
        num_ids -= 1
        dm_task = _with_sets(dm, ft_train, unseen)  # fine-tuning data; val = the unseen speaker
        dm_spk = _with_sets(dm, ft_train, seen_heldout)
        result["sizes"] = {"finetune": len(ft_train), "unseen": len(unseen), "speaker_probe_val": len(seen_heldout)}
    else:
        dm_task = dm_spk = dm

    def measure(m) -> dict:
        if dm_task is dm_spk:
            heads = HeadAccuracy({"logits": "y", "id_logits": "speaker"})
            return evaluate(m, dm, {"digit_probe": digit_probe, "speaker_probe": speaker_probe, "heads": heads})
        out = evaluate(m, dm_task, {"digit_probe": digit_probe, "heads": HeadAccuracy({"logits": "y"})})
        spk_heads = HeadAccuracy({"id_logits": "speaker"})
        out.update(evaluate(m, dm_spk, {"speaker_probe": speaker_probe, "heads": spk_heads}))
        return out

    if not args.skip_pretrained_eval:
        model.load_encoder(state)
        result["pretrained_features"] = measure(model)
    confusion_kind = "ce" if args.id_loss == "ce" else "bce"
    keys = ("digit_probe/acc", "speaker_probe/acc", "heads/logits_acc", "heads/id_logits_acc")
    for seed in args.seeds:
        for lam in args.lambdas:
            cfg = compose(
                [
                    "experiment=fmae_iat_finetune",
                    f"seed={seed}",
                    f"model.grl_lambda={lam}",
                    f"model.num_identities={num_ids}",
                    f"model.id_head={args.id_head}",
                    f"objective.terms.identity.kind={args.id_loss}",
                    f"module.id_head_lr_mult={args.id_lr_mult}",
                    f"module.id_head_steps={args.id_steps}",
                    f"model.adversary={args.adversary}",
                    *(["objective=fmae_iat_confusion", f"objective.terms.confusion.kind={confusion_kind}"]
                      if args.adversary == "confusion" else []),
                    f"trainer.max_epochs={args.epochs}",
                    *([f"optim.blr={args.blr}"] if args.blr else []),
                    *args.set,
                ]
            )
            _, model, module = build_parts(cfg, dm_task)
            model.load_encoder(state)
            seconds = fit_module(cfg, module, dm_task)
            metrics = {k: v for k, v in measure(model).items() if k in keys}
            metrics["finetune_seconds"] = round(seconds, 1)
            result[f"seed_{seed}/lambda_{lam:g}"] = metrics
            print(json.dumps({f"seed_{seed}/lambda_{lam:g}": metrics}), flush=True)
    if len(args.lambdas) >= 2:
        lo, hi = f"lambda_{args.lambdas[0]:g}", f"lambda_{args.lambdas[-1]:g}"
        for seed in args.seeds:
            a, b = result[f"seed_{seed}/{lo}"], result[f"seed_{seed}/{hi}"]
            result[f"seed_{seed}/change"] = {
                "speaker_probe_drop": round(a["speaker_probe/acc"] - b["speaker_probe/acc"], 4),
                "digit_probe_change": round(b["digit_probe/acc"] - a["digit_probe/acc"], 4),
                "digit_head_change": round(b["heads/logits_acc"] - a["heads/logits_acc"], 4),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
