"""Run a trained localizer over whole slides: MONAI's ``PatchInferer`` over the tissue of a slide, read patch by patch
through ``WSIReader`` (:class:`~monai_wsl.inferers.splitter.TissueWSISplitter`), merged by ``AvgMerger`` (or
``ZarrAvgMerger`` on disk when the map would not fit in memory), and the map handed on as files viewers open
(:mod:`monai_wsl.data.slide_outputs`)."""

from __future__ import annotations

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
from monai_wsl.data.slide_outputs import SlideWriter, class_summary, run_summary
from monai_wsl.data.slides import ArrayPlane, ZeroMap, read_region, slide_problems
from monai_wsl.networks.utils import binary_entropy, spatial_flips
from monai_wsl.transforms import intensity_on_tensors

from .backends import OnnxNetwork, with_backend
from .onnx_export import weights_digest
from .shard import SlideShards, run_share
from .splitter import TissueWSISplitter, choose_merger, plan_slide

__all__ = ["TissueWSISplitter", "SlideInferer", "binary_entropy"]

logger = logging.getLogger(__name__)

#: the attributes a slide's outputs depend on (:meth:`SlideInferer.settings`, with the weights' SHA-256)
_SETTINGS = (
    "level", "mpp", "patch_size", "overlap", "min_tissue", "min_saturation", "threshold", "uncertainty",
    "class_names", "positive_class", "region_name", "thumbnail_size", "geojson_max_side",
)  # fmt: skip


class SlideInferer:
    """A weakly-supervised localizer over whole slides. For each slide: the plan (:func:`plan_slide`: tissue by Otsu
    on saturation at a low level, the tissue patches), MONAI's ``PatchInferer`` over those patches (batched, with an
    overlap, a progress bar), and the files :class:`~monai_wsl.data.slide_outputs.SlideWriter` names after the slide
    (map TIFF, thumbnail, GeoJSON, and last the JSON summary that makes the slide complete). :meth:`run` takes this
    process's share of many slides; with ``uncertainty`` each patch's mask is averaged over four flips and its binary
    entropy is a map too; :meth:`infer_region` serves a region (MONAI Label's pathology workflow).

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
        return {**{name: getattr(self, name) for name in _SETTINGS}, "model": weights_digest(self.network)}

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
        where = self.output_dir.resolve()
        logger.info(
            f"checked {len(slides)} slide(s); the network runs on {self.inference_backend}; outputs go to {where}"
        )

    def network_min_size(self) -> int:
        return int(getattr(self.network, "min_spatial_size", 1))

    # ------------------------------------------------------------------ the network pass
    @torch.no_grad()
    def infer_patches(self, patches: torch.Tensor, probs: list | None = None) -> torch.Tensor:
        """The masks ``(B, 1, H, W)`` of a ``(B, 3, H, W)`` uint8 batch (with ``uncertainty``: ``(B, 2, H, W)``, the
        mask averaged over four flips and its binary entropy); its class probabilities are appended to ``probs``
        (default: the slide's, ``self._probs``)."""
        x = convert_to_tensor(patches, track_meta=False).to(self.device).float()
        x = intensity_on_tensors(self.preprocessing, x)
        flips = spatial_flips(x.ndim - 2) if self.uncertainty else [()]
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
        kwargs = {"batch_size": self.batch_size, "match_spatial_shape": True, **merger_kwargs}
        return PatchInferer(splitter=splitter, merger_cls=merger_cls, **kwargs)

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
        mask = self._patch_inferer(splitter)(image, lambda patches: self.infer_patches(patches, probs))
        out = {"mask": mask[0, 0].numpy(), "prob": torch.cat(probs).mean(0).numpy()}
        if self.uncertainty:
            out["uncertainty"] = mask[0, 1].numpy()
        return out

    # ------------------------------------------------------------------ one slide
    def prepare(self, slide: str | Path) -> dict:
        """The plan of a slide's run (:func:`~monai_wsl.inferers.splitter.plan_slide`)."""
        return plan_slide(
            slide,
            self.backend,
            self.level,
            self.mpp,
            self.patch_size,
            self.overlap,
            self.min_tissue,
            self.min_saturation,
            self.thumbnail_size,
            self.num_workers,
        )

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
        if n_run == 0:  # plan_slide said so
            return "none", ZeroMap(shape), ZeroMap(shape) if self.uncertainty else None
        merger_cls, kwargs = choose_merger(plan, 1 + self.uncertainty, self.merger, self.max_memory_mb, workdir)
        with tqdm(total=n_run, desc=f"{slide.stem}", unit="patch", disable=not self.progress) as self._bar:
            with np.errstate(invalid="ignore"):  # 0 / 0 where no patch ran: NaN, written as 0
                merged = self._patch_inferer(setup["splitter"], merger_cls, **kwargs)(str(slide), self.infer_patches)
        self._bar = None
        in_memory = isinstance(merged, torch.Tensor)
        planes = [merged[0, c].numpy() if in_memory else ArrayPlane(merged, c) for c in range(1 + self.uncertainty)]
        return merger_cls.__name__, planes[0], planes[1] if self.uncertainty else None

    def run(
        self, slides: Sequence[str | Path], shard: str | Sequence[int] | None = None, overwrite: bool = False
    ) -> list[dict]:
        """Check all slides (unless :meth:`check` has just checked these), then run this process's share of them
        (:func:`~monai_wsl.inferers.shard.run_share`): under ``torchrun`` this rank's, else ``shard`` ``"i/n"``, else
        all, shared out by tissue area. A slide whose outputs are complete with these :meth:`settings` is skipped
        unless ``overwrite``; one stopped midway runs again; one that fails is reported and the others run, then a
        ``RuntimeError`` lists the failures. Each slide's outcome goes to ``.status/<stem>.json`` and, at the end,
        ``slides_summary.csv`` / ``.json`` list every slide (status ``done``, ``skipped-complete``, ``failed`` with the
        error, ``pending``; tissue area, patches, seconds, regions). Returns this process's slides' summaries."""
        slides = [Path(s) for s in slides]
        if slides != self._checked:
            self.check(slides)
        with SlideShards(shard) as shards:
            try:
                self._settings = settings = self.settings()
                return run_share(self, slides, shards, settings, overwrite)
            finally:
                self._settings = None
