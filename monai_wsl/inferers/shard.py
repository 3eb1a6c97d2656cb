"""Many slides over many processes: each process (a rank of ``torchrun``, or a ``--shard i/n`` started by hand) takes a
disjoint share of the slides, balanced by tissue area (:func:`balanced_shares`), and the ranks of ``torchrun`` meet
through a ``torch.distributed`` gloo group (:class:`SlideShards`) to agree on the shares and to wait for each other
before the summary table is written."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["parse_shard", "balanced_shares", "tissue_area_estimate", "SlideShards"]

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
    from monai_wsl.data.slides import find_tissue, opened_slide

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
