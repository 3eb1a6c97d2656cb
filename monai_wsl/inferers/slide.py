"""Run a trained localizer over whole slides: MONAI's ``PatchInferer`` over the tissue of a slide, read patch by patch
through ``WSIReader`` (:class:`~monai_wsl.inferers.splitter.TissueWSISplitter`), merged by ``AvgMerger`` (or
``ZarrAvgMerger`` on disk when the map would not fit in memory), and the map handed on as files viewers open
(:mod:`monai_wsl.data.slide_outputs`)."""

from __future__ import annotations

import glob
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import AvgMerger, PatchInferer, SlidingWindowSplitter
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_tensor

from monai_wsl.data.check import DataError, warn_if_synthetic
from monai_wsl.data.slide_outputs import (
    SlideWriter,
    class_summary,
    run_summary,
    slide_output_paths,
    slide_outputs_complete,
    write_slide_status,
    write_slides_table,
)
from monai_wsl.data.slides import ArrayPlane, ZeroMap, read_region, slide_problems, survey_slide

from .backends import OnnxNetwork, weights_digest, with_backend
from .shard import SlideShards, balanced_shares, tissue_area_estimate
from .splitter import TissueWSISplitter, choose_merger

__all__ = ["TissueWSISplitter", "SlideInferer", "binary_entropy"]

