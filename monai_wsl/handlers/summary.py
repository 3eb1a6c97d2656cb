"""The end of a training: what was selected and why, written down beside the model and said in the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_wsl.model_card import MODEL_CARD, read_model_card, trained_setting
from monai_wsl.networks.config import RecordsConfig
from monai_wsl.utils import write_json_atomic

__all__ = ["TrainingSummary", "MODEL_CARD", "read_model_card", "trained_setting"]

logger = logging.getLogger(__name__)


def network_definition(network: Any) -> dict | None:
    """``network``'s config (:class:`~monai_wsl.networks.config.RecordsConfig`) for the model card, or None, with a
    warning, for a network that cannot give one: its card then lacks ``network_def``, and evaluation and inference
    build the network from their configuration, as for a model from before cards recorded it."""
    try:
        if not isinstance(network, RecordsConfig):
            raise TypeError(f"a {type(network).__name__} does not record its constructor arguments")
        return network.get_config()
    except TypeError as e:
        logger.warning(
            f"the model card will not record the network's definition ({e}): evaluation and inference will build "
            "it from their own configuration, so give them the settings it was trained with."
        )
        return None


class TrainingSummary:
    """Follow the model selection of a training and say, when it ends, where the selected model is, which epoch was
    selected and why, its validation metrics and the TensorBoard command.

    Each time validation selects a new model (the best ``key_metric``, ties to the later epoch: the bundle's
    ``best_model_saver`` rule) a model card, ``model_card.json``, is written beside the model file: the epoch, its
    metrics, what the model was trained on (``trained_on``) and, given the ``network``, its whole definition
    (``network_def``: the class and every constructor argument, :meth:`~monai_wsl.networks.WSLNet.get_config`), from
    which evaluation, inference and export build the same network
    (:func:`~monai_wsl.model_card.network_from_card`).

    Attach it to the trainer; its record (:meth:`state_dict`) belongs in the training checkpoint, so that a resumed
    run reports the whole training.

    Args:
        evaluator: the validation engine.
        model_file: the selected model's file (``models/model.pt``).
        log_dir: the TensorBoard folder.
        trained_on: what the card records about the training (data, classes, network, recipe).
        key_metric: the validation metric the model is selected on.
        network: the trained network (the bundle's ``network_def``, not a DDP or other wrapper of it).
    """

    def __init__(
        self,
        evaluator: Engine,
        model_file: str | Path,
        log_dir: str | Path,
        trained_on: dict[str, Any] | None = None,
        key_metric: str = "val_accuracy",
        network: Any = None,
    ) -> None:
        self.evaluator, self.model_file, self.log_dir = evaluator, Path(model_file), Path(log_dir)
        self.trained_on, self.key_metric = dict(trained_on or {}), key_metric
        self.network_def = network_definition(network) if network is not None else None
        self.selected: dict[str, Any] | None = None  # {"epoch": e, "metrics": {...}}
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        self.evaluator.add_event_handler(Events.COMPLETED, self.validated)
        engine.add_event_handler(Events.COMPLETED, self)

    def validated(self, evaluator: Engine) -> None:
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        score = metrics.get(self.key_metric)
        if score is None or (self.selected is not None and score < self.selected["metrics"][self.key_metric]):
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        self.selected = {"epoch": epoch, "metrics": metrics}
        card = {
            "model": self.model_file.name,
            "selected_epoch": epoch,
            "selected_by": f"best {self.key_metric} on the validation images (ties: the later epoch)",
            "validation": metrics,
            "trained_on": self.trained_on,
        }
        if self.network_def is not None:
            card["network_def"] = self.network_def
        if idist.get_rank() == 0:  # under DDP every rank selects the same epoch; one writes, as for the checkpoints
            write_json_atomic(self.model_file.with_name(MODEL_CARD), card)

    def __call__(self, engine: Engine) -> None:
        if self.selected is None:
            logger.warning(f"training ended without a validated model: {self.model_file} was not written by this run.")
            return
        metrics = "\n".join(f"    {k}: {v:.4f}" for k, v in sorted(self.selected["metrics"].items()))
        logger.info(
            f"training finished after {engine.state.epoch} epoch(s).\n"
            f"  selected model: {self.model_file.resolve()} (and {MODEL_CARD} beside it)\n"
            f"  selected epoch: {self.selected['epoch']}, the best {self.key_metric} on the validation images "
            f"(ties go to the later epoch); its validation metrics:\n{metrics}\n"
            f"  curves and mask overlays: tensorboard --logdir {self.log_dir.resolve()}"
        )

    def state_dict(self) -> dict:
        return {"selected": json.dumps(self.selected)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.selected = json.loads(state_dict.get("selected", "null"))
