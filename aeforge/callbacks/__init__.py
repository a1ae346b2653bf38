"""Lightning callbacks: image grids and loss curves, preemption checkpoints, EMA of weights."""

from aeforge.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint
from aeforge.callbacks.ema import EMA
from aeforge.callbacks.plots import LossCurvePlot, ReconstructionGrid
from aeforge.callbacks.timing import StepTimer

__all__ = ["AtomicCheckpointIO", "EMA", "LossCurvePlot", "PreemptionCheckpoint", "ReconstructionGrid", "StepTimer"]