logger = logging.getLogger(__name__)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """The entropy of a Bernoulli probability, in bits: 0 where ``p`` is 0 or 1, 1 at 0.5."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / np.log(2.0)


class SlideInferer:
    """A weakly-supervised localizer over whole slides. For each slide: a tissue mask from a low-resolution level
    (the smallest of at least ``thumbnail_size`` pixels; Otsu on saturation), MONAI's ``PatchInferer`` over the
    tissue patches of the chosen level (batched, with an overlap, a progress bar), and the files
    :class:`~monai_wsl.data.slide_outputs.SlideWriter` names after the slide in ``output_dir``: the mask probability
    as a pyramidal TIFF, a thumbnail, the regions as GeoJSON, and a JSON summary, written last (it lists the other
    files, their sizes and the :meth:`settings`: what makes a slide complete). Over many slides, :meth:`run` takes
    this process's share (``torchrun`` or ``shard``) and skips complete slides. With ``uncertainty``, each patch's
    mask is averaged over four test-time flips (none, horizontal, vertical, both) and the binary entropy of that
    mean, merged as the map is, is written as a map too. The same network pass serves a region of a slide
    (:meth:`infer_region`, as MONAI Label's pathology workflow sends it).

    Args:
        network: a ``WSLNet`` (or ``MaskOutput``) with ``predict(x) -> {"mask", "logits"}``.
        output_dir: where the files go.
        patch_size: the side of the patches the network sees (pixels of the level run).
        overlap: the overlap of neighbouring patches (a fraction of the patch, or pixels); overlapping masks are
            averaged.
        level, mpp: the level to run at, or the microns per pixel to choose it by (``mpp`` wins when given).
        batch_size: patches per forward pass.
        num_workers: threads reading patches ahead of the network (see :class:`TissueWSISplitter`).
        preprocessing: the intensity transform of a ``(B, 3, H, W)`` uint8 batch (default: to [-1, 1], as the
            bundle trains).
        threshold: the mask threshold for the GeoJSON regions and the thumbnail's outline.
        min_tissue: the fraction of a patch that must be tissue for it to run.
        min_saturation: the lowest saturation counted as tissue (Otsu's threshold is used when higher).
        merger: ``"auto"`` (in memory while the map's buffers fit in ``max_memory_mb``, else on disk), ``"memory"``
            (``AvgMerger``) or ``"zarr"`` (``ZarrAvgMerger`` in a temporary folder of ``output_dir``).
        max_memory_mb: see ``merger``.
        backend: the ``WSIReader`` backend (``"openslide"``, ``"cucim"``).
        class_names, positive_class: the classes, and the one whose probability is the slide's score.
        region_name: the class name of the GeoJSON regions.
        device, amp: where the network runs, and whether in mixed precision (CUDA only).
        checkpoint: the model file, to warn when a model of the embedded synthetic set is used on slides.
        progress: show a progress bar over the patches.
        uncertainty: average the network over four flips of each batch and write ``<stem>_uncertainty.tif`` (four
            forward passes per patch).
        inference_backend: what runs the network (:func:`~monai_wsl.inferers.backends.with_backend`): ``"torch"``
            (eager PyTorch), ``"onnxruntime"`` (its export, on the CPU, written beside ``checkpoint``) or ``"auto"``
            (ONNX Runtime on a CPU when it is installed, PyTorch on GPUs).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        output_dir: str | Path,
        patch_size: int = 512,
        overlap: float | int = 0.25,
        level: int | None = 0,
        mpp: float | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        preprocessing: Callable | None = None,
        threshold: float = 0.5,
        min_tissue: float = 0.05,
        min_saturation: float = 0.07,
        merger: str = "auto",
        max_memory_mb: float = 2048,
        backend: str = "openslide",
        class_names: Sequence[str] = ("benign", "malignant"),
        positive_class: int = 1,
        region_name: str = "gland",
        device: str | torch.device | None = None,
        amp: bool = False,
        checkpoint: str | Path | None = None,
        progress: bool = True,
        thumbnail_size: int = 1024,
        geojson_max_side: int = 4096,
        uncertainty: bool = False,
        inference_backend: str = "torch",
    ) -> None:
        if merger not in ("auto", "memory", "zarr"):
            raise ValueError(f"merger must be 'auto', 'memory' or 'zarr', not {merger!r}.")
        self.output_dir = Path(output_dir)
        self.patch_size, self.overlap = int(patch_size), overlap
        self.level, self.mpp = level, mpp
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.preprocessing = preprocessing or ScaleIntensityRange(0, 255, -1.0, 1.0, clip=True)
        self.threshold, self.region_name = float(threshold), region_name
        self.min_tissue, self.min_saturation = float(min_tissue), float(min_saturation)
        self.merger, self.max_memory_mb = merger, float(max_memory_mb)
        self.backend = backend
        self.class_names, self.positive_class = list(class_names), int(positive_class)
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.network = with_backend(network, inference_backend, self.device, checkpoint)
        self.inference_backend = "onnxruntime" if isinstance(self.network, OnnxNetwork) else "torch"
        self.amp = bool(amp) and self.device.type == "cuda"
        self.checkpoint, self.progress, self.uncertainty = checkpoint, progress, bool(uncertainty)
        self.thumbnail_size, self.geojson_max_side = int(thumbnail_size), int(geojson_max_side)
        self._probs: list[torch.Tensor] = []
        self._bar: Any = None
        self._checked: list[Path] = []
        self._settings: dict | None = None  # run()'s, for its slides

    def settings(self) -> dict:
        """What a slide's outputs depend on, as its ``<stem>.json`` records it (``"settings"``): a rerun skips a slide
        whose outputs are complete and were made with the same settings and weights (``"model"``: their SHA-256)."""
        return {
            "level": self.level,
            "mpp": self.mpp,
            "patch_size": self.patch_size,
            "overlap": self.overlap,
            "min_tissue": self.min_tissue,
            "min_saturation": self.min_saturation,
            "threshold": self.threshold,
            "uncertainty": self.uncertainty,
            "class_names": self.class_names,
            "positive_class": self.positive_class,
            "region_name": self.region_name,
            "thumbnail_size": self.thumbnail_size,
            "geojson_max_side": self.geojson_max_side,
            "model": weights_digest(self.network),
        }

    # ------------------------------------------------------------------ checks
    def check(self, slides: Sequence[str | Path]) -> None:
        """Open every slide and check its level, the patch size and the output folder before anything runs; one
        :class:`DataError` lists every problem (each names its file). With ONNX Runtime, the export for the patch
        size is then checked (or made) too, so that it is not timed with the first slide."""
        problems = slide_problems(
            slides, self.backend, self.level, self.mpp, self.patch_size, self.network_min_size(), self.output_dir
        )
        if self.checkpoint is not None:
            warn_if_synthetic(self.checkpoint, None, list(slides))
        if problems:
            error = DataError(problems, "the slides")
            logger.error(str(error))
            raise error
        if isinstance(self.network, OnnxNetwork):
            self.network.session((self.patch_size, self.patch_size))
        self._checked = [Path(s) for s in slides]
        logger.info(
            "checked %d slide(s); the network runs on %s; outputs go to %s",
            len(slides),
            self.inference_backend,
            self.output_dir.resolve(),
        )

    def network_min_size(self) -> int:
        return int(getattr(self.network, "min_spatial_size", 1))

    # ------------------------------------------------------------------ the network pass
    @torch.no_grad()
    def _forward(self, patches: torch.Tensor, probs: list | None = None) -> torch.Tensor:
        """The masks ``(B, 1, H, W)`` of a ``(B, 3, H, W)`` uint8 batch (with ``uncertainty``: ``(B, 2, H, W)``, the
        mask averaged over four flips and its binary entropy); its class probabilities are appended to ``probs``
        (default: the slide's, ``self._probs``)."""
        x = self.preprocessing(patches.to(self.device).float())
        x = convert_to_tensor(x, track_meta=False)
        flips: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1)) if self.uncertainty else ((),)
        if len(flips) > 1:
            x = torch.cat([x.flip(f) if f else x for f in flips])
        with torch.autocast("cuda") if self.amp else nullcontext():
            out = self.network.predict(x)
        n = len(patches)
        masks = out["mask"].float().split(n)
        mask = torch.stack([m.flip(f) if f else m for m, f in zip(masks, flips)]).mean(0)
        prob = torch.softmax(out["logits"].float(), 1).view(len(flips), n, -1).mean(0)
        (self._probs if probs is None else probs).append(prob.cpu())
        if self._bar is not None:
            self._bar.update(n)
        if self.uncertainty:
            mask = torch.cat([mask, binary_entropy(mask)], 1)
        return mask.cpu()

    def _patch_inferer(self, splitter: Any, merger_cls: Any = AvgMerger, **merger_kwargs: Any) -> PatchInferer:
        return PatchInferer(
            splitter=splitter,
            merger_cls=merger_cls,
            batch_size=self.batch_size,
            match_spatial_shape=True,
            **merger_kwargs,
        )

    def infer_region(
        self, slide: str | Path, location: Sequence[int], size: Sequence[int], level: int | None = None
    ) -> dict[str, np.ndarray]:
        """The mask of one region of a slide (as MONAI Label's pathology workflow sends it from a viewer), by the same
        patch size, overlap, preprocessing, network pass and merging as a whole slide: ``location`` ``(x, y)`` in
        level-0 pixels, ``size`` ``(width, height)`` in pixels of ``level`` (default: the level the slide runs at,
        ``level`` or ``mpp``). The patches start at the region's corner and all run (the region was asked for);
        pixels beyond the slide are glass (white). On a region that starts on the slide's patch grid it equals the
        slide's map there. Returns ``{"mask": (H, W) float32, "prob": (K,) float32}`` (the mean of the patches' class
        probabilities), and with ``uncertainty`` ``"uncertainty": (H, W) float32`` (bits)."""
        levels = (self.level, self.mpp) if level is None else (level, None)
        return self.infer_pixels(read_region(slide, location, size, *levels, backend=self.backend))

    def infer_pixels(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`infer_region` on a region already read (:func:`~monai_wsl.data.read_region`: ``(C, H, W)`` uint8,
        glass beyond the slide)."""
        image = torch.from_numpy(image)[None]
        self.network.eval()
        probs: list[torch.Tensor] = []  # this call's own (calls from several threads do not mix)
        splitter = SlidingWindowSplitter(self.patch_size, overlap=self.overlap, pad_mode="constant", pad_value=255)
        mask = self._patch_inferer(splitter)(image, lambda patches: self._forward(patches, probs))
        out = {"mask": mask[0, 0].numpy(), "prob": torch.cat(probs).mean(0).numpy()}
        if self.uncertainty:
            out["uncertainty"] = mask[0, 1].numpy()
        return out

    # ------------------------------------------------------------------ one slide
    def prepare(self, slide: str | Path) -> dict:
        """Open a slide and plan its run: the level, its downsample and microns per pixel, the tissue mask (and the
        low-resolution image it was found on) and the :class:`TissueWSISplitter` with its grid."""
        slide = Path(slide)
        setup = survey_slide(
            slide, self.backend, self.level, self.mpp, self.patch_size, self.thumbnail_size, self.min_saturation
        )
        splitter = TissueWSISplitter(
            self.patch_size,
            self.overlap,
            setup["tissue"],
            setup.pop("tissue_downsample"),
            setup["level_downsample"],
            self.min_tissue,
            # tifffile's reader shares one unlocked file handle: threads only where reads are thread-safe
            self.num_workers if self.backend.lower() in ("openslide", "cucim") else 0,
            reader=self.backend,
            level=setup["level"],
        )
        return {**setup, "splitter": splitter, "plan": splitter.plan(str(slide))}

    def __call__(self, slide: str | Path) -> dict:
        """Run one slide and write its files (:mod:`monai_wsl.data.slide_outputs`); returns its summary (the content
        of ``<stem>.json``)."""
        slide = Path(slide)
        start = time.perf_counter()
        setup = self.prepare(slide)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix=f".{slide.stem}.work.", dir=self.output_dir)
        self.network.eval()
        self._probs = []
        try:
            merger_name, plane, uncertain = self._run_patches(slide, setup, workdir)
            probs = torch.cat(self._probs).numpy() if self._probs else np.zeros((0, len(self.class_names)))
            run = run_summary(slide, setup, self.patch_size, self.overlap, merger_name)
            run["settings"] = self._settings or self.settings()
            classes = class_summary(probs, self.class_names, self.positive_class)
            writer = SlideWriter(
                self.output_dir, self.threshold, self.region_name, self.geojson_max_side, self.thumbnail_size
            )
            summary = writer.write(slide.stem, plane, uncertain, setup, (run, classes, start), workdir)
        finally:
            self._bar = None
            shutil.rmtree(workdir, ignore_errors=True)
        logger.info(
            f"{slide.name}: {summary['patches_run']} of {summary['patches_total']} patches on tissue run in "
            f"{summary['seconds']} s; {summary['regions']['count']} region(s); files in {self.output_dir.resolve()}"
        )
        return summary

    def _run_patches(self, slide: Path, setup: dict, workdir: str) -> tuple[str, Any, Any]:
        """The network over the slide's tissue patches, merged: the merger's name, the map and the uncertainty map
        (None without ``uncertainty``), each ``(H, W)`` (in memory, or read by slices from disk)."""
        from tqdm.auto import tqdm

        plan, shape = setup["plan"], setup["plan"]["shape"]
        n_run = len(plan["tissue_positions"])
        if n_run == 0:
            logger.warning(
                f"slide {slide}: no tissue found (saturation threshold {setup['saturation']:.3f}, min_tissue "
                f"{self.min_tissue}): nothing was run and its map is empty. If the slide has tissue, lower "
                "--min_saturation or --min_tissue."
            )
            return "none", ZeroMap(shape), ZeroMap(shape) if self.uncertainty else None
        merger_cls, kwargs = choose_merger(shape, 1 + self.uncertainty, self.merger, self.max_memory_mb, workdir)
        with tqdm(total=n_run, desc=f"{slide.stem}", unit="patch", disable=not self.progress) as self._bar:
            with np.errstate(invalid="ignore"):  # 0 / 0 where no patch ran: NaN, written as 0
                merged = self._patch_inferer(setup["splitter"], merger_cls, **kwargs)(str(slide), self._forward)
        self._bar = None
        in_memory = isinstance(merged, torch.Tensor)
        plane = merged[0, 0].numpy() if in_memory else ArrayPlane(merged)
        uncertain = None
        if self.uncertainty:
            uncertain = merged[0, 1].numpy() if in_memory else ArrayPlane(merged, 1)
        return merger_cls.__name__, plane, uncertain

    def run(
        self, slides: Sequence[str | Path], shard: str | Sequence[int] | None = None, overwrite: bool = False
    ) -> list[dict]:
        """Check all slides (unless :meth:`check` has just checked these), then run this process's share of them (see
        :meth:`__call__`) and write the table of all of them. A slide that fails is reported and the others run, then
        a ``RuntimeError`` lists the failures.

        The share (:class:`~monai_wsl.inferers.shard.SlideShards`): under ``torchrun``, this rank's; else ``shard``
        ``"i/n"``; else all. The slides are shared out by their tissue area (:func:`balanced_shares`; under
        ``torchrun`` a slide already complete weighs nothing). A slide whose outputs are complete
        (:func:`~monai_wsl.data.slide_outputs.slide_outputs_complete`: all its files, made with these
        :meth:`settings`) is skipped unless ``overwrite``; one stopped midway is run again. Each slide's outcome is
        recorded in ``.status/<stem>.json``; at the end (under ``torchrun``: rank 0, once every rank is done; else each
        process, the last one seeing all) ``slides_summary.csv`` and ``slides_summary.json`` list every slide with
        its status (``done``, ``skipped-complete``, ``failed`` with the error, ``pending`` for a share not run yet),
        tissue area, patches, seconds and regions. Returns the summaries of this process's slides, run or skipped."""
        slides = [Path(s) for s in slides]
        if slides != self._checked:
            self.check(slides)
        with SlideShards(shard) as shards:
            try:
                self._settings = settings = self.settings()
                return self._run_share(slides, shards, settings, overwrite)
            finally:
                self._settings = None

    def _remove_leftovers(self, stem: str) -> None:
        """The temporary files and folder of an earlier run of slide ``stem`` that was killed (no other process runs
        this slide: the shares are disjoint)."""
        if not self.output_dir.is_dir():
            return
        names = [p.name for p in slide_output_paths(self.output_dir, stem, True).values()]
        leftovers = [p for name in names for p in self.output_dir.glob(f".{glob.escape(name)}.*.partial")]
        leftovers += self.output_dir.glob(f".{glob.escape(stem)}.work.*")
        for path in leftovers:
            logger.info(f"removing {path.name}, left by a run of {stem} that was stopped")
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _run_share(self, slides: list[Path], shards: SlideShards, settings: dict, overwrite: bool) -> list[dict]:
        def complete(i: int) -> bool:
            return not overwrite and slide_outputs_complete(self.output_dir, slides[i].stem, settings) is None

        def weigh(i: int) -> float:
            if shards.distributed and complete(i):  # the ranks see the same outputs: only the work left is shared
                return 0.0
            try:
                return tissue_area_estimate(slides[i], self.backend, self.min_saturation)
            except Exception as e:  # the slide's own run will say what is wrong with it
                logger.warning(f"slide {slides[i]}: no tissue estimate ({type(e).__name__}: {e}); weighed as 0")
                return 0.0

        weights = shards.compute(weigh, len(slides))
        mine = balanced_shares(weights, shards.world_size)[shards.rank]
        where = f"[shard {shards.label}] " if shards.world_size > 1 else ""
        if shards.world_size > 1:
            logger.info(
                f"{where}{len(mine)} of {len(slides)} slide(s), {sum(weights[i] for i in mine) / 1e6:.1f} of "
                f"{sum(weights) / 1e6:.1f} Mpx of tissue (level 0): " + ", ".join(slides[i].name for i in mine)
            )
        summaries, failed = [], []
        for i in mine:  # a slide that fails (a damaged tile, a full disk) does not stop the others
            slide, start = slides[i], time.perf_counter()
            record = {"slide": str(slide.absolute()), "shard": shards.label, "tissue_area_estimate_px": weights[i]}
            self._remove_leftovers(slide.stem)
            problem = "overwrite" if overwrite else slide_outputs_complete(self.output_dir, slide.stem, settings)
            if problem is None:
                summaries.append(json.loads((self.output_dir / f"{slide.stem}.json").read_text()))
                logger.info(f"{where}{slide.name}: its outputs are complete, skipped")
                write_slide_status(self.output_dir, slide.stem, {**record, "status": "skipped-complete"})
                continue
            if (self.output_dir / f"{slide.stem}.json").exists():
                logger.info(f"{where}{slide.name}: run again: {problem}")
            try:
                summaries.append(self(slide))
                record["status"], record["error"] = "done", None
            except Exception as e:
                logger.error(
                    f"slide {slide} failed ({type(e).__name__}: {e}); nothing of it was written", exc_info=True
                )
                failed.append(f"{slide}: {type(e).__name__}: {e}")
                record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
            record["seconds"] = round(time.perf_counter() - start, 2)
            write_slide_status(self.output_dir, slide.stem, record)
        shards.barrier()  # under torchrun, rank 0 writes the table once every rank's slides are recorded
        if shards.rank == 0 or not shards.distributed:
            extra = {"processes": shards.world_size, "torchrun": shards.distributed}
            rows = write_slides_table(self.output_dir, slides, settings, extra)
            counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
            logger.info(
                f"{where}slides: "
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + f"; the table of all: {(self.output_dir / 'slides_summary.csv').resolve()}"
            )
        shards.barrier()  # no rank stops (and torchrun stops the others) before the table is written
        if failed:
            raise RuntimeError(
                f"{where}{len(failed)} of {len(mine)} slide(s) failed, the others are done:\n  " + "\n  ".join(failed)
            )
        return summaries
