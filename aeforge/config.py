"""Checks that run on the composed config before anything is built or computed.

- every `_target_` node: keys must be constructor arguments, values of the annotated simple types;
- the model's modality must match the DataModule's (with the compatible choices named).
"""

from __future__ import annotations

import importlib.util
import inspect
import types
import typing
from pathlib import Path

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# conf/ at the repository root, shipped as the package aeforge.conf (pyproject.toml maps it): resolve it
# through the import system so a checkout, an editable install and a wheel all find it
CONF_DIR = Path(importlib.util.find_spec("aeforge.conf").submodule_search_locations[0])


class ConfigError(ValueError):
    """The composed config is invalid; the message names the key and the valid choices."""


def _target(path: str):
    try:
        return get_class(path)
    except Exception:
        return get_method(path)


def _params(obj) -> tuple[dict[str, inspect.Parameter], bool]:
    """Constructor parameters, following **kwargs up the class hierarchy. Returns (params, open_ended)."""
    params: dict[str, inspect.Parameter] = {}
    classes = inspect.getmro(obj) if inspect.isclass(obj) else [obj]
    for cls in classes:
        fn = cls.__init__ if inspect.isclass(cls) else cls
        if inspect.isclass(cls) and "__init__" not in vars(cls):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        var_kw = False
        for name, p in sig.parameters.items():
            if name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
                continue
            params.setdefault(name, p.replace(annotation=hints.get(name, p.annotation)))
        if not var_kw:
            return params, False
        if cls is object or not inspect.isclass(obj):
            return params, True
    return params, True


def _type_ok(value, ann) -> bool:
    if ann is inspect.Parameter.empty or ann is typing.Any:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if value is None:
        return False
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann in (bool, str):
        return isinstance(value, ann)
    if origin in (list, tuple) or ann in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict or ann is dict:
        return isinstance(value, (dict, DictConfig))
    return True  # objects, callables, tensors...: instantiate checks them


def target_params(path: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """Constructor parameters of the class or function a `_target_` names, and whether it takes **kwargs."""
    return _params(_target(path))


def check_targets(cfg: DictConfig, where: str = "", injected: frozenset = frozenset()) -> None:
    """Recursively validate `_target_` nodes of `cfg` (a node of the composed config)."""
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            if isinstance(item, (DictConfig, ListConfig)):
                check_targets(item, f"{where}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    target = cfg.get("_target_") if "_target_" in cfg else None
    if target is not None:
        try:
            obj = _target(target)
        except Exception as e:
            raise ConfigError(f"{where or 'config'}._target_={target!r} cannot be imported: {e}") from e
        params, open_ended = _params(obj)
        keys = [k for k in cfg.keys() if k not in HYDRA_KEYS]
        if not open_ended:
            unknown = [k for k in keys if k not in params]
            if unknown:
                valid = sorted(k for k in params if k not in injected)
                raise ConfigError(
                    f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} for {target}; valid keys: {valid}"
                )
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for k in keys:
            node = cfg._get_node(k)
            if isinstance(node, (DictConfig, ListConfig)) or k not in params:
                continue
            value = resolved[k]
            if not _type_ok(value, params[k].annotation):
                raise ConfigError(
                    f"{where}.{k}={value!r} has the wrong type for {target}: expected {params[k].annotation}"
                )
    for k in cfg.keys():
        node = cfg._get_node(k)
        if isinstance(node, (DictConfig, ListConfig)):
            check_targets(node, f"{where}.{k}" if where else str(k))


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _modality_of(node) -> str | None:
    try:
        return getattr(_target(node["_target_"]), "modality", None)
    except Exception:
        return None


def check_compatibility(cfg: DictConfig, choices: dict | None = None) -> None:
    """Fail before any compute when the model needs another kind of data than the DataModule gives."""
    model_mod, data_mod = _modality_of(cfg.model), _modality_of(cfg.data)
    if model_mod is None or data_mod is None or model_mod == data_mod:
        return
    choices = choices or {}
    compatible = []
    for name in group_choices("data"):
        node = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
        if "_target_" not in node and "defaults" in node:  # a variant of another data config
            node = OmegaConf.load(CONF_DIR / "data" / f"{node.defaults[0]}.yaml")
        if "_target_" in node and _modality_of(node) == model_mod:
            compatible.append(name)
    raise ConfigError(
        f"model={choices.get('model', cfg.model._target_)} ({cfg.model._target_}) needs {model_mod} data, but "
        f"data={choices.get('data', cfg.data._target_)} ({cfg.data._target_}) provides {data_mod} data. "
        f"Data choices for this model: {compatible or 'none shipped'}"
    )
