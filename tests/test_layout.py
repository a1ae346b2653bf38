"""The house rules that keep the code walkable: the package tree mirrors the config tree (a `_target_` in
conf/<group>/ resolves inside that group's home), aeforge/models/ holds models only, files stay short."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, OmegaConf

from aeforge.config import CONF_DIR, _target

ROOT = Path(__file__).resolve().parents[1]

# group -> where its `_target_`s may point (aeforge's home for the role, or the library that provides it)
HOMES = {
    "model": ("aeforge.models.",),
    "data": ("aeforge.data.",),
    "objective": ("aeforge.objectives.",),
    "module": ("aeforge.modules.",),
    "optim": ("aeforge.modules.optim.",),
    "eval": ("aeforge.eval.",),
    "callbacks": ("aeforge.callbacks.", "pytorch_lightning.callbacks."),
    "stages": ("aeforge.stages.",),
    "masking": ("aeforge.nn.masking.",),
    "teacher": ("aeforge.targets.",),
    "tokenizer": ("aeforge.targets.",),
    # a GAN loss term's network (objective.terms.<gan>.discriminator): a shared block, or a frozen feature net
    "discriminator": ("aeforge.nn.", "aeforge.targets."),
    "trainer": ("pytorch_lightning.", "aeforge.strategies."),
    "strategy": ("pytorch_lightning.strategies.", "aeforge.strategies."),
    "logger": ("pytorch_lightning.loggers.",),
    "sweeper": ("hydra_plugins.",),
    "sampler": ("optuna.samplers.",),
    "launcher": ("hydra_plugins.",),
}
GLOBAL_GROUPS = {"experiment", "debug", "hparams_search", "local"}  # `# @package _global_` files


def _targets(node, path: tuple[str, ...]):
    """(key path, _target_) of every node below `node`."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, str(node._get_node("_target_")._value())
        for key in node.keys():
            yield from _targets(node._get_node(key), (*path, str(key)))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _targets(item, (*path, str(i)))


def _group_of(file_group: str, path: tuple[str, ...]) -> str:
    """The innermost group a node belongs to: a key that names a group (model.masking -> masking), else the
    group of the file (or, in a global file, its top-level key)."""
    keys = path if file_group in GLOBAL_GROUPS or file_group == "hydra" else (file_group, *path)
    for key in reversed(keys):
        if key in HOMES:
            return key
    return file_group


def conf_targets() -> list[tuple[str, str, str]]:
    found = []
    for file in sorted(CONF_DIR.rglob("*.yaml")):
        file_group = file.relative_to(CONF_DIR).parts[0] if len(file.relative_to(CONF_DIR).parts) > 1 else "root"
        for path, target in _targets(OmegaConf.load(file), ()):
            if target.startswith("${"):
                continue
            found.append((str(file.relative_to(ROOT)), _group_of(file_group, path), target))
    return found


def test_every_target_lives_in_its_groups_home():
    wrong = [f"{file}: {group} -> {target} (home: {HOMES.get(group)})"
             for file, group, target in conf_targets()
             if group in HOMES and not target.startswith(HOMES[group]) and not target.startswith("tests.")]
    assert wrong == []
    unknown = sorted({group for _, group, _ in conf_targets() if group not in HOMES})
    assert unknown == [], f"groups without a home in HOMES: {unknown}"


@pytest.mark.parametrize("target", sorted({t for _, _, t in conf_targets()}))
def test_every_target_imports(target):
    if target.startswith(("hydra_plugins.", "optuna.")):
        pytest.importorskip(target.split(".")[0])
    assert _target(target) is not None


def test_models_folder_holds_models_only():
    import aeforge.models

    roles = (pl.LightningModule, pl.LightningDataModule, pl.Callback)
    misplaced = []
    for info in pkgutil.iter_modules(aeforge.models.__path__):
        module = importlib.import_module(f"aeforge.models.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, roles):
                misplaced.append(f"{module.__name__}.{name}")
    assert misplaced == [], "LightningModules go to aeforge/modules, DataModules to data, callbacks to callbacks"


def test_files_stay_short():
    long = []
    for file in sorted((ROOT / "aeforge").rglob("*.py")):
        text = file.read_text()
        if text.count("\n") > 500 and not text.startswith("# long because"):
            long.append(f"{file.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long == [], "split by role, or say why at the top: '# long because ...'"


def test_tests_do_not_patch_sys_path():
    offenders = [p.name for p in (ROOT / "tests").glob("*.py") if "sys.path.insert" in p.read_text()
                 and p.name != Path(__file__).name]
    assert offenders == [], "import through the package (pytest's pythonpath has the repo root)"
