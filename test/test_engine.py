"""Segmenter on the CPU: outputs, sizes, channel orders, palette/overlay/confidence maths, batching, optimised vs
plain agreement, model sources and input errors. Reference values are computed independently in the tests from
the plain network and numpy."""
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_checkpoint

from icnet_ros.checkpoint import CheckpointError, build_meta, default_model_path, load_model
from icnet_ros.classes import CAMVID
from icnet_ros.engine import UNKNOWN, FrameError, SegmentResult, Segmenter, resolve_device
from icnet_ros.engine_config import ConfigError
from icnet_ros.models import build_icnet

ALL = ("label", "color", "overlay", "confidence")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine") / "r18.safetensors")


@pytest.fixture(scope="module")
def seg(ckpt):
    return Segmenter(ckpt, device="cpu", outputs=ALL, warmup=False)


@pytest.fixture(scope="module")
def plain_model(ckpt):
    return load_model(ckpt, "cpu")


def frame(h, w, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    # smooth-ish content (random blobs) so that predictions vary across the image
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    big = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None].float(),
                                                     size=(h, w), mode="bilinear")[0].permute(1, 2, 0))
    img = np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
    if channels is None:
        return img[:, :, 0]
    return img if channels == 3 else img[:, :, :channels]


def reference(model, meta, rgb, alpha=0.5, net_size=None):
    """Independent implementation: normalise in numpy, resize to ``net_size`` (bilinear), plain network, upsample,
    argmax/softmax, palette, blend."""
    norm = meta["normalization"]
    assert norm["channel_order"] == "RGB"
    x = (rgb.astype(np.float32) - np.float32(norm["mean"])) / np.float32(norm["std"])
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    if net_size is not None:
        x = F.interpolate(x, size=net_size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model.eval()(x)
        up = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        prob = up.softmax(1)
    label = up.argmax(1)[0].numpy().astype(np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(meta["palette"])] = np.asarray(meta["palette"], np.uint8)
    color = palette[label]
    overlay = np.round(alpha * color.astype(np.float64) + (1 - alpha) * rgb.astype(np.float64)).astype(np.uint8)
    conf = np.round(255 * prob.max(1).values[0].numpy()).astype(np.uint8)
    return label, color, overlay, conf, logits


def agreement(a, b):
    return float((a == b).mean())


# ---------------------------------------------------------------------------------------------- outputs
def test_outputs_shapes_dtypes_and_values(seg):
    (r,) = seg.segment([frame(96, 160)])
    assert isinstance(r, SegmentResult)
    assert r.label.shape == (96, 160) and r.label.dtype == np.uint8
    assert r.color.shape == r.overlay.shape == (96, 160, 3) and r.color.dtype == r.overlay.dtype == np.uint8
    assert r.confidence.shape == (96, 160) and r.confidence.dtype == np.uint8
    assert r.label.max() < CAMVID.num_classes  # argmax never yields UNKNOWN
    assert r.confidence.min() >= round(255 / CAMVID.num_classes) - 1  # max prob >= 1/C
    assert r.model_size == (96, 160)
    assert len(np.unique(r.label)) > 1, "test model should predict several classes"


def test_default_outputs_label_only(ckpt):
    s = Segmenter(ckpt, device="cpu", warmup=False)
    (r,) = s.segment([frame(80, 80)])
    assert r.label.shape == (80, 80) and r.color is None and r.overlay is None and r.confidence is None
    (r,) = s.segment([frame(80, 80)], outputs=("color",))  # per-call override; the label always comes back
    assert r.color.shape == (80, 80, 3) and r.label is not None and r.overlay is None


def test_matches_independent_reference(seg, plain_model):
    rgb = frame(120, 200, seed=3)
    # the network runs at multiples of 32: 120 -> 128, 200 -> 192
    label, color, overlay, conf, _ = reference(plain_model, seg.meta, rgb, net_size=(128, 192))
    (r,) = seg.segment([rgb], channel_order="RGB")
    assert agreement(r.label, label) >= 0.999
    same = r.label == label
    np.testing.assert_array_equal(r.color[same], color[same])
    assert np.abs(r.overlay[same].astype(int) - overlay[same].astype(int)).max() <= 1
    assert np.abs(r.confidence.astype(int) - conf.astype(int)).max() <= 1


@pytest.mark.parametrize("h, w", [(64, 64), (65, 97), (101, 203), (200, 67)])
def test_odd_sizes_come_back_at_input_resolution(seg, h, w):
    (r,) = seg.segment([frame(h, w, seed=h)])
    assert r.label.shape == (h, w) and r.overlay.shape == (h, w, 3) and r.confidence.shape == (h, w)


def test_rgb_bgr_equivalence(seg):
    rgb = frame(90, 150, seed=5)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    r_rgb, r_bgr = seg.segment([rgb, bgr], channel_order=["RGB", "BGR"])
    np.testing.assert_array_equal(r_rgb.label, r_bgr.label)
    np.testing.assert_array_equal(r_rgb.confidence, r_bgr.confidence)
    np.testing.assert_array_equal(r_rgb.color, r_bgr.color[:, :, ::-1])  # colour comes back in the frame's order
    np.testing.assert_array_equal(r_rgb.overlay, r_bgr.overlay[:, :, ::-1])


def test_mono8_frames(seg):
    g = frame(72, 100, seed=7, channels=None)
    r2, r1, r3 = seg.segment([g, g[:, :, None], np.repeat(g[:, :, None], 3, axis=2)])
    np.testing.assert_array_equal(r2.label, r3.label)
    np.testing.assert_array_equal(r1.label, r3.label)
    np.testing.assert_array_equal(r2.overlay, r3.overlay)
    assert r2.overlay.shape == (72, 100, 3)


def test_palette_and_overlay_on_constant_prediction(tmp_path):
    """Hand-made network: classifier weights zero, bias one-hot -> every pixel is class 4; check exact colours."""
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.zero_()
        model.decode_head.conv_seg.bias.copy_(torch.arange(11) == 4)
    model.meta = build_meta(model.config, CAMVID)
    s = Segmenter(model, device="cpu", outputs=ALL, overlay_alpha=0.25, warmup=False)
    rgb = frame(64, 96, seed=1)
    (r,) = s.segment([rgb])
    assert (r.label == 4).all()
    np.testing.assert_array_equal(r.color, np.broadcast_to(np.uint8(CAMVID.palette[4]), rgb.shape))
    expected = np.round(0.25 * np.float64(CAMVID.palette[4]) + 0.75 * rgb.astype(np.float64)).astype(np.uint8)
    assert np.abs(r.overlay.astype(int) - expected.astype(int)).max() <= 1
    p = np.exp(1) / (np.exp(1) + 10)  # softmax of a one-hot logit vector over 11 classes
    assert (r.confidence == round(255 * p)).all()
    (rb,) = s.segment([rgb[:, :, ::-1].copy()], channel_order="BGR")
    np.testing.assert_array_equal(rb.color[0, 0], np.uint8(CAMVID.palette[4])[::-1])


def test_unclassified_pixels_take_the_models_ignore_index(tmp_path):
    """A model whose class set names ignore index 250 marks low-confidence pixels 250 (what the node announces as
    classes.ignore_index), black in the colour mask, the frame in the overlay; they were 255 whatever it said."""
    import dataclasses

    from icnet_ros.checkpoint import build_meta, save_checkpoint
    from icnet_ros.models import build_icnet

    torch.manual_seed(0)
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    path = tmp_path / "ignore250.safetensors"
    save_checkpoint(model, path, build_meta(model.config, dataclasses.replace(CAMVID, ignore_index=250)))
    rgb = frame(80, 120, seed=11)
    s = Segmenter(path, device="cpu", outputs=ALL, confidence_threshold=0.999, warmup=False)
    assert s.class_set.ignore_index == 250
    (r,) = s.segment([rgb])
    unknown = r.label == 250
    assert unknown.any() and set(np.unique(r.label)) <= set(range(11)) | {250}
    assert (r.color[unknown] == 0).all()
    np.testing.assert_array_equal(r.overlay[unknown], rgb[unknown])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_overlay_alpha_extremes(ckpt, alpha):
    s = Segmenter(ckpt, device="cpu", outputs=ALL, overlay_alpha=alpha, warmup=False)
    rgb = frame(64, 80)
    (r,) = s.segment([rgb])
    np.testing.assert_array_equal(r.overlay, rgb if alpha == 0.0 else r.color)


def test_confidence_threshold_marks_unknown(ckpt, seg):
    rgb = frame(80, 120, seed=11)
    (base,) = seg.segment([rgb])
    thr = float(np.median(base.confidence)) / 255
    s = Segmenter(ckpt, device="cpu", outputs=ALL, confidence_threshold=thr, warmup=False)
    (r,) = s.segment([rgb])
    low = base.confidence.astype(float) / 255 < thr - 1 / 255
    high = base.confidence.astype(float) / 255 > thr + 1 / 255
    assert low.any() and high.any()
    assert (r.label[low] == UNKNOWN).all()
    np.testing.assert_array_equal(r.label[high], base.label[high])
    assert (r.color[r.label == UNKNOWN] == 0).all()  # unknown is black in the colour mask
    np.testing.assert_array_equal(r.overlay[r.label == UNKNOWN], rgb[r.label == UNKNOWN])  # and keeps the frame
    # without the confidence output the threshold still applies
    (r2,) = s.segment([rgb], outputs=("label",))
    np.testing.assert_array_equal(r2.label, r.label)


# ---------------------------------------------------------------------------------------------- batching
def test_mixed_size_batch_equals_single_frames(seg):
    frames = [frame(96, 128, 1), frame(64, 200, 2), frame(96, 128, 3), frame(70, 70, 4, channels=None)]
    orders = ["RGB", "BGR", "RGB", "RGB"]
    batch = seg.segment(frames, channel_order=orders)
    assert len(batch) == 4
    for f, o, b in zip(frames, orders, batch):
        (single,) = seg.segment([f], channel_order=o)
        assert b.label.shape == f.shape[:2]
        assert agreement(b.label, single.label) >= 0.999
        np.testing.assert_array_equal(b.color[b.label == single.label], single.color[b.label == single.label])


def test_batch_as_4d_array_and_empty_list(seg):
    frames = np.stack([frame(64, 96, 1), frame(64, 96, 2)])
    rs = seg.segment(frames)
    assert len(rs) == 2 and rs[1].label.shape == (64, 96)
    assert seg.segment([]) == []


def test_fixed_input_size_resizes_and_batches(ckpt, plain_model):
    s = Segmenter(ckpt, device="cpu", input_size=(96, 128), outputs=ALL, warmup=False)
    frames = [frame(48, 50, 1), frame(192, 256, 2), frame(100, 333, 3)]  # small frames are fine when upscaled
    rs = s.segment(frames)
    for f, r in zip(frames, rs):
        assert r.label.shape == r.frame_size == f.shape[:2] and r.model_size == (96, 128)
    m = Segmenter(ckpt, device="cpu", input_size=(96, 128), output_size="model", outputs=ALL, warmup=False)
    (r,) = m.segment([frames[1]])
    assert r.label.shape == (96, 128) and r.overlay.shape == (96, 128, 3)
    # a 2x downscaled frame at output_size=model equals the reference on the resized frame
    resized = F.interpolate(torch.from_numpy(frames[1]).permute(2, 0, 1)[None].float(), size=(96, 128),
                            mode="bilinear", align_corners=False)[0].permute(1, 2, 0).round().numpy().astype(np.uint8)
    label, *_ = reference(plain_model, s.meta, resized)
    assert agreement(r.label, label) >= 0.98  # the engine resizes in float, the reference input is rounded


def test_scale_factor_policy(ckpt):
    s = Segmenter(ckpt, device="cpu", input_size=0.5, outputs=("label", "overlay"), warmup=False)
    (r,) = s.segment([frame(200, 300)])
    assert r.model_size == (96, 160) and r.label.shape == (200, 300)  # 100 x 150, in multiples of 32
    assert s.network_size(201, 301) == (96, 160)
    exact = Segmenter(ckpt, device="cpu", input_size=0.5, outputs=("label", "overlay"), warmup=False, size_divisor=1)
    (r,) = exact.segment([frame(200, 300)])
    assert r.model_size == (100, 150) and r.label.shape == (200, 300)
    for native in (None, "native", (), []):
        assert Segmenter(ckpt, device="cpu", input_size=native, warmup=False).network_size(70, 90) == (64, 96)
        assert Segmenter(ckpt, device="cpu", input_size=native, warmup=False,
                         size_divisor=1).network_size(70, 90) == (70, 90)
    assert Segmenter(ckpt, device="cpu", input_size="64x96", warmup=False).network_size(1, 1) == (64, 96)
    assert Segmenter(ckpt, device="cpu", input_size="80x112", warmup=False).network_size(1, 1) == (96, 128)
    for bad in (0, -32, 1.5, True, "thirty-two"):  # text forms ("32") parse: the CLI and the node give text
        with pytest.raises(ValueError, match="size_divisor"):
            Segmenter(ckpt, device="cpu", warmup=False, size_divisor=bad)
    with pytest.raises(ValueError, match="below the minimum"):
        s.segment([frame(100, 300)])  # 50 x 150 network input


# ---------------------------------------------------------------------------------------------- optimisation
def test_optimized_matches_plain(ckpt):
    opt = Segmenter(ckpt, device="cpu", outputs=ALL, optimize=True, warmup=False)
    plain = Segmenter(ckpt, device="cpu", outputs=ALL, optimize=False, warmup=False)
    assert opt.folded_batchnorms > 30 and plain.folded_batchnorms == 0
    assert opt.factorized_ppms == 1 and plain.factorized_ppms == 0  # the r18 preset has mmseg's concat PPM
    assert opt.channels_last and not plain.channels_last  # NHWC by default on the CPU too (BENCHMARKS.md)
    frames = [frame(128, 192, s) for s in range(3)]
    for a, b in zip(opt.segment(frames), plain.segment(frames)):
        assert agreement(a.label, b.label) >= 0.999
        assert np.abs(a.confidence.astype(int) - b.confidence.astype(int)).max() <= 1
    x = torch.randn(2, 3, 128, 192)
    with torch.inference_mode():
        lo, lp = opt.forward(x), plain.forward(x)
    assert ((lo - lp).abs().max() / lp.abs().max()).item() <= 1e-4


def test_bf16_on_cpu_runs(ckpt, seg):
    s = Segmenter(ckpt, device="cpu", precision="bf16", outputs=ALL, warmup=False)
    assert s.precision == "bf16" and s.channels_last
    rgb = frame(96, 128, seed=2)
    (r,) = s.segment([rgb])
    (ref,) = seg.segment([rgb])
    assert r.label.dtype == np.uint8 and r.label.max() < CAMVID.num_classes
    assert agreement(r.label, ref.label) >= 0.9  # random weights: many near-ties, bf16 has 8 mantissa bits


def test_warmup_and_describe(ckpt):
    s = Segmenter(ckpt, device="cpu", input_size=(64, 96), warmup=True)
    text = s.describe()
    assert "resnet18" in text and "fp32" in text and "on cpu" in text and "64x96" in text and "bn-fold" in text
    assert "ppm-factorized" in text
    assert s.last_latency_s is not None and s.last_latency_s > 0  # warm-up ran the pipeline


def test_shape_cache_keeps_warmup_shapes_and_bounds_the_rest():
    """The policy behind the torch backend's CUDA graphs (its CUDA run: test_engine_cuda.py): what warm-up makes
    stays; shapes first seen later share max_recent places, least recently used evicted."""
    from icnet_ros.backends.torch_backend import ShapeCache

    made = []

    def maker(key):
        return lambda: made.append(key) or f"graph {key}"

    cache = ShapeCache(max_recent=3, max_pinned=2)
    cache.pinning = True
    for key in ("cam-a", "cam-b", "cam-a"):
        assert cache.get(key, maker(key)) == f"graph {key}"
    cache.pinning = False
    assert list(cache.pinned) == ["cam-a", "cam-b"] and made == ["cam-a", "cam-b"] and cache.unpinned == 0
    for key in ("x1", "x2", "x3", "x1", "x4", "x5"):  # x2 and x3 are the least recently used when x4, x5 come
        cache.get(key, maker(key))
    assert list(cache.recent) == ["x1", "x4", "x5"] and cache.evictions == 2
    for key in ("cam-a", "cam-b"):  # never evicted, never made again
        cache.get(key, maker(key))
    assert made.count("cam-a") == made.count("cam-b") == 1 and len(cache) == 5
    cache.get("x2", maker("x2"))  # evicted earlier: made again
    assert made.count("x2") == 2 and list(cache.recent) == ["x4", "x5", "x2"]
    cache.pinning = True  # a later warm-up: a hot-path shape moves to the pinned part if there is room ...
    cache.get("x5", maker("x5"))
    assert "x5" in cache.recent and cache.unpinned == 1  # ... there is none (max_pinned=2)
    roomy = ShapeCache(max_recent=1, max_pinned=4)
    roomy.get("y", maker("y"))
    roomy.pinning = True
    roomy.get("y", maker("y"))
    assert list(roomy.pinned) == ["y"] and not roomy.recent and made.count("y") == 1
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        ShapeCache(max_recent=0, max_pinned=1)


# ---------------------------------------------------------------------------------------------- model sources
def test_module_source_is_copied_not_modified():
    model = build_icnet("icnet_r18", width=0.25, num_classes=5)  # no .meta: built from .config
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    s = Segmenter(model, device="cpu", warmup=False)
    assert s.class_set.num_classes == 5 and s.folded_batchnorms > 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert model.auxiliary_head is not None and model.training


def test_bad_models(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter(tmp_path / "missing.safetensors", device="cpu", warmup=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        Segmenter(bad, device="cpu", warmup=False)
    with pytest.raises(CheckpointError, match="neither .meta nor .config"):
        Segmenter(torch.nn.Conv2d(3, 3, 1), device="cpu", warmup=False)
    with pytest.raises(CheckpointError):
        Segmenter(42, device="cpu", warmup=False)


def test_default_model_missing_is_a_checkpoint_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ICNET_ROS_DEFAULT_MODEL", str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="default model is not installed"):
        default_model_path()
    with pytest.raises(CheckpointError, match="default model"):
        Segmenter(device="cpu", warmup=False)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64, 3), np.float32), "dtype float32, expected uint8"),
    (np.zeros((64, 64, 3), np.uint16), "dtype uint16"),
    (np.zeros((64, 64, 4), np.uint8), "drop the alpha channel"),
    (np.zeros((64, 64, 2), np.uint8), r"shape \(64, 64, 2\)"),
    (np.zeros((0, 64, 3), np.uint8), "empty frame"),
    (np.zeros((64, 0), np.uint8), "empty frame"),
    (np.zeros((40, 50, 3), np.uint8), r"below the minimum 64x64 \(a fixed input_size HxW upscales small frames\)"),
    (np.zeros((2, 64, 64, 3), np.uint8)[0, :, :, :, None], "shape"),
    ([[1, 2], [3, 4]], "expected a numpy uint8 array"),
])
def test_bad_frames(seg, bad, match):
    """A FrameError (a ValueError) naming the bad frame's position in the call, so that a caller can drop it."""
    with pytest.raises(FrameError, match="^frame 1: ") as info:
        seg.segment([frame(64, 64), bad])
    assert info.value.index == 1 and str(info.value) == f"frame 1: {info.value.reason}"
    assert re.search(match, info.value.reason)


