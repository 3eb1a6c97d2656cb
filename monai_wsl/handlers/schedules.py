"""Training state that changes once per epoch: values on a schedule (the max-min sigma and t) and the per-epoch random
seeds. Both are computed from the epoch number alone, so a resumed run needs no extra state to continue exactly."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["ScheduleHandler", "EpochSeedHandler"]


class ScheduleHandler:
    """Set a value from a closed-form schedule of the epoch, and log it.

    When epoch ``e`` (1-based) starts, ``target`` (a 0-d tensor, e.g. a buffer) is set to ``schedule(e - 1)`` and the
    value is written to ``engine.state.metrics[name]``, where ``StatsHandler`` and ``TensorBoardStatsHandler`` find
    it; when the epoch completes, ``target`` is set to ``schedule(e)``, the value of the next epoch, so that the
    weights saved after it (and those left at the end of training) carry it. Without ``target`` the value is only
    logged (e.g. the learning rate of an optimizer's own scheduler).

    Example (the max-min mask threshold: 0.15 + 0.001 per epoch, at most 0.2)::

        ScheduleHandler("sigma", lambda epoch: min(0.15 + 0.001 * epoch, 0.2), target=net.sigma)

    Args:
        name: the name it is logged under.
        schedule: epoch (0 for the first) -> value.
        target: the tensor to set, optional.
    """

    def __init__(self, name: str, schedule: Callable[[int], float], target: torch.Tensor | None = None) -> None:
        self.name, self.schedule, self.target = name, schedule, target

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _set(self, epoch: int) -> float:
        value = float(self.schedule(epoch))
        if self.target is not None:
            self.target.fill_(value)
        return value

    def epoch_started(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = self._set(engine.state.epoch - 1)

    def epoch_completed(self, engine: Engine) -> None:
        self._set(engine.state.epoch)


class EpochSeedHandler:
    """Seed every random source from ``(seed, epoch)`` when an epoch starts, so that an epoch's shuffling,
    augmentation and dropout depend only on its number: a run resumed from a checkpoint continues exactly as the
    uninterrupted run (Ignite creates the epoch's data iterator after ``EPOCH_STARTED``), at the same number of CPU
    threads.

    Seeds Python's ``random``, NumPy's and torch's global generators, and the random transforms of
    ``transforms`` (a MONAI ``Compose``) when given; with ``num_workers > 0`` MONAI's ``DataLoader`` seeds the
    workers' transforms from torch's generator. cuDNN flags are left alone (use ``monai.utils.set_determinism`` for
    bitwise GPU determinism, at a cost in speed).

    Args:
        seed: base seed.
        transforms: the training preprocessing, optional.
    """

    def __init__(self, seed: int = 0, transforms: object = None) -> None:
        self.seed, self.transforms = int(seed), transforms

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        s = (self.seed + 1_000_003 * engine.state.epoch) % (2**32)
        random.seed(s)
        np.random.seed(s)  # noqa: NPY002 - the global generator is what MONAI's and users' code draw from
        torch.manual_seed(s)
        if self.transforms is not None and hasattr(self.transforms, "set_random_state"):
            self.transforms.set_random_state(seed=s)
