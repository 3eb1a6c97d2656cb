"""Stop training at the first non-finite value, before it reaches the weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_wsl.handlers.checkpoint import NonFiniteError

__all__ = ["StopOnNonFinite", "NonFiniteError"]


class StopOnNonFinite:
    """Raise :class:`~monai_wsl.handlers.checkpoint.NonFiniteError` at the first non-finite input pixel, loss term or
    gradient of a training step, naming the epoch and iteration, the images of the batch and what was not finite.

    The gradients are checked after the backward pass and before the optimiser step (MONAI's
    ``IterationEvents.BACKWARD_COMPLETED``), so the weights, and every checkpoint saved before, stay finite. Each
    check costs one reduction over the tensors (and, on a GPU, one synchronisation).

    Args:
        loss: the loss, whose ``terms`` (a dict of scalar tensors, as :class:`~monai_wsl.losses.MaxMinUncertaintyLoss`
            keeps them) name the term that is not finite.
        image_key: the batch key of the input images.
        file_key: the batch key of their file names (the bundle copies ``image`` there before loading it).
    """

    def __init__(self, loss: object = None, image_key: str = "image", file_key: str = "image_file") -> None:
        self.loss, self.image_key, self.file_key = loss, image_key, file_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.check_inputs)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_gradients)

    def _where(self, engine: Engine) -> str:
        batch = engine.state.batch
        files = batch.get(self.file_key) if isinstance(batch, Mapping) else None
        images = f"; the batch's images: {', '.join(map(str, files))}" if files else ""
        return f"in epoch {engine.state.epoch}, iteration {engine.state.iteration}{images}"

    def check_inputs(self, engine: Engine) -> None:
        batch = engine.state.batch
        images = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        if isinstance(images, torch.Tensor) and images.is_floating_point() and not torch.isfinite(images).all():
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            files = batch.get(self.file_key)
            names = [str(files[i]) for i in bad] if files else [f"#{i}" for i in bad]
            raise NonFiniteError(
                f"non-finite input pixels (NaN or Inf) in image(s) {', '.join(names)} {self._where(engine)}: fix or "
                "drop those images (a transform may make them: check the preprocessing)."
            )

    def check_loss(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None or torch.isfinite(loss).all():
            return
        terms = getattr(self.loss, "terms", {}) or {}
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        which = f" (term(s): {', '.join(bad)})" if bad else ""
        raise NonFiniteError(
            f"the loss is {float(loss.detach().float().mean())}{which} {self._where(engine)}; no step was taken: lower "
            "the learning rate or check the network's outputs."
        )

    def check_gradients(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            return  # fp16 gradients overflow now and then by design: the GradScaler skips those steps itself
        grads = [p.grad for p in engine.network.parameters() if p.grad is not None]
        if not grads or torch.isfinite(torch.stack([g.abs().max() for g in grads])).all():
            return
        names = [n for n, p in engine.network.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        raise NonFiniteError(
            f"non-finite gradients of {len(names)} parameter(s) (e.g. {names[:3]}) {self._where(engine)}; the "
            "optimiser step was not taken: lower the learning rate (or use gradient clipping)."
        )
