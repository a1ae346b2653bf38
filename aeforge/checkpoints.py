"""Reading checkpoints and weight files, which may come from anywhere: tensors and plain containers only
(`torch.load(weights_only=True)`), so reading a file can never run code; a refused, truncated or corrupt file
is one error that names it. Every checkpoint aeforge reads goes through `load_checkpoint` (resume and
evaluation through `AtomicCheckpointIO.load_checkpoint`, which Lightning calls). The one exception is OpenAI's
pickled DALL-E `encoder.pkl`, read in full only with `tokenizer.trust_pickle=true` (aeforge/targets/tokenizers.py).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

# torch is imported inside the functions: the CLI imports CheckpointError before it may import torch
# Globals a checkpoint may name beyond what weights_only allows by default (tensors, storages, dtypes, plain
# containers, OrderedDict). Found by loading last.ckpt of MAE, VAE, CAE (pixel and token targets), MixedAE,
# Bird-MAE, ColorMAE, FMAE-IAT, PHG-MAE (+ distillation), VQ tokenizer, SCGC (+ SCGC*), SAEs (TopK, BatchTopK,
# vSAE, GSAE, attention-z), with EMA and bf16/16-mixed precision: none needed more, because aeforge stores its
# own state as tensors and plain types (numpy's RNG key array as a tensor, modules/base.py). Add a class here
# only if it rebuilds data, never one whose construction can run code (no functions, no nn.Module).
SAFE_GLOBALS: list = []


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous file is untouched."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely: it holds code-bearing objects, or it is truncated/corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """The file names Python globals that weights_only refuses (a pickled module, or a payload)."""


def _refused(path: Path, err: Exception) -> UnsafeCheckpointError:
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the file is odd enough that even listing its globals fails; torch's message says more
        names = []
    found = ", ".join(names[:5]) if names else str(err).split("WeightsUnpickler error:")[-1].strip()[:200]
    return UnsafeCheckpointError(
        f"refused to read checkpoint {path}: it holds Python objects beyond tensors and plain containers "
        f"({found}), and unpickling them could run code. aeforge reads checkpoints with weights_only=True. "
        f"If you made this file yourself, load it in Python with torch.load(..., weights_only=False) and "
        f"torch.save only its tensors (e.g. the 'state_dict') to a new file"
    )


def load_checkpoint(path: str | os.PathLike, map_location="cpu", what: str = "checkpoint") -> dict:
    """torch.load(path, weights_only=True) with SAFE_GLOBALS allowed; `what` names the setting the path came
    from (resume=, model.pretrained=, ...) in the error."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such checkpoint file {p}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch reports a refused global and a broken pickle stream with the same exception type
        if any(s in str(e) for s in ("Unsupported global", "Can only", "unrecognized function")):
            raise _refused(p, e) from None
        raise _corrupt(p, what, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, RuntimeError) and not _looks_corrupt(e):
            raise  # e.g. out of memory, a device in map_location that is not here: not the file's fault
        raise _corrupt(p, what, e) from None


def check_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Fail before a run builds anything on a checkpoint that load_checkpoint would refuse (the pickle's opcodes
    are read, not run) or whose bytes changed since torch.save wrote them: torch does not check the zip's CRC32s,
    so a flipped bit in a tensor would load silently; checking them reads the file once (~3 GB/s here)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such checkpoint file {p}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
        if not names:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"record {bad} fails its CRC check")
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile) as e:  # not a torch.save zip, cut, altered
        raise _corrupt(p, what, e) from None
    if names:
        raise _refused(p, pickle.UnpicklingError(", ".join(names)))


def _looks_corrupt(e: RuntimeError) -> bool:
    text = str(e)
    return any(s in text for s in ("PytorchStreamReader", "zip archive", "invalid header", "archive is corrupt",
                                   "unexpected EOF", "storage has wrong byte size"))


def _corrupt(p: Path, what: str, e: Exception) -> CheckpointError:
    size = p.stat().st_size
    reason = str(e).split(". This is an internal miniz error")[0].strip() or type(e).__name__
    return CheckpointError(
        f"{what}: checkpoint {p} is truncated or corrupt ({size} bytes; {reason}); it is not a complete "
        f"torch.save file. Use another checkpoint (best.ckpt, an earlier copy) or start a new run"
    )


def state_dict_of(checkpoint, path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The Lightning checkpoint's 'state_dict', or an error naming the file when it has none."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{what}: {path} is not an aeforge/Lightning checkpoint (no 'state_dict'; has {keys})")
    return checkpoint["state_dict"]
