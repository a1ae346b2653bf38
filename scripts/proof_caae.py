"""CPU proof for CAAE (card 8) on MNIST with the digit class as the condition: moving the condition moves
what a classifier reads from the output, while the reconstruction at the image's own condition holds.

Three runs, same data, seed, schedule and evaluator (aeforge/eval/conditional.py; its CNN classifier is
trained on the real training images, seeded):
  caae     E, G, D_z, D_img, the caae_mnist recipe's weights
  cond_ae  the same net and label input, adversarial weights 0 (a conditional AE: the ablation)
  ae       model=conv_ae, no condition at all (its output is the same at every target: the baseline)
Prints JSON: per run target/moved/own accuracy, chance, PSNR/SSIM at the own condition, seconds.
    .venv/bin/python scripts/proof_caae.py [--quick] [--seed 0]
The net is the recipe's layer types at a width the shared 2-core CPU trains in minutes (listed in OVERRIDES)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose, evaluate, fit  # noqa: E402

SMALL = ["data=mnist_subset", "data.mean=[0.5]", "data.std=[0.5]", "data.batch_size=100"]
CAAE_NET = ["model.latent_dim=16", "model.enc_channels=[16,32]", "model.gen_channels=[32,16]",
            "model.gen_tail_channels=[]", "model.dimg_channels=[8,16,32]", "model.dimg_hidden=64",
            # at the official lr 2e-4 with L1 the small net output all-background after 4 epochs (PSNR 9.9): the
            # proof uses lr 1e-3 and the paper's L2
            "optim.lr=1e-3", "objective.recon_loss=l2"]
RUNS = {
    "caae": ["experiment=caae_mnist", *CAAE_NET, "objective.adv_img=1e-3", "objective.adv_z=1e-2"],
    "cond_ae": ["experiment=caae_mnist", *CAAE_NET, "objective.adv_img=0", "objective.adv_z=0"],
    "ae": ["model=conv_ae", "eval=caae", "model.channels=[16,32]", "model.latent_dim=16", "optim.optimizer=adam",
           "optim.lr=1e-3", "optim.betas=[0.5,0.999]", "optim.schedule=constant"],
}
KEYS = ("target_acc", "moved_acc", "own_acc", "chance", "real_acc", "psnr", "ssim", "l1")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="2 epochs instead of 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS))
    args = p.parse_args(argv)
    epochs = 2 if args.quick else 4
    common = [*SMALL, f"seed={args.seed}", f"trainer.max_epochs={epochs}", "objective.pretrain_epochs=1",
              "eval.max_samples=2000"]
    out = {"seed": args.seed, "epochs": epochs, "pretrain_epochs": 1, "data": "mnist_subset (10k train / 2k test)",
           "runs": {}}
    for name in args.runs.split(","):
        overrides = [*common, *RUNS[name]]
        if name == "ae":
            overrides.remove("objective.pretrain_epochs=1")
        cfg = compose(overrides)
        model, dm, seconds = fit(cfg)
        from hydra.utils import instantiate

        evaluators = {k: instantiate(v) for k, v in cfg.eval.evaluators.items()}
        evaluators["conditional"].out_dir = f"/tmp/aeforge-proof/caae_{name}_seed{args.seed}"
        m = evaluate(model, dm, evaluators, max_samples=cfg.eval.max_samples)
        out["runs"][name] = {k: round(m[f"conditional/{k}"], 4) for k in KEYS} | {"fit_seconds": round(seconds, 1)}
        out["runs"][name]["grid"] = evaluators["conditional"].out_dir + "/conditional_grid.png"
        print(json.dumps({name: out["runs"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
