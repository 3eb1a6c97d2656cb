from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from monai_wsl.handlers import ClassificationError, PixelAP, PixelF1, PixelFPR, PixelIoU
from monai_wsl.metrics import (
    ClassificationErrorMetric,
    PixelAPMetric,
    PixelF1Metric,
    PixelIoUMetric,
    compute_classification_error,
    compute_pixel_f1,
    compute_pixel_fpr,
    compute_pixel_iou,
    compute_pxap,
)

# A 3 x 4 case: |P| = 4, |G| = 5, |P n G| = 3 -> F1+ = 6/9; background |1-P| = 8, |1-G| = 7, overlap 6 -> F1- = 12/15.
P = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
G = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


def _b(x):
    return x[None, None]


def test_f1_iou_fpr_hand_values():
    torch.testing.assert_close(compute_pixel_f1(_b(P), _b(G)), torch.tensor([[6 / 9, 12 / 15]]))
    # IoU+ = 3 / (4 + 5 - 3); IoU- = 6 / (8 + 7 - 6)
    torch.testing.assert_close(compute_pixel_iou(_b(P), _b(G)), torch.tensor([[3 / 6, 6 / 9]]))
    # one false positive among the 7 background pixels
    torch.testing.assert_close(compute_pixel_fpr(_b(P), _b(G)), torch.tensor([[1 / 7]]))


def test_all_ones_mask_scores_like_the_paper_baseline():
    ones = torch.ones_like(P)
    f1 = compute_pixel_f1(_b(ones), _b(G))
    assert f1[0, 0].item() == pytest.approx(2 * 5 / (12 + 5)) and f1[0, 1].item() == 0.0
    assert compute_pixel_fpr(_b(ones), _b(G)).item() == 1.0


def test_empty_ground_truth_conventions():
    empty = torch.zeros_like(P)
    # benign image without foreground: F1+ undefined (NaN, skipped), F1- defined
    f1 = compute_pixel_f1(_b(P), _b(empty))
    assert math.isnan(f1[0, 0].item()) and f1[0, 1].item() == pytest.approx(2 * 8 / (8 + 12))
    # ignore_empty=False: 1 when the prediction is empty too, else 0
    assert compute_pixel_f1(_b(empty), _b(empty), ignore_empty=False)[0, 0].item() == 1.0
    assert compute_pixel_f1(_b(P), _b(empty), ignore_empty=False)[0, 0].item() == 0.0
    full = torch.ones_like(P)
    assert math.isnan(compute_pixel_f1(_b(P), _b(full))[0, 1].item())
    assert math.isnan(compute_pixel_fpr(_b(P), _b(full)).item())
    # the cumulative metric averages over images where the region exists
    metric = PixelF1Metric(region="foreground")
    metric(torch.stack([_b(P)[0], _b(P)[0]]), torch.stack([_b(G)[0], _b(empty)[0]]))
    assert metric.aggregate().item() == pytest.approx(6 / 9)


def test_cumulative_metrics_accept_batches_and_lists_of_different_sizes():
    big_p = torch.zeros(1, 1, 6, 6)
    big_g = torch.zeros(1, 1, 6, 6)
    big_g[..., :3, :] = 1
    big_p[..., :2, :] = 1  # F1+ = 2*12/(12+18) = 0.8; F1- = 2*18/(24+18) = 6/7
    metric = PixelF1Metric(region="both", reduction="mean_batch")
    metric(_b(P), _b(G))
    metric([big_p[0]], [big_g[0]])  # decollated items, as Ignite engines pass them
    torch.testing.assert_close(metric.aggregate(), torch.tensor([(6 / 9 + 0.8) / 2, (12 / 15 + 6 / 7) / 2]))
    iou = PixelIoUMetric(region="background")
    iou(_b(P), _b(G))
    assert iou.aggregate().item() == pytest.approx(6 / 9)


