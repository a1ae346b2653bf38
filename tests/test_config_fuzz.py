"""Config fuzzing: random override lists (misspelt keys at several depths, keys of another group, unknown group
choices, wrong types, out-of-range values) on several experiments. Every draw either composes, passes the checks
and builds its data and model, or is refused with a message that names the offending key: our ConfigError /
DataFileError (the CLI's one line `aeforge: ...`) or Hydra's own compact error. Never a raw traceback."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections import Counter

import pytest
from hydra.errors import CompactHydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig

from aeforge.config import ConfigError, check_overrides, group_choices
from aeforge.data.sources import DataFileError, check_data_config
from aeforge.train import build, model_inputs, validate
from tests.conftest import ROOT, compose_cfg, run_command

EXPERIMENTS = {
    "default": [],
    "mae_mnist": ["experiment=mae_mnist"],
    "sae_topk": ["experiment=sae_topk"],
    "scgc_acm": ["experiment=scgc_acm"],
    # any existing folder passes the data-source check, which otherwise refuses every draw (no ImageNet here)
    "mae_vit_base_imagenet": ["experiment=mae_vit_base_imagenet", f"data.path={ROOT}"],
}
# a ViT-B is 86M parameters: built once per draw it would take the whole time budget; MAE is built on MNIST
NOT_BUILT = {"mae_vit_base_imagenet"}
GROUPS = ("data", "model", "objective", "optim", "masking", "module", "eval", "callbacks", "trainer", "logger")
CHOICE_GROUPS = ("model", "data", "optim", "masking", "objective", "module", "eval", "callbacks", "logger")
# (task_name is left out: compose_cfg sets its own)
ROOT_KEYS = ("seed", "fit", "evaluate", "compile", "resume", "optimized_metric", "tags")
# values that are wrong for most keys: types, ranges, interpolations, one unparsable override
ODD_VALUES = ("abc", "null", "[1,2]", "[abc]", "[]", "true", "'{a: 1}'", "-1", "0", "-0.5", "1.5", "2", "0.3",
              "'${nope}'", "[1,2")
# derandomized (the same draws in CI and here), no example database; AEFORGE_FUZZ_EXAMPLES=200 for a longer hunt
_EXAMPLES = int(os.environ.get("AEFORGE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=_EXAMPLES or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


STATS: dict[str, Counter] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for exp, c in STATS.items():
        print(f"\nconfig fuzz {exp}: {sum(c.values())} draws, {c['ok']} composed+checked+built, "
              f"{c['ok_unbuilt']} composed+checked (not built), {c['refused']} refused cleanly", file=sys.stderr)


@functools.cache
def leaf_keys(exp: str) -> dict[str, object]:
    """Dotted paths of the scalar and list leaves of the experiment's groups (the keys a user overrides), with
    their values (None where an interpolation needs a running job)."""
    cfg = compose_cfg(EXPERIMENTS[exp])
    leaves: dict[str, object] = {}

    def walk(node, where):
        for k in node.keys():
            child = node._get_node(k)
            path = f"{where}.{k}"
            if isinstance(child, DictConfig):
                walk(child, path)
            elif k != "_target_":
                try:
                    leaves[path] = child._value() if not isinstance(child, ListConfig) else list(child)
                except Exception:
                    leaves[path] = None

    for group in GROUPS:
        if isinstance(cfg.get(group), DictConfig):
            walk(cfg[group], group)
    return dict(sorted(leaves.items()))


def plausible(draw, value) -> str:
    """A value of the same type as `value`, in a range a user might try: these are meant to build."""
    if isinstance(value, bool):
        return draw(st.sampled_from(("true", "false")))
    if isinstance(value, int):
        return str(draw(st.sampled_from((1, 2, 3, 4, 8))))
    if isinstance(value, float):
        return str(draw(st.sampled_from((0.0, 0.1, 0.5, 0.9, 1.0, 2.0))))
    return draw(st.sampled_from(ODD_VALUES))


def misspell(draw, key: str) -> str:
    """`key` with one segment misspelt (any depth): a dropped, doubled or swapped letter."""
    parts = key.split(".")
    i = draw(st.integers(0, len(parts) - 1))
    seg = parts[i]
    j = draw(st.integers(0, len(seg) - 1))
    how = draw(st.sampled_from(("drop", "double", "swap")))
    if how == "drop" and len(seg) > 1:
        seg = seg[:j] + seg[j + 1:]
    elif how == "swap" and j + 1 < len(seg) and seg[j] != seg[j + 1]:
        seg = seg[:j] + seg[j + 1] + seg[j] + seg[j + 2:]
    else:
        seg = seg[:j] + seg[j] + seg[j:]
    parts[i] = seg
    return ".".join(parts)


@st.composite
def a_key(draw, exp: str) -> str:
    """A leaf key, its group drawn first: callbacks and trainer have many leaves, the model and data few."""
    keys = leaf_keys(exp)
    group = draw(st.sampled_from(("model", "model", "data", "data", "objective", "optim", "masking", "module",
                                  "eval", "callbacks", "trainer")))
    return draw(st.sampled_from([k for k in keys if k.split(".")[0] == group] or list(keys)))


@st.composite
def overrides(draw, exp: str) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("plausible", "plausible", "plausible", "value", "value", "misspelt",
                                     "other_group", "choice", "root", "new_root")))
        plus = draw(st.sampled_from(("", "", "+", "++")))
        if kind == "plausible":
            key = draw(a_key(exp))
            out.append(f"{key}={plausible(draw, leaf_keys(exp)[key])}")
        elif kind == "value":
            out.append(f"{draw(a_key(exp))}={draw(st.sampled_from(ODD_VALUES))}")
        elif kind == "misspelt":
            out.append(f"{plus}{misspell(draw, draw(a_key(exp)))}={draw(st.sampled_from(ODD_VALUES))}")
        elif kind == "other_group":  # a key that exists, but in another group: model.batch_size
            key = draw(a_key(exp))
            group = draw(st.sampled_from([g for g in GROUPS if g != key.split(".")[0]]))
            out.append(f"{plus}{group}.{key.split('.')[-1]}={draw(st.sampled_from(ODD_VALUES))}")
        elif kind == "choice":
            group = draw(st.sampled_from(CHOICE_GROUPS))
            out.append(f"{group}={draw(st.sampled_from([*group_choices(group), 'nope', 'null']))}")
        elif kind == "root":
            out.append(f"{draw(st.sampled_from(ROOT_KEYS))}={draw(st.sampled_from(ODD_VALUES))}")
        else:  # a top-level key nothing reads: +resum=auto (Hydra's own hint adds the '+')
            out.append(f"+{misspell(draw, draw(st.sampled_from(ROOT_KEYS)))}={draw(st.sampled_from(ODD_VALUES))}")
    return out


@st.composite
def plausible_overrides(draw, exp: str) -> list[str]:
    """Values of the right type only, on the model, data and training knobs: these must build, or be refused."""
    keys = [k for k in leaf_keys(exp) if k.split(".")[0] in ("model", "data", "masking", "objective", "optim")]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    return [f"{k}={plausible(draw, leaf_keys(exp)[k])}" for k in chosen]


def names_a_key(message: str, drawn: list[str]) -> bool:
    """The message names one of the drawn overrides' keys: the whole key, its last part, or the part of it that
    is wrong (a misspelt group `eeval`, a misspelt `eval.evaluaators`); for a group choice, the group."""
    for o in drawn:
        value = o.split("=", 1)[-1].strip("'")
        if len(value) > 2 and value not in ("null", "true", "[]") and value in message:
            return True  # a data file or array named by the value the user typed: data.adj_key=abc
        parts = o.split("=", 1)[0].lstrip("+").split(".")
        if len(parts) == 1 and parts[0] in message:
            return True
        named = [".".join(parts[:i]) for i in range(2, len(parts) + 1)] + [parts[-1]] * (len(parts[-1]) > 2)
        if parts[0] not in leaf_groups():
            named.append(parts[0])  # a misspelt group
        if any(n in message for n in named):
            return True
    # a group choice the experiment's own settings do not fit (scgc_acm's objective.tau with model=ae): the
    # message names the experiment's key, which is the one to change
    return any(o.split("=")[0] in CHOICE_GROUPS for o in drawn) and re.search(rf"\b({'|'.join(GROUPS)})\.\w", message)


@functools.cache
def leaf_groups() -> frozenset[str]:
    return frozenset({*GROUPS, *ROOT_KEYS, "paths", "stages"})


def outcome(exp: str, drawn: list[str], tmp_path) -> str:
    """'ok', 'ok_unbuilt' or 'refused' (cleanly, naming a drawn key); anything else fails the test."""
    try:
        check_overrides(drawn)  # what the CLI runs before Hydra composes
    except ConfigError as e:
        assert names_a_key(str(e), drawn), f"{drawn}: the message does not name the key:\n{e}"
        return "refused"
    try:
        cfg = compose_cfg([*EXPERIMENTS[exp], *drawn], tmp_path)
    except CompactHydraException as e:  # printed by Hydra as one message, no traceback
        msg = f"{e}\n{e.__cause__ or ''}"
        assert names_a_key(msg, drawn), f"Hydra's message does not name the key of {drawn}:\n{msg}"
        return "refused"
    try:
        check_data_config(cfg.data)  # the CLI's order: the data source before torch
        validate(cfg)
        if exp in NOT_BUILT or any(o.split("=")[0] in CHOICE_GROUPS for o in drawn):
            return "ok_unbuilt"  # group choices may name ViT-H: validated, not built per draw
        datamodule = build(cfg.data, seed=cfg.seed)
        build(cfg.model, **model_inputs(cfg.model, datamodule))
        build(cfg.objective)
        build(cfg.optim)
        build(cfg.module)
        return "ok"
    except (ConfigError, DataFileError) as e:
        assert names_a_key(str(e), drawn), f"{drawn}: the message does not name the key:\n{e}"
        return "refused"


def fuzz(exp: str, drawn: list[str], tmp_path_factory) -> None:
    result = outcome(exp, drawn, tmp_path_factory.mktemp("fuzz", numbered=True))
    STATS.setdefault(exp, Counter())[result] += 1


# what the fuzzing found (each was a raw traceback, a silently ignored key or a message without the key)
FOUND = [
    ("default", ["logger=null"], r"logger=null: logger is a config group: choose one of .*logger=none turns"),
    ("default", ["data.batch_size=[1,2"], r"cannot parse the override 'data.batch_size=\[1,2'"),
    ("default", ["+resum=auto"], r"unknown top-level key\(s\) \['resum'\]"),
    ("default", ["seed=[abc]"], r"seed=\['abc'\] has the wrong type"),
    ("default", ["seed=-1"], r"seed=-1 is out of range"),
    ("default", ["fit=0"], r"fit=0 has the wrong type"),
    ("default", ["data.batch_size='${nope}'"], r"data.batch_size: its value cannot be resolved"),
    ("default", ["data.path='${nope}'"], r"data.path: its value cannot be resolved"),
    ("default", ["data.path=[abc]"], r"data.path=\['abc'\] has the wrong type"),
    ("default", ["model.latent_dim=-1"], r"model.latent_dim=-1 is out of range .* must be >= 1"),
    ("default", ["model.latent_dim=[1,2]"], r"model.latent_dim=\[1, 2\] has the wrong type"),
    ("default", ["model.hidden_dims=[abc]"], r"model.hidden_dims=\['abc'\] has the wrong type .* list\[int\]"),
    ("default", ["data.batch_size=0"], r"data.batch_size=0 is out of range"),
    ("default", ["data.val_fraction=1.0"], r"data.val_fraction=1.0 is out of range .* in \[0, 1\)"),
    ("default", ["optim.betas=[1,2]"], r"optim.betas=\[1, 2\] is out of range .* \(item 1\)"),
    ("default", ["optim.lr=-1"], r"optim.lr=-1 is out of range"),
    ("default", ["optim.optimizer=adamm"], r"optim: optim.optimizer='adamm'; valid"),
    ("default", ["module._partial_=abc"], r"module._partial_='abc' has the wrong type"),
    ("mae_mnist", ["masking.ratio=[]"], r"masking.ratio=\[\] has the wrong type"),
    ("mae_mnist", ["masking.ratio=1.0"], r"masking.ratio=1.0 is out of range"),
    ("mae_mnist", ["model.decoder_num_heads=3"], r"model.decoder_num_heads=3 does not divide model.decoder_embed_dim"),
    ("mae_mnist", ["model.embed_dim=2", "model.num_heads=1"], r"model: .*model.embed_dim .* divisible by 4, got 2"),
    ("sae_topk", ["data.lm_dtype=abc"], r"data.lm_dtype='abc'; valid"),
    ("sae_topk", ["data.text_field=abc"], r"no document has the field data.text_field='abc'"),
    ("sae_topk", ["data.text=abc"], r"data: .*'abc'"),
    ("sae_topk", ["data.lm=abc"], r"data: data.lm='abc' cannot be loaded"),
    ("sae_topk", ["data.sample_by=abc"], r"data.sample_by='abc'; valid"),
    ("mae_mnist", ["module._partial_=false"], r"module._partial_=False: it must stay true"),
]


@pytest.mark.parametrize(("exp", "drawn", "match"), FOUND, ids=[" ".join(d) for _, d, _ in FOUND])
def test_found_examples_are_refused_naming_the_key(exp, drawn, match, tmp_path):
    with pytest.raises((ConfigError, DataFileError), match=match):
        try:
            check_overrides(drawn)
            cfg = compose_cfg([*EXPERIMENTS[exp], *drawn], tmp_path)
            check_data_config(cfg.data)
            validate(cfg)
            build(cfg.model, **model_inputs(cfg.model, build(cfg.data, seed=cfg.seed)))
            build(cfg.optim)
            build(cfg.module)
        except (ConfigError, DataFileError) as e:
            assert names_a_key(str(e), drawn), str(e)
            raise


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    """Mistakes that stop before a job through `python train.py` (one process for all, torch never imported):
    `aeforge: ...` and exit status 1, or Hydra's own compact message for an unknown choice."""
    cases = [["logger=null"], ["data.batch_size=[1,2"], ["model=nope"]]
    script = (
        "import sys\nfrom hydra.core.global_hydra import GlobalHydra\nfrom aeforge import cli\n"
        f"for args in {cases!r}:\n"
        "    sys.argv = ['train.py', *args]\n    GlobalHydra.instance().clear()\n"
        "    try:\n        cli.main()\n    except SystemExit as e:\n"
        "        print('CASE', args, 'EXIT', e.code if isinstance(e.code, int) else 1, e.code, file=sys.stderr)\n"
    )
    proc = run_command([sys.executable, "-c", script], tmp_path, env={"HYDRA_FULL_ERROR": "0"}, check=False)
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert err.count("EXIT 1") == len(cases), err[-3000:]
    assert "aeforge: ConfigError: logger=null" in err and "cannot parse the override 'data.batch_size=[1,2'" in err
    assert "Could not find 'model/nope'" in err


@fuzz_settings(6)
@given(data=st.data())
@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_fuzzed_overrides_compose_or_fail_cleanly(exp, data, tmp_path_factory):
    fuzz(exp, data.draw(overrides(exp), label="overrides"), tmp_path_factory)


@fuzz_settings(5)
@given(data=st.data())
@pytest.mark.parametrize("exp", sorted(set(EXPERIMENTS) - NOT_BUILT))
def test_plausible_values_build_or_are_refused(exp, data, tmp_path_factory):
    fuzz(exp, data.draw(plausible_overrides(exp), label="overrides"), tmp_path_factory)
