"""Postprocessor on the CPU (OpenCV plane-by-plane upsampling with a running maximum) and its torch path (what runs
on CUDA, run here on CPU tensors) against the plain torch definition: bilinear upsampling of the whole logit map
(align_corners=False), argmax, max softmax probability."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.classes import CAMVID
from icnet_ros.postprocess import UNKNOWN, Postprocessor


def _reference(logits, size):
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    prob = up.softmax(1)
    return up.argmax(1).numpy(), prob.max(1).values.numpy(), up.sort(1, descending=True).values.numpy()


def _labels(post, impl):
    """The label step of one implementation: 'opencv' (what the CPU runs) or 'torch' (the CUDA path)."""
    return post.labels if impl == "opencv" else post._labels_torch


IMPLS = ["opencv", "torch"]


def _logits(n=2, c=11, h=17, w=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [(136, 184), (17, 23), (50, 61), (9, 12), (1, 1), (4, 1), (1, 4), (2, 1)])
def test_labels_and_confidence_match_the_torch_definition(size, impl):
    """Also at 1x1 and 4x1 outputs, which OpenCV's binding took for Scalars: every pixel was labelled 0."""
    logits = _logits()
    labels = _labels(Postprocessor(CAMVID, torch.device("cpu")), impl)
    label, conf = labels(logits, size, want_confidence=True)
    ref_label, ref_prob, ranked = _reference(logits, size)
    assert label.dtype == torch.uint8 and label.shape == (2, *size) and conf.shape == (2, *size)
    # where the two best classes are not within float rounding of each other the labels are identical
    clear = (ranked[:, 0] - ranked[:, 1]) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(label.numpy()[clear], ref_label[clear])
    assert np.abs(conf.numpy().astype(int) - np.rint(ref_prob * 255).astype(int)).max() <= 1
    label_only, none = labels(logits, size, want_confidence=False)
    assert none is None
    np.testing.assert_array_equal(label_only.numpy(), label.numpy())
    assert logits.equal(_logits())  # the logits are never written


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_keep_the_lower_class_like_argmax(impl):
    logits = torch.zeros(1, 4, 3, 3)
    logits[0, 2] = 1.0
    logits[0, 3] = 1.0  # classes 2 and 3 tie everywhere
    label, conf = _labels(Postprocessor(CAMVID, torch.device("cpu")), impl)(logits, (6, 6), want_confidence=True)
    assert (label == 2).all()
    expected = round(255 * np.exp(1) / (2 + 2 * np.exp(1)))
    assert (conf == expected).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_confidence_threshold_marks_unknown_without_the_confidence_output(impl):
    logits = _logits(n=1)
    post = Postprocessor(CAMVID, torch.device("cpu"), confidence_threshold=0.6)
    label, conf = _labels(post, impl)(logits, (40, 50), want_confidence=False)
    assert conf is None
    ref_label, ref_prob, _ = _reference(logits, (40, 50))
    unknown = label.numpy() == UNKNOWN
    assert unknown[ref_prob < 0.59].all() and not unknown[ref_prob > 0.61].any()
    assert 0.05 < unknown.mean() < 0.95
    known = ~unknown & (np.abs(ref_prob - 0.6) > 0.01)
    assert (label.numpy()[known] == ref_label[known]).mean() > 0.999


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_and_non_contiguous_logits(impl):
    logits = _logits(n=3)
    view = logits.half()[::2]  # two frames, a strided view
    label, _ = _labels(Postprocessor(CAMVID, torch.device("cpu")), impl)(view, (34, 46), want_confidence=False)
    ref_label, _, ranked = _reference(view.float(), (34, 46))
    clear = (ranked[:, 0] - ranked[:, 1]) > 1e-3
    np.testing.assert_array_equal(label.numpy()[clear], ref_label[clear])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("channels", [3, 1])
