"""scripts/mask_study.py: the selection rules read from a training log, and the mask rules on a network."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


def load_study():
    return load_script("mask_study")


def line(epoch, acc, pxap, f1=0.5):
    return (
        f"2026-12-02 10:37:50,737 - INFO - Epoch[{epoch}] Metrics -- val_accuracy: {acc:.4f} val_f1_neg: {f1:.4f} "
        f"val_f1_pos: {f1:.4f} val_fpr: 0.2 val_iou_neg: 0.3 val_iou_pos: 0.3 val_pxap: {pxap:.4f} "
    )


def test_selection_rules_from_the_log(tmp_path):
    """Best accuracy with ties to the later epoch (the bundle's saver), best PxAP (B-LOC), best accuracy then PxAP,
    and the last epoch; the trainer's own metric lines (no val_accuracy) are not validation lines."""
    study = load_study()
    log = tmp_path / "train.log"
    rows = [line(1, 0.8, 0.60), line(2, 1.0, 0.70), line(3, 0.9, 0.75), line(4, 1.0, 0.65), line(5, 0.9, 0.50)]
    trainer = "2026-12-02 10:37:50 - INFO - Epoch[5] Metrics -- loss: -2.6669 train_accuracy: 0.6042 "
    log.write_text("\n".join([*rows, trainer, line(6, 1.0, 0.60)]) + "\n")
    metrics = study.epoch_metrics(log)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6] and metrics[3]["val_pxap"] == 0.75
    chosen = study.select_epochs(metrics)
    assert chosen == {"accuracy (paper)": 6, "PxAP (B-LOC)": 3, "accuracy, then PxAP": 2, "last epoch": 6}
    with pytest.raises(ValueError, match="no validation metrics"):
        study.select_epochs({})


def test_flips_and_percentile_normalisation():
    study = load_study()
    from monai_wsl.networks.utils import spatial_flips

    assert spatial_flips(2) == [(), (2,), (3,), (2, 3)]
    assert len(spatial_flips(3)) == 8 and len(set(spatial_flips(3))) == 8
    maps = torch.arange(400.0).view(1, 1, 20, 20)
    maps[0, 0, 0, 0] = 1e6  # one peak sets a min-max scale; the percentiles ignore it
    robust = study.percentile_normalize(maps)
    assert robust.min() == 0 and robust.max() == 1
    assert 0.45 < float(robust[0, 0, 10, 0]) < 0.55  # the middle value stays in the middle
    from monai_wsl.networks.utils import minmax_normalize

    assert float(minmax_normalize(maps)[0, 0, 10, 0]) < 0.001  # where min-max squeezes it to the bottom


def test_the_bundle_rule_is_the_networks_mask_at_any_scale():
    study = load_study()
    from monai_wsl.networks import MaxMinUncertaintyNet

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=False).eval()
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    rules = study.mask_rules(net, x, [0.15, 0.3])
    with torch.no_grad():
        mask = net.segment(x)
    score, seg = rules["M >= 0.5 (the bundle's)"]
    assert torch.equal(score, mask) and torch.equal(seg, mask >= 0.5)
    assert all(s.shape == (1, 1, 96, 128) and b.shape == (1, 1, 96, 128) for s, b in rules.values())
    assert rules["A_norm >= 0.3"][1].sum() <= rules["A_norm >= 0.15"][1].sum()
    # at another scale the masks still come back at the image's size
    scaled = study.mask_rules(net, x, [], short_side=64)
    assert all(s.shape == (1, 1, 96, 128) for s, _ in scaled.values())


class PoolingLocalizer(torch.nn.Module):
    """A localizer whose maps are 8 x 8 average pools of the image (class 1: the mean over channels, class 0: its
    negative): it commutes with flips, so averaging over flips must change nothing."""

    sigma, w = torch.tensor(0.15), 5.0

    def evidence(self, x):
        return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 8)

    def localize(self, x):
        from monai_wsl.networks.utils import soft_mask

        pooled = self.evidence(x)
        maps = torch.cat([-pooled, pooled], 1)
        scores = maps.flatten(2).mean(2)
        return scores, maps, soft_mask(maps, scores, x.shape[2:], self.sigma, self.w)


def test_flip_averaging_undoes_each_flip():
    study = load_study()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 96, 128)
    rules = study.mask_rules(PoolingLocalizer(), x, [])
    averaged, _ = rules["M averaged over flips >= 0.5"]
    assert torch.allclose(averaged, rules["M >= 0.5 (the bundle's)"][0], atol=1e-6)
    # evidence for the predicted class 1: its map minus class 0's, 2 x the pooled image, > 0 on an image in (0, 1)
    _, evidence = rules["evidence A_c - A_other > 0 (no normalisation)"]
    assert evidence.all()
    _, evidence = study.mask_rules(PoolingLocalizer(), x - 0.5, [])["evidence A_c - A_other > 0 (no normalisation)"]
    assert 0 < evidence.float().mean() < 1


