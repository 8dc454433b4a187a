"""OpenVINO backend: IR export (metadata, provenance, fp16, INT8 with NNCF), parity with the PyTorch model, bad
files refused with one line, and the missing-runtime error. Real OpenVINO and NNCF (the test extra installs
them), tiny random checkpoints; the default model on CamVid frames where the shared data is present."""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch

from helpers import CAMVID, export_meta, make_checkpoint, require, tiny_onnx
from icnet_ros.backends.base import BackendOptions, MissingRuntimeError
from icnet_ros.checkpoint import CheckpointError, default_model_path, file_sha256, load_model, read_metadata

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="openvino/nncf not installed in this environment (the test extra installs them: "
           "pip install -e '.[test]' or '.[openvino]')")

SIZE = (128, 192)


def torch_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_parity(out: torch.Tensor, ref: torch.Tensor, agreement: float = 0.999, rel: float = 1e-4) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert err <= rel, f"max logit error {err:.2e} relative to the logit range"
    assert agree >= agreement, f"argmax agreement {agree:.5f}"


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A tiny R18 checkpoint and its fp32 IR export (dynamic batch) at 128x192."""
    from icnet_ros.backends.openvino import export_openvino

    d = tmp_path_factory.mktemp("ov_r18")
    ckpt = make_checkpoint(d / "r18.safetensors", "icnet_r18", width=0.25)
    xml = export_openvino(ckpt, d / "r18_ov", size=SIZE, progress=False)
    return ckpt, xml


@needs_openvino
def test_export_writes_ir_with_metadata_and_provenance(r18):
    from icnet_ros.backends.openvino import read_openvino_metadata

    ckpt, xml = r18
    assert xml.name == "r18_ov.xml" and xml.is_file() and xml.with_suffix(".bin").is_file()
    assert sorted(p.name for p in xml.parent.iterdir()) == ["r18.safetensors", "r18_ov.bin", "r18_ov.xml"]
    meta, src = read_openvino_metadata(xml), read_metadata(ckpt)
    for key in ("classes", "palette", "normalization", "dataset", "ignore_index"):
        assert meta[key] == src[key], key
    assert meta["arch"] == {**src["arch"], "aux_heads": False}  # exported without the training-only heads
    assert meta["network_size"] == meta["input_size"] == list(SIZE)
    record = meta["provenance"]["exported"]
    assert record["format"] == "openvino" and record["precision"] == "fp32" and record["dynamic_batch"] is True
    assert record["size"] == list(SIZE) and record["from"] == ckpt.name and record["sha256"] == file_sha256(ckpt)
    import openvino

    assert openvino.get_version().startswith(record["openvino"]) and record["date"].startswith("20")


@needs_openvino
def test_backend_matches_torch_at_batch_1_and_3(r18):
    from icnet_ros.backends.openvino import open_backend

    ckpt, xml = r18
    backend = open_backend(xml, BackendOptions(threads=1))
    assert (backend.name, backend.provider, backend.device) == ("openvino", "CPU", torch.device("cpu"))
    assert backend.fixed_size == SIZE and backend.max_batch is None and backend.precision == "fp32"
    assert backend.input_dtype == torch.float32 and backend.memory_format == torch.contiguous_format
    assert "openvino" in backend.describe() and "128x192" in backend.describe()
    model = load_model(ckpt)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 1):
        x = torch.randn(n, 3, *SIZE, generator=gen)
        assert_parity(backend(x).clone(), torch_logits(model, x))
    with pytest.raises(ValueError, match="takes N x 3 x 128 x 192"):
        backend(torch.zeros(1, 3, 160, 192))
    backend.close()


@needs_openvino
@pytest.mark.parametrize("arch,size,batch", [("icnet_r50", (160, 224), 2), ("icnet_r50_half", (96, 320), None)])
def test_parity_other_architectures_sizes_and_fixed_batch(tmp_path, arch, size, batch):
    """R50 (Bottleneck, concat pyramid pooling, factorized in the export) with a fixed batch; the paper's
    half-width R50 (sum pooling, paper CFF) at another aspect ratio."""
    from icnet_ros.backends.openvino import export_openvino, open_backend

    ckpt = make_checkpoint(tmp_path / "m.safetensors", arch, width=0.25 if arch == "icnet_r50" else 0.5, seed=3)
    xml = export_openvino(ckpt, tmp_path / "m.xml", size=size, batch=batch, progress=False)
    backend = open_backend(xml, BackendOptions(threads=2))
    assert backend.fixed_size == size and backend.max_batch == batch
    n = batch or 3
    x = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(2))
    assert_parity(backend(x), torch_logits(load_model(ckpt), x))
    if batch:
        with pytest.raises(ValueError, match="fixed batch of 2"):
            backend(torch.zeros(3, 3, *size))


@needs_openvino
def test_default_model_parity_on_camvid_val_frames(tmp_path):
    from icnet_ros.backends.openvino import calibration_input, export_openvino, open_backend
    from icnet_ros.data.datasets import read_image
    from icnet_ros.preprocess import Normalizer

    frames = sorted((require(CAMVID / "val" / "images")).iterdir())[:3]
    size = (352, 480)
    xml = export_openvino(default_model_path(), tmp_path / "camvid.xml", size=size, progress=False)
    backend = open_backend(xml, BackendOptions())
    model = load_model(default_model_path())
    norm = Normalizer(model.meta["normalization"])
    x = torch.cat([calibration_input(read_image(f), size, norm) for f in frames])
    assert_parity(backend(x), torch_logits(model, x))


@needs_openvino
def test_default_model_int8_on_camvid_frames(tmp_path):
    """INT8 export of the shipped model (EfficientNet-Lite0 encoder: its TF-style padding must trace to constants
    for NNCF's quantizers to line up), calibrated on CamVid train frames, labels val frames as fp32 does on almost
    every pixel."""
    import openvino as ov

    from icnet_ros.backends.openvino import calibration_input, export_openvino, open_backend, read_openvino_metadata
    from icnet_ros.data.datasets import read_image
    from icnet_ros.preprocess import Normalizer

    size = (352, 480)
    xml = export_openvino(default_model_path(), tmp_path / "int8.xml", size=size, int8=True,
                          calib_dir=require(CAMVID / "train"), calib_count=12, progress=False)
    record = read_openvino_metadata(xml)["provenance"]["exported"]["calibration"]
    assert record["count"] == 12 and record["quantized"] == "torch" and record["folder"] == "train"
    ops = ov.Core().read_model(str(xml)).get_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops) > 50  # every convolution's weights and inputs
    model = load_model(default_model_path())
    norm = Normalizer(model.meta["normalization"])
    frames = sorted((require(CAMVID / "val" / "images")).iterdir())[::34]
    x = torch.cat([calibration_input(read_image(f), size, norm) for f in frames])
    agree = (open_backend(xml, BackendOptions(precision="int8"))(x).argmax(1)
             == torch_logits(model, x).argmax(1)).float().mean().item()
    # 0.993 measured (NNCF 3.4, OpenVINO 2026.4); quantizing the converted OpenVINO model instead: 0.979
    assert agree >= 0.985, f"INT8 vs fp32 argmax agreement {agree:.4f}"


@needs_openvino
def test_fp16_weights_halve_the_file_and_stay_close(tmp_path, r18):
    from icnet_ros.backends.openvino import export_openvino, open_backend, read_openvino_metadata

    ckpt, fp32_xml = r18
    xml = export_openvino(ckpt, tmp_path / "half.xml", size=SIZE, fp16=True, progress=False)
    assert xml.with_suffix(".bin").stat().st_size < 0.6 * fp32_xml.with_suffix(".bin").stat().st_size
    # only the stored weights are fp16 (decompressed at load, run at the runtime's precision): not an fp16 model
    record = read_openvino_metadata(xml)["provenance"]["exported"]
    assert record["weights"] == "fp16" and record["precision"] == "fp32"
    assert "weights" not in read_openvino_metadata(fp32_xml)["provenance"]["exported"]
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    assert_parity(open_backend(xml)(x), torch_logits(load_model(ckpt), x), agreement=0.99, rel=1e-2)


@needs_openvino
def test_int8_export_calibrates_and_mostly_agrees_with_fp32(tmp_path, r18):
    """NNCF INT8 on a handful of calibration images: a quantized model that runs, records its calibration, and
    labels most pixels as the fp32 model does (a loose bound: random weights, 6 calibration images)."""
    import openvino as ov

    from icnet_ros.backends.openvino import calibration_input, export_openvino, open_backend, read_openvino_metadata
    from icnet_ros.data.datasets import read_image
    from icnet_ros.preprocess import Normalizer

    ckpt, fp32_xml = r18
    calib = tmp_path / "calib" / "images"  # a split folder: export finds its images/
    calib.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):  # smooth gradients + blobs + noise, different sizes (resized like the Segmenter does)
        h, w = (240 + 16 * i, 320 + 24 * i)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, (xx + yy) // 3 % 256], -1).astype(np.float32)
        img += rng.normal(0, 20, img.shape)
        cv2.imwrite(str(calib / f"{i:02d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    (calib / "notes.txt").write_text("not an image")
    xml = export_openvino(ckpt, tmp_path / "int8.xml", size=SIZE, int8=True, calib_dir=calib.parent,
                          calib_count=6, progress=False)
    record = read_openvino_metadata(xml)["provenance"]["exported"]
    assert record["precision"] == "int8"
    assert record["calibration"]["folder"] == "calib" and record["calibration"]["count"] == 6
    backend = open_backend(xml, BackendOptions(precision="int8"))
    assert backend.int8 and backend.precision == "int8" and "int8" in backend.describe()
    matmuls = [op for op in ov.Core().read_model(str(xml)).get_ops() if op.get_type_name() == "MatMul"]
    assert matmuls  # the factorized concat pyramid pooling's: they stay in float (int8_ignored_scope)
    for op in matmuls:
        assert all(v.get_node().get_type_name() != "FakeQuantize" for v in op.input_values()), op
    norm = Normalizer(read_metadata(ckpt)["normalization"])
    x = torch.cat([calibration_input(read_image(p), SIZE, norm) for p in sorted(calib.glob("*.png"))])
    fp32 = open_backend(fp32_xml)
    ref = fp32(x).clone()
    out = backend(x)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.9, f"INT8 vs fp32 argmax agreement {agree:.3f}"  # 0.95 measured (OpenVINO 2026.4, NNCF 3.4)
    with pytest.raises(ValueError, match="not an INT8 model"):
        open_backend(fp32_xml, BackendOptions(precision="int8"))
    from icnet_ros.engine import Segmenter

    seg = Segmenter(xml, device="cpu", warmup=False)  # precision fp32 asked (the default): the file runs INT8
    assert seg.precision == "int8" and " | int8 | " in seg.describe()  # said fp32 (/diagnostics, icnet-bench)


@needs_openvino
def test_export_argument_errors(tmp_path, r18):
    from icnet_ros.backends.openvino import export_openvino

    ckpt, _ = r18
    with pytest.raises(ValueError, match="nearest valid size: 64x64"):
        export_openvino(ckpt, tmp_path / "a.xml", size=(32, 64))
    with pytest.raises(ValueError, match="multiples of 32.*nearest valid size: 96x160"):
        export_openvino(ckpt, tmp_path / "a.xml", size=(100, 150))
    with pytest.raises(ValueError, match="fp16 or int8"):
        export_openvino(ckpt, tmp_path / "a.xml", size=SIZE, fp16=True, int8=True, calib_dir=tmp_path)
    with pytest.raises(ValueError, match="needs calibration images"):
        export_openvino(ckpt, tmp_path / "a.xml", size=SIZE, int8=True)
    with pytest.raises(ValueError, match="no images"):
        export_openvino(ckpt, tmp_path / "a.xml", size=SIZE, int8=True, calib_dir=tmp_path)
    with pytest.raises(ValueError, match="batch must be"):
        export_openvino(ckpt, tmp_path / "a.xml", size=SIZE, batch=-1)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        export_openvino(tmp_path / "missing.safetensors", tmp_path / "a.xml", size=SIZE)
    assert not list(tmp_path.glob("a*"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@needs_openvino
def test_bad_files_are_refused_with_one_line(tmp_path, r18):
    import openvino as ov

    from icnet_ros.backends.openvino import open_backend, read_openvino_metadata

    _, xml = r18
    xml_text, bin_bytes = xml.read_text(), xml.with_suffix(".bin").read_bytes()
    cases = {}
    (tmp_path / "missing_bin.xml").write_text(xml_text)
    cases["missing_bin.xml"] = "weights file missing_bin.bin is missing"
    (tmp_path / "truncated_xml.xml").write_text(xml_text[: len(xml_text) // 2])
    (tmp_path / "truncated_xml.bin").write_bytes(bin_bytes)
    cases["truncated_xml.xml"] = "not XML"
    (tmp_path / "truncated_bin.xml").write_text(xml_text)
    (tmp_path / "truncated_bin.bin").write_bytes(bin_bytes[: len(bin_bytes) // 2])
    cases["truncated_bin.xml"] = "needs bytes .* of truncated_bin.bin, which has"
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    cases["garbage.onnx"] = "not a complete ONNX model"
    cases["r18.safetensors"] = "not an OpenVINO model"
    (tmp_path / "r18.safetensors").write_bytes(b"x")
    cases["nothing_here.xml"] = "model not found"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, which convert_model uses
        foreign = ov.convert_model(torch.nn.Conv2d(3, 4, 3).eval(), example_input=torch.zeros(1, 3, 64, 64))
    ov.save_model(foreign, str(tmp_path / "foreign.xml"))
    cases["foreign.xml"] = "no icnet_ros metadata"
    bad = ov.Core().read_model(str(xml))
    bad.set_rt_info("{not json", "icnet_ros")
    ov.save_model(bad, str(tmp_path / "badjson.xml"))
    cases["badjson.xml"] = "not valid JSON"
    meta = read_openvino_metadata(xml)
    bad.set_rt_info(json.dumps({**meta, "classes": meta["classes"][:3]}), "icnet_ros")
    ov.save_model(bad, str(tmp_path / "badmeta.xml"))
    cases["badmeta.xml"] = "invalid checkpoint metadata"
    for name, match in cases.items():
        for fn in (read_openvino_metadata, open_backend):
            with pytest.raises(CheckpointError, match=match) as e:
                fn(tmp_path / name)
            assert _one_line(e).startswith(str(tmp_path / name)) or "not found" in str(e.value), str(e.value)


@needs_openvino
@pytest.mark.parametrize("case", ["wrapped size", "offset past the bin", "element type", "not a net",
                                  "newline in the shape"])
def test_ir_constants_are_checked_against_the_bin_before_openvino_reads_it(tmp_path, r18, case):
    """Every Const of an IR must be as many bytes as its shape and type say, inside the .bin: OpenVINO checks that in
    64-bit arithmetic, where 2^62 + 2 f32 values are 8 bytes, and compiling such a file read past the mapped .bin
    (SIGBUS: the process ended without a message). Refused with one line before OpenVINO sees the file."""
    import re

    from icnet_ros.backends.openvino import open_backend, read_openvino_metadata

    _, xml = r18
    text, weights = xml.read_text(), xml.with_suffix(".bin").read_bytes()
    m = re.search(r'element_type="f32" shape="(\d+)" offset="(\d+)" size="(\d+)"', text)
    assert m and int(m[1]) * 4 == int(m[3]), "a 1-D f32 Const in the export"
    n, offset, size = int(m[1]), int(m[2]), int(m[3])
    if case == "wrapped size":
        text = text.replace(m[0], f'element_type="f32" shape="{n + 2 ** 62}" offset="{offset}" size="{size}"', 1)
        match = f"shape \\[{n + 2 ** 62}\\] of f32 is {size + 2 ** 64} bytes, its size says {size}"
    elif case == "offset past the bin":
        text = text.replace(m[0], f'element_type="f32" shape="{n}" offset="{len(weights)}" size="{size}"', 1)
        match = f"needs bytes {len(weights)}..{len(weights) + size} of bad.bin, which has {len(weights)}"
    elif case == "newline in the shape":  # (an attribute's &#10; is a newline: still one line in the message)
        text = text.replace(m[0], f'element_type="f32" shape="{n}&#10;" offset="{offset}" size="{size + 4}"', 1)
        match = f"shape \\[{n}\\] of f32 is {size} bytes, its size says {size + 4}"
    elif case == "element type":
        text = text.replace(m[0], f'element_type="u3" shape="{n}" offset="{offset}" size="{size}"', 1)
        match = "element type 'u3' is not one an exported model has"
    else:
        text = text.replace("<net ", "<network ", 1).replace("</net>", "</network>")
        match = "not an OpenVINO IR"
    (tmp_path / "bad.xml").write_text(text)
    (tmp_path / "bad.bin").write_bytes(weights)
    for fn in (read_openvino_metadata, open_backend):
        with pytest.raises(CheckpointError, match=match) as e:
            fn(tmp_path / "bad.xml")
        assert _one_line(e).endswith("not an IR that icnet-export wrote"), str(e.value)


@needs_openvino
def test_the_model_cache_must_be_the_users_own(tmp_path, r18):
    """engine_cache is also OpenVINO's compiled-model cache (CACHE_DIR), whose blobs run instead of the model when
    read (a blob of another network renamed to the model's ran that network): a folder others can write is refused
    as TensorRT's caches are; a new one is made 0700 and holds the compiled model."""
    import os

    from icnet_ros.backends.openvino import open_backend

    ckpt, xml = r18
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CheckpointError, match=r"refusing OpenVINO's model cache: the cache folder .* is writable by "
                                              r"its group and other users \(mode 0777\)") as e:
        open_backend(xml, BackendOptions(threads=1, cache_dir=str(shared)))
    _one_line(e)
    own = tmp_path / "own" / "cache"
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    out = open_backend(xml, BackendOptions(threads=1, cache_dir=str(own)))(x).clone()
    assert os.stat(own).st_mode & 0o777 == 0o700 and any(own.iterdir())
    assert torch.equal(open_backend(xml, BackendOptions(threads=1, cache_dir=str(own)))(x), out)  # from the cache


@needs_openvino
def test_upper_case_file_names_open(tmp_path, r18):
    """MODEL.XML / MODEL.BIN (a FAT-formatted stick, a Windows copy) open like model.xml / model.bin."""
    from icnet_ros.backends.openvino import open_backend

    _, xml = r18
    upper = tmp_path / "MODEL.XML"
    upper.write_bytes(xml.read_bytes())
    (tmp_path / "MODEL.BIN").write_bytes(xml.with_suffix(".bin").read_bytes())
    backend = open_backend(upper, BackendOptions(threads=1))
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(backend(x), open_backend(xml, BackendOptions(threads=1))(x))


@needs_openvino
def test_device_and_precision_errors(r18):
    from icnet_ros.backends.openvino import open_backend

    _, xml = r18
    with pytest.raises(ValueError, match="CPU or an Intel GPU") as e:
        open_backend(xml, BackendOptions(device=torch.device("cuda", 0)))
    _one_line(e)
    with pytest.raises(ValueError, match="finds no Intel GPU"):
        open_backend(xml, BackendOptions(device=torch.device("xpu")))
    with pytest.raises(ValueError, match="precision must be one of"):
        open_backend(xml, BackendOptions(precision="fp64"))


@needs_openvino
def test_segmenter_device_choice_for_openvino(r18, monkeypatch):
    """Through the Segmenter (and so the node and the CLIs): device auto runs an IR on the CPU even where CUDA is
    available (before: auto became cuda:0, which OpenVINO refuses, so model:=road.xml failed on every CUDA
    machine); xpu (an Intel GPU) reaches OpenVINO, which finds none here (before: the option parser refused xpu,
    the device the backend's own message advised); the backend's refusal is a one-line ConfigError."""
    from icnet_ros.engine import Segmenter
    from icnet_ros.engine_config import ConfigError

    _, xml = r18
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: CUDA only looks available
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seg = Segmenter(xml, warmup=False)
    assert seg.device.type == "cpu" and seg.backend.device.type == "cpu"
    seg.close()
    with pytest.raises(ConfigError, match="OpenVINO finds no Intel GPU") as e:
        Segmenter(xml, device="xpu", warmup=False)
    _one_line(e)
    with pytest.raises(ConfigError, match="CPU or an Intel GPU"):
        Segmenter(xml, device="cuda:0", warmup=False)


def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    from icnet_ros.backends import openvino as backend_module

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError, as when not installed
    for call in (lambda: backend_module.open_backend(tmp_path / "m.xml"),
                 lambda: backend_module.read_openvino_metadata(tmp_path / "m.xml"),
                 lambda: backend_module.export_openvino(tmp_path / "m.safetensors", tmp_path / "m.xml", (64, 64))):
        with pytest.raises(MissingRuntimeError, match=r"pip install 'icnet_ros\[openvino\]'") as e:
            call()
        assert e.value.extra == "openvino" and e.value.backend == "openvino"


@needs_openvino
def test_onnx_files_with_icnet_metadata_run_through_openvino(tmp_path, r18):
    """An ONNX export (metadata as JSON in metadata_props['icnet_ros']) runs exactly; one without is refused."""
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx not installed (the [onnx] extra): cannot write an ONNX file here")
    import onnx

    from icnet_ros.backends.openvino import open_backend, read_openvino_metadata

    ckpt, _ = r18
    size = (192, 192)  # torch's ONNX exporter needs pooled sizes (1, 2, 3, 6) dividing the 1/32 feature
    model = load_model(ckpt)
    model.auxiliary_head = None
    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *size),), str(plain), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    with pytest.raises(CheckpointError, match="ONNX model without icnet_ros metadata"):
        open_backend(plain)
    proto = onnx.load(str(plain))
    entry = proto.metadata_props.add()
    meta = {**model.meta, "network_size": list(size)}
    entry.key, entry.value = "icnet_ros", json.dumps(meta)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    assert read_openvino_metadata(tmp_path / "m.onnx") == meta
    backend = open_backend(tmp_path / "m.onnx")
    assert backend.fixed_size == size and backend.max_batch is None
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    assert_parity(backend(x), torch_logits(model, x))


