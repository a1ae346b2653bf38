"""compose -> check -> instantiate -> fit -> evaluate -> metrics.json; returns the optimised metric."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from aeforge.callbacks import AtomicCheckpointIO
from aeforge.callbacks.checkpointing import write_text_atomic
from aeforge.checkpoints import check_checkpoint, load_checkpoint, state_dict_of
from aeforge.cli import METRICS_LINE, RUN_DIR_ENV
from aeforge.config import ConfigError, check_compatibility, check_root, check_targets, target_params
from aeforge.data.sources import DataFileError
from aeforge.models.base import model_state_dict

log = logging.getLogger("aeforge")

# keys that train.py passes at instantiate time (not YAML knobs)
INJECTED = {
    "data": frozenset({"seed"}),
    "model": frozenset({"input_shape", "num_classes"}),
    "module": frozenset({"model", "objective", "optim", "num_classes", "feature_dim"}),
    "trainer": frozenset({"callbacks", "logger", "plugins", "use_distributed_sampler"}),
}


class _DropTips(logging.Filter):
    """Lightning advertises cloud services at every start ("💡 Tip: ..."): not a fact about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_console() -> None:
    """The default run's console: progress bar, run dir, metrics table, and warnings that concern the user."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    # Lightning's own call into torch's pytree API (not ours, nothing a user can change); fixed upstream
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def build(node, *args, **kwargs):
    """hydra.utils.instantiate, re-raising our own errors (bad data file, bad value) unwrapped so the
    user reads the message that names the problem rather than Hydra's wrapper."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        where = node._get_full_key(None) if isinstance(node, DictConfig) else ""
        # a constructor that refuses its arguments (ValueError, an assert, Lightning's MisconfigurationException)
        # is a config mistake: a ConfigError, one line in the CLI, with the node it came from
        if isinstance(cause, (AssertionError, MisconfigurationException)) or (
            isinstance(cause, ValueError) and not isinstance(cause, ConfigError)
        ):
            raise ConfigError(f"{where or node.get('_target_')}: {cause or type(cause).__name__}") from cause
        if isinstance(cause, OSError):  # a source the node names cannot be read (a file, a hub name offline)
            raise DataFileError(f"{where or node.get('_target_')}: {cause}") from cause
        if isinstance(cause, (ValueError, RuntimeError)):
            raise cause from None
        raise


def hydra_choices() -> dict:
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def model_inputs(node: DictConfig, datamodule) -> dict:
    """What the pipeline hands a model from the DataModule: its input shape, and the number of classes to a
    model whose constructor asks for it (SCGC sizes its cluster layer from it)."""
    inputs = {"input_shape": datamodule.input_shape}
    if "num_classes" in target_params(node._target_)[0]:
        inputs["num_classes"] = datamodule.num_classes
    return inputs


def trainer_config(cfg: DictConfig) -> DictConfig:
    """The trainer node to build. A smoke run in one process uses strategy `auto` (a one-process DDP would
    only add a process group); with several devices it keeps the chosen strategy (trainer=ddp / ddp_sites
    with trainer.devices=2 on CPU), except FSDP, which Lightning refuses on CPU: that falls back to `auto`."""
    node = cfg.trainer
    strategy = node.get("strategy")
    if not cfg.get("smoke") or strategy == "auto":
        return node
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    one_process = str(node.get("devices")) == "1" and int(node.get("num_nodes") or 1) == 1
    fsdp_on_cpu = node.get("accelerator") == "cpu" and "fsdp" in target.lower()
    if not (one_process or fsdp_on_cpu):
        return node
    if not one_process:
        log.warning("debug=smoke: FSDP needs a GPU; this smoke run uses trainer.strategy=auto instead")
    node = node.copy()
    node.strategy = "auto"
    return node


def validate(cfg: DictConfig) -> None:
    check_root(cfg)
    # masking, teacher and tokenizer reach the model through an interpolation (model.masking: ${masking}), which
    # check_targets does not follow: checked as groups of their own, where present
    optional = {"stages", "masking", "teacher", "tokenizer"}
    for group in ("data", "model", "objective", "optim", "trainer", "module", "eval", "callbacks", "logger", *optional):
        if group not in cfg and group not in optional:
            raise ConfigError(f"the config has no '{group}' group")
        node = cfg.get(group)
        if node is None:
            continue
        check_targets(node, group, INJECTED.get(group, frozenset()))
    if cfg.module.get("_partial_") is not True:  # run() passes the model, objective and optim to a partial
        raise ConfigError(f"module._partial_={cfg.module.get('_partial_')!r}: it must stay true")
    check_compatibility(cfg, hydra_choices())


