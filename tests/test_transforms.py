"""EnsureRGBd, BinarizeMaskd, CheckSameSized, CheckLabeld on files as users have them (after LoadImaged); the recipe's
augmentations (ResizeShortSided, RandColorJitterd) on arrays."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from monai_wsl.data import create_glas_datalist
from monai_wsl.transforms import (
    BinarizeMask,
    BinarizeMaskd,
    CheckLabeld,
    CheckSameSized,
    EnsureRGB,
    EnsureRGBd,
    RandColorJitterd,
    ResizeShortSided,
    hsv_to_rgb,
    intensity_on_tensors,
    rgb_to_hsv,
)

RNG = np.random.default_rng(0)


def load(**files):
    """``{key: path}`` -> LoadImaged + EnsureChannelFirstd output (PIL-read 2D images are ``(C, W, H)``)."""
    keys = list(files)
    return Compose([LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys)])(
        {k: str(v) for k, v in files.items()}
    )


def save(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


# --- BinarizeMaskd --------------------------------------------------------------------------------------------------


def test_binarize_official_instance_id_masks(shared_data):
    for name in ("train_1", "train_2", "train_12"):
        path = shared_data / "glas-bmp-sample" / f"{name}_anno.bmp"
        raw = np.asarray(Image.open(path))  # (H, W) instance ids
        assert raw.max() > 1  # several glands: really instance ids
        mask = BinarizeMaskd(keys="mask")(load(mask=path))["mask"]
        assert mask.dtype == torch.float32 and tuple(mask.shape) == (1, raw.shape[1], raw.shape[0])
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask[0].T.bool(), torch.from_numpy(raw > 0))  # (W, H) -> (H, W): same foreground
        assert mask.meta["filename_or_obj"] == str(path)


def test_binarize_0_255_png_mask(shared_data):
    path = shared_data / "glas" / "train_1_anno.png"
    raw = np.asarray(Image.open(path))
    mask = BinarizeMaskd(keys="mask")(load(mask=path))["mask"]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert int(mask.sum()) == int((raw == 255).sum())


def test_binarize_multichannel_masks():
    rgb = np.zeros((3, 4, 5), dtype=np.uint8)
    rgb[0, 0, 0], rgb[2, 3, 4] = 255, 7  # foreground in different channels
    out = BinarizeMask()(rgb)
    assert out.shape == (1, 4, 5) and out.dtype == np.float32
    assert out.sum() == 2 and out[0, 0, 0] == 1 and out[0, 3, 4] == 1
    rgba = np.concatenate([rgb, np.full((1, 4, 5), 255, np.uint8)])  # opaque alpha must not count
    assert np.array_equal(BinarizeMask()(rgba), out)
    assert BinarizeMask(ignore_alpha=False)(rgba).sum() == 20


# --- EnsureRGBd -----------------------------------------------------------------------------------------------------


def test_ensure_rgb_passes_rgb(tmp_path):
    path = save(tmp_path / "rgb.png", RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    d = load(image=path)
    out = EnsureRGBd(keys="image", mode="error")(d)["image"]
    assert out is d["image"] and tuple(out.shape) == (3, 8, 6)


def test_ensure_rgb_converts_grey_rgba_and_grey_alpha(tmp_path, caplog):
    grey = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    files = {
        "grey": (save(tmp_path / "grey.png", grey), np.stack([grey] * 3)),
        "rgba": (save(tmp_path / "rgba.png", rgba, "RGBA"), np.moveaxis(rgba[..., :3], -1, 0)),
        "la": (save(tmp_path / "la.png", np.stack([grey, 255 - grey], -1), "LA"), np.stack([grey] * 3)),
    }
    transform = EnsureRGBd(keys="image")  # mode="convert" by default
    with caplog.at_level(logging.WARNING):
        for path, expected in files.values():
            out = transform(load(image=path))["image"]
            assert tuple(out.shape) == (3, 8, 6)
            assert np.array_equal(out.numpy().transpose(0, 2, 1), expected)  # (C, W, H) -> (C, H, W)
            transform(load(image=path))  # a second time: no second warning
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(str(path) in w for (path, _), w in zip(files.values(), warned))


def test_ensure_rgb_rescales_16_bit(tmp_path):
    grey16 = RNG.integers(0, 65536, (6, 8), dtype=np.uint16)
    grey16[0, 0] = 65535
    out = EnsureRGBd(keys="image")(load(image=save(tmp_path / "g16.png", grey16)))["image"]
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 8, 6) and float(out.max()) == 255.0
    assert np.allclose(out[1].numpy().T, grey16 * 255.0 / 65535.0, atol=1e-3)
    with pytest.raises(ValueError, match=r"g16\.png .*values up to 65535 \(16-bit\)"):
        EnsureRGBd(keys="image", mode="error")(load(image=tmp_path / "g16.png"))


def test_ensure_rgb_errors_name_the_file(tmp_path):
    path = save(tmp_path / "train_3.png", RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8), "RGBA")
    with pytest.raises(ValueError) as err:
        EnsureRGBd(keys="image", mode="error")(load(image=path))
    assert str(err.value) == (
        f"image {path} has 4 channels (RGBA); expected 3 (RGB): "
        "convert the file or use EnsureRGBd(keys='image', mode='convert')."
    )
    grey = save(tmp_path / "grey.bmp", RNG.integers(0, 256, (6, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"grey\.bmp has 1 channel \(grey\)"):
        EnsureRGBd(keys="image", mode="error")(load(image=grey))
    with pytest.raises(ValueError, match=r"has shape \(5, 8, 6\)"):  # 5 channels: error in any mode
        EnsureRGB()(np.zeros((5, 8, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="mode"):
        EnsureRGBd(keys="image", mode="rgb")


# --- CheckSameSized, CheckLabeld ------------------------------------------------------------------------------------


def test_check_same_size(tmp_path):
    image = save(tmp_path / "train_1.bmp", RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    good = save(tmp_path / "train_1_anno.bmp", np.ones((10, 12), dtype=np.uint8))
    d = load(image=image, mask=good)
    assert CheckSameSized(keys=("image", "mask"))(d) is d
    bad = save(tmp_path / "train_1_anno.png", np.ones((9, 12), dtype=np.uint8))
    with pytest.raises(ValueError) as err:
        CheckSameSized(keys=("image", "mask"))(load(image=image, mask=bad))
    message = str(err.value)
    assert str(image) in message and str(bad) in message and "(12, 10)" in message and "(12, 9)" in message


def test_check_label():
    check = CheckLabeld(keys="label", num_classes=2, class_names=["benign", "malignant"])
    for label in (0, 1, np.int64(1), torch.tensor(1), torch.tensor([0]), np.array(1)):
        assert check({"image": "/d/train_1.bmp", "label": label})["label"] is label
    for label in (2, -1, True, 1.0, "malignant", torch.tensor(1.0), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=r"of image /d/train_7\.bmp is not a class index in \[0, 2\) \(0=benign"):
            check({"image": "/d/train_7.bmp", "label": label})
    with pytest.raises(ValueError, match="label 3 of image"):
        check({"image": "/d/train_7.bmp", "label": 3})
    with pytest.raises(ValueError, match="class_names"):
        CheckLabeld(keys="label", num_classes=3, class_names=["benign", "malignant"])


def test_pipeline_on_official_bmp_release(shared_data):
    datalist = create_glas_datalist(shared_data / "glas-bmp-sample", valid_fraction=0.5)
    transform = Compose(
        [
            LoadImaged(keys=["image", "mask"], image_only=False),
            EnsureChannelFirstd(keys=["image", "mask"]),
            EnsureRGBd(keys="image", mode="error"),
            BinarizeMaskd(keys="mask"),
            CheckSameSized(keys=("image", "mask")),
            CheckLabeld(keys="label", num_classes=2, class_names=datalist["labels"]),
        ]
    )
    for item in datalist["training"] + datalist["validation"]:
        out = transform(item)
        w, h = Image.open(item["image"]).size
        assert tuple(out["image"].shape) == (3, w, h) and tuple(out["mask"].shape) == (1, w, h)
        assert 0 < float(out["mask"].mean()) < 1 and out["label"] == item["label"]


# --- the recipe's augmentations: ResizeShortSided, RandColorJitterd, the HSV conversion ------------------------------


def test_hsv_conversion_matches_colorsys_and_round_trips():
    import colorsys

    rgb = torch.from_numpy(RNG.random((3, 7, 9))).float()
    rgb[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure red, green, blue, grey and black
    rgb[:, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    rgb[:, 0, 2] = torch.tensor([0.0, 0.0, 1.0])
    rgb[:, 0, 3] = 0.4
    rgb[:, 0, 4] = 0.0
    hsv = rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*rgb[:, i, j].tolist()) for i in range(7) for j in range(9)])
    np.testing.assert_allclose(hsv.reshape(3, -1).T.numpy(), expected, atol=1e-6)
    torch.testing.assert_close(hsv[:, 0, :3], torch.tensor([[0.0, 1 / 3, 2 / 3], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-6, rtol=1e-5)


def jitter(image: torch.Tensor, seed: int = 0, **factors) -> torch.Tensor:
    settings = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, **factors}
    transform = RandColorJitterd(keys="image", **settings)
    transform.set_random_state(seed)
    return transform({"image": image})["image"]


def test_color_jitter_brightness_scales_every_pixel_by_one_factor():
    image = torch.from_numpy(RNG.random((3, 8, 8)) * 0.6).float()  # below 1 / 1.5: never clipped
    out = jitter(image, brightness=0.5)
    factor = out / image
    assert 0.5 <= float(factor.mean()) <= 1.5 and float(factor.mean()) != pytest.approx(1.0)
    torch.testing.assert_close(factor, torch.full_like(factor, float(factor.mean())))


def test_color_jitter_hue_turns_the_colour_wheel_only():
    image = torch.from_numpy(RNG.random((3, 8, 8))).float()
    out = jitter(image, seed=3, hue=0.05)
    before, after = rgb_to_hsv(image), rgb_to_hsv(out)
    torch.testing.assert_close(after[1:], before[1:], atol=1e-5, rtol=1e-5)  # saturation and value kept
    shift = (after[0] - before[0]) % 1.0
    shift = torch.where(shift > 0.5, shift - 1, shift)
    assert 0 < abs(float(shift.mean())) <= 0.05
    torch.testing.assert_close(shift, torch.full_like(shift, float(shift.mean())), atol=1e-5, rtol=0)


def test_color_jitter_saturation_and_contrast_keep_grey_and_its_mean():
    grey = torch.full((3, 8, 8), 0.4)
    assert torch.allclose(jitter(grey, saturation=0.5, hue=0.05), grey, atol=1e-6)  # grey has no colour to change
    image = torch.from_numpy(RNG.random((3, 8, 8)) * 0.5 + 0.25).float()
    out = jitter(image, seed=1, contrast=0.5)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    assert float((out * luma).sum(0).mean()) == pytest.approx(float((image * luma).sum(0).mean()), abs=1e-5)
    assert not torch.allclose(out, image)


def test_color_jitter_is_seeded_clipped_and_keeps_the_meta_data():
    image = MetaTensor(torch.from_numpy(RNG.random((3, 8, 8))).float(), meta={"filename_or_obj": "train_1.bmp"})
    a = jitter(image, seed=5, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.05)
    b = jitter(image, seed=5, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.05)
    c = jitter(image, seed=6, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.05)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert isinstance(a, MetaTensor) and a.meta["filename_or_obj"] == "train_1.bmp"
    untouched = RandColorJitterd(keys="image", prob=0.0)({"image": image})["image"]
    assert torch.equal(untouched, image)
    with pytest.raises(ValueError, match="RGB images"):
        jitter(torch.rand(1, 8, 8), brightness=0.5)
    with pytest.raises(ValueError, match="hue"):
        RandColorJitterd(keys="image", hue=0.6)


def test_resize_short_side_keeps_the_aspect_ratio_and_the_masks_binary():
    image = torch.from_numpy(RNG.random((3, 775, 522))).float()  # a GlaS image as PIL reads it: (C, W, H)
    mask = (torch.from_numpy(RNG.random((1, 775, 522))) > 0.5).float()
    resize = ResizeShortSided(keys=("image", "mask"), size=432, mode=("bilinear", "nearest"))
    out = resize({"image": image, "mask": mask})
    assert tuple(out["image"].shape) == (3, 641, 432) and tuple(out["mask"].shape) == (1, 641, 432)  # 775 * 432 / 522
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    small = ResizeShortSided(keys="image", size=240)({"image": torch.rand(3, 100, 200)})["image"]
    assert tuple(small.shape) == (3, 240, 480)  # enlarged, so that a 224 crop always fits
    with pytest.raises(ValueError, match="size must be >= 1"):
        ResizeShortSided(keys="image", size=0)


@pytest.mark.parametrize(
    "args",
    [(0, 255, -1.0, 1.0, True), (0, 255, 0.0, 1.0, False), (10, 200, -2.0, 3.0, True), (255, 0, -1.0, 1.0, True)],
)
def test_intensity_on_tensors_equals_scale_intensity_range(args):
    """The slide path's plain-tensor intensity transform gives MONAI's ScaleIntensityRange's values to the bit (clipped
    or not, other ranges, a reversed input range), as a plain tensor."""
    from monai.transforms import ScaleIntensityRange

    transform = ScaleIntensityRange(*args[:4], clip=args[4])
    x = torch.from_numpy(RNG.integers(0, 256, (2, 3, 17, 9)).astype(np.float32))
    before = x.clone()
    ours = intensity_on_tensors(transform, x)
    assert type(ours) is torch.Tensor and ours.dtype == torch.float32
    assert torch.equal(ours, torch.as_tensor(transform(x.clone())))  # to the bit
    assert torch.equal(x, before)  # the input is left as it was
    if args[4]:
        assert ours.min() >= min(args[2:4]) and ours.max() <= max(args[2:4])


def test_intensity_on_tensors_calls_any_other_transform():
    from monai.transforms import NormalizeIntensity

    x = MetaTensor(torch.arange(24, dtype=torch.float32).view(1, 2, 3, 4))
    ours = intensity_on_tensors(NormalizeIntensity(), x)
    assert type(ours) is torch.Tensor
    assert torch.allclose(ours, torch.as_tensor(NormalizeIntensity()(x)))
    assert abs(float(ours.mean())) < 1e-6
