"""Training state that changes once per epoch: the max-min schedules (sigma, t) and the per-epoch random seeds."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

__all__ = ["MaxMinScheduleHandler", "EpochSeedHandler", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper."""
    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


class MaxMinScheduleHandler:
    """Advance the max-min schedules once per epoch, and record them for the logs.

    At the end of each epoch: ``sigma <- min(sigma + sigma_step, sigma_max)`` (the network's ``sigma`` buffer) and
    ``t <- min(t * t_factor, t_max)`` (the loss's log-barrier ``t``). Both live in buffers, so the network and loss
    state dicts carry them; this handler's own ``state_dict`` holds them too, so a checkpoint that includes it
    restores them even when the loss is not checkpointed.

    At the start of each epoch the values in force (and the learning rate, given an optimizer) are written to
    ``engine.state.metrics`` as ``sigma``, ``t`` and ``lr``, where ``StatsHandler`` and ``TensorBoardStatsHandler``
    log them. Networks without ``sigma`` or losses without a barrier (the CAM baselines) are skipped.

    Args:
        network: the (possibly DDP-wrapped) network with a ``sigma`` buffer.
        loss: the loss with a ``barrier`` (:class:`~monai_wsl.losses.MaxMinUncertaintyLoss`), optional.
        optimizer: to log its first learning rate, optional.
        sigma_step, sigma_max: the paper's 0.001 per epoch up to 0.2.
        t_factor, t_max: the paper's x 1.01 per epoch up to 10.
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        sigma_step: float = 0.001,
        sigma_max: float = 0.2,
        t_factor: float = 1.01,
        t_max: float = 10.0,
    ) -> None:
        self.network, self.loss, self.optimizer = network, loss, optimizer
        self.sigma_step, self.sigma_max, self.t_factor, self.t_max = sigma_step, sigma_max, t_factor, t_max

    @property
    def _sigma(self) -> torch.Tensor | None:
        return getattr(unwrap(self.network), "sigma", None)

    @property
    def _barrier(self) -> Any:
        return getattr(self.loss, "barrier", None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def record(self, engine: Engine) -> None:
        if self._sigma is not None:
            engine.state.metrics["sigma"] = float(self._sigma)
        if self._barrier is not None:
            engine.state.metrics["t"] = float(self._barrier.t)
        if self.optimizer is not None:
            engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])

    def __call__(self, engine: Engine) -> None:
        if self._sigma is not None:
            self._sigma.fill_(min(float(self._sigma) + self.sigma_step, self.sigma_max))
        if self._barrier is not None:
            self._barrier.step(self.t_factor, self.t_max)

    def state_dict(self) -> dict[str, float]:
        state = {}
        if self._sigma is not None:
            state["sigma"] = float(self._sigma)
        if self._barrier is not None:
            state["t"] = float(self._barrier.t)
        return state

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        if "sigma" in state_dict and self._sigma is not None:
            self._sigma.fill_(state_dict["sigma"])
        if "t" in state_dict and self._barrier is not None:
            self._barrier.t.fill_(state_dict["t"])


class EpochSeedHandler:
    """Seed every random source from ``(seed, epoch)`` when an epoch starts, so that an epoch's shuffling,
    augmentation and dropout depend only on its number: a run resumed from a checkpoint continues exactly as the
    uninterrupted run (Ignite creates the epoch's data iterator after ``EPOCH_STARTED``).

    Seeds Python's ``random``, NumPy's and torch's global generators, and the random transforms of
    ``transforms`` (a MONAI ``Compose``) when given; with ``num_workers > 0`` MONAI's ``DataLoader`` seeds the
    workers' transforms from torch's generator. cuDNN flags are left alone (use ``monai.utils.set_determinism`` for
    bitwise GPU determinism, at a cost in speed).

    Args:
        seed: base seed.
        transforms: the training preprocessing, optional.
    """

    def __init__(self, seed: int = 0, transforms: Any = None) -> None:
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