def test_soft_masks_are_thresholded_at_half():
    soft = P * 0.7 + (1 - P) * 0.3
    metric = PixelF1Metric(region="foreground")
    metric(_b(soft), _b(G))
    assert metric.aggregate().item() == pytest.approx(6 / 9)


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
    metric = PixelAPMetric()  # pooled over batches and over images of different sizes
    metric(scores[:2], labels[:2])
    metric([scores[2], scores[3, :, :10]], [labels[2], labels[3, :, :10]])
    pooled = torch.cat([scores[:3].flatten(), scores[3, :, :10].flatten()])
    pooled_labels = torch.cat([labels[:3].flatten(), labels[3, :, :10].flatten()])
    expected = sklearn_metrics.average_precision_score(pooled_labels.numpy(), pooled.numpy())
    assert metric.aggregate().item() == pytest.approx(expected, abs=1e-6)


def test_pxap_extremes():
    labels = _b(G)
    assert compute_pxap(labels, labels).item() == pytest.approx(1.0)  # the ground truth itself
    assert compute_pxap(torch.full_like(labels, 0.5), labels).item() == pytest.approx(5 / 12)  # prevalence
    assert math.isnan(compute_pxap(_b(P), torch.zeros_like(labels)).item())


def test_classification_error():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert compute_classification_error(logits, torch.tensor([0, 1, 1])).flatten().tolist() == [0.0, 0.0, 1.0]
    metric = ClassificationErrorMetric()
    metric(logits, torch.tensor([[0], [1], [1]]))
    metric([torch.tensor([0.2, 0.8])], [torch.tensor(1)])
    assert metric.aggregate().item() == pytest.approx(1 / 4)
    accuracy = ClassificationErrorMetric(accuracy=True)
    accuracy(logits, torch.tensor([0, 1, 1]))
    assert accuracy.aggregate().item() == pytest.approx(2 / 3)


def test_bad_masks_raise_clear_errors():
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[0, 255\].*mask > 0"):
        compute_pixel_f1(_b(P), _b(G) * 255)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[-0.5, 1\]"):
        compute_pxap(_b(P) - 0.5 * (1 - _b(P)), _b(G))
    with pytest.raises(ValueError, match="must be binary"):
        compute_pixel_f1(_b(P) * 0.5, _b(G))
    with pytest.raises(ValueError, match="same shape.*ground truth's size"):
        compute_pixel_f1(_b(P), torch.zeros(1, 1, 4, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 1, \*spatial\)"):
        compute_pixel_f1(P, G)
    with pytest.raises(ValueError, match="region must be one of"):
        PixelF1Metric(region="gland")


def test_ignite_handlers_compute_over_an_epoch():
    batches = [
        {"pred": _b(P), "mask": _b(G), "logits": torch.tensor([[1.0, 0.0]]), "label": torch.tensor([0])},
        {"pred": _b(1 - P), "mask": _b(G), "logits": torch.tensor([[1.0, 0.0]]), "label": torch.tensor([1])},
    ]
    engine = Engine(lambda e, b: b)
    pixels = lambda o: (o["pred"], o["mask"])  # noqa: E731
    PixelF1("foreground", output_transform=pixels).attach(engine, "f1_pos")
    PixelF1("background", output_transform=pixels).attach(engine, "f1_neg")
    PixelIoU("foreground", output_transform=pixels).attach(engine, "iou_pos")
    PixelFPR(output_transform=pixels).attach(engine, "fpr")
    PixelAP(output_transform=pixels).attach(engine, "pxap")
    ClassificationError(output_transform=lambda o: (o["logits"], o["label"])).attach(engine, "error")
    ClassificationError(accuracy=True, output_transform=lambda o: (o["logits"], o["label"])).attach(engine, "acc")
    state = engine.run(batches)
    both = compute_pixel_f1(torch.cat([_b(P), _b(1 - P)]), torch.cat([_b(G), _b(G)]))
    assert state.metrics["f1_pos"] == pytest.approx(both[:, 0].mean().item())
    assert state.metrics["f1_neg"] == pytest.approx(both[:, 1].mean().item())
    assert state.metrics["fpr"] == pytest.approx((1 / 7 + 6 / 7) / 2)
    assert state.metrics["error"] == pytest.approx(0.5) and state.metrics["acc"] == pytest.approx(0.5)
    assert 0 < state.metrics["pxap"] < 1 and 0 < state.metrics["iou_pos"] < 1
    assert state.metric_details["f1_pos"].shape == (2, 1)  # per-image scores for MetricsSaver
