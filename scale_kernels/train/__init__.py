"""Continual pre-training (CPT) with SCALE width upscaling and the paper's baselines.

Entry points: the ``scale-cpt`` console script / ``python -m scale_kernels.train`` (:mod:`.cli`),
:func:`run_training` for one run, :func:`run_compare` for a forgetting-vs-adaptation comparison.
"""

from .compare import run_compare
from .config import METHODS, TrainConfig, make_config
from .trainer import Trainer, run_training

__all__ = ["METHODS", "TrainConfig", "Trainer", "make_config", "run_compare", "run_training"]
