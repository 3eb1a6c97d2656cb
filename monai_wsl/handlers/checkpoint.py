"""Checkpoints that resume exactly: the best-model saver's record travels with the training checkpoint, and the
resuming loader finds the newest training checkpoint itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["ResumableCheckpointSaver", "ResumeCheckpointLoader", "latest_checkpoint"]


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


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of the newest training checkpoint in ``ckpt_dir`` (:func:`latest_checkpoint`):
    what ``--resume true`` continues from.

    Args:
        ckpt_dir: the folder of the run to continue.
        load_dict: the objects to restore, as saved (the bundle's ``training_state``).
        kwargs: other ``CheckpointLoader`` arguments (``map_location``, ``strict``, ...).

    Raises:
        FileNotFoundError: ``ckpt_dir`` holds no ``checkpoint_epoch=N.pt``.
    """

    def __init__(self, ckpt_dir: str | Path, load_dict: dict, **kwargs: Any) -> None:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume=True but {ckpt_dir} holds no checkpoint_epoch=N.pt: train without --resume first, or point "
                "ckpt_dir at the folder of the run to continue."
            )
        super().__init__(load_path=path, load_dict=load_dict, **kwargs)
