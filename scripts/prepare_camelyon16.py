"""Cut the CAMELYON16-P512 patches (normal vs metastatic) from a CAMELYON16 release and write their MONAI datalist.

See monai_wsl.data.camelyon16 for the protocol. Example::

    python scripts/prepare_camelyon16.py --src ~/data/CAMELYON16 --out runs/camelyon16 --workers 4
    python -m monai.bundle run --config_file "['bundle/configs/train.json','bundle/configs/recipes/camelyon16.json']" \\
        --dataset_dir runs/camelyon16

A second run with the same arguments continues an interrupted one (nothing done is redone) and writes the same files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter

from script_args import add_split_arguments, prepare_parser

from monai_wsl.apps.camelyon16 import prepare_camelyon16
from monai_wsl.data.camelyon16 import CAMELYON16_CLASS_NAMES, EXCLUDED_SLIDES
from monai_wsl.data.check import DataError


def main(argv: list[str] | None = None) -> int:
    parser = prepare_parser(
        __doc__,
        "CAMELYON16 folder: training/{normal,tumor,lesion_annotations}, testing/{images,lesion_annotations}, "
        "testing/reference.csv",
        "output folder (patches, masks, splits, datalist.json)",
    )
    parser.add_argument("--patch-size", type=int, default=512, help="patch side at level 0 (default 512, the protocol)")
    add_split_arguments(
        parser,
        "seed of the split and the sampling (default 0)",
        0.25,
        "share of the training slides of each class that go to validation (default 0.25)",
    )
    parser.add_argument("--min-tissue", type=float, default=0.1, help="tissue fraction a patch needs (default 0.1)")
    parser.add_argument(
        "--min-metastatic", type=float, default=0.2, help="metastatic fraction a metastatic patch needs (default 0.2)"
    )
    parser.add_argument(
        "--high-ratio",
        type=float,
        default=1.0,
        help="per slide, at most this many patches of metastatic fraction > 0.5 per kept patch of 0.2..0.5 (default 1)",
    )
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=list(EXCLUDED_SLIDES),
        help=f"slides left out (default: {' '.join(EXCLUDED_SLIDES)}, whose annotation is flawed)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="slides processed in parallel, one process each (default: min(4, CPUs))",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    start = time.perf_counter()
    try:
        settings = {k: v for k, v in vars(args).items() if k != "no_progress"}  # the options are its arguments
        datalist = prepare_camelyon16(**settings, progress=not args.no_progress)
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    seconds = time.perf_counter() - start

    print(f"wrote {args.out / 'datalist.json'} ({datalist['_written']} patch(es) written by this run, {seconds:.1f} s)")
    for split in ("training", "validation", "test"):
        items = datalist.get(split, [])
        counts = Counter(item["label"] for item in items)
        slides = len({item["slide"] for item in items})
        per_class = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(CAMELYON16_CLASS_NAMES))
        print(f"{split}: {len(items)} patches from {slides} slide(s) ({per_class})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
