"""What a run over many slides records: whether a slide's outputs (:mod:`monai_wsl.data.slide_outputs`) are complete
(:func:`slide_outputs_complete`: its ``<stem>.json`` lists files that are all there at those sizes, made with the
settings of the run at hand), each slide's outcome in ``.status/<stem>.json`` (:func:`write_slide_status`), and one
table of all the slides, ``slides_summary.csv`` and ``slides_summary.json`` (:func:`write_slides_table`)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_wsl.utils import write_bytes_atomic, write_json_atomic

__all__ = [
    "slide_outputs_complete",
    "write_slide_status",
    "read_slide_status",
    "slides_table",
    "write_slides_table",
    "SUMMARY_COLUMNS",
]


def slide_outputs_complete(output_dir: str | Path, stem: str, settings: dict | None = None) -> str | None:
    """Why the outputs of slide ``stem`` in ``output_dir`` are not complete, or None when they are: its ``<stem>.json``
    reads, lists its files (``"files"``: name and size in bytes), every one of them is there at that size, and (when
    ``settings`` are given) it was made with those settings (its ``"settings"``)."""
    path = Path(output_dir) / f"{stem}.json"
    if not path.is_file():
        return f"{path.name} is not there"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path.name} does not read ({type(e).__name__}: {e})"
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{path.name} lists no files (written before outputs were checked)"
    for name, size in files.items():
        file = path.with_name(name)
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes where {path.name} says {size}"
    if settings is not None and summary.get("settings") != settings:
        before = summary.get("settings") or {}
        changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        return f"it was made with other settings ({', '.join(changed)})"
    return None


def _status_path(output_dir: str | Path, stem: str) -> Path:
    return Path(output_dir) / ".status" / f"{stem}.json"


def write_slide_status(output_dir: str | Path, stem: str, record: dict) -> None:
    """Record what a run did with slide ``stem`` (``record``: its ``status``, ``error``, ``shard``, ``seconds``...)
    in ``<output_dir>/.status/<stem>.json``, atomically, with the time."""
    write_json_atomic(_status_path(output_dir, stem), {**record, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_slide_status(output_dir: str | Path, stem: str) -> dict | None:
    """The last :func:`write_slide_status` record of slide ``stem``, or None."""
    try:
        return json.loads(_status_path(output_dir, stem).read_text())
    except (OSError, ValueError):
        return None


#: the columns of ``slides_summary.csv``
SUMMARY_COLUMNS = (
    "slide",
    "status",
    "error",
    "shard",
    "tissue_area_mm2",
    "tissue_area_px",
    "patches_run",
    "patches_total",
    "seconds",
    "regions",
    "slide_max_probability",
    "recorded",
)


def slides_table(output_dir: str | Path, slides: Sequence[str | Path], settings: dict | None = None) -> list[dict]:
    """One row per slide (:data:`SUMMARY_COLUMNS`) from what is in ``output_dir``: its status as last recorded
    (``done``, ``skipped-complete``, ``failed`` with the error; ``pending`` when no run has recorded it;
    ``incomplete`` when it was recorded finished but its outputs are no longer complete), and for a finished slide its
    tissue area (level-0 pixels, and mm^2 when the slide gives its pixel size), patches run and on the grid, seconds
    and regions from its ``<stem>.json``; for a failed slide the seconds until it failed and the tissue area estimated
    when the slides were shared out."""
    rows = []
    for slide in slides:
        stem = Path(slide).stem
        record = read_slide_status(output_dir, stem) or {}
        status, error = record.get("status", "pending"), record.get("error")
        row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
        row.update(slide=str(slide), status=status, error=error, shard=record.get("shard"))
        row.update(seconds=record.get("seconds"), recorded=record.get("recorded"))
        row["tissue_area_px"] = record.get("tissue_area_estimate_px")
        if status in ("done", "skipped-complete"):
            problem = slide_outputs_complete(output_dir, stem, settings)
            if problem:
                row.update(status="incomplete", error=problem)
            else:
                summary = json.loads((Path(output_dir) / f"{stem}.json").read_text())
                w0, h0 = summary["size_level0"]
                area = summary["tissue_fraction"] * w0 * h0
                row["tissue_area_px"] = round(area)
                if summary.get("mpp"):
                    mpp0 = summary["mpp"] / summary["level_downsample"]
                    row["tissue_area_mm2"] = round(area * mpp0**2 * 1e-6, 3)
                row.update(patches_run=summary["patches_run"], patches_total=summary["patches_total"])
                row.update(seconds=summary["seconds"], regions=summary["regions"]["count"])
                row["slide_max_probability"] = summary.get("slide_max_probability")
        rows.append(row)
    return rows


def write_slides_table(
    output_dir: str | Path, slides: Sequence[str | Path], settings: dict | None = None, extra: dict | None = None
) -> list[dict]:
    """Write :func:`slides_table` as ``slides_summary.csv`` and ``slides_summary.json`` (with the counts by status
    and ``extra``) in ``output_dir``, each atomically, while holding a lock on ``.status/summary.lock`` there: of
    processes that each finish a share of the slides and write the table, the last one sees every other's records.
    Returns the rows."""
    output_dir = Path(output_dir)
    _status_path(output_dir, "summary").parent.mkdir(parents=True, exist_ok=True)
    with open(_status_path(output_dir, "summary").with_suffix(".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no POSIX locks (Windows, some network file systems): written unlocked
            pass
        rows = slides_table(output_dir, slides, settings)
        text = io.StringIO()
        writer = csv.DictWriter(text, SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(output_dir / "slides_summary.csv", text.getvalue().encode())
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        write_json_atomic(output_dir / "slides_summary.json", {"counts": counts, **(extra or {}), "slides": rows})
    return rows
