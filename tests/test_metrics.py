"""The localization metrics the bundle computes: MONAI's DiceMetric (F1+, and F1- on the backgrounds), MeanIoU,
ConfusionMatrixMetric's fall-out (pixel FPR) and Ignite's Accuracy, wired as in train.json; and PxAP, the project's
own. The values are those of the project's earlier implementation (the formulas below, in NumPy): hand-computed
cases, GlaS masks, and the empty-region convention (NaN, left out of the mean, as DiceMetric(ignore_empty=True))."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from PIL import Image

from monai_wsl.handlers import PixelAP
from monai_wsl.metrics import PixelAPMetric, compute_pxap

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"

# A 3 x 4 case: |P| = 4, |G| = 5, |P n G| = 3 -> F1+ = 6/9; background |1-P| = 8, |1-G| = 7, overlap 6 -> F1- = 12/15.
P = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
G = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


def _b(x):
    return x[None, None]


def reference_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """F1+, F1-, IoU+, IoU-, FPR of one binary mask, as the project computed them before it used MONAI's metrics: a
    score whose ground-truth region is empty is NaN."""
    p, g = pred.astype(bool), truth.astype(bool)
    tp, fp, fn, tn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum(), (~p & ~g).sum()

    def ratio(num, den, empty):
        return math.nan if empty else num / max(den, 1)

    return {
        "val_f1_pos": ratio(2 * tp, 2 * tp + fp + fn, tp + fn == 0),
        "val_f1_neg": ratio(2 * tn, 2 * tn + fn + fp, tn + fp == 0),
        "val_iou_pos": ratio(tp, tp + fp + fn, tp + fn == 0),
        "val_iou_neg": ratio(tn, tn + fn + fp, tn + fp == 0),
        "val_fpr": ratio(fp, fp + tn, fp + tn == 0),
    }


def bundle_metrics(items: list[dict]) -> tuple[dict, dict]:
    """Run train.json's validation postprocessing and metrics over ``items`` (one image each, as the evaluator's
    decollated output: soft ``pred`` (1, H, W), ``mask`` (1, H, W), ``logits`` (K,), ``label``); returns the epoch
    metrics and the per-image details."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    post = parser.get_parsed_content("validate#postprocessing")
    metrics = {
        **parser.get_parsed_content("validate#key_metric"),
        **parser.get_parsed_content("validate#additional_metrics"),
    }
    engine = Engine(lambda e, item: [post({**item, "pred": {"mask": item["pred"], "logits": item["logits"]}})])
    for name, metric in metrics.items():
        metric.attach(engine, name)
    state = engine.run(items)
    return state.metrics, state.metric_details


def test_hand_values_and_the_empty_region_convention():
    empty, full = torch.zeros_like(P), torch.ones_like(P)
    items = [
        {"pred": _b(P)[0] * 0.7 + 0.1, "mask": _b(G)[0], "logits": torch.tensor([1.0, 0.0]), "label": torch.tensor(0)},
        {"pred": _b(P)[0], "mask": _b(empty)[0], "logits": torch.tensor([0.0, 1.0]), "label": torch.tensor(0)},
        {"pred": _b(P)[0], "mask": _b(full)[0], "logits": torch.tensor([0.0, 1.0]), "label": torch.tensor(1)},
    ]
    metrics, details = bundle_metrics(items)
    # image 0 (a soft mask, segmented at 0.5): F1+ 6/9, F1- 12/15, IoU+ 3/6, IoU- 6/9, FPR 1/7
    torch.testing.assert_close(details["val_f1_pos"].flatten()[0], torch.tensor(6 / 9))
    torch.testing.assert_close(details["val_f1_neg"].flatten()[0], torch.tensor(12 / 15))
    torch.testing.assert_close(details["val_iou_pos"].flatten()[0], torch.tensor(3 / 6))
    torch.testing.assert_close(details["val_iou_neg"].flatten()[0], torch.tensor(6 / 9))
    # image 1 has no foreground (F1+ NaN, left out), image 2 no background (F1-, FPR NaN)
    assert metrics["val_f1_pos"] == pytest.approx((6 / 9 + 2 * 4 / (4 + 12)) / 2)
    assert metrics["val_f1_neg"] == pytest.approx((12 / 15 + 2 * 8 / (8 + 12)) / 2)
    assert metrics["val_fpr"] == pytest.approx((1 / 7 + 4 / 12) / 2)
    assert metrics["val_accuracy"] == pytest.approx(2 / 3)
    assert 0 < metrics["val_pxap"] < 1


