"""Where data comes from, checked before anything is built: a missing file, an unreachable hub dataset or a
corrupt archive is one message that says where aeforge looked and how to give it the data (README, "Data").
DataModules call these in their constructor, so a run without its data stops before the model is built."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

DATA_ENV = "AEFORGE_DATA_DIR"
README_DATA = "README.md, section Data"


class DataFileError(RuntimeError):
    """A data file is missing, unreadable or lacks the expected arrays (or a hub dataset cannot be had)."""


def _env_value(var: str) -> str:
    value = os.environ.get(var)
    return f"{var}={value}" if value else f"{var} is not set"


def missing_file(path: str | os.PathLike, env: str = DATA_ENV) -> DataFileError:
    """The error for a data file that is not there: the path, the variable it came from, the ways out."""
    p = Path(path)
    return DataFileError(
        f"data not found: {p} ({_env_value(env)}). Give aeforge the data: set {env}=<folder> that holds "
        f"{p.parent.name}/{p.name} (datasets are read from ${env}/<name>/...), or point data.path=<file> at it; "
        f"see {README_DATA}"
    )


def load_npz(path: str | os.PathLike, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """np.load with errors that name the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise missing_file(p)
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataFileError(f"data file {p} is corrupt or not an .npz archive ({type(e).__name__}: {e})") from e
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataFileError(f"data file {p} lacks arrays {missing}; it has {sorted(arrays)}")
    return arrays


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub name ("owner/name")."""
    return path.startswith(("/", ".", "~")) or Path(path).exists() or path.count("/") != 1


def check_local_or_hub(path: str, env: str = DATA_ENV) -> None:
    """A DataModule's `path` that is a local file/folder or a hub dataset name: fail now if neither can be had."""
    if not looks_local(path):
        check_hub_dataset(path, env)
    elif not Path(path).expanduser().exists():
        raise missing_file(path, env)


def check_data_config(data) -> None:
    """The `data` config node's source (`path`, named by `path_env`), checked from the config alone: the CLI
    runs it before importing torch or Lightning, so a run without its data stops within seconds."""
    from omegaconf.errors import OmegaConfBaseException

    from aeforge.config import ConfigError

    try:
        path = data.get("path") if data is not None else None
        env = data.get("path_env") if data is not None else None
    except OmegaConfBaseException as e:  # data.path='${nope}': the key, not an OmegaConf traceback
        key = getattr(e, "full_key", None) or "data.path"
        raise ConfigError(f"{key}: its value cannot be resolved: {str(e).splitlines()[0]}") from None
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"data.path={path!r} has the wrong type: expected a file, folder or hub name (str)")
    if path:
        check_local_or_hub(path, str(env or DATA_ENV))


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir() or any(
        datasets_cache.glob(f"{repo.replace('/', '___')}*")
    )


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub_dataset(repo: str, env: str, timeout: float = 3.0) -> None:
    """Fail at once, with the ways to give the data, when the hub dataset `repo` cannot be read: not in the
    local cache and (offline, or the hub does not answer one request within `timeout`, or the set is gated and
    no account is logged in). One request, no retries: `datasets` would retry for ~45 s before failing."""
    if _hub_cached(repo):
        return
    from huggingface_hub import get_token

    ways = (f"Give aeforge the data in one of three ways: {env}=<local copy> (parquet/arrow shards, an image "
            f"folder or a save_to_disk folder), data.path=<that folder>, or a logged-in Hugging Face account "
            f"(`hf auth login`; the set may be gated) with network access, optionally data.streaming=true to read "
            f"shards without downloading the split. See {README_DATA}")
    where = f"data.path={repo!r} is a hub dataset ({_env_value(env)}; not in the local Hugging Face cache)"
    if _offline():
        raise DataFileError(f"{where}, and the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). {ways}")
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(repo, timeout=timeout, token=get_token())
    except Exception as e:  # no network, unknown name, gated without access: all end the same way
        raise DataFileError(f"{where}, and the hub did not give it ({type(e).__name__}: {str(e)[:200]}). "
                            f"{ways}") from None
    if getattr(info, "gated", False) and get_token() is None:
        raise DataFileError(f"{where}; it is gated and no Hugging Face account is logged in. {ways}")
