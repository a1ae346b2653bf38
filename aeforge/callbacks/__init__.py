"""Lightning callbacks: image grids and loss curves, checkpoints (last.ckpt at every save point, atomic writes,
preemption), EMA of weights."""

from aeforge.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint
from aeforge.callbacks.ema import EMA
from aeforge.callbacks.model_checkpoint import ModelCheckpoint
from aeforge.callbacks.plots import LossCurvePlot, ReconstructionGrid
from aeforge.callbacks.timing import StepTimer

__all__ = [
    "AtomicCheckpointIO", "EMA", "LossCurvePlot", "ModelCheckpoint", "PreemptionCheckpoint", "ReconstructionGrid",
    "StepTimer",
]