def test_bundle_metrics_equal_the_earlier_implementation_on_glas_masks(shared_data):
    """20 GlaS ground truths against predictions made from them (blurred, noisy, thresholded), plus an image without
    gland and one with gland only: every per-image score and every mean as before."""
    files = sorted((shared_data / "glas").glob("train_*_anno.png"))[:20]
    g = torch.Generator().manual_seed(0)
    items, expected = [], []
    for f in files:
        truth = torch.from_numpy(np.array(Image.open(f)) > 0).float()[None]
        blurred = torch.nn.functional.avg_pool2d(truth[None], 31, 1, 15)[0]
        soft = (blurred + 0.3 * torch.rand(truth.shape, generator=g)).clamp(0, 1)
        items.append({"pred": soft, "mask": truth, "logits": torch.randn(2, generator=g), "label": torch.tensor(1)})
    items += [
        {**items[0], "mask": torch.zeros_like(items[0]["mask"])},
        {**items[1], "mask": torch.ones_like(items[1]["mask"])},
    ]
    for item in items:
        expected.append(reference_scores((item["pred"] >= 0.5).numpy(), item["mask"].numpy()))
    metrics, details = bundle_metrics(items)
    for name in ("val_f1_pos", "val_f1_neg", "val_iou_pos", "val_iou_neg"):
        ours = details[name].flatten().numpy()
        ref = np.array([e[name] for e in expected])
        assert np.array_equal(np.isnan(ours), np.isnan(ref)), name
        np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], rtol=1e-6, err_msg=name)
    for name in ("val_f1_pos", "val_f1_neg", "val_iou_pos", "val_iou_neg", "val_fpr"):
        assert metrics[name] == pytest.approx(np.nanmean([e[name] for e in expected]), rel=1e-6), name
    pooled = torch.cat([i["pred"].flatten() for i in items])[None, None, :, None]
    truths = torch.cat([i["mask"].flatten() for i in items])[None, None, :, None]
    # the bundle's PxAP is binned (1000 score bins): the exact PxAP of the scores rounded down to their bin
    binned = torch.floor(pooled.double() * 1000).clamp(max=999) / 1000
    assert metrics["val_pxap"] == pytest.approx(compute_pxap(binned, truths).item(), abs=1e-6)
    correct = [int(i["logits"].argmax() == i["label"]) for i in items]
    assert metrics["val_accuracy"] == pytest.approx(np.mean(correct))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pxap_equals_scikit_learn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(4, 1, 23, 17, generator=g)
    scores[0, 0, :5] = 0.5  # ties
    scores[1] = (scores[1] * 10).round() / 10  # many ties
    labels = (torch.rand(4, 1, 23, 17, generator=g) < 0.4).float()
    expected = sklearn_metrics.average_precision_score(labels.flatten().numpy(), scores.flatten().numpy())
    assert compute_pxap(scores, labels).item() == pytest.approx(expected, abs=1e-6)
    metric = PixelAPMetric(num_bins=None)  # exact, pooled over batches and over images of different sizes
    metric(scores[:2], labels[:2])
    metric([scores[2], scores[3, :, :10]], [labels[2], labels[3, :, :10]])
    pooled = torch.cat([scores[:3].flatten(), scores[3, :, :10].flatten()])
    pooled_labels = torch.cat([labels[:3].flatten(), labels[3, :, :10].flatten()])
    expected = sklearn_metrics.average_precision_score(pooled_labels.numpy(), pooled.numpy())
    assert metric.aggregate().item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("num_bins", [10, 1000])
def test_binned_pxap_is_the_exact_pxap_of_scores_rounded_down_to_their_bin(num_bins):
    g = torch.Generator().manual_seed(num_bins)
    scores = torch.rand(3, 1, 40, 30, generator=g)
    scores[0, 0, :4] = 1.0  # the top edge goes to the last bin
    scores[1, 0, :4] = 0.0
    labels = (torch.rand(3, 1, 40, 30, generator=g) < scores * 0.9).float()
    metric = PixelAPMetric(num_bins)
    metric(scores[:1], labels[:1])
    metric([scores[1], scores[2, :, :20]], [labels[1], labels[2, :, :20]])  # images of different sizes
    pooled = torch.cat([scores[:2].flatten(), scores[2, :, :20].flatten()])[None, None]
    pooled_labels = torch.cat([labels[:2].flatten(), labels[2, :, :20].flatten()])[None, None]
    rounded = torch.floor(pooled.double() * num_bins).clamp(max=num_bins - 1) / num_bins
    assert metric.aggregate().item() == pytest.approx(compute_pxap(rounded, pooled_labels).item(), abs=1e-6)
    exact = compute_pxap(pooled, pooled_labels).item()
    assert abs(metric.aggregate().item() - exact) < (0.05 if num_bins == 10 else 0.002)
    assert metric.aggregate().item() != pytest.approx(exact, abs=1e-9)  # it is not the exact value in disguise
    with pytest.raises(ValueError, match="num_bins must be at least 1"):
        PixelAPMetric(0)


