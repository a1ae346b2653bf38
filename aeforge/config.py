"""Checks that run on the composed config before anything is built or computed.

- every `_target_` node: keys must be constructor arguments, values of the annotated simple types;
- sizes, counts, rates and ratios must lie in their range (by parameter name, `RANGES`): a negative width is
  a torch traceback at build time, a batch size of 0 one at the first batch;
- top-level keys must be known and of their type (`+resum=auto` would otherwise be ignored silently);
- the model's modality must match the DataModule's (with the compatible choices named).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# conf/ at the repository root, shipped as the package aeforge.conf (pyproject.toml maps it): resolve it
# through the import system so a checkout, an editable install and a wheel all find it
CONF_DIR = Path(importlib.util.find_spec("aeforge.conf").submodule_search_locations[0])


class ConfigError(ValueError):
    """The composed config is invalid; the message names the key and the valid choices."""


# Ranges of numeric constructor arguments (and of the items of list ones), by name: the same knobs recur across
# constructors. Out of range they fail later as a torch traceback (negative width), at the first batch
# (batch_size=0) or in the optimiser (betas=[1, 1]).
RANGES: list[tuple[str, str]] = [
    (r"(.+_)?(batch_size|dims?)|(patch|image|input|view|bank|pattern|vocab)_size|(.+_)?num_heads|expansion|k|ks|"
     r"(knn|teacher)_k|n_latents|n_clusters|num_codes|num_tokens|ctx_len|hidden_dim", ">= 1"),
    (r"num_workers|(.+_)?depth|(.+_)?lr|blr|weight_decay|eps|warmup_(epochs|steps)|aux_k|(.+_)?seed", ">= 0"),
    (r"visible_ratio|labeled_fraction|(.+_)?prob|mixup_p|min_confidence", "in [0, 1]"),
    (r"ratio|val_fraction|betas|dropout|drop_path", "in [0, 1)"),
]
_IN_RANGE = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
             "in [0, 1)": lambda v: 0 <= v < 1}


def range_error(name: str, value) -> str | None:
    """Why `value` is out of range for an argument called `name`, or None."""
    values = value if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for pattern, rule in RANGES:
        if re.fullmatch(pattern, name):
            bad = [v for v in numbers if not _IN_RANGE[rule](v)]
            if not bad:
                return None
            return f"must be {rule}" + (f" (item {bad[0]!r})" if isinstance(value, (list, tuple)) else "")
    return None


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
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        # list[int]: every item too (hidden_dims=[abc] would be a TypeError inside torch)
        args = typing.get_args(ann)
        return origin is not list or not args or all(_type_ok(v, args[0]) for v in value)
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
        for flag in ("_partial_", "_recursive_"):  # else Hydra's own TypeError at instantiate
            if flag in cfg and not isinstance(cfg[flag], bool):
                raise ConfigError(f"{where}.{flag}={cfg[flag]!r} has the wrong type: expected true or false")
        keys = [k for k in cfg.keys() if k not in HYDRA_KEYS]
        if not open_ended:
            unknown = [k for k in keys if k not in params]
            if unknown:
                valid = sorted(k for k in params if k not in injected)
                raise ConfigError(
                    f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} for {target}; valid keys: {valid}"
                )
        resolved = _resolved(cfg, where)
        for k in keys:
            node = cfg._get_node(k)
            if isinstance(node, DictConfig) or k not in params:
                continue
            value = resolved[k]
            if isinstance(node, ListConfig) and any(isinstance(v, (dict, list)) for v in value):
                continue  # a list of nodes (blocks, evaluators): checked below, item by item
            if not _type_ok(value, params[k].annotation):
                raise ConfigError(
                    f"{where}.{k}={value!r} has the wrong type for {target}: expected {params[k].annotation}"
                )
            if (why := range_error(k, value)) is not None:
                raise ConfigError(f"{where}.{k}={value!r} is out of range for {target}: it {why}")
        _check_heads(resolved, where)
    for k in cfg.keys():
        node = cfg._get_node(k)
        if isinstance(node, (DictConfig, ListConfig)):
            check_targets(node, f"{where}.{k}" if where else str(k))


def _check_heads(values: dict, where: str) -> None:
    """Attention splits its width over the heads: `[decoder_]num_heads` must divide `[decoder_]embed_dim` (else an
    assert deep inside timm/torch names neither key)."""
    for key, heads in values.items():
        m = re.fullmatch(r"(.*)num_heads", str(key))
        dim = values.get(f"{m.group(1)}embed_dim") if m else None
        if isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim % heads:
            raise ConfigError(f"{where}.{key}={heads} does not divide {where}.{m.group(1)}embed_dim={dim}: "
                              f"attention splits the width over the heads")


def _resolved(cfg: DictConfig, where: str) -> dict:
    """The node as plain values; an interpolation that cannot resolve (${nope}) names its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{getattr(e, 'full_key', None) or where}: its value cannot be resolved: {msg}") from None


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# the top-level knobs of conf/config.yaml (and debug=smoke's flag) with their types: nothing else checks them
ROOT_TYPES = {"task_name": str, "tags": list, "seed": int, "resume": str | None, "ckpt": str | None, "fit": bool,
              "evaluate": bool, "compile": bool, "optimized_metric": str | None, "smoke": bool}


@functools.cache
def root_keys() -> frozenset[str]:
    """Keys the root config may hold: config.yaml's, the groups, and what `@package _global_` files set."""
    keys = {"hydra", *ROOT_TYPES, *(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name[0] not in "._")}
    for path in CONF_DIR.rglob("*.yaml"):
        if path.parent == CONF_DIR or "@package _global_" in path.read_text():
            keys.update(k for k in (OmegaConf.load(path) or {}) if k != "defaults")
    return frozenset(keys)


def check_root(cfg: DictConfig) -> None:
    """Top-level keys: known (a misspelt `+resum=auto` is otherwise ignored without a word), and typed."""
    unknown = sorted(set(cfg.keys()) - root_keys())
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}: nothing reads them; valid: {sorted(root_keys())}")
    for key, ann in ROOT_TYPES.items():
        if key not in cfg or key == "task_name":  # task_name may read Hydra's choices, set only in a job
            continue
        try:
            value = cfg[key]
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: its value cannot be resolved: {str(e).splitlines()[0]}") from None
        if not _type_ok(value, ann):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected {ann}")
    seed = cfg.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**32:  # numpy's and Lightning's seed range
        raise ConfigError(f"seed={seed} is out of range: it must be in [0, 2**32)")


def check_overrides(overrides: list[str]) -> None:
    """Two command-line mistakes that Hydra reports without naming the override (a value it cannot parse) or
    as a raw ValueError traceback (a group set to null): refuse both here, naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            raise ConfigError(f"cannot parse the override {text!r}: {e.message.splitlines()[0]} (quote a "
                              f"value that holds brackets, commas or spaces: key='...')") from None
        group = override.key_or_group
        if override.value() is None and not override.is_delete() and (CONF_DIR / group).is_dir():
            choices = group_choices(group)
            off = f"; {group}=none turns it off" if "none" in choices else ""
            raise ConfigError(f"{text}: {group} is a config group: choose one of {choices}{off}")


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