def test_bad_call_arguments(seg):
    f = frame(64, 64)
    with pytest.raises(ValueError, match="wrap one frame"):
        seg.segment(f)
    with pytest.raises(ValueError, match="channel_order"):
        seg.segment([f], channel_order="RGBA")
    with pytest.raises(ValueError, match="2 entries for 1 frames"):
        seg.segment([f], channel_order=["RGB", "BGR"])
    with pytest.raises(ValueError, match=r"unknown output\(s\)"):
        seg.segment([f], outputs=("label", "depth"))


def test_more_bad_call_arguments(ckpt):
    """One clear error each (before: TypeError / numpy UFuncTypeError tracebacks from inside the engine)."""
    seg = Segmenter(ckpt, device="cpu", warmup=False)
    f = frame(64, 64)
    with pytest.raises(ValueError, match="channel_order must be"):
        seg.segment([f], channel_order=None)
    with pytest.raises(ConfigError, match="outputs = 5"):
        seg.segment([f], outputs=5)
    seg.warmup("64x96")  # the text form the warmup option takes
    assert seg.warmed_up[-1] == (64, 96, 1)
    with pytest.raises(ConfigError, match="warmup"):
        seg.warmup("big")
    with pytest.raises(ValueError, match="warmup size must be"):
        seg.warmup((64, 0))
    with pytest.raises(ConfigError, match="is for the openvino backend"):  # xpu: an Intel GPU, OpenVINO only
        Segmenter(ckpt, device="xpu", warmup=False)


