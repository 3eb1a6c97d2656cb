"""Checkpoints that survive a kill and resume exactly, and models that are checked before they are used.

- :class:`ResumableCheckpointSaver`: MONAI's ``CheckpointSaver`` whose saves are atomic (a temporary file in the same
  folder, flushed and synced, then ``os.replace``), whose previous file is deleted only once the new one is complete,
  which never writes non-finite weights, and whose model-selection record travels with the training checkpoint.
- :class:`ResumeCheckpointLoader`: the newest *readable* training checkpoint of a folder, for ``--resume``.
- :class:`CheckedCheckpointLoader`: a model file for evaluation or inference, refused with a message that names the
  file and what it holds when it is missing, damaged, of another network or not finite.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_wsl.utils import atomic_write

__all__ = [
    "ResumableCheckpointSaver",
    "ResumeCheckpointLoader",
    "CheckedCheckpointLoader",
    "AtomicDiskSaver",
    "NonFiniteError",
    "latest_checkpoints",
    "describe_state_dict",
]

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A value that must be finite is not (a pixel, a loss term, a gradient, a weight)."""


def _non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a (nested) mapping that hold a NaN or an Inf."""
    bad = []
    for name, value in tensors.items():
        if isinstance(value, Mapping):
            bad += [f"{name}.{n}" for n in _non_finite(value)]
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad.append(name)
    return bad


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` made safe against a kill during a save.

    The checkpoint is written to ``.<name>.<random>.partial`` in the same folder, flushed and synced, then moved onto
    ``<name>`` with ``os.replace``: a reader sees the previous file or the new one, never half of one. A file that
    Ignite asks to remove (the previous checkpoint) is removed only after the next save has completed. Weights that
    are not finite are never written (:class:`NonFiniteError`).

    Args:
        dirname: the folder.
        filename: a fixed file name (the selected model's ``model.pt``), or None for Ignite's names.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True)
        self.filename = filename
        self._to_remove: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        states = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in checkpoint.items()}
        bad = _non_finite(states)
        if bad:
            raise NonFiniteError(
                f"not saving {self.dirname / filename}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {bad[:3]}); the "
                "previous file is kept. Lower the learning rate or check the data."
            )
        if idist.get_rank() != self.save_on_rank:
            return
        for stale in self.dirname.glob(f".{filename}.*.partial"):  # left by a killed save
            stale.unlink(missing_ok=True)
        super().__call__(checkpoint, filename, metadata)
        for old in self._to_remove:
            if old != filename:
                (self.dirname / old).unlink(missing_ok=True)
        self._to_remove = []

    def _save_func(self, checkpoint: Mapping, path: Path, func: Any) -> None:
        with atomic_write(path) as (tmp,), open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)
            f.flush()
            os.fsync(f.fileno())

    def remove(self, filename: str) -> None:
        self._to_remove.append(self.filename or filename)


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` with :class:`AtomicDiskSaver` saves, whose key-metric record (which epochs scored
    what, which file holds the best) is itself checkpointable: put it in the training checkpoint's ``save_dict`` (and
    the ``load_dict`` of the resuming loader), and a resumed run keeps selecting the best model as the uninterrupted
    run would. The best model file itself stays a bare state dict (``key_metric_filename="model.pt"``, a one-entry
    ``save_dict``), as bundles and MONAI Label expect. Arguments as ``CheckpointSaver``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint, name in (
            (self._final_checkpoint, self._final_filename),
            (self._key_metric_checkpoint, kwargs.get("key_metric_filename")),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, name)

    def state_dict(self) -> dict:
        if self._key_metric_checkpoint is None:
            return {}
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


def latest_checkpoints(ckpt_dir: str | Path, pattern: str = r"checkpoint_epoch=(\d+)\.pt") -> list[Path]:
    """The training checkpoints of ``ckpt_dir`` (``checkpoint_epoch=N.pt``, as the interval ``CheckpointSaver`` names
    them), newest epoch first."""
    folder = Path(ckpt_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := re.fullmatch(pattern, p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _load(path: Path, weights_only: bool = True) -> Any:
    return torch.load(path, map_location="cpu", weights_only=weights_only)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of the newest readable training checkpoint in ``ckpt_dir``: what ``--resume true``
    continues from. A checkpoint that cannot be read (a file damaged outside the bundle's atomic saves) is skipped
    with a warning that names it, and the next newest is used.

    Args:
        ckpt_dir: the folder of the run to continue.
        load_dict: the objects to restore, as saved (the bundle's ``training_state``).
        kwargs: other ``CheckpointLoader`` arguments (``map_location``, ``strict``, ...).

    Raises:
        FileNotFoundError: ``ckpt_dir`` holds no readable ``checkpoint_epoch=N.pt``.
    """

    def __init__(self, ckpt_dir: str | Path, load_dict: dict, **kwargs: Any) -> None:
        for path in latest_checkpoints(ckpt_dir):
            try:
                _load(path)
            except Exception as e:
                logger.warning(f"resume: skipping {path}, which cannot be read ({type(e).__name__}: {e}).")
                continue
            logger.info(f"resume: continuing from {path}")
            super().__init__(load_path=str(path), load_dict=load_dict, **kwargs)
            return
        raise FileNotFoundError(
            f"resume=True but {ckpt_dir} holds no readable checkpoint_epoch=N.pt: train without --resume first, or "
            "point ckpt_dir at the folder of the run to continue."
        )


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """What network a monai_wsl state dict belongs to, from its keys: ``"a MaxMinUncertaintyNet (efficientnet-lite0
    encoder, 2 classes)"``."""
    keys = set(state)
    if any(k.startswith("encoder._blocks") for k in keys):
        blocks = {tuple(k.split(".")[2:4]) for k in keys if k.startswith("encoder._blocks.")}
        head = state.get("encoder._conv_head.weight")
        head_in = None if head is None else head.shape[1]
        encoder = (
            "efficientnet-lite0"
            if len(blocks) == 16
            else {320: "efficientnet-lite1", 352: "efficientnet-lite2"}.get(head_in, "efficientnet-lite")
        )
    elif any(k.startswith("encoder.layer4") for k in keys):
        depth = len({k.split(".")[2] for k in keys if k.startswith("encoder.layer3.")})
        encoder = {2: "resnet18", 6: "resnet34 or resnet50"}.get(depth, "resnet")
    else:
        encoder = "unknown"
    if "localizer_head.conv.weight" in keys:
        net, head = "MaxMinUncertaintyNet", state.get("localizer_head.conv.weight")
    elif "attention_v.weight" in keys:
        net, head = "DeepMILNet", state.get("classifier.weight")
    elif "head.conv.weight" in keys:
        net, head = "CAMClassifier", state["head.conv.weight"]
    else:
        example = ", ".join(sorted(keys)[:3])
        return f"no monai_wsl network (keys such as {example})"
    detail = f"{encoder} encoder" + (f", head of {head.shape[0]} outputs" if head is not None else "")
    return f"a {net} ({detail})"


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for a trained model (``model.pt``) in evaluation or inference, checked when it is
    built: the file must exist, be a PyTorch checkpoint, hold the state dict of the network the configuration builds
    (the same keys and shapes) and hold finite weights. Each refusal names the file, says what it holds and the fix.

    Args:
        load_path: the model file.
        load_dict: ``{"model": network}``, as for ``CheckpointLoader``.
        kwargs: other ``CheckpointLoader`` arguments.
    """

    def __init__(self, load_path: str | Path, load_dict: dict, **kwargs: Any) -> None:
        path = Path(load_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist: train the bundle first, or pass --checkpoint FILE (a model.pt)."
            )
        try:
            checkpoint = _load(path)
        except Exception as e:
            raise ValueError(
                f"checkpoint {path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}): it is damaged "
                "or not a model file; train again or pass the right --checkpoint."
            ) from e
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict.")
        for key, module in load_dict.items():
            state = checkpoint.get(key, checkpoint) if len(load_dict) == 1 else checkpoint[key]
            expected = module.state_dict()
            wrong = {k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)}
            extra = set(state) - set(expected)
            if wrong or extra:
                builds = describe_state_dict(expected).replace("a ", "", 1)
                differences = [
                    f"{k}: {tuple(state[k].shape) if k in state else 'missing'} in the file, "
                    f"{tuple(expected[k].shape)} built"
                    for k in sorted(wrong)
                ] + [f"{k}: in the file, not built" for k in sorted(extra)]
                raise ValueError(
                    f"checkpoint {path} holds {describe_state_dict(state)}, but this configuration builds {builds} "
                    f"({len(differences)} difference(s), e.g. {'; '.join(differences[:3])}): add the method or "
                    "recipe file it was trained with (configs/methods/*.json, configs/recipes/*.json) or pass its own "
                    "--checkpoint."
                )
            bad = _non_finite(state)
            if bad:
                raise NonFiniteError(
                    f"checkpoint {path} holds {len(bad)} tensor(s) with NaN or Inf (e.g. {bad[:3]}): the model "
                    "diverged when it was saved; train again."
                )
        super().__init__(load_path=str(path), load_dict=load_dict, **kwargs)

    def load(self) -> None:
        """Load the checkpoint now, outside any engine (a configuration's ``initialize``: whole-slide inference)."""
        from ignite.engine import Engine

        self(Engine(lambda engine, batch: None))