def test_cpu_render_matches_the_torch_blend(alpha, channels):
    rng = np.random.default_rng(7)
    label = rng.integers(0, 11, (2, 30, 41), dtype=np.uint8)
    label[:, :5] = UNKNOWN
    frames = rng.integers(0, 256, (2, 30, 41, channels), dtype=np.uint8)
    post = Postprocessor(CAMVID, torch.device("cpu"), overlay_alpha=alpha, confidence_threshold=0.2)
    want = frozenset({"color", "overlay"})
    for order in ("RGB", "BGR"):
        fast = post.render(torch.from_numpy(label), torch.from_numpy(frames), order, (30, 41), want)
        slow = post._render(torch.from_numpy(label), torch.from_numpy(frames), order, (30, 41), want)
        np.testing.assert_array_equal(fast["color"].numpy(), slow["color"].numpy())
        assert np.abs(fast["overlay"].numpy().astype(int) - slow["overlay"].numpy().astype(int)).max() <= 1
        base = np.broadcast_to(frames, (2, 30, 41, 3))
        np.testing.assert_array_equal(fast["overlay"].numpy()[:, :5], base[:, :5])  # unknown keeps the frame
        assert (fast["color"].numpy()[:, :5] == 0).all()
    palette = CAMVID.palette_array()
    np.testing.assert_array_equal(fast["color"].numpy()[:, 5:], palette[label[:, 5:]][..., ::-1])  # BGR
    only_color = post.render(torch.from_numpy(label), torch.from_numpy(frames), "RGB", (30, 41), frozenset({"color"}))
    assert set(only_color) == {"color"}


@pytest.mark.parametrize("impl", IMPLS)
def test_confidence_is_rounded_to_nearest_not_truncated(impl):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 11, 17, 23, generator=g) * 3
    label, conf = _labels(Postprocessor(CAMVID, torch.device("cpu")), impl)(logits, (50, 61), want_confidence=True)
    up = F.interpolate(logits, size=(50, 61), mode="bilinear", align_corners=False)
    scaled = up.double().softmax(1).max(1).values.numpy() * 255
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > 0.01  # not at a rounding tie
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(conf.numpy()[clear], np.rint(scaled[clear]).astype(np.uint8))


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_pixels_take_the_class_sets_ignore_index_in_both_paths(impl):
    classes = dataclasses.replace(CAMVID, ignore_index=250)
    post = Postprocessor(classes, torch.device("cpu"), confidence_threshold=0.6, overlay_alpha=0.5)
    g = torch.Generator().manual_seed(1)
    label, _ = _labels(post, impl)(torch.randn(1, 11, 17, 23, generator=g) * 3, (40, 50), want_confidence=False)
    values = set(np.unique(label.numpy()).tolist())
    assert 250 in values and 255 not in values and values <= set(range(11)) | {250}
    frames = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8))
    render = post.render if impl == "opencv" else post._render
    out = render(label, frames, "RGB", (40, 50), frozenset({"color", "overlay"}))
    unknown = label.numpy() == 250
    assert (out["color"].numpy()[unknown] == 0).all()
    np.testing.assert_array_equal(out["overlay"].numpy()[unknown], frames.numpy()[unknown])


@pytest.mark.parametrize("channels", [3, 1])
def test_overlay_at_the_network_size_blends_the_bilinearly_resized_frame(channels):
    """output_size 'model': the frame is resized to the label size (bilinear, half-pixel centres, rounded)."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 72, 100, channels), dtype=np.uint8)
    label = torch.from_numpy(rng.integers(0, 11, (2, 36, 48), dtype=np.uint8))
    want = frozenset({"overlay"})
    ref = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).double(), size=(36, 48), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy()
    base = Postprocessor(CAMVID, torch.device("cpu"), overlay_alpha=0.0).render(
        label, torch.from_numpy(frames), "RGB", (36, 48), want)["overlay"].numpy()
    assert np.abs(base - ref).max() <= 0.5 + 1e-6  # rounded to nearest, not truncated
    color = CAMVID.palette_array()[label.numpy()].astype(float)
    blend = Postprocessor(CAMVID, torch.device("cpu"), overlay_alpha=0.3).render(
        label, torch.from_numpy(frames), "RGB", (36, 48), want)["overlay"].numpy()
    assert np.abs(blend - (0.7 * base + 0.3 * color)).max() <= 0.5 + 1e-6  # (base: checked above)


def test_the_cpu_label_pass_work_planes_follow_the_size_and_the_thread():
    """The CPU label pass keeps its frame-sized work planes between calls (per thread, for the last output size):
    calls alternating between sizes, and two threads using one Postprocessor at once, give the reference labels and
    confidences."""
    import threading

    post = Postprocessor(CAMVID, torch.device("cpu"))
    cases = [(_logits(seed=s), size) for s, size in enumerate([(50, 61), (90, 120), (50, 61), (17, 23)])]

    def check(errors):
        try:
            for _ in range(3):
                for logits, size in cases:
                    label, conf = post.labels(logits, size, want_confidence=True)
                    ref_label, ref_prob, _ = _reference(logits, size)
                    assert (label.numpy() == ref_label).mean() > 0.999
                    assert np.abs(conf.numpy().astype(int) - np.rint(ref_prob * 255)).max() <= 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    errors: list = []
    threads = [threading.Thread(target=check, args=(errors,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
