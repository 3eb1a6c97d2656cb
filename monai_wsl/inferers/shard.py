"""Many slides over many processes: each process (a rank of ``torchrun``, or a ``--shard i/n`` started by hand) takes a
disjoint share of the slides, balanced by tissue area (:func:`balanced_shares`), and the ranks of ``torchrun`` meet
through a ``torch.distributed`` gloo group (:class:`SlideShards`) to agree on the shares and to wait for each other
before the summary table is written. :func:`run_share` runs this process's share with a slide inferer: complete slides
skipped, each slide's outcome recorded, one table of all the slides at the end."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from monai_wsl.data.slide_outputs import slide_output_paths
from monai_wsl.data.slide_records import slide_outputs_complete, write_slide_status, write_slides_table
from monai_wsl.data.slides import find_tissue, opened_slide

__all__ = ["parse_shard", "balanced_shares", "tissue_area_estimate", "SlideShards", "remove_leftovers", "run_share"]

logger = logging.getLogger(__name__)


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (or ``(i, n)``) as ``(i, n)``, the ``i``-th of ``n`` shares of the slides (``0 <= i < n``); None,
    ``""`` or ``"null"``: all the slides."""
    if shard is None or (isinstance(shard, str) and shard.strip().lower() in ("", "null", "none")):
        return None
    try:
        i, n = (int(v) for v in (shard.split("/") if isinstance(shard, str) else shard))
    except (TypeError, ValueError):
        raise ValueError(
            f"shard {shard!r} is not 'i/n': pass --shard 0/2 for the first of two shares of the slides"
        ) from None
    if not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: the share i of 'i/n' runs from 0 to n - 1 (--shard 0/{max(n, 1)})")
    return i, n


def balanced_shares(weights: Sequence[float], n: int) -> list[list[int]]:
    """The indices of ``weights`` shared out into ``n`` lists of about equal total weight: the heaviest first, each to
    the share with the least weight so far (longest processing time first: the largest share is at most 4/3 of the
    best possible). Deterministic (ties go to the earlier index and the lower share), so that processes that compute it
    apart agree. Each list is in the order of the indices."""
    loads, shares = [0.0] * n, [[] for _ in range(n)]  # type: list[float], list[list[int]]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        share = min(range(n), key=lambda s: (loads[s], s))
        shares[share].append(i)
        loads[share] += weights[i]
    return [sorted(s) for s in shares]


def tissue_area_estimate(
    slide: str | Path, backend: str = "openslide", min_saturation: float = 0.07, min_side: int = 512
) -> float:
    """The tissue area of a slide in level-0 pixels, from its smallest level of at least ``min_side`` pixels (brought
    to at most 1024 on the long side): cheap, and what the time a slide takes grows with."""
    with opened_slide(slide, backend) as (reader, wsi):
        _, tissue, downsample, _ = find_tissue(reader, wsi, slide, math.inf, min_side, min_saturation)
    return float(tissue.sum()) * downsample**2


class SlideShards:
    """Which share of the slides this process takes: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) its
    ``RANK`` of ``WORLD_SIZE``, the ranks meeting in a gloo process group (the default group when none exists, which
    is then destroyed on exit; else a new gloo group beside it); else ``shard`` ``"i/n"`` (the ``i``-th of ``n``
    processes started apart, which never wait for each other); else all the slides.

    Args:
        shard: ``"i/n"``, ``(i, n)`` or None (see :func:`parse_shard`); refused under ``torchrun``, whose ranks share
            the slides out already.
        timeout: how long the ranks wait for each other (the last rank's slides can take hours after the first's).
    """

    def __init__(self, shard: str | Sequence[int] | None = None, timeout: timedelta = timedelta(days=7)) -> None:
        parsed = parse_shard(shard)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = world > 1
        if self.distributed and parsed is not None:
            raise ValueError(
                f"--shard {shard} under torchrun ({world} processes): torchrun's ranks share the slides out already; "
                "pass one of the two (leave --shard out under torchrun)"
            )
        self.rank, self.world_size = (int(os.environ.get("RANK", "0")), world) if self.distributed else parsed or (0, 1)
        self.timeout, self.group, self._own = timeout, None, False

    @property
    def label(self) -> str:
        """``"rank/world_size"``."""
        return f"{self.rank}/{self.world_size}"

    def __enter__(self) -> SlideShards:
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=self.timeout)
                self._own = True
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._own and dist.is_initialized():
            dist.destroy_process_group()
        self._own, self.group = False, None

    def compute(self, fn: Callable[[int], Any], n: int) -> list[Any]:
        """``[fn(0), ..., fn(n - 1)]``: under ``torchrun`` each rank computes every ``world_size``-th and all receive
        all (``all_gather_object``), so that every rank holds the same values; else all computed here."""
        if not self.distributed:
            return [fn(i) for i in range(n)]
        mine = {i: fn(i) for i in range(self.rank, n, self.world_size)}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[i] for i in range(n)]

    def barrier(self) -> None:
        """Wait for every rank (under ``torchrun``; else nothing to wait for)."""
        if self.distributed:
            dist.barrier(group=self.group)


