"""icnet-eval: metrics match an independent computation; JSON on stdout; input size, flip, multi-scale, layouts,
the default model and error paths."""
import json
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import CAMVID, REPO, make_checkpoint, require
from icnet_ros import checkpoint as checkpoint_module
from icnet_ros import load_model
from icnet_ros.evaluate import main, predict_logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "m.safetensors", input_size=(180, 240))


def _run_json(capsys, *args):
    rc = main([*map(str, args), "--workers", "0", "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, "--json must print exactly one line on stdout"
    return json.loads(lines[0])


def _reference_metrics(ckpt, samples, size):
    """mIoU etc. computed independently: numpy normalisation, per-image forward, numpy confusion matrix."""
    model = load_model(ckpt)
    norm = model.meta["normalization"]
    conf = np.zeros((11, 11), np.int64)
    for img_path, lbl_path in samples:
        rgb = cv2.imread(str(img_path))[..., ::-1].astype(np.float32)
        x = (rgb - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32)
        x = torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)
        raw = cv2.imread(str(lbl_path), cv2.IMREAD_UNCHANGED).astype(np.int64)
        if size is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = F.interpolate(model(x), size=raw.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        keep = raw < 11
        conf += np.bincount(raw[keep] * 11 + pred[keep], minlength=121).reshape(11, 11)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return 100 * np.nanmean(iou), 100 * iou, 100 * tp.sum() / conf.sum()


# (flags, network input the reference runs at): the checkpoint records 180x240, frames are 360x480; by default
# sizes are rounded to multiples of 32 (180 -> 192, 240 -> 256, 360 -> 352)
@pytest.mark.parametrize("native,divisor,size", [(False, None, (192, 256)), (True, None, (352, 480)),
                                                 (False, 1, (180, 240)), (True, 1, None)])
def test_json_metrics_match_an_independent_computation(capsys, ckpt, native, divisor, size):
    root = require(CAMVID)
    extra = (["--native"] if native else []) + ([] if divisor is None else ["--size-divisor", divisor])
    report = _run_json(capsys, "--model", ckpt, "--data", root, "--split", "val", "--limit", 3, "--batch-size", 2,
                       *extra)
    from icnet_ros.data import DataSpec, find_samples

    samples = find_samples(DataSpec(str(root)), "val")[0][:3]
    miou, iou, aacc = _reference_metrics(ckpt, samples, size)
    assert report["mIoU"] == pytest.approx(miou, abs=0.02)
    assert report["aAcc"] == pytest.approx(aacc, abs=0.02)
    names = list(report["per_class"])
    assert names[0] == "sky" and len(names) == 11
    for name, ref in zip(names, iou):
        got = report["per_class"][name]["IoU"]
        assert (got is None and np.isnan(ref)) or got == pytest.approx(ref, abs=0.05)
    assert report["input_size"] == (None if native else [180, 240]) and report["images"] == 3
    assert report["size_divisor"] == (divisor or 32)
    assert report["pixels"] > 0.8 * 3 * 360 * 480


def test_input_size_flag_flip_and_scales_change_the_result(capsys, ckpt):
    root = require(CAMVID)
    base = ["--model", ckpt, "--data", root, "--limit", 2]
    plain = _run_json(capsys, *base)
    sized = _run_json(capsys, *base, "--input-size", 128, 160)
    tta = _run_json(capsys, *base, "--flip", "--scales", 0.75, 1.0)
    assert sized["input_size"] == [128, 160] and tta["flip"] is True and tta["scales"] == [0.75, 1.0]
    assert len({plain["mIoU"], sized["mIoU"], tta["mIoU"]}) == 3


def test_flip_and_multi_scale_average_softmax_probabilities():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(8)).eval()
    x = torch.randn(2, 3, 64, 96)
    out = predict_logits(model, x, (64, 96), scales=(1.0, 1.5), flip=True, size_divisor=1)

    def probs(inp):
        return F.interpolate(model(inp), size=(64, 96), mode="bilinear", align_corners=False).softmax(1)

    x15 = F.interpolate(x, size=(96, 144), mode="bilinear", align_corners=False)
    expected = probs(x) + probs(x.flip(-1)).flip(-1) + probs(x15) + probs(x15.flip(-1)).flip(-1)
    assert torch.allclose(out, expected, atol=1e-5)
    single = predict_logits(model, x, (64, 96))
    assert torch.allclose(single, F.interpolate(model(x), size=(64, 96), mode="bilinear", align_corners=False))


def test_network_inputs_are_rounded_to_multiples_of_the_divisor():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, x.shape[2] // 8, x.shape[3] // 8)

    x = torch.randn(1, 3, 90, 100)
    out = predict_logits(Probe(), x, (90, 100), scales=(1.0, 1.5))
    assert seen == [(96, 96), (128, 160)]  # 90 -> 96, 100 -> 96; x1.5: 135 -> 128, 150 -> 160 (halves go up)
    assert out.shape == (1, 2, 90, 100)
    seen.clear()
    predict_logits(Probe(), x, (90, 100), input_size=(200, 208), size_divisor=1)
    predict_logits(Probe(), x, (90, 100), input_size=(200, 208), size_divisor=64)
    assert seen == [(200, 208), (192, 192)]


def test_stdout_is_one_json_object_with_progress_on_stderr(ckpt):
    root = require(CAMVID)
    proc = subprocess.run([sys.executable, "-m", "icnet_ros.evaluate", "--model", str(ckpt), "--data", str(root),
                           "--split", "val", "--limit", "2", "--workers", "0", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout parses as one object
    assert 0.0 <= report["mIoU"] <= 100.0 and report["split"] == "val"


def test_a_runtime_backend_without_a_model_file_is_refused(capsys):
    """--backend onnxruntime (or openvino) without --model evaluated the default model with torch and exited 0,
    its header saying 'backend: torch': an exported runtime needs an exported file, as icnet-segment says."""
    for backend in ("onnxruntime", "openvino"):
        assert main(["--data", str(require(CAMVID)), "--backend", backend, "--limit", "1"]) == 2
        err = capsys.readouterr().err
        assert err == (f"icnet-eval: error: --backend {backend} runs an exported model file (icnet-export); got the "
                       "default model: give --model\n"), err


def test_readable_table(capsys, ckpt):
    root = require(CAMVID)
    assert main(["--model", str(ckpt), "--data", str(root), "--limit", "1", "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sidewalk" in out and "bicyclist" in out and "mIoU" in out and "aAcc" in out
    assert "license of the weights: not recorded" in out


def test_license_of_the_weights_is_printed(capsys, tmp_path):
    root = require(CAMVID)
    licence = "CC BY-NC 4.0 (trained on CamVid; non-commercial use only)"
    model = make_checkpoint(tmp_path / "licensed.safetensors", license=licence)
    args = ["--model", str(model), "--data", str(root), "--limit", "1", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    assert f"license of the weights: {licence}\n" in capsys.readouterr().out
    assert _run_json(capsys, *args)["license"] == licence


def test_without_model_uses_the_default_model(capsys, ckpt, monkeypatch):
    root = require(CAMVID)
    monkeypatch.setattr(checkpoint_module, "default_model_path", lambda: ckpt)
    default = _run_json(capsys, "--data", root, "--limit", 1)
    explicit = _run_json(capsys, "--model", ckpt, "--data", root, "--limit", 1)
    assert default["model"] == "default" and default["mIoU"] == explicit["mIoU"]


def test_cityscapes_layout_and_mixed_size_generic_folders(capsys, tmp_path):
    from test_datasets import _cityscapes_tree, _folders

    ids = _cityscapes_tree(tmp_path / "cs")
    city = make_checkpoint(tmp_path / "city.safetensors", num_classes=19)
    report = _run_json(capsys, "--model", city, "--data", tmp_path / "cs", "--split", "val")
    assert report["classes"] == "cityscapes" and report["pixels"] == 2 * int(np.isin(ids, (7, 26, 33)).sum())
    assert list(report["per_class"])[13] == "car"
    # generic folders without a class file: labels are the model's train ids; images of two sizes
    root = tmp_path / "generic"
    _folders(root, lambda p, h, w: cv2.imwrite(str(p), np.full((h, w), 3, np.uint8)), "classes: [a]\n",
             sizes=((64, 96), (80, 64)))
    (root / "classes.yaml").unlink()
    cam = make_checkpoint(tmp_path / "cam.safetensors")
    rc = main(["--model", str(cam), "--data", str(root), "--split", "train", "--layout", "folders",
               "--label-suffix", "_mask", "--workers", "0", "--no-progress", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert report["pixels"] == 64 * 96 + 80 * 64 and report["per_class"]["road"]["Acc"] is not None


def test_errors_are_reported_with_exit_code_2(capsys, tmp_path, ckpt):
    root = require(CAMVID)
    assert main(["--model", str(ckpt), "--data", str(tmp_path / "nothing")]) == 2
    assert "dataset root not found" in capsys.readouterr().err
    city = make_checkpoint(tmp_path / "city.safetensors", num_classes=19)
    assert main(["--model", str(city), "--data", str(root)]) == 2
    assert "dataset has 11 classes" in capsys.readouterr().err
    # a missing root with a model of other classes: said so (it read as a dataset of the wrong classes)
    assert main(["--model", str(city), "--data", str(tmp_path / "nothing")]) == 2
    assert "dataset root not found" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing.safetensors"), "--data", str(root)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_scales_and_a_native_conflict_are_refused_at_once(capsys, ckpt):
    """--scales 100000 was accepted and ended in a 112 GiB MemoryError traceback; --native with --input-size
    evaluated silently at the native size. Each is now one line, exit status 2, before the model is loaded."""
    root = require(CAMVID)
    base = ["--model", str(ckpt), "--data", str(root), "--limit", "1", "--workers", "0", "--no-progress"]
    assert main([*base, "--scales", "1", "100000"]) == 2
    assert capsys.readouterr().err == "icnet-eval: error: --scales 100000: each scale must be in (0, 4]\n"
    assert main([*base, "--native", "--input-size", "128", "160"]) == 2
    assert capsys.readouterr().err == ("icnet-eval: error: --native is --input-size native; give one of them, not "
                                       "both (--input-size 128 160)\n")


def test_network_inputs_over_the_pixel_bound_are_refused(capsys, tmp_path, ckpt):
    """A scale that makes a network input of more than 4096x4096 pixels (the engine's bound): with a fixed size, at
    once; with a size that depends on the image (here the trained width 2048, reached at most 4x: 1440x1920, then x 4),
    at the first image, before that input is allocated. One line, exit status 2."""
    root = require(CAMVID)
    base = ["--data", str(root), "--limit", "1", "--workers", "0", "--no-progress"]
    assert main(["--model", str(ckpt), *base, "--input-size", "2048x2048", "--scales", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-eval: error: --scales 4: ") and "8192x8192 network input, more than 16777216 " \
        "pixels" in err and err.count("\n") == 1, err
    wide = make_checkpoint(tmp_path / "wide.safetensors", network_width=2048)
    assert main(["--model", str(wide), *base, "--scales", "4"]) == 2
    err = capsys.readouterr().err
    assert err == ("icnet-eval: error: --scales 4: a 360x480 image becomes a 5760x7680 network input, more than "
                   "16777216 pixels (4096x4096); use smaller --scales or --input-size\n"), err


def test_auto_input_size_scales_to_the_recorded_width(capsys, tmp_path):
    """input_size auto (the default): each image scaled to the metadata's network_width, aspect ratio kept."""
    root = require(CAMVID)
    ckpt = make_checkpoint(tmp_path / "w.safetensors", network_width=256)
    report = _run_json(capsys, "--model", ckpt, "--data", root, "--split", "val", "--limit", 2)
    assert report["network_width"] == 256 and report["input_policy"] == "auto (width 256)"
    from icnet_ros.data import DataSpec, find_samples

    samples = find_samples(DataSpec(str(root)), "val")[0][:2]
    miou, _, _ = _reference_metrics(ckpt, samples, (192, 256))  # 360x480 frames -> 192x256
    assert report["mIoU"] == pytest.approx(miou, abs=0.02)
    native = _run_json(capsys, "--model", ckpt, "--data", root, "--split", "val", "--limit", 2,
                       "--input-size", "native")
    assert native["input_policy"] == "native" and native["mIoU"] != report["mIoU"]


def test_exported_onnx_model_is_evaluated_through_onnxruntime(capsys, tmp_path):
    from icnet_ros.export import export_onnx

    root = require(CAMVID)
    ckpt = make_checkpoint(tmp_path / "x.safetensors")
    onnx = export_onnx(ckpt, tmp_path / "x.onnx", size=(192, 256))
    torch_report = _run_json(capsys, "--model", ckpt, "--data", root, "--split", "val", "--limit", 2,
                             "--input-size", "192x256")
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # printed as two raw lines by the CLI (device auto)
        warnings.simplefilter("always")
        ort_report = _run_json(capsys, "--model", onnx, "--data", root, "--split", "val", "--limit", 2)
    assert not [w for w in caught if "CUDA is not available" in str(w.message)]
    assert ort_report["backend"] == "onnxruntime" and ort_report["input_size"] == [192, 256]
    assert ort_report["mIoU"] == pytest.approx(torch_report["mIoU"], abs=0.05)
    # another --input-size is refused as the engine refuses it (it was ignored: the export's size ran silently)
    assert main(["--model", str(onnx), "--data", str(root), "--split", "val", "--limit", "1", "--workers", "0",
                 "--input-size", "352x480"]) == 2
    assert "input_size 352x480: this exported model runs only at 192x256" in capsys.readouterr().err
    # test-time scales need other network sizes: refused in one line (a traceback from the runtime, after loading)
    assert main(["--model", str(onnx), "--data", str(root), "--split", "val", "--limit", "1", "--workers", "0",
                 "--scales", "0.75", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "exported for 192x256 inputs and runs at no other size; --scales 0.75 1 needs the checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    flipped = _run_json(capsys, "--model", onnx, "--data", root, "--split", "val", "--limit", 1, "--flip")
    assert flipped["flip"] is True  # --flip keeps the size: allowed



def test_fixed_batch_exports_are_evaluated_in_the_chunks_they_take(capsys, tmp_path, ckpt):
    """An export with a fixed batch (--static-batch --batch 2) ran on whatever batch the loader made: a traceback
    ('batch of 3 exceeds ... maximum batch 2', or 'fixed batch of 2, got 1 frames' for the last, short batch).
    It is run in chunks of its batch, the last padded, and scores as the dynamic-batch export."""
    from icnet_ros.export import export_onnx

    _camvid_tree(tmp_path / "data", n=3)
    reports = {}
    for dynamic in (True, False):
        onnx = export_onnx(ckpt, tmp_path / f"m_{dynamic}.onnx", size=(64, 96), batch=2, dynamic_batch=dynamic)
        reports[dynamic] = _run_json(capsys, "--model", onnx, "--data", tmp_path / "data", "--split", "val",
                                     "--batch-size", 3)
    assert reports[False]["mIoU"] == pytest.approx(reports[True]["mIoU"], abs=1e-6)
    assert reports[False]["per_class"] == reports[True]["per_class"] and reports[False]["aAcc"] == reports[True]["aAcc"]

def test_labels_without_a_labelled_pixel_say_so(capsys, tmp_path, ckpt):
    """Labels whose every pixel is ignore (a wrong format or class set) give exit 1 and a reason, not silence."""
    _camvid_tree(tmp_path / "void")
    for label in (tmp_path / "void" / "val" / "labels").iterdir():
        cv2.imwrite(str(label), np.full((64, 96), 11, np.uint8))  # CamVid's void
    assert main(["--model", str(ckpt), "--data", str(tmp_path / "void"), "--split", "val", "--no-progress",
                 "--workers", "0"]) == 1  # DataLoader workers fork this multi-threaded test process: no
    assert "icnet-eval: error: no labelled pixel in 2 label file(s)" in capsys.readouterr().err


def test_datasets_in_other_folders_and_class_sets_are_evaluated_as_trained(capsys, tmp_path, ckpt):
    """icnet-train reads data.image_dir / data.label_dir / data.class_set; icnet-eval had no flags for them, so a
    model trained on an ADE20K-style tree (images/training, annotations/training) could not be evaluated on it.
    Label values no class claims are reported (they are read as ignore: a class missing from the table)."""
    samples = _camvid_tree(tmp_path / "camvid")
    root = tmp_path / "ade"
    for kind, sub in (("images", 0), ("annotations", 1)):
        (root / kind / "validation").mkdir(parents=True)
        for pair in samples:
            (root / kind / "validation" / pair[sub].name).write_bytes(pair[sub].read_bytes())
    args = ["--model", ckpt, "--data", root, "--split", "validation", "--image-dir", "images/{split}",
            "--label-dir", "annotations/{split}"]
    ade, camvid = _run_json(capsys, *args), _run_json(capsys, "--model", ckpt, "--data", tmp_path / "camvid")
    assert ade["per_class"] == camvid["per_class"] and ade["pixels"] == camvid["pixels"] == 2 * 64 * 96
    assert _run_json(capsys, *args, "--class-set", "camvid")["classes"] == "camvid"
    assert main([*map(str, args), "--class-set", "cityscapes", "--workers", "0", "--no-progress"]) == 2
    assert "the dataset has 19 classes (cityscapes) but the model predicts 11" in capsys.readouterr().err
    label = samples[0][1]
    cv2.imwrite(str(label), np.full((64, 96), 40, np.uint8))
    assert main(["--model", str(ckpt), "--data", str(tmp_path / "camvid"), "--workers", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"icnet-eval: warning: label values 40 belong to no class of 'camvid' (its classes take 0..10; 255 is "
            f"ignore): 1 of the 2 label files checked hold them (e.g. {label}; 100.0% of their pixels)") in err, err


def _camvid_tree(root, n=2, size=(64, 96), seed=0):
    """A CamVid-layout split (val/images/*.png, val/labels/*.png with train ids 0..10) of small noisy images."""
    rng = np.random.default_rng(seed)
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "labels").mkdir(parents=True)
    samples = []
    for i in range(n):
        img, lbl = root / "val" / "images" / f"f{i}.png", root / "val" / "labels" / f"f{i}.png"
        small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        cv2.imwrite(str(img), cv2.resize(small, size[::-1], interpolation=cv2.INTER_LINEAR))
        cv2.imwrite(str(lbl), rng.integers(0, 11, size, dtype=np.uint8))
        samples.append((img, lbl))
    return samples


def test_auto_input_size_is_the_engines_policy(capsys, tmp_path):
    """icnet-eval sizes images as the engine does (one definition): auto upscales at most MAX_SCALE, so a 64x96
    image with network_width 512 runs at 256x384 (x4), as in the node, not at 352x512."""
    from icnet_ros.engine import Segmenter
    from icnet_ros.sizes import MAX_SCALE

    ckpt = make_checkpoint(tmp_path / "w.safetensors", network_width=512)
    seg = Segmenter(str(ckpt), device="cpu", warmup=False)
    assert seg.network_size(64, 96) == (256, 384) and MAX_SCALE == 4.0
    samples = _camvid_tree(tmp_path / "ds")
    report = _run_json(capsys, "--model", ckpt, "--data", tmp_path / "ds", "--split", "val")
    assert report["input_policy"] == "auto (width 512)" and report["network_width"] == 512
    miou, _, aacc = _reference_metrics(ckpt, samples, seg.network_size(64, 96))
    assert report["mIoU"] == pytest.approx(miou, abs=0.02) and report["aAcc"] == pytest.approx(aacc, abs=0.02)
    # the size computation itself, for every policy: the Segmenter's (one InputSizePolicy for both)
    from icnet_ros.sizes import InputSizePolicy

    meta = load_model(ckpt).meta
    for policy in ("auto", "native", "checkpoint", (128, 160), 0.5):
        sizes = InputSizePolicy.from_option(policy, meta)
        engine = seg if policy == "auto" else Segmenter(str(ckpt), device="cpu", warmup=False, input_size=policy)
        for h, w in ((64, 96), (360, 480), (100, 700), (720, 960)):
            assert sizes.network_size(h, w) == engine.network_size(h, w), (policy, h, w)


def test_an_unreadable_image_is_one_line_exit_2(capsys, tmp_path, ckpt):
    """In the process (no loader worker) and as the CLI runs by default (2 loader workers, which re-raise the error
    with the worker's traceback in its text); the workers run in a subprocess: a DataLoader worker forked inside
    the test process makes a later subprocess of test_export crash the process (SIGSEGV), with or without errors."""
    _camvid_tree(tmp_path / "ds")
    (tmp_path / "ds" / "val" / "images" / "f1.png").write_bytes(b"garbage")
    args = ["--model", str(ckpt), "--data", str(tmp_path / "ds"), "--no-progress"]
    rc = main([*args, "--workers", "0"])
    err = capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "icnet_ros.evaluate", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for code, text in ((rc, err), (proc.returncode, proc.stderr)):
        assert code == 2 and text.count("\n") == 1, text
        assert text.startswith("icnet-eval: error: cannot read image") and "f1.png" in text
        assert "Traceback" not in text


def test_a_file_whose_size_is_not_read_from_its_header_is_one_line_exit_2(capsys, tmp_path, ckpt):
    """A label PNG whose tEXt chunk fails its CRC (Pillow cannot parse its header) and an image named .jpg holding a
    Radiance HDR header (a format Pillow does not read), each declaring 40000x30000: their size went unchecked and
    OpenCV's own limit (2**30 pixels) ended icnet-eval with a cv2.error traceback, exit status 1. Now each is refused
    from its header: one line naming the file and why, exit status 2."""
    import struct
    import zlib

    def chunk(kind, data, bad=False):
        crc = zlib.crc32(kind + data) ^ (1 if bad else 0)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    label = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 30000, 8, 0, 0, 0, 0))
             + chunk(b"tEXt", b"a\0b", bad=True) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 40000\n" + b"\x80" * 256
    for name, broken, data, why in (("label", "labels/f1.png", label, "cannot decode label {}: PNG chunk b'tEXt' at "
                                     "byte 33 fails its CRC check"),
                                    ("image", "images/f1.jpg", hdr, "cannot read image {}: not a JPEG, PNG, BMP, TIFF "
                                     "or WebP file")):
        root = tmp_path / name
        _camvid_tree(root)
        if broken.endswith(".jpg"):  # the image f1.jpg in place of f1.png
            (root / "val" / "images" / "f1.png").unlink()
        (root / "val" / broken).write_bytes(data)
        assert main(["--model", str(ckpt), "--data", str(root), "--workers", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icnet-eval: error: " + why.format(root / "val" / broken)) and err.count("\n") == 1, err


def test_a_dataset_listing_the_models_classes_in_another_order_is_matched_by_name(capsys, tmp_path):
    """A class file with the model's class names in another order (each name keeping its raw label value): ids were
    compared as numbers, so each class met another's pixels; labels that are the model's own prediction scored 0
    mIoU, exit status 0, with only a 'class names differ' warning. Now matched by name: 100, in the dataset's order."""
    from icnet_ros.classes import CAMVID as CAMVID_CLASSES
    from icnet_ros.preprocess import Normalizer
    from icnet_ros.sizes import InputSizePolicy

    ck = make_checkpoint(tmp_path / "m.safetensors")
    model = load_model(ck)
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    with torch.no_grad():
        x = Normalizer(model.meta.get("normalization"))(torch.from_numpy(img)[None], "RGB")
        size_fn = InputSizePolicy("native", None, 32).network_size
        pred = predict_logits(model, x, (64, 96), size_fn=size_fn).argmax(1)[0].numpy().astype(np.uint8)
    assert len(np.unique(pred)) >= 2, "the test needs a label with several classes"
    reports = {}
    for order, ids in (("same", range(11)), ("reversed", range(10, -1, -1))):
        root = tmp_path / order
        (root / "val" / "images").mkdir(parents=True)
        (root / "val" / "labels").mkdir(parents=True)
        cv2.imwrite(str(root / "val" / "images" / "f0.png"), img[..., ::-1])
        cv2.imwrite(str(root / "val" / "labels" / "f0.png"), pred)  # raw value = the model's class id
        (root / "classes.yaml").write_text("classes:\n" + "".join(
            f"  - {{name: {CAMVID_CLASSES.classes[i]}, id: {i}}}\n" for i in ids))
        rc = main(["--model", str(ck), "--data", str(root), "--split", "val", "--layout", "folders",
                   "--input-size", "native", "--workers", "0", "--no-progress", "--json"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        reports[order] = (json.loads(out.out), out.err)
    (same, same_err), (rev, rev_err) = reports["same"], reports["reversed"]
    assert same["mIoU"] == rev["mIoU"] == 100.0 and rev["aAcc"] == 100.0, (same, rev)
    assert same_err == "" and "in another order: matched by name" in rev_err, rev_err
    assert list(rev["per_class"]) == list(reversed(CAMVID_CLASSES.classes))
    assert {k: v["IoU"] for k, v in rev["per_class"].items()} == {k: v["IoU"] for k, v in same["per_class"].items()}


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_are_one_line_and_no_partial_report(ckpt, signum, status):
    """SIGINT (Ctrl-C) or SIGTERM once the evaluation started (its progress bar drawn): 'icnet-eval: interrupted',
    exit status 130 / 143, nothing on stdout. Before: a KeyboardInterrupt traceback (exit 1), and SIGTERM killed
    it without a word (-15)."""
    root = require(CAMVID)
    proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.evaluate", "--model", str(ckpt), "--data", str(root),
                             "--split", "val", "--limit", "40", "--batch-size", "1", "--workers", "0",
                             "--input-size", "64x96", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while b"icnet-eval val" not in seen:  # the progress bar (drawn with \r, no newline)
        chunk = proc.stderr.read1(4096)
        assert chunk, seen
        seen += chunk
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    err = (seen + err).decode()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-eval:")]
    assert proc.returncode == status and lines == ["icnet-eval: interrupted"] and "Traceback" not in err, err
    assert out == b""


def test_sigterm_to_the_process_group_with_dataloader_workers_is_one_line(ckpt):
    """timeout, Slurm and systemd signal the whole process group: the DataLoader workers died of the SIGTERM too, and
    torch's SIGCHLD handler raised "DataLoader worker (pid N) is killed by signal" during the shutdown, a 20-line
    traceback printed before 'icnet-eval: interrupted'."""
    root = require(CAMVID)
    proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.evaluate", "--model", str(ckpt), "--data", str(root),
                             "--split", "val", "--limit", "40", "--batch-size", "1", "--workers", "2",
                             "--input-size", "64x96", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    seen = b""
    while b"icnet-eval val" not in seen:  # the progress bar: the workers are running
        chunk = proc.stderr.read1(4096)
        assert chunk, seen
        seen += chunk
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    err = (seen + err).decode()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-eval:")]
    assert proc.returncode == 143 and lines == ["icnet-eval: interrupted"], err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert out == b""


def test_json_reports_the_network_size_the_model_ran_at(capsys, ckpt):
    """--input-size 100x150 runs the network at 96x160 (multiples of 32): the JSON said only input_size [100, 150].
    Now network_size [96, 160] beside the requested input_size; the text report names the network size too."""
    root = require(CAMVID)
    report = _run_json(capsys, "--model", ckpt, "--data", root, "--limit", 1, "--input-size", "100x150")
    assert report["input_size"] == [100, 150] and report["network_size"] == [96, 160]
    # auto (the default) and native: the size the frames ran at (null before, though every CamVid frame runs at one)
    from icnet_ros.engine import Segmenter

    for flags, policy in (([], "auto"), (["--native"], "native")):
        expected = Segmenter(str(ckpt), device="cpu", input_size=policy, warmup=False).network_size(360, 480)
        report = _run_json(capsys, "--model", ckpt, "--data", root, "--limit", 2, *flags)
        assert report["network_size"] == list(expected), (policy, report)
    assert main(["--model", str(ckpt), "--data", str(root), "--limit", "1", "--workers", "0", "--no-progress",
                 "--input-size", "100x150"]) == 0
    assert "input: 100x150 (network 96x160)" in capsys.readouterr().out
