"""Run a trained localizer over whole slides: MONAI's ``PatchInferer`` over the tissue of a slide, read patch by patch
through ``WSIReader``, merged by ``AvgMerger`` (or ``ZarrAvgMerger`` on disk when the map would not fit in memory),
and the map handed on as files viewers open."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import AvgMerger, PatchInferer, SlidingWindowSplitter, WSISlidingWindowSplitter, ZarrAvgMerger
from monai.transforms import ScaleIntensityRange

from monai_wsl.data.check import DataError, _warn_if_synthetic, _writable_problem
from monai_wsl.data.slides import (
    ZeroMap,
    choose_level,
    downsample_mean,
    mask_to_geojson,
    open_slide,
    tissue_mask,
    write_pyramid_tiff,
)

__all__ = ["TissueWSISplitter", "SlideInferer", "binary_entropy"]

logger = logging.getLogger(__name__)


class TissueWSISplitter(WSISlidingWindowSplitter):
    """MONAI's ``WSISlidingWindowSplitter`` that decides from the location, before reading, whether a patch is run:
    only patches with at least ``min_tissue`` of their area on tissue are read and yielded, so background costs
    neither a read nor a forward pass. Pixels of border patches beyond the slide are set to white (glass), not to
    the black a reader returns there.

    Args:
        patch_size, overlap: as ``WSISlidingWindowSplitter``.
        tissue: ``(h, w)`` bool tissue mask of the slide at ``tissue_downsample`` (level-0 pixels per mask pixel);
            ``None`` runs every patch.
        tissue_downsample: see ``tissue``.
        level_downsample: level-0 pixels per pixel of the level run.
        min_tissue: the fraction of a patch that must be tissue.
        num_workers: threads that read patches ahead of the network, in order (at most ``4 x num_workers`` patches
            ahead, so memory stays bounded); 0 reads each patch when it is asked for. OpenSlide and cuCIM read
            regions without holding Python's lock, so on a GPU, where reading is the slow part, threads keep the
            network fed.
        reader, reader_kwargs: as ``WSISlidingWindowSplitter`` (``level`` among the kwargs).
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        overlap: float | int = 0.0,
        tissue: np.ndarray | None = None,
        tissue_downsample: float = 1.0,
        level_downsample: float = 1.0,
        min_tissue: float = 0.05,
        num_workers: int = 0,
        reader: Any = "OpenSlide",
        **reader_kwargs: Any,
    ) -> None:
        super().__init__(patch_size=patch_size, overlap=overlap, reader=reader, **reader_kwargs)
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be 0 or more, not {num_workers}.")
        self.num_workers = int(num_workers)
        self.tissue = tissue
        self.tissue_downsample = float(tissue_downsample)
        self.level_downsample = float(level_downsample)
        self.min_tissue = float(min_tissue)

    def _grid(self, inputs: Any) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
        from monai.data.utils import iter_patch_position

        shape = tuple(self.get_input_shape(inputs))
        patch_size, overlap, offset = self._get_valid_shape_parameters(shape)
        pad_size, _ = self._calculate_pad_size(shape, 2, patch_size, offset, overlap)
        padded = tuple(s + p for s, p in zip(shape, pad_size[::2]))
        positions = [tuple(int(v) for v in loc) for loc in iter_patch_position(padded, patch_size, offset, overlap)]
        return shape, tuple(patch_size), positions

    def tissue_fraction(self, location: Sequence[int], patch_size: Sequence[int]) -> float:
        """The fraction of the patch at ``location`` (pixels of the level run, ``(row, col)``) that is tissue."""
        if self.tissue is None:
            return 1.0
        scale = self.level_downsample / self.tissue_downsample
        (y, x), (ph, pw) = location, patch_size
        y0, x0 = int(np.floor(y * scale)), int(np.floor(x * scale))
        y1, x1 = max(int(np.ceil((y + ph) * scale)), y0 + 1), max(int(np.ceil((x + pw) * scale)), x0 + 1)
        window = self.tissue[max(y0, 0) : y1, max(x0, 0) : x1]
        return float(window.sum()) / ((y1 - y0) * (x1 - x0))

    def plan(self, inputs: Any) -> dict:
        """The grid a slide is split into: ``shape`` (of the level run), ``positions`` (all), ``tissue_positions``
        (those that are run)."""
        shape, patch_size, positions = self._grid(inputs)
        kept = [p for p in positions if self.tissue_fraction(p, patch_size) >= self.min_tissue]
        return {"shape": shape, "patch_size": patch_size, "positions": positions, "tissue_positions": kept}

    def __call__(self, inputs: Any) -> Iterable[tuple[torch.Tensor, Sequence[int]]]:
        if not isinstance(inputs, str) and isinstance(inputs, Sequence):
            inputs = inputs[0]
        wsi = self.reader.read(str(inputs))
        plan = self.plan(inputs)
        (h, w), patch_size = plan["shape"], plan["patch_size"]

        def read(location: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
            level0 = tuple(round(v * self.level_downsample) for v in location)
            patch, _ = self.reader.get_data(wsi=wsi, location=level0, size=patch_size)
            patch = torch.tensor(np.asarray(patch))[None]
            over_h, over_w = location[0] + patch_size[0] - h, location[1] + patch_size[1] - w
            if over_h > 0 or over_w > 0:
                if over_h > 0:
                    patch[..., patch_size[0] - over_h :, :] = 255
                if over_w > 0:
                    patch[..., :, patch_size[1] - over_w :] = 255
            return patch, location

        positions = iter(plan["tissue_positions"])
        if self.num_workers == 0:
            yield from map(read, positions)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="slide-reader") as pool:
            ahead = deque(pool.submit(read, p) for p in islice(positions, 4 * self.num_workers))
            try:
                while ahead:
                    patch = ahead.popleft().result()
                    ahead.extend(pool.submit(read, p) for p in islice(positions, 1))
                    yield patch
            finally:  # a consumer that stops early (an error downstream) leaves no reads queued
                for future in ahead:
                    future.cancel()


