"""The model card, ``model_card.json`` beside a trained model: what the model was trained on and with, written by
:class:`~monai_wsl.handlers.TrainingSummary` and read by the data checks, the evaluation and inference configs and
the scripts, so that a model is run as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MODEL_CARD", "read_model_card", "trained_setting"]

MODEL_CARD = "model_card.json"


def read_model_card(checkpoint: str | Path) -> dict | None:
    """The model card written beside ``checkpoint`` by :class:`TrainingSummary`, or None when there is none.

    Raises:
        ValueError: the card exists but is not a JSON object (a damaged copy): running the model with default
            settings instead of the recorded ones would give other masks without a word.
    """
    path = Path(checkpoint).with_name(MODEL_CARD)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        card = error
    if not isinstance(card, dict):
        raise ValueError(
            f"{path} is damaged ({card if isinstance(card, Exception) else 'not a JSON object'}): it records how "
            f"{Path(checkpoint).name} was trained (padding, encoder), which evaluation and inference follow. Copy it "
            "again from the training's models/ folder, or remove it to run the model with the default settings."
        )
    return card


def trained_setting(checkpoint: str | Path, key: str, default: object = None) -> object:
    """The setting ``key`` that ``checkpoint`` was trained with, as its model card records it (``trained_on``), or
    ``default`` when the card or the key is missing (a model saved before the card recorded it). The evaluation and
    inference configs take settings that change the network's function but not its weights (``padding_mode``) from
    here, so that a model is run as it was trained."""
    trained_on = (read_model_card(checkpoint) or {}).get("trained_on") or {}
    if not isinstance(trained_on, dict):
        raise ValueError(
            f"{Path(checkpoint).with_name(MODEL_CARD)} is damaged ('trained_on' is not a JSON object): copy it again "
            "from the training's models/ folder, or remove it to run the model with the default settings."
        )
    return trained_on.get(key, default)