def test_a_closed_segmenter_says_so(ckpt):
    """segment / warmup / reconfigure after close(): one RuntimeError naming the cause (before: 'NoneType' object is
    not callable from inside the backend); closing twice is harmless."""
    seg = Segmenter(ckpt, device="cpu", warmup=False)
    seg.segment([frame(64, 64)])
    seg.close()
    seg.close()
    for call in (lambda: seg.segment([frame(64, 64)]), lambda: seg.warmup((64, 64)),
                 lambda: seg.reconfigure(overlay_alpha=0.2)):
        with pytest.raises(RuntimeError, match="this Segmenter is closed"):
            call()


def test_concurrent_reconfigures_both_take_effect(ckpt):
    """Two threads reconfigure while a segment() call holds the engine: both changes stay (before, each built its
    new config from the same old one before waiting, and the second to run undid the first)."""
    seg = Segmenter(ckpt, device="cpu", warmup=False)
    threads = [threading.Thread(target=seg.reconfigure, kwargs=kw)
               for kw in ({"overlay_alpha": 0.9}, {"confidence_threshold": 0.3})]
    with seg._lock:  # as a segment() call in progress does
        for t in threads:
            t.start()
        time.sleep(0.3)  # both are waiting for the engine now
    for t in threads:
        t.join(10)
    assert seg.config.overlay_alpha == 0.9 and seg.config.confidence_threshold == 0.3, seg.config