def resume_checkpoint(cfg: DictConfig, out: Path) -> str | None:
    # resume=random (fit=false only): evaluate the untrained initialisation, asked for by name; without it
    # run() refuses fit=false with no checkpoint
    if cfg.resume is None or (str(cfg.resume) == "random" and not cfg.fit):
        return None
    if str(cfg.resume) == "auto":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resume=auto: continuing %s", last)
            check_checkpoint(last, what="resume=auto")  # a refused or broken file stops the run before building
            return str(last)
        log.info("resume=auto: no checkpoint under %s, starting a new run", out)
        return None
    path = Path(str(cfg.resume))
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file (use resume=auto or a .ckpt path)")
    check_checkpoint(path, what=f"resume={cfg.resume}")
    return str(path)


def init_from_checkpoint(model: torch.nn.Module, path: str) -> dict[str, int]:
    """Start `model` from the model weights of another run's checkpoint (`ckpt=`): the weights whose names and
    shapes match are copied; new submodules (a later stage's) keep their initialisation. A checkpoint sharing no
    weight with the model, or a weight of another shape, is an error naming the keys: it is the wrong file."""
    what = f"ckpt={path}"
    if not Path(path).is_file():
        raise ConfigError(f"{what}: no such checkpoint file")
    check_checkpoint(Path(path), what=what)
    state = model_state_dict(load_checkpoint(path, what=what))
    own = model.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise ConfigError(f"{what}: no weight of this model is in the checkpoint (model keys start "
                          f"{sorted(own)[:3]}, the checkpoint's {sorted(state)[:3]}): is it another model's run?")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    if bad:
        raise ConfigError(f"{what}: weights of another shape (checkpoint vs model): {bad[:5]}")
    model.load_state_dict({k: state[k] for k in shared}, strict=False)
    new = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    log.info("ckpt=%s: %d weights loaded; %d new in this model%s; %d of the checkpoint unused%s", path, len(shared),
             len(new), f" (e.g. {new[:3]})" if new else "", len(unused), f" (e.g. {unused[:3]})" if unused else "")
    return {"ckpt/loaded": len(shared), "ckpt/new": len(new), "ckpt/unused": len(unused)}


def make_loggers(cfg: DictConfig, out: Path, resuming: bool) -> list:
    loggers = []
    for node in (cfg.logger or {}).values():
        if node is None:
            continue
        if "WandbLogger" in node._target_:
            id_file = out / "wandb_id.txt"
            run_id = id_file.read_text().strip() if resuming and id_file.is_file() else uuid.uuid4().hex[:12]
            out.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
            loggers.append(build(node, id=run_id, resume="allow"))
        else:
            loggers.append(build(node))
    return loggers


@contextmanager
def ddp_children_reuse(out: Path):
    """Lightning starts DDP workers by re-running this command; they must land in this run dir and run
    this one job (not the whole sweep)."""
    old_argv = list(sys.argv)
    os.environ[RUN_DIR_ENV] = str(out)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *HydraConfig.get().overrides.task]
    try:
        yield
    finally:
        sys.argv = old_argv
        os.environ.pop(RUN_DIR_ENV, None)


def run_stages(cfg: DictConfig, model, datamodule, out: Path, resuming: bool) -> dict[str, float]:
    """The `stages` group: work done once before the first epoch. A resumed run skips them (the checkpoint holds
    what they produced) and reports the numbers they wrote to <run>/stages.json."""
    from aeforge.stages import StageContext

    record = out / "stages.json"
    if resuming:
        return json.loads(record.read_text()) if record.is_file() else {}
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    ctx = StageContext(run_dir=out, seed=int(cfg.seed), device=device)
    metrics: dict[str, float] = {}
    for name, node in (cfg.stages or {}).items():
        if node is None:
            continue
        log.info("stage %s", name)
        metrics.update(build(node)(model, datamodule, ctx) or {})
    if metrics:
        write_text_atomic(record, json.dumps(metrics, indent=2))
    return metrics


def print_table(metrics: dict[str, float], title: str) -> None:
    width = max([len(k) for k in metrics] + [10])
    print(f"\n{title}\n" + "-" * (width + 14))
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:>12.6g}")
    print("-" * (width + 14))


