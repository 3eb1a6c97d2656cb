"""The model card, ``model_card.json`` beside a trained model: what the model was trained on and with, and the whole
network definition (``network_def``), written by :class:`~monai_wsl.handlers.TrainingSummary` and read by the data
checks, the evaluation and inference configs, the exports and the scripts, so that a model is run as it was trained."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_CARD",
    "card_file",
    "INITIAL_WEIGHTS",
    "read_model_card",
    "trained_setting",
    "network_from_card",
    "load_trained_network",
    "synthetic_model_warning",
    "log_synthetic_model_warning",
]

MODEL_CARD = "model_card.json"
#: constructor arguments that only choose the initial weights: the checkpoint's replace them, so a network built for a
#: checkpoint loads none (and a value given for them contradicts nothing)
INITIAL_WEIGHTS = ("pretrained", "pretrained_path")

logger = logging.getLogger(__name__)
#: the models this process has warned of (:func:`log_synthetic_model_warning`, a checkpoint without a card)
_WARNED: set[str] = set()


def card_file(checkpoint: str | Path) -> Path:
    """Where ``checkpoint``'s model card is: ``model_card.json`` beside it; for the weights that ``--snapshot_interval``
    keeps in ``models/snapshots/``, the card of their training in ``models/`` when the snapshots folder has none (a
    card records the network and its settings, which every epoch of one training shares)."""
    path = Path(checkpoint).with_name(MODEL_CARD)
    above = path.parent.parent / MODEL_CARD
    if not path.is_file() and path.parent.name == "snapshots" and above.is_file():
        return above
    return path


def read_model_card(checkpoint: str | Path) -> dict | None:
    """The model card written beside ``checkpoint`` by :class:`TrainingSummary` (:func:`card_file`), or None when
    there is none.

    Raises:
        ValueError: the card exists but is not a JSON object (a damaged copy): running the model with default
            settings instead of the recorded ones would give other masks without a word.
    """
    path = card_file(checkpoint)
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
            f"{card_file(checkpoint)} is damaged ('trained_on' is not a JSON object): copy it again "
            "from the training's models/ folder, or remove it to run the model with the default settings."
        )
    return trained_on.get(key, default)


def network_from_card(checkpoint: str | Path, without_card: Mapping[str, Any] | None = None, **settings: Any) -> Any:
    """The network that ``checkpoint`` was trained as: the ``network_def`` its model card records (the class and
    every constructor argument), built without initial weights (:data:`INITIAL_WEIGHTS`; the checkpoint's are
    loaded next). The bundle's evaluation, inference and export configs build their network here, so that
    ``--network_def#w 7.5`` on their command line arrives as ``w=7.5``.

    Args:
        checkpoint: the trained model; its card is ``model_card.json`` beside it.
        without_card: the network for a model whose card does not record ``network_def`` (a model saved before cards
            did, or one without a card): ``target`` the class (default ``monai_wsl.networks.MaxMinUncertaintyNet``;
            an older card's ``trained_on.network`` names it) and settings, under those given as ``settings``.
        settings: constructor arguments given by the config or the command line. One the card records with another
            value is refused; an equal one, or one the card does not hold, is used. An empty dict stands for nothing
            (the configs hold ``"wildcat": {}`` so that ``--network_def#wildcat#kmax`` has a place to go).

    Raises:
        ValueError: a setting contradicts the card (the message names the card, the card's value and the given one),
            or the card's ``network_def`` is damaged.
    """
    from monai.bundle import ConfigParser

    card_path = card_file(checkpoint)
    card = read_model_card(checkpoint) or {}
    given = {k: v for k, v in settings.items() if not (isinstance(v, Mapping) and not v)}
    recorded = card.get("network_def")
    if recorded is None:
        config = _config_without_card(card, card_path, dict(without_card or {}), checkpoint)
    elif not isinstance(recorded, dict) or not isinstance(recorded.get("_target_"), str):
        raise ValueError(
            f"{card_path} is damaged ('network_def' is not a network config with a _target_): copy it again from "
            "the training's models/ folder."
        )
    else:
        conflicts = [
            f"{key} = {value!r} given, {card_value!r} in the card"
            for key, card_value, value in _conflicts(recorded, given)
        ]
        if conflicts:
            raise ValueError(
                f"{card_path} records the network {Path(checkpoint).name} was trained as, and the settings given here "
                f"(command line or config) contradict it: {'; '.join(conflicts)}. A network built otherwise gives "
                "other masks: leave these settings out (the card's values are used) or give the card's values."
            )
        config = copy.deepcopy(recorded)
    config = _merged(config, given)
    config.update(pretrained=False, pretrained_path=None)  # INITIAL_WEIGHTS: the checkpoint's are loaded next
    if os.environ.get("MONAI_LABEL_APP_DIR"):  # served by MONAI Label (any app): its log is where the warning goes
        log_synthetic_model_warning(checkpoint)
    return ConfigParser({"network": config}).get_parsed_content("network")


def synthetic_model_warning(checkpoint: str | Path) -> str | None:
    """The warning for a served model whose card says it was trained on the embedded synthetic set (the quick start),
    or None: its masks on histology images mean nothing."""
    trained_on = (read_model_card(checkpoint) or {}).get("trained_on") or {}
    if not (isinstance(trained_on, dict) and trained_on.get("synthetic")):
        return None
    return (
        f"{checkpoint} was trained on the embedded synthetic set (the quick start), not on histology images: its "
        "masks and classes on real images and slides mean nothing. Train on your data first (bundle/docs/README.md, "
        "Train) and serve that model.pt."
    )


def log_synthetic_model_warning(checkpoint: str | Path) -> None:
    """Log :func:`synthetic_model_warning`, once per model and process: a MONAI Label server's log carries it when it
    serves such a model (the slide app at its start, any app whose network is built from the card under MONAI Label,
    such as MONAI Label's ``monaibundle`` app running ``inference.json``)."""
    warning = synthetic_model_warning(checkpoint)
    if warning and str(Path(checkpoint).resolve()) not in _WARNED:
        _WARNED.add(str(Path(checkpoint).resolve()))
        logger.warning(warning)


def load_trained_network(checkpoint: str | Path, without_card: Mapping[str, Any] | None = None, **settings: Any) -> Any:
    """:func:`network_from_card` with the weights of ``checkpoint`` (a bare state dict, or a training checkpoint's
    ``model``) loaded, on the CPU, in evaluation mode: what the scripts that study a trained model run."""
    import torch

    net = network_from_card(checkpoint, without_card, **settings)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))
    return net.eval()


def _config_without_card(card: dict, card_path: Path, fallback: dict, checkpoint: str | Path) -> dict:
    """The network config for a card that does not record ``network_def``: ``fallback`` (``target`` and settings),
    with what an older card's ``trained_on`` does record (the class, a named encoder, the padding)."""
    from monai_wsl import networks

    target = fallback.pop("target", "monai_wsl.networks.MaxMinUncertaintyNet")
    trained_on = card.get("trained_on") if isinstance(card.get("trained_on"), dict) else {}
    name = trained_on.get("network")
    if isinstance(name, str) and isinstance(getattr(networks, name, None), type):
        target = f"monai_wsl.networks.{name}"
    if trained_on.get("encoder") in networks.ENCODERS:
        fallback["encoder"] = trained_on["encoder"]
    if "padding_mode" in trained_on:
        fallback["padding_mode"] = trained_on["padding_mode"]
    built = (
        f"{target.rpartition('.')[2]} is built from the configuration and the class defaults, so give the settings the "
        "model was trained with (e.g. --network_def#w, --network_def#padding_mode) if they were not the defaults."
    )
    if card:
        logger.warning(
            f"{card_path} does not record the network's definition (network_def; a card from before cards did): {built}"
        )
    elif str(Path(checkpoint).resolve()) not in _WARNED:  # once per model and process
        _WARNED.add(str(Path(checkpoint).resolve()))
        logger.warning(
            f"no {MODEL_CARD} beside {checkpoint} (the training writes one beside model.pt; copy it "
            f"along with the weights): {built}"
        )
    return {"_target_": target, **fallback}


def _conflicts(recorded: Mapping[str, Any], given: Mapping[str, Any], where: str = "network_def") -> Iterator[tuple]:
    """``(id, card value, given value)`` for each given setting that the card records with another value."""
    from monai_wsl.networks.config import config_value

    for key, value in given.items():
        if key in INITIAL_WEIGHTS or key not in recorded:
            continue
        try:
            value = config_value(value, key)
        except TypeError:
            value = f"a {type(value).__name__} module"
        if isinstance(value, Mapping) and isinstance(recorded[key], Mapping):
            yield from _conflicts(recorded[key], value, f"{where}#{key}")
        elif not _same(recorded[key], value):
            yield f"{where}#{key}", recorded[key], value


def _same(a: Any, b: Any) -> bool:
    """Whether two config values mean the same: ``"true"`` and ``True``, ``7`` and ``7.0``, a tuple and a list."""
    from monai.utils import str2bool

    if isinstance(a, bool) or isinstance(b, bool):
        try:
            return str2bool(a) == str2bool(b)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _merged(config: dict, given: Mapping[str, Any]) -> dict:
    """``config`` with ``given`` laid over it, nested dicts key by key (``wildcat={"kmax": 0.25}`` keeps the rest)."""
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = _merged(config[key], value)
        else:
            config[key] = value
    return config
