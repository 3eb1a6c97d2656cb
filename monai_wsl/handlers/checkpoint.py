"""Checkpoints that resume exactly: the best-model saver's record travels with the training checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_wsl.utils import as_bool

__all__ = ["ResumableCheckpointSaver", "latest_checkpoint", "checkpoint_to_resume", "attach_checkpointing"]


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose key-metric record (which epochs scored what, which file holds the best)
    is itself checkpointable: put it in the training checkpoint's ``save_dict`` (and the ``load_dict`` of the
    resuming ``CheckpointLoader``), and a resumed run keeps selecting the best model as the uninterrupted run would.
    The best model file itself stays a bare state dict (``key_metric_filename="model.pt"``, a one-entry
    ``save_dict``), as bundles and MONAI Label expect."""

    def state_dict(self) -> dict:
        if self._key_metric_checkpoint is None:
            return {}
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


def latest_checkpoint(ckpt_dir: str | Path, pattern: str = r"checkpoint_epoch=(\d+)\.pt") -> str | None:
    """Path of the training checkpoint with the highest epoch in ``ckpt_dir`` (``checkpoint_epoch=N.pt``, as the
    interval ``CheckpointSaver`` names them), or None."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        m = re.fullmatch(pattern, path.name)
        if m:
            found.append((int(m.group(1)), path))
    return str(max(found)[1]) if found else None


def checkpoint_to_resume(ckpt_dir: str | Path, resume: bool = True) -> str | None:
    """The checkpoint a ``resume`` run continues from: :func:`latest_checkpoint` of ``ckpt_dir``; None when not
    resuming. Raises ``FileNotFoundError`` when resuming without any checkpoint."""
    if not as_bool(resume):
        return None
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(
            f"resume=True but {ckpt_dir} holds no checkpoint_epoch=N.pt: train without --resume first, or point "
            "ckpt_dir at the folder of the run to continue."
        )
    return path


def attach_checkpointing(
    trainer: Engine,
    training_state: dict,
    ckpt_dir: str | Path,
    resume: bool = False,
    map_location: Any = None,
    n_saved: int = 1,
) -> Engine:
    """Save ``training_state`` (which holds the trainer itself, hence attached here rather than listed in the
    trainer's handlers: a config cannot refer to the trainer from inside its own handler list) after every epoch as
    ``checkpoint_epoch=N.pt``, after all other handlers; with ``resume``, first restore it from the latest such file.

    Returns the trainer, for chaining in a config's ``run`` list.
    """
    if as_bool(resume):
        CheckpointLoader(
            load_path=checkpoint_to_resume(ckpt_dir, True), load_dict=training_state, map_location=map_location
        ).attach(trainer)
    CheckpointSaver(
        save_dir=str(ckpt_dir), save_dict=training_state, save_interval=1, n_saved=n_saved, epoch_level=True
    ).attach(trainer)
    return trainer