@needs_openvino
def test_segmenter_runs_the_export_on_mixed_frames_like_torch(tmp_path):
    """icnet-export --format openvino, then Segmenter(model.xml): mixed frame sizes and channel orders in one
    call, labels as the torch backend's (the same preprocessing and postprocessing around both)."""
    from icnet_ros.engine import Segmenter
    from icnet_ros.tools.export import main as export_main

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "icnet_r18", width=0.25, seed=7)
    xml = tmp_path / "m.xml"
    assert export_main([str(ckpt), "--format", "openvino", "--size", "128x192", "--output", str(xml)]) == 0
    ov_seg = Segmenter(xml, device="cpu", outputs=("label", "color", "confidence"))
    torch_seg = Segmenter(ckpt, device="cpu", input_size=SIZE, outputs=("label", "color", "confidence"))
    assert "openvino" in ov_seg.describe() and ov_seg.backend.name == "openvino"
    assert ov_seg.network_size(480, 640) == SIZE  # an export runs at its own size, whatever the frame
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((240, 320, 3), (128, 192, 3), (97, 131), (240, 320, 3))]
    orders = ["RGB", "BGR", "RGB", "RGB"]
    got, ref = ov_seg.segment(frames, orders), torch_seg.segment(frames, orders)
    for f, a, b in zip(frames, got, ref):
        assert a.label.shape == f.shape[:2] and a.color.shape == (*f.shape[:2], 3)
        assert (a.label == b.label).mean() >= 0.999
        assert np.abs(a.confidence.astype(int) - b.confidence.astype(int)).max() <= 1


