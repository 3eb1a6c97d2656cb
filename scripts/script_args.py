"""What the scripts' command lines share (imported by its siblings, as ``bundle_runner`` is by ``report.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def prepare_parser(doc: str, src_help: str, out_help: str) -> argparse.ArgumentParser:
    """The parser of a data preparation: the first line of ``doc`` as its description, ``--src`` (the release
    folder) and ``--out``, both required paths."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--src", required=True, type=Path, help=src_help)
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    return parser


def study_parser(doc: str, model: str, model_help: str) -> argparse.ArgumentParser:
    """The parser of a study of a trained network on a datalist: ``doc`` as its description, the required ``model``
    option (``--checkpoint``, ``--run``), ``--datalist`` and ``--split`` (default ``validation``), ``--encoder``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(model, required=True, help=model_help)
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--encoder", help="default: the model card's, else efficientnet-lite0")
    return parser


def add_split_arguments(
    parser: argparse.ArgumentParser, seed_help: str, valid_fraction: float, valid_help: str
) -> None:
    """A preparation's seeded split: ``--seed`` (default 0) and ``--valid-fraction`` (default ``valid_fraction``)."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--valid-fraction", type=float, default=valid_fraction, help=valid_help)