def run(cfg: DictConfig) -> float | None:
    try:
        return _run(cfg)
    finally:
        # left to exit-time destructors, gloo's threads can abort a rank that finished cleanly ("terminate
        # called without an active exception", exit -6: seen on a 2-rank CPU run)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: DictConfig) -> float | None:
    quiet_console()
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_checkpoint(cfg, out)

    datamodule = build(cfg.data, seed=cfg.seed)
    model = build(cfg.model, **model_inputs(cfg.model, datamodule))
    objective = build(cfg.objective)
    optim = build(cfg.optim)
    feature_dim = None
    if cfg.module.get("online_probe"):
        with torch.no_grad():
            feature_dim = model.encode({"x": torch.zeros(2, *datamodule.input_shape)}).shape[1]
    module = build(cfg.module)(
        model=model, objective=objective, optim=optim, num_classes=datamodule.num_classes, feature_dim=feature_dim
    )
    if cfg.ckpt is not None and ckpt_path is None:  # a resumed run's own checkpoint already holds the weights
        init_from_checkpoint(model, str(cfg.ckpt))
    if cfg.compile:
        model.compile()

    metrics_from_stages = run_stages(cfg, model, datamodule, out, resuming=ckpt_path is not None or not cfg.fit)

    callbacks = [build(c) for c in (cfg.callbacks or {}).values() if c is not None]
    loggers = make_loggers(cfg, out, resuming=ckpt_path is not None)
    trainer: pl.Trainer = build(
        trainer_config(cfg),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # aeforge loaders shard by rank themselves (and resume exactly)
    )
    if trainer.is_global_zero:
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run dir: %s | data: %s | model: %s (%.2fM params)", out, datamodule.describe(),
                 type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)

    metrics: dict[str, float] = dict(metrics_from_stages)
    t0 = time.time()
    if cfg.fit:
        with ddp_children_reuse(out):
            # weights_only: a checkpoint is data; read through AtomicCheckpointIO (aeforge/checkpoints.py)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if getattr(trainer, "preempted", None):
            log.warning("stopped by %s; continue with resume=auto", trainer.preempted)
            return None
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        metrics["fit_seconds"] = time.time() - t0
        metrics["epochs"] = trainer.current_epoch
        metrics["steps"] = trainer.global_step
    elif ckpt_path is not None:
        what = f"resume={ckpt_path}"
        module.load_state_dict(state_dict_of(load_checkpoint(ckpt_path, what=what), ckpt_path, what))
    elif str(cfg.resume) != "random":
        # evaluating random weights by accident reports numbers that look like a result
        raise ConfigError(f"fit=false with resume={cfg.resume}: no checkpoint to evaluate"
                          f"{' (resume=auto found none under ' + str(out) + ')' if cfg.resume else ''}. Give "
                          f"resume=<path to .ckpt>, or aeforge-eval ckpt=<path>, or resume=random to evaluate the "
                          f"untrained initialisation on purpose")
    # evaluation only, on several processes (torchrun scripts/evaluate.py): every rank evaluates (fine-tuning
    # shards its data over them) in the process group Lightning's strategy sets up; rank 0 reports
    sharded_eval = not cfg.fit and cfg.evaluate and cfg.eval is not None and trainer.world_size > 1
    if sharded_eval:
        if not trainer.strategy.cluster_environment.creates_processes_externally:  # nothing else would start them
            raise ConfigError(f"fit=false on {trainer.world_size} devices: evaluation starts no processes itself; "
                              f"launch it with torchrun --nproc_per_node=<devices> scripts/evaluate.py ... "
                              f"(or set trainer.devices=1)")
        trainer.strategy.setup_environment()
    if not trainer.is_global_zero and not sharded_eval:
        return None

    if cfg.evaluate and cfg.eval is not None:
        datamodule.setup("fit")
        evaluation = build(cfg.eval)
        # without fit the module never moved: evaluate on the trainer's device (fine-tuning wants the GPU)
        device = module.device if cfg.fit else trainer.strategy.root_device
        metrics.update(evaluation(module.model, datamodule, device, sharded=sharded_eval))
    if not trainer.is_global_zero:
        return None

    metrics.update(getattr(datamodule, "data_metrics", dict)())  # e.g. images skipped as undecodable
    metrics = {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and not k.startswith("loss")}
    print_table(metrics, f"{cfg.task_name}: final metrics")
    path = out / "metrics.json"
    write_text_atomic(path, json.dumps(metrics, indent=2))  # a crash mid-write leaves the old file, whole
    print(f"{METRICS_LINE}{path}")

    if cfg.optimized_metric is None:
        return None
    if cfg.optimized_metric not in metrics:
        msg = f"optimized_metric={cfg.optimized_metric!r} is not among the metrics: {sorted(metrics)}"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise ConfigError(msg)  # a sweep without its objective is wasted compute
        log.warning(msg)
        return None
    value = metrics[cfg.optimized_metric]
    return value if math.isfinite(value) else float("inf")