def _tiny_onnx(path, ckpt, size=(64, 64), classes=11, in_shape=None, out_shape=None, **changes):
    return tiny_onnx(path, export_meta(ckpt, size, **changes), size, classes, in_shape, out_shape)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "r18.safetensors")


@needs_openvino
def test_model_input_is_the_metadata_network_size(tmp_path, tiny_ckpt):
    """The model's fixed input must be the (bounded) network_size of the metadata, not any size the graph says."""
    pytest.importorskip("onnx")
    from icnet_ros.backends.openvino import open_backend

    backend = open_backend(_tiny_onnx(tmp_path / "ok.onnx", tiny_ckpt), BackendOptions(threads=1))
    assert backend.fixed_size == (64, 64) and backend(torch.zeros(1, 3, 64, 64)).shape == (1, 11, 8, 8)
    path = _tiny_onnx(tmp_path / "big.onnx", tiny_ckpt, in_shape=["N", 3, 4160, 4160])
    with pytest.raises(CheckpointError) as e:
        open_backend(path, BackendOptions(threads=1))
    assert "model's input is 4160x4160, the metadata's network_size 64x64" in _one_line(e)


@needs_openvino
def test_model_output_classes_are_the_metadata_classes(tmp_path, tiny_ckpt):
    """A model with 200 output classes under metadata listing 11 (labels up to 172 came out) is refused at load
    naming both; a call whose logits are not the metadata's shape raises instead of returning them."""
    pytest.importorskip("onnx")
    from icnet_ros.backends.openvino import open_backend

    for name, kwargs in {"more": dict(classes=200), "symbolic": dict(classes=200, out_shape=["N", "C", "h", "w"]),
                         "declared_11": dict(classes=200, out_shape=["N", 11, 8, 8])}.items():
        with pytest.raises(CheckpointError) as e:
            open_backend(_tiny_onnx(tmp_path / f"{name}.onnx", tiny_ckpt, **kwargs), BackendOptions(threads=1))
        assert "output class dimension is 200, the metadata needs 11" in _one_line(e)
    backend = open_backend(_tiny_onnx(tmp_path / "ok.onnx", tiny_ckpt), BackendOptions(threads=1))
    assert backend(torch.zeros(2, 3, 64, 64)).shape == (2, 11, 8, 8)
    backend.num_classes = 12  # as if the model's class axis had resolved to another count than the metadata's
    with pytest.raises(RuntimeError, match=r"returned logits of shape \[2, 11, 8, 8\], the metadata needs "
                                           r"\[2, 12, 8, 8\]"):
        backend(torch.zeros(2, 3, 64, 64))