class _Plane:
    """The ``(H, W)`` plane ``channel`` of a ``(1, C, H, W)`` zarr array, read by slices (never the whole array at
    once)."""

    def __init__(self, array: Any, channel: int = 0) -> None:
        self.array, self.channel = array, int(channel)
        self.shape = tuple(array.shape[-2:])

    def __getitem__(self, index: tuple) -> np.ndarray:
        return np.asarray(self.array[(0, self.channel, *index)])


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """The entropy of a Bernoulli probability, in bits: 0 where ``p`` is 0 or 1, 1 at 0.5."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / np.log(2.0)


class SlideInferer:
    """A weakly-supervised localizer over whole slides. For each slide: a tissue mask from a low-resolution level
    (the smallest of at least ``thumbnail_size`` pixels; Otsu on saturation), MONAI's ``PatchInferer`` over the
    tissue patches of the chosen level (batched, with an overlap, a progress bar), and four files named after the
    slide in ``output_dir``:

    - ``<stem>_map.tif``: the mask probability ``M`` (8-bit, ``round(255 M)``) as a pyramidal tiled TIFF;
    - ``<stem>_thumbnail.png``: the slide and the regions ``M >= threshold`` over it;
    - ``<stem>.geojson``: the regions ``M >= threshold`` as polygons in level-0 pixels (QuPath imports them);
    - ``<stem>.json``: the slide, the level and grid used, the patches run, seconds, the slide-level class
      probabilities and how they were aggregated;
    - with ``uncertainty``, ``<stem>_uncertainty.tif``: the binary entropy (bits, 8-bit ``round(255 H)``) of each
      patch's mask averaged over four test-time flips (none, horizontal, vertical, both), merged as the map is (where
      patches overlap, the mean of their entropies), pyramidal like the map; the map, regions and class
      probabilities are then those flip averages too.

    Each file is written under a temporary name and renamed when complete, the JSON last: a slide whose JSON exists
    is done. The same network pass serves a region of a slide (:meth:`infer_region`, as MONAI Label's pathology
    workflow sends it).

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
    ) -> None:
        if merger not in ("auto", "memory", "zarr"):
            raise ValueError(f"merger must be 'auto', 'memory' or 'zarr', not {merger!r}.")
        self.network = network
        self.output_dir = Path(output_dir)
        self.patch_size = int(patch_size)
        self.overlap = overlap
        self.level, self.mpp = level, mpp
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.preprocessing = preprocessing or ScaleIntensityRange(0, 255, -1.0, 1.0, clip=True)
        self.threshold = float(threshold)
        self.min_tissue, self.min_saturation = float(min_tissue), float(min_saturation)
        self.merger, self.max_memory_mb = merger, float(max_memory_mb)
        self.backend = backend
        self.class_names, self.positive_class = list(class_names), int(positive_class)
        self.region_name = region_name
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.amp = bool(amp) and self.device.type == "cuda"
        self.checkpoint = checkpoint
        self.progress = progress
        self.thumbnail_size, self.geojson_max_side = int(thumbnail_size), int(geojson_max_side)
        self.uncertainty = bool(uncertainty)
        self._probs: list[torch.Tensor] = []
        self._bar: Any = None
        self._checked: list[Path] = []

    # ------------------------------------------------------------------ checks
    def check(self, slides: Sequence[str | Path]) -> None:
        """Open every slide and check its level, the patch size and the output folder before anything runs; one
        :class:`DataError` lists every problem (each names its file)."""
        problems = []
        for slide in slides:
            try:
                reader, wsi = open_slide(slide, self.backend)
                level = choose_level(reader, wsi, slide, self.level, self.mpp)
                h, w = reader.get_size(wsi, level)
                if min(h, w) < self.patch_size:
                    problems.append(
                        f"slide {slide}: level {level} is {w} x {h} pixels, smaller than a patch ({self.patch_size}): "
                        "pass a smaller --patch_size or a finer --level"
                    )
            except DataError as e:
                problems += e.problems
        if self.patch_size < self.network_min_size():
            problems.append(f"patch_size {self.patch_size} is under the network's minimum {self.network_min_size()}")
        writable = _writable_problem(self.output_dir)
        problems += [writable] if writable else []
        stems = [Path(s).stem for s in slides]
        problems += [
            f"two slides are named {s!r}: their outputs would overwrite each other"
            for s in sorted({s for s in stems if stems.count(s) > 1})
        ]
        if self.checkpoint is not None:
            _warn_if_synthetic(self.checkpoint, None, list(slides))
        if problems:
            error = DataError(problems, "the slides")
            logger.error(str(error))
            raise error
        self._checked = [Path(s) for s in slides]
        logger.info("checked %d slide(s); outputs go to %s", len(slides), self.output_dir.resolve())

    def network_min_size(self) -> int:
        return int(getattr(self.network, "min_spatial_size", 1))

    # ------------------------------------------------------------------ the network pass
    @torch.no_grad()
    def _forward(self, patches: torch.Tensor, probs: list | None = None) -> torch.Tensor:
        """The masks ``(B, 1, H, W)`` of a ``(B, 3, H, W)`` uint8 batch (with ``uncertainty``: ``(B, 2, H, W)``, the
        mask averaged over four flips and its binary entropy); its class probabilities are appended to ``probs``
        (default: the slide's, ``self._probs``)."""
        x = self.preprocessing(patches.to(self.device).float())
        x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
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
        reader, wsi = open_slide(slide, self.backend)
        try:
            if level is None:
                level = choose_level(reader, wsi, slide, self.level, self.mpp)
            else:
                level = choose_level(reader, wsi, slide, level, None)
            image, _ = reader.get_data(
                wsi, location=(int(location[1]), int(location[0])), size=(int(size[1]), int(size[0])), level=level
            )
            image = np.array(image)
            h, w = reader.get_size(wsi, level)
            downsample = float(reader.get_downsample_ratio(wsi, level))
        finally:  # one request, one handle: a long-running server closes it at once
            close = getattr(wsi, "close", None)
            if close is not None:
                close()
        inside_h = max(0, min(int(size[1]), h - round(location[1] / downsample)))
        inside_w = max(0, min(int(size[0]), w - round(location[0] / downsample)))
        image[:, inside_h:, :] = 255
        image[:, :, inside_w:] = 255
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
    def _tissue(
        self, reader: Any, wsi: Any, slide: Path, level_downsample: float
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        # the smallest level of at least `thumbnail_size` pixels on its long side (else the largest level): the
        # picture for the thumbnail, and where the tissue is found
        n = reader.get_level_count(wsi)
        lowest = next((i for i in reversed(range(n)) if max(reader.get_size(wsi, i)) >= self.thumbnail_size), 0)
        h, w = reader.get_size(wsi, lowest)
        if h * w > 2**26:
            raise DataError(
                [
                    f"slide {slide} has no low-resolution level (its smallest is {w} x {h}): save it as a pyramidal "
                    "tiled TIFF (e.g. vips tiffsave --tile --pyramid) so that the tissue can be found"
                ]
            )
        rgb, _ = reader.get_data(wsi, location=(0, 0), size=(h, w), level=lowest)
        rgb = np.moveaxis(np.asarray(rgb), 0, -1)[..., :3]
        downsample = float(reader.get_downsample_ratio(wsi, lowest))
        # no finer than 1024 pixels on the long side or 8 pixels a patch side, whichever is finer: enough to place
        # every patch, and cheap on a slide whose lowest level is large
        wanted = min(max(h, w) * downsample / 1024, self.patch_size * level_downsample / 8)  # level-0 pixels
        if wanted > downsample * 1.25:
            from PIL import Image

            factor = wanted / downsample
            size = (max(1, round(w / factor)), max(1, round(h / factor)))
            rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.BILINEAR))
            downsample *= w / size[0]
        mask, threshold = tissue_mask(rgb, self.min_saturation)
        return rgb, mask, downsample, threshold

    def _merger(self, shape: tuple[int, int], workdir: str) -> tuple[Any, dict]:
        need_mb = shape[0] * shape[1] * 4 * (1 + 1 + self.uncertainty) / 2**20  # float32 values (1 or 2), counts
        if self.merger == "memory" or (self.merger == "auto" and need_mb <= self.max_memory_mb):
            return AvgMerger, {}
        import zarr

        store_cls = getattr(zarr.storage, "LocalStore", None) or zarr.storage.DirectoryStore  # zarr 3, zarr 2
        stores = {k: store_cls(os.path.join(workdir, f"{k}.zarr")) for k in ("out", "values", "counts")}
        chunks = (1, 1, 1024, 1024)
        return ZarrAvgMerger, {
            "store": stores["out"],
            "value_store": stores["values"],
            "count_store": stores["counts"],
            "chunks": chunks,
            "count_dtype": "uint8",
        }

    def prepare(self, slide: str | Path) -> dict:
        """Open a slide and plan its run: the level, its downsample and microns per pixel, the tissue mask (and the
        low-resolution image it was found on) and the :class:`TissueWSISplitter` with its grid."""
        slide = Path(slide)
        reader, wsi = open_slide(slide, self.backend)
        level = choose_level(reader, wsi, slide, self.level, self.mpp)
        level_downsample = float(reader.get_downsample_ratio(wsi, level))
        h0, w0 = reader.get_size(wsi, 0)
        thumb, tissue, tissue_downsample, saturation = self._tissue(reader, wsi, slide, level_downsample)
        try:
            mpp: float | None = float(np.mean(reader.get_mpp(wsi, level)))
        except Exception:
            mpp = None
        splitter = TissueWSISplitter(
            self.patch_size,
            self.overlap,
            tissue,
            tissue_downsample,
            level_downsample,
            self.min_tissue,
            # tifffile's reader shares one unlocked file handle: threads only where reads are thread-safe
            self.num_workers if self.backend.lower() in ("openslide", "cucim") else 0,
            reader=self.backend,
            level=level,
        )
        return {
            "level": level,
            "level_downsample": level_downsample,
            "mpp": mpp,
            "size_level0": (int(w0), int(h0)),
            "thumbnail": thumb,
            "tissue": tissue,
            "saturation": saturation,
            "splitter": splitter,
            "plan": splitter.plan(str(slide)),
        }

    def __call__(self, slide: str | Path) -> dict:
        """Run one slide; returns its summary (the content of ``<stem>.json``)."""
        from tqdm.auto import tqdm

        slide = Path(slide)
        start = time.perf_counter()
        setup = self.prepare(slide)
        splitter, plan, shape = setup["splitter"], setup["plan"], setup["plan"]["shape"]
        level, level_downsample, mpp = setup["level"], setup["level_downsample"], setup["mpp"]
        thumb, tissue, saturation = setup["thumbnail"], setup["tissue"], setup["saturation"]
        w0, h0 = setup["size_level0"]
        n_run, n_all = len(plan["tissue_positions"]), len(plan["positions"])
        stem = slide.stem
        names = [("map", "_map.tif"), ("thumbnail", "_thumbnail.png"), ("geojson", ".geojson"), ("json", ".json")]
        if self.uncertainty:
            names.insert(1, ("uncertainty", "_uncertainty.tif"))
        outputs = {k: self.output_dir / f"{stem}{suffix}" for k, suffix in names}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix=f".{stem}.", dir=self.output_dir)
        partial = {k: p.with_name(f".{p.name}.partial") for k, p in outputs.items()}
        self.network.eval()
        self._probs = []
        try:
            if n_run == 0:
                logger.warning(
                    f"slide {slide}: no tissue found (saturation threshold {saturation:.3f}, min_tissue "
                    f"{self.min_tissue}): nothing was run and its map is empty. If the slide has tissue, lower "
                    "--min_saturation or --min_tissue."
                )
                plane: Any = ZeroMap(shape)
                uncertain: Any = ZeroMap(shape)
                merger_name = "none"
            else:
                merger_cls, kwargs = self._merger(shape, workdir)
                merger_name = merger_cls.__name__
                with tqdm(total=n_run, desc=f"{stem}", unit="patch", disable=not self.progress) as self._bar:
                    with np.errstate(invalid="ignore"):  # 0 / 0 where no patch ran: NaN, written as 0
                        merged = self._patch_inferer(splitter, merger_cls, **kwargs)(str(slide), self._forward)
                self._bar = None
                in_memory = isinstance(merged, torch.Tensor)
                plane = merged[0, 0].numpy() if in_memory else _Plane(merged)
                if self.uncertainty:
                    uncertain = merged[0, 1].numpy() if in_memory else _Plane(merged, 1)
            levels = write_pyramid_tiff(partial["map"], plane, mpp=mpp, workdir=workdir)
            if self.uncertainty:
                write_pyramid_tiff(partial["uncertainty"], uncertain, mpp=mpp, workdir=workdir)
            factor = max(1, int(np.ceil(max(shape) / self.geojson_max_side)))
            small = downsample_mean(plane, factor) if factor > 1 else np.nan_to_num(np.asarray(plane[:, :]))
            geojson = mask_to_geojson(small >= self.threshold, factor * level_downsample, self.region_name)
            partial["geojson"].write_text(json.dumps(geojson))  # renamed into place below
            self._thumbnail(partial["thumbnail"], thumb, small)
            probs = torch.cat(self._probs).numpy() if self._probs else np.zeros((0, len(self.class_names)))
            summary = {
                "slide": str(slide.absolute()),
                "size_level0": [int(w0), int(h0)],
                "level": level,
                "level_downsample": level_downsample,
                "mpp": mpp,
                "patch_size": self.patch_size,
                "overlap": self.overlap,
                "stride": self.patch_size
                - (round(self.patch_size * self.overlap) if isinstance(self.overlap, float) else int(self.overlap)),
                "patches_total": n_all,
                "patches_run": n_run,
                "tissue_fraction": float(tissue.mean()),
                "tissue_saturation_threshold": saturation,
                "merger": merger_name,
                "map": {
                    "file": outputs["map"].name,
                    "levels": [list(s) for s in levels],
                    "scale": 255,
                    "downsample_level0": level_downsample,
                },
                "uncertainty": {
                    "file": outputs["uncertainty"].name,
                    "what": "the binary entropy (bits) of each patch's mask averaged over four flips (none, "
                    "horizontal, vertical, both), merged as the map (the mean where patches overlap); the map, "
                    "regions and class probabilities are those flip averages",
                    "scale": 255,
                }
                if self.uncertainty
                else None,
                "regions": {
                    "file": outputs["geojson"].name,
                    "count": len(geojson["features"]),
                    "threshold": self.threshold,
                    "downsample_level0": factor * level_downsample,
                },
                "class_names": self.class_names,
                "slide_probability": probs.mean(0).round(6).tolist() if len(probs) else None,
                "slide_max_probability": float(probs[:, self.positive_class].max()) if len(probs) else None,
                "aggregation": "slide_probability: the mean over the patches run of each patch's class probabilities; "
                f"slide_max_probability: the highest {self.class_names[self.positive_class]!r} probability of a patch",
                "seconds": round(time.perf_counter() - start, 2),
            }
            partial["json"].write_text(json.dumps(summary, indent=1))
            for k in outputs:  # the JSON last: it marks a finished slide
                os.replace(partial[k], outputs[k])
            if not self.uncertainty:  # an earlier run's, which this slide's JSON no longer describes
                (self.output_dir / f"{stem}_uncertainty.tif").unlink(missing_ok=True)
        finally:
            self._bar = None
            for p in partial.values():
                p.unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)
        logger.info(
            f"{slide.name}: {n_run} of {n_all} patches on tissue run in {summary['seconds']} s; "
            f"{len(geojson['features'])} region(s); files in {self.output_dir.resolve()}"
        )
        return summary

    def _thumbnail(self, path: Path, rgb: np.ndarray, prob: np.ndarray) -> None:
        from PIL import Image

        from monai_wsl.visualize import COLORS, legend
        from monai_wsl.visualize.overlay import _contour

        image = Image.fromarray(rgb)
        scale = self.thumbnail_size / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
            )
        base = np.asarray(image, np.float32) / 255
        p = np.asarray(Image.fromarray(prob.astype(np.float32)).resize(image.size, Image.BILINEAR))
        color = np.asarray(COLORS["pred"], np.float32)
        inside = p >= self.threshold  # the predicted region, tinted as in the bundle's other overlays
        over = base.copy()
        over[inside] = 0.55 * base[inside] + 0.45 * color
        edge = _contour(torch.from_numpy(inside)).numpy()
        over[edge] = color
        gap = np.ones((base.shape[0], 4, 3), np.float32)
        panels = np.concatenate([base, gap, over], 1)
        key = legend(panels.shape[1], truth=False).permute(1, 2, 0).numpy()
        out = np.concatenate([panels, key], 0)
        Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8)).save(path, format="PNG", compress_level=1)

    def run(self, slides: Sequence[str | Path]) -> list[dict]:
        """Check all slides (unless :meth:`check` has just checked these), then run each (see :meth:`__call__`); a
        slide that fails is reported and the others run, then a ``RuntimeError`` lists the failures."""
        slides = [Path(s) for s in slides]
        if slides != self._checked:
            self.check(slides)
        summaries, failed = [], []
        for slide in slides:  # a slide that fails (a damaged tile, a full disk) does not stop the others
            try:
                summaries.append(self(slide))
            except Exception as e:
                logger.error(
                    f"slide {slide} failed ({type(e).__name__}: {e}); nothing of it was written", exc_info=True
                )
                failed.append(f"{slide}: {type(e).__name__}: {e}")
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(slides)} slide(s) failed, the others are done:\n  " + "\n  ".join(failed)
            )
        return summaries
