"""Training an upscaled model with Hugging Face's own ``transformers.Trainer``: save only the expansion.

``Trainer`` trains an upscaled model as it is (only the expansion requires grad; the fused LM-head loss is
used when the model computes its loss). Its checkpoints hold the whole model, base weights included;
:class:`SaveExpansionCallback` adds what SCALE needs to keep: the expansion alone
(:func:`scale_kernels.save_expansion`, a few MB), to be loaded back onto the base model with
:func:`scale_kernels.load_expansion`::

    from transformers import Trainer, TrainingArguments
    from scale_kernels.train.hf_callbacks import SaveExpansionCallback

    args = TrainingArguments("out", save_strategy="no", ...)   # "no": the final expansion only
    Trainer(model=upscaled, args=args, train_dataset=data, callbacks=[SaveExpansionCallback()]).train()
    model = sk.load_expansion(AutoModelForCausalLM.from_pretrained(base_id), "out/expansion")
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

EXPANSION_DIR = "expansion"


class SaveExpansionCallback(TrainerCallback):
    """A ``transformers.Trainer`` callback that writes the expansion of the upscaled model it trains.

    * whenever the Trainer saves a checkpoint (``save_strategy``): into ``<checkpoint-N>/expansion/``, next to
      the Trainer's own files (which hold the whole model and the optimizer, for resuming);
    * when training ends: into ``directory`` (default ``<output_dir>/expansion/``).

    Each is a :func:`scale_kernels.save_expansion` folder (``expansion.safetensors`` + ``expansion_config.json``);
    only the main process writes. With ``save_strategy="no"`` the final expansion is the only thing saved.

    Args:
        directory: where the final expansion goes (default: ``<args.output_dir>/expansion``).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = directory

    @staticmethod
    def _save(model: nn.Module | None, directory: Path, state: TrainerState) -> None:
        from scale_kernels import save_expansion

        if model is None:
            raise ValueError("SaveExpansionCallback needs the model: the Trainer passes it to its callbacks")
        if state.is_world_process_zero:
            save_expansion(getattr(model, "module", model), directory)  # the model inside a DDP wrapper

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._save(model, checkpoint / EXPANSION_DIR, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self._save(model, Path(self.directory or Path(args.output_dir) / EXPANSION_DIR), state)