def test_binned_pxap_memory_does_not_grow_with_the_pixels():
    """Binned, the metric holds one (2, num_bins) count however many pixels it has seen; exact, 8 bytes a pixel."""
    binned, exact = PixelAPMetric(), PixelAPMetric(num_bins=None)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(8):
        scores = torch.rand(2, 1, 256, 256, generator=g)
        labels = (scores > 0.7).float()
        binned(scores, labels)
        exact(scores, labels)
        sizes.append(sum(t.numel() * t.element_size() for t in binned._buffers[0]))
    assert sizes == [2 * 1000 * 8] * 8
    assert binned.get_buffer().sum().item() == 8 * 2 * 256 * 256  # every pixel counted once
    assert sum(t.numel() * t.element_size() for t in exact._buffers[0]) == 8 * 2 * 256 * 256 * 8
    assert binned.aggregate().item() == pytest.approx(1.0) and exact.aggregate().item() == pytest.approx(1.0)
    binned.reset()
    assert binned._buffers is None or binned._buffers == [[]] or not any(binned._buffers[0])


def test_pxap_extremes():
    labels = _b(G)
    assert compute_pxap(labels, labels).item() == pytest.approx(1.0)  # the ground truth itself
    assert compute_pxap(torch.full_like(labels, 0.5), labels).item() == pytest.approx(5 / 12)  # prevalence
    assert math.isnan(compute_pxap(_b(P), torch.zeros_like(labels)).item())


def test_bad_maps_raise_clear_errors():
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[0, 255\].*mask > 0"):
        compute_pxap(_b(P), _b(G) * 255)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[-0.5, 1\]"):
        compute_pxap(_b(P) - 0.5 * (1 - _b(P)), _b(G))
    with pytest.raises(ValueError, match="must be binary"):
        compute_pxap(_b(P), _b(G) * 0.5)
    with pytest.raises(ValueError, match="same shape"):
        compute_pxap(_b(P), torch.zeros(1, 1, 4, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 1, \*spatial\)"):
        compute_pxap(P, G)


def test_pxap_handler_pools_an_epoch():
    engine = Engine(lambda e, b: b)
    PixelAP(output_transform=lambda o: (o["pred"], o["mask"])).attach(engine, "pxap")
    batches = [{"pred": _b(P) * 0.8, "mask": _b(G)}, {"pred": [_b(1 - P)[0]], "mask": [_b(G)[0]]}]
    state = engine.run(batches)
    expected = compute_pxap(torch.cat([_b(P) * 0.8, _b(1 - P)]), torch.cat([_b(G), _b(G)])).item()
    assert state.metrics["pxap"] == pytest.approx(expected)
    assert "pxap" not in getattr(state, "metric_details", {})  # no per-pixel details


def test_per_image_rows_equal_the_hand_formulas_including_empty_regions():
    """The per-image CSV's scores come from MONAI (dice, IoU, the confusion-matrix FPR): they equal the hand formulas on
    random masks, and NaN exactly where the ground truth's region is empty."""
    from monai_wsl.handlers.per_image import image_scores

    gen = torch.Generator().manual_seed(0)
    truths = [(torch.rand(1, 9, 7, generator=gen) > q).float() for q in (0.3, 0.7)]
    truths += [torch.zeros(1, 9, 7), torch.ones(1, 9, 7)]
    for truth in truths:
        for pred in ((torch.rand(1, 9, 7, generator=gen) > 0.5).float(), torch.zeros(1, 9, 7), torch.ones(1, 9, 7)):
            got = image_scores(pred, truth)
            want = {k[4:]: v for k, v in reference_scores(pred.numpy(), truth.numpy()).items()}
            assert got.keys() == want.keys()
            for k in want:
                if math.isnan(want[k]):
                    assert math.isnan(got[k]), k
                else:
                    assert got[k] == pytest.approx(want[k], abs=1e-6), k