@needs_openvino
def test_metadata_size_is_bounded(tmp_path, tiny_ckpt):
    """rt_info metadata beyond MAX_METADATA_BYTES (the ONNX and engine side-file limit) is refused before parsing."""
    pytest.importorskip("onnx")
    import openvino as ov

    from icnet_ros.backends.openvino import open_backend, read_openvino_metadata
    from icnet_ros.export import MAX_METADATA_BYTES

    model = ov.Core().read_model(str(_tiny_onnx(tmp_path / "m.onnx", tiny_ckpt)))
    meta = read_metadata(tiny_ckpt)
    meta["network_size"] = [64, 64]
    for name, junk in (("fits", 1 << 19), ("big", MAX_METADATA_BYTES)):  # (the JSON itself: at most 1 MiB)
        meta["provenance"]["junk"] = "x" * junk
        model.set_rt_info(json.dumps(meta), "icnet_ros")
        ov.save_model(model, str(tmp_path / f"{name}.xml"))
    assert read_openvino_metadata(tmp_path / "fits.xml")["provenance"]["junk"] == "x" * (1 << 19)
    for fn in (read_openvino_metadata, open_backend):
        with pytest.raises(CheckpointError) as e:
            fn(tmp_path / "big.xml")
        assert f"icnet_ros metadata larger than {MAX_METADATA_BYTES} bytes" in _one_line(e)


@needs_openvino
def test_fixed_batch_is_bounded(tmp_path, tiny_ckpt):
    """A model with a fixed batch pads every call to it: a fixed batch beyond 64 is refused at load, and an export
    beyond it up front."""
    pytest.importorskip("onnx")
    from icnet_ros.backends.openvino import export_openvino, open_backend

    assert open_backend(_tiny_onnx(tmp_path / "b4.onnx", tiny_ckpt, in_shape=[4, 3, 64, 64])).max_batch == 4
    with pytest.raises(CheckpointError, match="the model's fixed batch is 100000, not 1 to 64"):
        open_backend(_tiny_onnx(tmp_path / "big.onnx", tiny_ckpt, in_shape=[100_000, 3, 64, 64]))
    with pytest.raises(ValueError, match="positive integer up to 64"):
        export_openvino(tiny_ckpt, tmp_path / "x.xml", size=(64, 64), batch=65)
