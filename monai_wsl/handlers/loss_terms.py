"""Make each term of a composite loss visible to the logging handlers."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["LossTermsHandler"]


class LossTermsHandler:
    """Copy ``loss.terms`` (e.g. of :class:`~monai_wsl.losses.MaxMinUncertaintyLoss`) into the iteration output and
    their epoch means into ``engine.state.metrics``.

    After the loss is computed each term is added to ``engine.state.output`` under its name, so an iteration-level
    ``TensorBoardStatsHandler(output_transform=...)`` can plot it; at the end of the epoch the means over the epoch's
    iterations (and of the total, as ``loss``) are written to ``engine.state.metrics``, where epoch-level
    ``StatsHandler`` and ``TensorBoardStatsHandler`` find them. Attach it before those handlers.

    Args:
        loss: a loss with a ``terms`` dict of scalar tensors, refreshed at each call.
        prefix: prepended to the metric names (e.g. ``"train_"``).
    """

    def __init__(self, loss: torch.nn.Module, prefix: str = "") -> None:
        self.loss, self.prefix = loss, prefix
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.iteration)
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch)

    def reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def iteration(self, engine: Engine) -> None:
        terms = dict(getattr(self.loss, "terms", {}))
        output = engine.state.output
        if isinstance(output, dict):
            if "loss" in output:
                terms["loss"] = output["loss"].detach()
            output.update({k: v for k, v in terms.items() if k != "loss"})
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def epoch(self, engine: Engine) -> None:
        if self._count:
            for name, total in self._sums.items():
                engine.state.metrics[self.prefix + name] = total / self._count
