"""Handlers that the tests put into a real bundle run (as ``_target_`` overrides) to observe or interrupt it. They are
test instruments only; nothing in the bundle refers to them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_wsl.handlers import ResumableCheckpointSaver


class PausingSaver(ResumableCheckpointSaver):
    """The bundle's training-checkpoint saver, which stops in the middle of writing the checkpoint of ``pause_epoch``
    (the temporary file holds it, not yet synced nor moved into place), writes ``marker`` and sleeps: the test kills
    the process there."""

    def __init__(self, pause_epoch: int, marker: str, **kwargs) -> None:
        super().__init__(**kwargs)
        saver = self._interval_checkpoint.save_handler
        original = saver._save_func

        def save_func(checkpoint, path, func):
            def write_then_stop(obj, f, **kw):
                func(obj, f, **kw)
                if f"epoch={pause_epoch}" in path.name:
                    f.flush()
                    Path(marker).write_text(path.name)
                    time.sleep(600)

            original(checkpoint, path, write_then_stop)

        saver._save_func = save_func


class LossRecorder:
    """Append each iteration's loss (the mean over this process's images), its terms (those the loss keeps in
    ``terms``, as ``MaxMinUncertaintyLoss`` does) and the names of its images to ``<folder>/losses_rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = self.folder / f"losses_rank{rank}.json"
        losses = json.loads(path.read_text()) if path.is_file() else []
        files = [Path(f).name for f in engine.state.batch.get("image_file", [])]
        terms = {k: float(v) for k, v in getattr(engine.loss_function, "terms", {}).items()}
        losses.append({"loss": float(engine.state.output["loss"]), "terms": terms, "images": files})
        path.write_text(json.dumps(losses))


class FirstStepRecorder:
    """Save the network's parameters (without a DDP wrapper's ``module.``) just before and just after the first
    iteration to ``<folder>/first_step.pt`` as ``{"before": {...}, "after": {...}}`` (rank 0; every rank of a DDP run
    holds the same parameters)."""

    def __init__(self, folder: str) -> None:
        self.path = Path(folder) / "first_step.pt"
        self.saved: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED(once=1), self._save, "before")
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._save, "after")

    def _save(self, engine: Engine, when: str) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        network = getattr(engine.network, "module", engine.network)
        self.saved[when] = {k: v.detach().clone() for k, v in network.named_parameters()}
        if when == "after":
            torch.save(self.saved, self.path)
