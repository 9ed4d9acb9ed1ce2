"""Continual pre-training (CPT) with SCALE width upscaling and the paper's baselines.

Entry points: the ``scale-cpt`` console script / ``python -m scale_kernels.train`` (:mod:`.cli`),
:func:`run_training` for one run, :func:`run_sweep` for a forgetting-vs-adaptation sweep (methods x learning
rates x seeds, in parallel processes, resumable) and its report (:mod:`.report`). To train with Hugging
Face's own ``transformers.Trainer`` instead, :class:`.hf_callbacks.SaveExpansionCallback` saves only the
expansion.
"""

from .config import METHODS, TrainConfig, make_config
from .sweep import RunSpec, Variant, grid, run_sweep
from .trainer import Trainer, run_training

__all__ = [
    "METHODS",
    "RunSpec",
    "TrainConfig",
    "Trainer",
    "Variant",
    "grid",
    "make_config",
    "run_sweep",
    "run_training",
]