class PixelLocalizer(PoolingLocalizer):
    """Class 1's map is the image itself (no pooling) plus ``frame`` times a pattern tied to the grid's origin (class
    0's, its negative): without the pattern the map moves with the image, so averaging over grid phases must change
    nothing."""

    def __init__(self, frame: float = 0.0):
        super().__init__()
        self.frame = frame

    def evidence(self, x):
        grid = torch.zeros_like(x[:, :1])
        grid[..., ::16, :] = self.frame  # a stripe every 16 rows from the top, wherever the image starts
        return x.mean(1, keepdim=True) + grid


def test_grid_phase_averaging_crops_each_shift_back():
    study = load_study()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 80)
    rules = study.mask_rules(PixelLocalizer(), x, [], shift=8)
    shifted, seg = rules["M averaged over flips and shifts 0 / 8 >= 0.5"]
    assert shifted.shape == (1, 1, 64, 80) and torch.equal(seg, shifted >= 0.5)
    # the reflected border holds only values of the image: each shift's mask, cropped back, is the unshifted one
    assert torch.allclose(shifted, rules["M averaged over flips >= 0.5"][0], atol=1e-6)
    # a map tied to the grid (its stripes stay where the padded input starts) is averaged over the phases
    framed = study.mask_rules(PixelLocalizer(frame=5.0), x, [], shift=8)
    unshifted = framed["M averaged over flips >= 0.5"][0]
    averaged = framed["M averaged over flips and shifts 0 / 8 >= 0.5"][0]
    assert (averaged - unshifted).abs().max() > 0.1


def test_classifier_views_score_each_view_the_loss_builds(tmp_path):
    """The classifier's probability of the true class on x, x * M, x * (1 - M), x * G and x * (1 - G), by class:
    a mask G over the whole image leaves x as it is and blanks the complement; x * M is the network's own mask."""
    study = load_study()
    import numpy as np
    from PIL import Image

    from monai_wsl.networks import MaxMinUncertaintyNet

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=False).eval()
    rng = np.random.default_rng(0)
    items = []
    for i, (label, glands) in enumerate([(0, 1), (1, 1)]):
        pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"i{i}.png")
        Image.fromarray(np.full((64, 96), 255 * glands, np.uint8)).save(tmp_path / f"i{i}_anno.png")
        items.append({"image": str(tmp_path / f"i{i}.png"), "mask": str(tmp_path / f"i{i}_anno.png"), "label": label})
    views = study.classifier_views(net, items)
    assert sorted(views) == [0, 1] and list(views[0]) == list(study.VIEWS)
    x = torch.from_numpy(np.array(Image.open(items[1]["image"]))).permute(2, 1, 0)[None].float() / 127.5 - 1
    with torch.no_grad():
        mask = net.segment(x)
        views_x = (x, x * mask, x * (1 - mask), torch.zeros_like(x))
        direct = [net.classify(v).softmax(1)[0, 1].item() for v in views_x]
    assert views[1]["x"] == pytest.approx(direct[0], abs=1e-5)
    assert views[1]["x * M"] == pytest.approx(direct[1], abs=1e-5)
    assert views[1]["x * (1 - M)"] == pytest.approx(direct[2], abs=1e-5)
    assert views[1]["x * G"] == pytest.approx(direct[0], abs=1e-5)  # G covers everything: x * G is x
    assert views[1]["x * (1 - G)"] == pytest.approx(direct[3], abs=1e-5)  # and its complement is blank
    assert 0 < views[0]["x"] < 1 and views[0]["x"] != pytest.approx(views[1]["x"], abs=1e-6)  # class 0's own image


def test_grid_ceiling_is_exact_on_the_grid_and_blind_below_it(tmp_path):
    """A perfect map pooled to the encoder's grid keeps glands whose borders lie on the cells' borders exactly, and
    loses a gland narrower than half a cell."""
    study = load_study()
    import numpy as np
    from PIL import Image

    aligned = np.zeros((64, 96), np.uint8)
    aligned[:, :64] = 255  # two of three 32-pixel columns of cells
    narrow = np.zeros((64, 96), np.uint8)
    narrow[:, 40:48] = 255  # 8 pixels wide: a quarter of a cell
    items = []
    for i, (label, glands) in enumerate([(0, aligned), (1, narrow)]):
        Image.fromarray(glands).save(tmp_path / f"m{i}.png")
        items.append({"image": "unused", "mask": str(tmp_path / f"m{i}.png"), "label": label})
    rows = study.grid_ceiling(items[:1], [32])
    row = rows["the glands on a 32-pixel grid"]
    assert row["f1_pos"] == pytest.approx(1.0) and row["f1_neg"] == pytest.approx(1.0)
    assert row["pxap"] > 0.99 and row["mask_share_0"] == pytest.approx(2 / 3)
    row = study.grid_ceiling(items, [32, 8])
    assert row["the glands on a 32-pixel grid"]["mask_share_1"] == 0  # below the grid: nothing marked
    assert row["the glands on a 8-pixel grid"]["mask_share_1"] == pytest.approx(8 / 96)