def test_the_default_warm_up_frame_suits_the_scale(tmp_path):
    """input_size x4 with a model that records a 1056x1024 input size: the warm-up frame was that size, upscaled to
    4224x4096, over the largest network input, and the Segmenter could not be built (FrameError; warmup=False
    worked). Now the warm-up frame is one the scale brings to about the recorded size."""
    ckpt = make_checkpoint(tmp_path / "big.safetensors", input_size=(1056, 1024))
    seg = Segmenter(ckpt, device="cpu", input_size=4.0)
    assert seg.warmed_up == [(264, 256, 1)]
    assert Segmenter(ckpt, device="cpu", input_size=0.5).warmed_up == [(1056, 1024, 1)]  # as before


def test_a_live_input_size_the_warm_up_sizes_cannot_run_is_refused(ckpt):
    """The warm-up sizes are the cameras' frame sizes: a Segmenter built with warmup 96x128 and input_size 0.25
    is refused (24x32 network inputs), but reconfigure(input_size=0.25) was taken: every frame of those cameras was
    then refused, and every later rebuild failed its warm-up with no word of input_size. Now refused alike, with
    nothing changed."""
    with pytest.raises(FrameError, match="below the minimum"):
        Segmenter(ckpt, device="cpu", warmup="96x128", input_size=0.25)
    seg = Segmenter(ckpt, device="cpu", warmup="96x128")
    with pytest.raises(ConfigError, match=r"^input_size 0.25: the warm-up size 96x128 \(warmup\): 96x128 gives a "
                                          r"24x32 network input, below the minimum 64x64 .*; change warmup with it$"):
        seg.reconfigure(input_size=0.25)
    assert seg.config.input_size == "auto" and seg.segment([frame(96, 128, seed=1)])[0].label.shape == (96, 128)
    assert seg.reconfigure(input_size=0.75).input_size == 0.75  # 72x96: runs


