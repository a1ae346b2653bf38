"""Run any evaluation protocol (an `eval` config) on a trained checkpoint.

    aeforge-eval ckpt=logs/mae_mnist/runs/<time>/checkpoints/last.ckpt eval=finetune
    aeforge-eval ckpt=<run>/checkpoints/best.ckpt eval=finetune eval.evaluators.finetune.epochs=10
    aeforge-eval ckpt=/elsewhere/x.ckpt eval=default model=mae data=mnist_subset   # no run dir

(`python scripts/evaluate.py ...` is the same command; torchrun needs that script form.)

A thin layer over train.py. The run's composed config (`<run>/.hydra/config.yaml`, the run being the folder
above `checkpoints/`) gets its `eval` node replaced by the chosen `conf/eval/<choice>.yaml` and the
overrides applied, both by Hydra; then `aeforge.train.run` runs it with fit=false resume=<ckpt>, which
loads the weights and evaluates. A group choice in the overrides (data=..., trainer=..., debug=...)
replaces that node of the saved config; model/objective cannot change (the checkpoint fixes them).
A checkpoint with no run config next to it needs model=... data=... (as it was trained), composed from
the package defaults. Evaluation runs in one process on one device: trainer.accelerator=auto devices=1
num_nodes=1 strategy=auto compile=false unless overridden. Fine-tuning also runs on every GPU of torchrun's
processes (the trainer follows torchrun's layout, strategy=ddp; batch_size is per process):

    torchrun --nproc_per_node=8 scripts/evaluate.py ckpt=<run>/checkpoints/last.ckpt eval=finetune \
        eval.evaluators.finetune.batch_size=128        # the MAE ViT-B recipe's global batch 1024

Output: `<run>/eval_<choice>.json` (flat `name: value`, like metrics.json; its path is the last line
printed); run()'s own files (metrics.json, config_resolved.yaml, csv/) go to `<run>/eval/<choice>/`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from aeforge.compose import compose_config
from aeforge.config import CONF_DIR, group_choices

USAGE = "usage: aeforge-eval ckpt=<run>/checkpoints/<name>.ckpt eval=<choice> [overrides]"
# the checkpoint's weights were trained with these: choosing another config would not load them
FIXED_GROUPS = ("model", "objective", "experiment", "hparams_search")
# one process on one device, whatever layout the run trained with (8 GPUs x 4 nodes would not start here)
SINGLE_DEVICE = {"trainer.accelerator": "auto", "trainer.devices": 1, "trainer.num_nodes": 1,
                 "trainer.strategy": "auto", "compile": False}


def device_layout() -> dict:
    """One process on one device; under torchrun, the processes it started (one device each)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE_DEVICE
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {**SINGLE_DEVICE, "trainer.devices": per_node, "trainer.num_nodes": world // per_node,
            "trainer.strategy": "ddp"}


def fail(msg: str):
    raise SystemExit(f"evaluate: {msg}")


