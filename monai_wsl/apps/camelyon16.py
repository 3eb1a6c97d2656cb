"""The CAMELYON16-P512 preparation: a release folder -> patches, split CSVs and a MONAI datalist, resumable and in
parallel (``scripts/prepare_camelyon16.py`` is its command line).

The protocol and its parts (the release, the annotations, the rasteriser, the tissue and the sampling of the patches)
are :mod:`monai_wsl.data.camelyon16`'s; here they run over a whole release: 1. scan each slide (tissue and metastatic
fractions of every grid patch, :mod:`monai_wsl.apps.camelyon16_slides`), 2. choose the patches split by split, 3.
write them slide by slide, 4. the split CSVs and, last, the datalist.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsl.data.camelyon16 import (
    CAMELYON16_CLASS_NAMES,
    EXCLUDED_SLIDES,
    C16Slide,
    check_annotation_on_slide,
    find_camelyon16_slides,
    normal_quotas,
    read_asap_annotation,
    select_metastatic,
    select_normal,
)
from monai_wsl.data.check import DataError
from monai_wsl.data.glas import stratified_split
from monai_wsl.data.slides import opened_slide
from monai_wsl.utils import write_bytes_atomic, write_json_atomic

from .camelyon16_slides import load_scan, patch_name, scan_file, scan_slide, scan_slides, write_slide_patches

__all__ = ["SPLITS", "scan_slide", "prepare_camelyon16"]

logger = logging.getLogger(__name__)


SPLITS = ("training", "validation", "test")
_CSV_FIELDS = ("image", "mask", "label", "slide", "x", "y", "tissue", "metastatic")


def _preflight(slides: Sequence[C16Slide], patch_size: int) -> None:
    """Open every slide and read every annotation before any work: all problems in one :class:`DataError`."""
    problems = []
    for s in slides:
        try:
            with opened_slide(s.path) as (reader, wsi):
                h, w = (int(v) for v in reader.get_size(wsi, 0))
        except DataError as e:
            problems += e.problems
            continue
        if min(h, w) < patch_size:
            problems.append(f"slide {s.path} is {w} x {h} pixels at level 0, smaller than a patch ({patch_size})")
        if s.annotation is not None:
            try:
                tumour, excluded = read_asap_annotation(s.annotation)
            except DataError as e:
                problems += e.problems
                continue
            problems += check_annotation_on_slide(tumour, excluded, (h, w), s.annotation, s.path)
    if problems:
        raise DataError(problems, "the CAMELYON16 slides and annotations")


def prepare_camelyon16(
    src: str | Path,
    out: str | Path,
    patch_size: int = 512,
    seed: int = 0,
    valid_fraction: float = 0.25,
    min_tissue: float = 0.1,
    min_metastatic: float = 0.2,
    high_ratio: float = 1.0,
    min_saturation: float = 0.07,
    exclude: Sequence[str] = EXCLUDED_SLIDES,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Cut the CAMELYON16-P512 patches of a release folder ``src`` into ``out`` and write their datalist.

    The training slides are split at slide level into ``training`` and ``validation`` (seeded, stratified by the
    slide's class, ``valid_fraction`` of each class; :func:`monai_wsl.data.stratified_split`), the test slides form
    ``test``. Writes ``out/images/<slide>/<slide>_x<X>_y<Y>.png``, ``out/masks/<slide>/..._mask.png`` (metastatic
    patches only: 255 = lesion; a normal patch has no mask file, which the datalist's ``"missing_mask": "empty"``
    makes an all-zero mask), ``out/splits/<split>.csv`` and, last, ``out/datalist.json``.

    Resumable: the per-slide scans (``out/.work/scans``) and the patches already written are kept, and a rerun
    continues where the last one stopped; the same settings and seed give the same files, byte for byte. A rerun
    with other settings or another set of slides is refused (use another ``out``).

    Returns:
        the datalist written.

    Raises:
        DataError: every problem found, each naming its file (release layout, annotations, slides, settings).
    """
    out = Path(out).expanduser().resolve()
    work = out / ".work"
    if patch_size < 8:
        raise DataError([f"patch size {patch_size} is too small: use 512 (the protocol) or at least 8"])
    slides = find_camelyon16_slides(src, exclude)
    fractions = {"valid_fraction": valid_fraction, "min_tissue": min_tissue, "min_metastatic": min_metastatic}
    fractions |= {"high_ratio": high_ratio, "min_saturation": min_saturation}
    settings = {"src": str(Path(src).expanduser().resolve()), "patch_size": int(patch_size), "seed": int(seed)}
    settings |= {k: float(v) for k, v in fractions.items()} | {"slides": [s.name for s in slides]}
    todo_scan = _start(work, settings, slides, out)
    split_of = _split_slides(slides, src, valid_fraction, seed)
    # 1. scan the slides: tissue and metastatic fractions of every grid patch
    started = time.perf_counter()
    scan_seconds = scan_slides(todo_scan, work, patch_size, min_tissue, min_saturation, workers, progress)
    if todo_scan:
        logger.info("scanned %d slide(s) in %.1f s", len(todo_scan), time.perf_counter() - started)
    scans = {s.name: load_scan(work, s.name) for s in slides}
    # 2. choose the patches, split by split; 3. write them, slide by slide; 4. the split CSVs and, last, the datalist
    chosen = _choose_patches(slides, split_of, scans, seed, min_tissue, min_metastatic, high_ratio)
    extract = write_slide_patches(slides, chosen, work, out, patch_size, workers, progress)
    datalist = _write_datalist(out, slides, chosen, split_of, patch_size)
    datalist["_timing"] = {
        name: {"scan_s": scan_seconds.get(name, 0.0), "extract_s": extract.get(name, (0.0, 0))[0]}
        for name in settings["slides"]
    }
    datalist["_written"] = sum(w for _, w in extract.values())
    return datalist