def remove_leftovers(output_dir: Path, stem: str) -> None:
    """The temporary files and folder of an earlier run of slide ``stem`` in ``output_dir`` that was killed (no other
    process runs this slide: the shares are disjoint)."""
    if not output_dir.is_dir():
        return
    names = [p.name for p in slide_output_paths(output_dir, stem, True).values()]
    leftovers = [p for name in names for p in output_dir.glob(f".{glob.escape(name)}.*.partial")]
    leftovers += output_dir.glob(f".{glob.escape(stem)}.work.*")
    for path in leftovers:
        logger.info(f"removing {path.name}, left by a run of {stem} that was stopped")
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _my_share(inferer: Any, slides: list[Path], shards: SlideShards, settings: dict, overwrite: bool) -> tuple:
    """This process's slides (indices) and every slide's weight: its tissue area (under ``torchrun`` a complete slide
    weighs nothing: the ranks see the same outputs, only the work left is shared)."""

    def weigh(i: int) -> float:
        if shards.distributed and not overwrite:
            if slide_outputs_complete(inferer.output_dir, slides[i].stem, settings) is None:
                return 0.0
        try:
            return tissue_area_estimate(slides[i], inferer.backend, inferer.min_saturation)
        except Exception as e:  # the slide's own run will say what is wrong with it
            logger.warning(f"slide {slides[i]}: no tissue estimate ({type(e).__name__}: {e}); weighed as 0")
            return 0.0

    weights = shards.compute(weigh, len(slides))
    mine = balanced_shares(weights, shards.world_size)[shards.rank]
    if shards.world_size > 1:
        logger.info(
            f"[shard {shards.label}] {len(mine)} of {len(slides)} slide(s), {sum(weights[i] for i in mine) / 1e6:.1f} "
            f"of {sum(weights) / 1e6:.1f} Mpx of tissue (level 0): " + ", ".join(slides[i].name for i in mine)
        )
    return mine, weights


def _run_one(inferer: Any, slide: Path, record: dict, settings: dict, overwrite: bool, where: str) -> dict | None:
    """One slide of the share: skipped when complete, else run; its outcome recorded in ``.status/`` and in
    ``record`` (``status`` ``"failed"`` with the ``error`` when the slide's run raised: the others go on). Returns its
    summary (None for a failed slide)."""
    output_dir, start = inferer.output_dir, time.perf_counter()
    remove_leftovers(output_dir, slide.stem)
    problem = "overwrite" if overwrite else slide_outputs_complete(output_dir, slide.stem, settings)
    if problem is None:
        logger.info(f"{where}{slide.name}: its outputs are complete, skipped")
        write_slide_status(output_dir, slide.stem, {**record, "status": "skipped-complete"})
        return json.loads((output_dir / f"{slide.stem}.json").read_text())
    if (output_dir / f"{slide.stem}.json").exists():
        logger.info(f"{where}{slide.name}: run again: {problem}")
    summary = None
    try:
        summary = inferer(slide)
        record["status"], record["error"] = "done", None
    except Exception as e:  # a slide that fails (a damaged tile, a full disk) does not stop the others
        logger.error(f"slide {slide} failed ({type(e).__name__}: {e}); nothing of it was written", exc_info=True)
        record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_slide_status(output_dir, slide.stem, record)
    return summary


def run_share(inferer: Any, slides: list[Path], shards: SlideShards, settings: dict, overwrite: bool) -> list[dict]:
    """Run this process's share of ``slides`` with ``inferer`` (a :class:`~monai_wsl.inferers.SlideInferer`; see its
    ``run``), then write the table of all of them (under ``torchrun``: rank 0, once every rank is done). Raises a
    ``RuntimeError`` listing the slides that failed once the others are done. Returns the summaries of this process's
    slides, run or skipped."""
    mine, weights = _my_share(inferer, slides, shards, settings, overwrite)
    where = f"[shard {shards.label}] " if shards.world_size > 1 else ""
    summaries, failed = [], []
    for i in mine:
        record = {"slide": str(slides[i].absolute()), "shard": shards.label, "tissue_area_estimate_px": weights[i]}
        summary = _run_one(inferer, slides[i], record, settings, overwrite, where)
        if record.get("status") == "failed":
            failed.append(f"{slides[i]}: {record['error']}")
        else:
            summaries.append(summary)
    shards.barrier()  # under torchrun, rank 0 writes the table once every rank's slides are recorded
    if shards.rank == 0 or not shards.distributed:
        extra = {"processes": shards.world_size, "torchrun": shards.distributed}
        rows = write_slides_table(inferer.output_dir, slides, settings, extra)
        counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
        logger.info(
            f"{where}slides: {', '.join(f'{n} {s}' for s, n in counts.items())}; the table of all: "
            f"{(inferer.output_dir / 'slides_summary.csv').resolve()}"
        )
    shards.barrier()  # no rank stops (and torchrun stops the others) before the table is written
    if failed:
        raise RuntimeError(
            f"{where}{len(failed)} of {len(mine)} slide(s) failed, the others are done:\n  " + "\n  ".join(failed)
        )
    return summaries