def parse_args(argv: list[str]) -> tuple[Path, str, list[str]]:
    ckpt = choice = None
    rest = []
    for arg in argv:
        if arg.startswith("ckpt="):
            ckpt = arg.split("=", 1)[1]
        elif arg.startswith("eval="):
            choice = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    valid = group_choices("eval")
    if ckpt is None:
        fail(f"no ckpt= given\n{USAGE}")
    path = Path(ckpt).expanduser()
    if not path.is_file():
        fail(f"ckpt={ckpt}: no such checkpoint file")
    if choice is None:
        fail(f"no eval= given; valid choices: {valid}\n{USAGE}")
    if choice not in valid:
        fail(f"eval={choice!r} is not an eval config (conf/eval/); valid choices: {valid}")
    return path.resolve(), choice, rest


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str], set[str]]:
    """(group choices such as data=cifar10_subset, the other overrides, every key the user set)."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    choices, others, keys = {}, [], set()
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        keys.add(o.key_or_group)
        if o.key_or_group in groups and not (o.is_add() or o.is_delete()) and o.package is None:
            choices[o.key_or_group] = str(o.value())
        else:
            others.append(text)
    return choices, others, keys


def compose_saved(run_dir: Path, choice: str, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The saved run config with eval (and any chosen group) recomposed from the package, overrides applied."""
    group_choice, others, _ = split_overrides(overrides)
    fixed = [g for g in FIXED_GROUPS if g in group_choice]
    if fixed:
        fail(f"{', '.join(f'{g}={group_choice[g]}' for g in fixed)}: the checkpoint was trained with the saved "
             f"{'/'.join(fixed)} config; change its keys instead (e.g. model.pool=mean)")
    node = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    saved_hydra = OmegaConf.load(hydra_file).hydra if hydra_file.is_file() else OmegaConf.create({})
    for g in ("eval", *group_choice):
        node.pop(g, None)  # replaced, not merged: a new eval group must not inherit the old evaluators
    node.defaults = ["_self_", {"eval": choice}, *({g: v} for g, v in group_choice.items())]
    node.hydra = {"searchpath": ["pkg://aeforge.conf", *saved_hydra.get("searchpath", [])]}
    with tempfile.TemporaryDirectory() as tmp:
        OmegaConf.save(node, Path(tmp) / "run.yaml")
        GlobalHydra.instance().clear()
        with initialize_config_dir(tmp, version_base="1.3"):
            cfg = compose("run", overrides=others, return_hydra_config=True)
    choices = dict(saved_hydra.get("runtime", {}).get("choices", {}))
    choices.update({"eval": choice, **group_choice})
    return cfg, choices


def compose_fresh(ckpt: Path, choice: str, overrides: list[str]) -> tuple[DictConfig, dict]:
    """No run config next to the checkpoint: the package config with the given model/data."""
    group_choice, _, _ = split_overrides(overrides)
    if "experiment" not in group_choice and not {"model", "data"} <= group_choice.keys():
        fail(f"{ckpt} has no run config next to it ({run_dir_of(ckpt) / '.hydra' / 'config.yaml'} is missing); "
             f"give the model and data it was trained with: model=... data=... (or experiment=...), plus any "
             f"other overrides of that run")
    cfg = compose_config([f"eval={choice}", *overrides], return_hydra_config=True)
    return cfg, dict(cfg.hydra.runtime.choices)


def build_config(ckpt: Path, choice: str, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The config train.run() gets, and the run dir; sets HydraConfig (the saved ${hydra:...} interpolations
    need the run's choices). The caller clears it after the run."""
    run_dir = run_dir_of(ckpt)
    if (run_dir / ".hydra" / "config.yaml").is_file():
        cfg, choices = compose_saved(run_dir, choice, overrides)
    else:
        cfg, choices = compose_fresh(ckpt, choice, overrides)
    out = run_dir / "eval" / choice
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.choices = choices
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    _, _, user_keys = split_overrides(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
        for key, value in device_layout().items():
            if key not in user_keys and OmegaConf.select(cfg, key, default=None) is not None:
                OmegaConf.update(cfg, key, value)
        cfg.fit, cfg.evaluate, cfg.resume, cfg.optimized_metric = False, True, str(ckpt), None
        cfg.paths.output_dir = str(out)
        try:
            str(cfg.task_name)
        except Exception:  # a run dir without .hydra/hydra.yaml: its choices (in task_name) are unknown
            cfg.task_name = "evaluate"
    return cfg, run_dir


def main(argv: list[str] | None = None) -> Path | None:
    ckpt, choice, overrides = parse_args(sys.argv[1:] if argv is None else list(argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from aeforge.checkpoints import CheckpointError
    from aeforge.train import run  # torch and Lightning only once the arguments are known to be good

    try:
        cfg, run_dir = build_config(ckpt, choice, overrides)
        run(cfg)
    except CheckpointError as e:  # a refused or broken file: one message naming it, not a traceback
        fail(str(e))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # rank 0 writes the results
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    path = run_dir / f"eval_{choice}.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"eval: {path}")
    return path


def cli() -> None:
    """The `aeforge-eval` console script (its exit status must not be main()'s returned path)."""
    main()


if __name__ == "__main__":
    main()
