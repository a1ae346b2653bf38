"""CPU proof of AriEL (card 9) against its sentence-autoencoder baselines, under one evaluator
(eval=text_generation), through the real pipeline (aeforge.train.run, as train.py runs it):

    python scripts/proof_ariel.py                                  # toy grammar + Tiny Shakespeare, seed 0
    python scripts/proof_ariel.py --corpora toy_grammar --models ariel text_vae --seeds 0 1 --epochs 5

Each run is `experiment=text_ae_<corpus> model=<m> seed=<s> trainer.max_epochs=<epochs>`; 1,000 codes are drawn
from each model's prior (AriEL: U[0,1]^16; VAE: N(0, I); AE / transformer AE: the bounding box of their training
codes), decoded and scored. Prints one JSON object: per corpus, per model, the text_generation/* metrics, the
final val/ce and the wall time."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

MODELS = ["ariel", "text_ae", "text_vae", "text_transformer_ae"]
CORPORA = ["toy_grammar", "tinyshakespeare"]


def run_one(corpus: str, model: str, seed: int, epochs: int, out: Path) -> dict:
    import torch

    from aeforge.compose import compose_config
    from aeforge.train import run

    torch.set_num_threads(1)
    overrides = [f"experiment=text_ae_{corpus}", f"model={model}", f"seed={seed}", f"trainer.max_epochs={epochs}",
                 "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", "callbacks=none",
                 "logger=none"]
    run_dir = out / f"{corpus}_{model}_{seed}"
    cfg = compose_config(overrides, output_dir=run_dir, task_name=f"proof_{corpus}_{model}")
    t0 = time.time()
    run(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keep = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items() if k.startswith("text_generation/")}
    keep["val_ce"] = round(metrics.get("val/ce", float("nan")), 4)
    keep["seconds"] = round(time.time() - t0, 1)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", nargs="+", default=CORPORA, choices=CORPORA)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    results: dict = {"epochs": args.epochs, "seeds": args.seeds, "samples": 1000}
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in args.corpora:
            for model in args.models:
                for seed in args.seeds:
                    r = run_one(corpus, model, seed, args.epochs, Path(tmp))
                    results.setdefault(corpus, {}).setdefault(model, {})[str(seed)] = r
                    print(json.dumps({corpus: {model: {seed: r}}}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