def _start(work: Path, settings: dict, slides: Sequence[C16Slide], out: Path) -> list[C16Slide]:
    """Start or continue a run: refuse one started with other settings, check the slides not scanned yet
    (:func:`_preflight`), record the settings; returns those slides."""
    settings_file = work / "settings.json"
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise DataError(
                [
                    f"{out} was started with other settings ({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}"
                    "): rerun with the same ones to continue it, or pass another --out"
                ]
            )
    todo_scan = [s for s in slides if not scan_file(work, s.name).is_file()]
    _preflight(todo_scan, settings["patch_size"])
    write_bytes_atomic(settings_file, json.dumps(settings, indent=1).encode())
    return todo_scan


def _split_slides(slides: Sequence[C16Slide], src: str | Path, valid_fraction: float, seed: int) -> dict[str, str]:
    """``{slide name: split}``: the split at slide level (training slides stratified by class, test slides)."""
    training = {s.name: s.label for s in slides if s.source == "training"}
    split_of = {s.name: "test" for s in slides if s.source == "testing"}
    if training:
        try:
            train, valid = stratified_split(training, valid_fraction, seed)
        except ValueError as e:
            raise DataError([f"the training slides of {src} cannot be split: {e}"]) from e
        split_of.update({n: "training" for n in train} | {n: "validation" for n in valid})
    return split_of


def _choose_patches(
    slides: Sequence[C16Slide],
    split_of: dict[str, str],
    scans: dict[str, dict],
    seed: int,
    min_tissue: float,
    min_metastatic: float,
    high_ratio: float,
) -> dict[str, list[dict]]:
    """The patches of each slide, split by split: the metastatic ones, then as many normal ones over the split's
    normal slides."""
    chosen: dict[str, list[dict]] = {s.name: [] for s in slides}
    for split in SPLITS:
        members = [s for s in slides if split_of.get(s.name) == split]
        n_metastatic = 0
        for s in (s for s in members if s.label == 1):
            for i in select_metastatic(scans[s.name], s.name, seed, min_tissue, min_metastatic, 0.5, high_ratio):
                chosen[s.name].append(_item(scans[s.name], i, 1))
                n_metastatic += 1
        normal = [s for s in members if s.label == 0]
        available = {s.name: int((np.asarray(scans[s.name]["tissue"]) >= min_tissue).sum()) for s in normal}
        quotas = normal_quotas(available, n_metastatic)
        for s in normal:
            for i in select_normal(scans[s.name], s.name, seed, quotas[s.name], min_tissue):
                chosen[s.name].append(_item(scans[s.name], i, 0))
        if members and sum(quotas.values()) < n_metastatic:
            logger.warning(
                f"{split}: {n_metastatic} metastatic patches but the normal slides of the split have only "
                f"{sum(quotas.values())} tissue patches: the split is unbalanced"
            )
    return chosen


def _write_datalist(
    out: Path, slides: Sequence[C16Slide], chosen: dict[str, list[dict]], split_of: dict[str, str], patch_size: int
) -> dict:
    """Write the split CSVs and, last, ``datalist.json`` (left as it is when unchanged); returns the datalist."""
    datalist: dict[str, Any] = {split: [] for split in SPLITS}
    for s in slides:
        for p in chosen[s.name]:
            name = patch_name(s.name, p["x"], p["y"])
            item = {"image": f"images/{s.name}/{name}.png", "label": p["label"]}
            if p["label"] == 1:
                item["mask"] = f"masks/{s.name}/{name}_mask.png"
            item.update(slide=s.name, x=p["x"], y=p["y"], tissue=p["tissue"], metastatic=p["metastatic"])
            datalist[split_of[s.name]].append(item)
    datalist = {k: v for k, v in datalist.items() if v}
    datalist.update(labels=list(CAMELYON16_CLASS_NAMES), missing_mask="empty", patch_size=int(patch_size))
    for split in SPLITS:
        rows = [",".join(_CSV_FIELDS)]
        for item in datalist.get(split, []):
            rows.append(",".join(str(item.get(k, "")) for k in _CSV_FIELDS))
        write_bytes_atomic(out / "splits" / f"{split}.csv", ("\n".join(rows) + "\n").encode())
    text = json.dumps(datalist, indent=1).encode()
    if not (out / "datalist.json").is_file() or (out / "datalist.json").read_bytes() != text:
        write_json_atomic(out / "datalist.json", datalist)
    return datalist


def _item(scan: dict, i: int, label: int) -> dict:
    return {
        "x": int(scan["x"][i]),
        "y": int(scan["y"][i]),
        "tissue": round(float(scan["tissue"][i]), 6),
        "metastatic": round(float(scan["metastatic"][i]), 6),
        "label": label,
    }