def test_a_warm_up_holds_the_engine_before_it_keeps_what_it_makes(ckpt):
    """A warm-up marks what it makes to be kept (CUDA graphs pinned for the backend's life) and then waited for the
    engine once per segment() call: another thread's call (a node's worker, during a live max_batch warm-up) could
    run inside that window and have its graphs kept for good. The warm-up now takes the engine first."""
    seg = Segmenter(ckpt, device="cpu", warmup=False)
    with seg._lock:  # as a segment() call in progress on the worker does
        warm = threading.Thread(target=seg.warmup, args=((64, 96),))
        warm.start()
        time.sleep(0.3)
        assert seg.backend._graphs.pinning is False, "the warm-up marked the time it waited for the engine"
    warm.join(30)
    assert seg.warmed_up == [(64, 96, 1)] and seg.backend._graphs.pinning is False


def test_read_only_and_non_contiguous_frames(seg):
    f = frame(80, 96, seed=9)
    ro = f.copy()
    ro.flags.writeable = False
    flipped = f[:, ::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (a,) = seg.segment([ro])
    (b,) = seg.segment([f])
    (c,) = seg.segment([flipped])
    (d,) = seg.segment([np.ascontiguousarray(flipped)])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(c.label, d.label)


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="tpu"), "device = 'tpu': must be auto, cpu"),
    (dict(precision="int8"), "precision = 'int8': must be one of"),
    (dict(precision="fp16"), "not supported on the CPU"),
    (dict(input_size=(32, 64)), "below the network minimum"),
    (dict(input_size=-1.0), r"input_size = -1.0: scale -1.0 must be in \[1/64, 4\]"),
    (dict(input_size=0.001), r"scale 0.001 must be in \[1/64, 4\]"),  # (warming up asked for a 64001x64001 frame)
    (dict(input_size="big"), "input_size"),
    (dict(outputs=("label", "edges")), r"unknown output\(s\) \['edges'\]"),
    (dict(overlay_alpha=1.5), "overlay_alpha"),
    (dict(output_size="half"), "output_size"),
    (dict(confidence_threshold=2.0), "confidence_threshold"),
    (dict(cuda_graphs=True), "needs a CUDA device"),
])
def test_bad_options(ckpt, kwargs, match):
    opts = dict(device="cpu", warmup=False)
    opts.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Segmenter(ckpt, **opts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_device_falls_back_to_cpu_with_warning(ckpt):
    with pytest.warns(RuntimeWarning) as record:
        s = Segmenter(ckpt, device="auto", precision="fp16", warmup=False)
    messages = [str(w.message) for w in record]
    assert any("CUDA is not available" in m for m in messages) and any("using fp32" in m for m in messages)
    assert s.device.type == "cpu" and s.precision == "fp32" and len(s.notes) == 2
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_segmenter_matches_eager(ckpt):
    """compile=True: the warm-up compiles the network (inductor, weights frozen on the CPU) and that compilation
    serves the frames after it: no recompilation on the first real frame (before, the pyramid pooling's matrix
    cache, filled while tracing, broke the traced graph's guard: a second compilation, 8.5 s, on the hot path).
    Logits match eager within 1e-3 relative, labels agree, and the rendered bytes are identical where labels are."""
    from torch._dynamo.utils import counters

    from icnet_ros.optimize import MIN_ARGMAX_AGREEMENT, FactorizedPyramidPooling, compare_logits

    comp = Segmenter(ckpt, device="cpu", input_size=(96, 128), outputs=ALL, compile=True, warmup=True)
    eager = Segmenter(ckpt, device="cpu", input_size=(96, 128), outputs=ALL, warmup=False)
    assert "compile(default)" in comp.describe()
    # the warm-up ran the network eagerly once first, so the graph reads the pooling's resize matrix from its cache
    # instead of building it on every call (on a CUDA model without frozen weights: host work and a copy per frame)
    pools = [m for m in comp.backend.model.modules() if isinstance(m, FactorizedPyramidPooling)]
    assert len(pools) == 1 and (3, 4) in [key[:2] for key in pools[0]._matrices]  # 96x128 at 1/32
    graphs = counters["stats"]["unique_graphs"]
    for f in (frame(96, 128, 5), frame(120, 160, 6)):  # both run at the fixed 96x128 network input
        (c,), (e,) = comp.segment([f]), eager.segment([f])
        assert agreement(c.label, e.label) >= 0.999
        same = c.label == e.label
        np.testing.assert_array_equal(c.color[same], e.color[same])
        np.testing.assert_array_equal(c.overlay[same], e.overlay[same])
    with torch.inference_mode():  # an inference tensor in the preprocessor's layout, as the engine passes
        x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=comp.backend.memory_format)
        a = compare_logits(eager.backend(x), comp.backend(x))
    assert a.relative_diff <= 1e-3 and a.argmax_agreement >= MIN_ARGMAX_AGREEMENT, str(a)
    assert counters["stats"]["unique_graphs"] == graphs, "the frames after the warm-up compiled again"




def test_weights_that_overflow_are_refused_at_load(tmp_path):
    """Finite weights whose output overflows float32 (a conv weight of 1e38 from bit rot) loaded with only a
    warning about BN folding and gave NaN logits (every pixel one class): now a CheckpointError naming the file,
    from a path as from a module."""
    from icnet_ros.checkpoint import save_checkpoint

    path = make_checkpoint(tmp_path / "bad.safetensors")
    model = load_model(path)
    with torch.no_grad():
        model.backbone.conv_sub1[0].conv.weight.fill_(1e38)
    save_checkpoint(model, path, model.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not loaded with a warning
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: the model's output is NaN or infinite on a "
                                                            "test input (corrupt weights?); not loaded")):
            Segmenter(path, device="cpu", warmup=False)
        with pytest.raises(CheckpointError, match="^the model's output is NaN or infinite"):
            Segmenter(model, device="cpu", warmup=False)
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            Segmenter(path, device="cpu", optimize=False, warmup=False)  # no folding, no probe of its own
