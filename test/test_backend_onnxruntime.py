"""ONNX Runtime backend against the torch model it was exported from: logits within 1e-4 relative and argmax
agreement >= 99.9% (R18/R50 random weights at 32-aligned odd sizes, the default model on CamVid val frames),
dynamic and fixed batches, the Backend contract, thread/spinning settings, refused inputs and files, a missing
runtime. CUDA execution providers: cuda-marked, skipped without a GPU and onnxruntime-gpu."""
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CAMVID, export_meta, make_checkpoint, require, tiny_onnx

from icnet_ros.backends.base import Backend, BackendOptions, MissingRuntimeError
from icnet_ros.checkpoint import CheckpointError, default_model_path, load_model
from icnet_ros.export import export_onnx
from icnet_ros.optimize import compare_logits
from icnet_ros.preprocess import Normalizer

ort = pytest.importorskip("onnxruntime")
from icnet_ros.backends.onnxruntime import open_backend  # noqa: E402

RTOL, MIN_AGREEMENT = 1e-4, 0.999


def _export(tmp_path_factory, arch, width, size, seed=0):
    folder = tmp_path_factory.mktemp(arch)
    ckpt = make_checkpoint(folder / f"{arch}.safetensors", arch=arch, width=width, seed=seed)
    return ckpt, export_onnx(ckpt, folder / f"{arch}.onnx", size=size)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return _export(tmp_path_factory, "icnet_r18", 0.25, (160, 224))


def check_parity(model, backend, x):
    with torch.no_grad():
        ref = model(x)
    got = backend(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    agreement = compare_logits(ref, got)
    assert agreement.relative_diff <= RTOL and agreement.argmax_agreement >= MIN_AGREEMENT, str(agreement)
    return agreement


def test_r18_parity_dynamic_batch_and_contract(r18):
    ckpt, path = r18
    backend = open_backend(path, BackendOptions())
    assert isinstance(backend, Backend)
    assert backend.name == "onnxruntime" and backend.provider == "CPUExecutionProvider"
    assert backend.device == torch.device("cpu") and backend.input_dtype == torch.float32
    assert backend.memory_format == torch.contiguous_format
    assert backend.fixed_size == (160, 224) and backend.max_batch is None
    line = backend.describe()
    assert "\n" not in line and "CPUExecutionProvider" in line and "160x224" in line
    assert backend.meta["network_size"] == [160, 224]
    model = load_model(ckpt)
    g = torch.Generator().manual_seed(1)
    for n in (1, 3):
        check_parity(model, backend, torch.randn(n, 3, 160, 224, generator=g))
    # a non-contiguous (channels_last) input is accepted and gives the same logits
    x = torch.randn(2, 3, 160, 224, generator=g)
    torch.testing.assert_close(backend(x.contiguous(memory_format=torch.channels_last)), backend(x))
    backend.close()


def test_refused_inputs(r18):
    backend = open_backend(r18[1], BackendOptions(threads=1))
    with pytest.raises(ValueError, match="exported for 160x224"):
        backend(torch.zeros(1, 3, 128, 224))
    with pytest.raises(ValueError, match="float32"):
        backend(torch.zeros(1, 3, 160, 224, dtype=torch.float64))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        backend(torch.zeros(3, 160, 224))
    with pytest.raises(ValueError, match="fp32 or fp16"):
        open_backend(r18[1], BackendOptions(precision="bf16"))
    # through the Segmenter: a ConfigError, as its docstring promises for a bad option value (was a ValueError)
    from icnet_ros.engine import Segmenter
    from icnet_ros.engine_config import ConfigError

    with pytest.raises(ConfigError, match="fp32 or fp16"):
        Segmenter(r18[1], precision="bf16", warmup=False)


def test_auto_device_with_the_cpu_wheel_on_a_gpu_machine_runs_on_the_cpu(r18, monkeypatch):
    """device auto on a machine with CUDA but the CPU onnxruntime wheel: the CPU with a warning (it was a refusal
    to run at all: icnet-eval and the node needed --device cpu); asked for explicitly, cuda is still refused."""
    import onnxruntime as ort

    from icnet_ros.engine import Segmenter
    from icnet_ros.engine_config import ConfigError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: CUDA only looks available
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.warns(RuntimeWarning, match="no CUDA execution provider .*; running on the CPU"):
        seg = Segmenter(r18[1], warmup=False)
    assert seg.device.type == "cpu" and any("onnxruntime-gpu" in n for n in seg.notes)
    frame = np.random.default_rng(0).integers(0, 256, (160, 224, 3), dtype=np.uint8)
    assert seg.segment([frame])[0].label.shape == (160, 224)
    seg.close()
    with pytest.raises(ConfigError, match="no CUDA execution provider"):
        Segmenter(r18[1], device="cuda", warmup=False)


def test_thread_options(r18):
    """intra-op threads from the options (0: torch's), one inter-op thread, no spinning in either pool."""
    for threads, expected in ((1, 1), (2, 2), (0, torch.get_num_threads())):
        so = open_backend(r18[1], BackendOptions(threads=threads)).session.get_session_options()
        assert so.intra_op_num_threads == expected and so.inter_op_num_threads == 1
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    # results do not depend on the thread count
    x = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(2))
    a = open_backend(r18[1], BackendOptions(threads=1))(x)
    b = open_backend(r18[1], BackendOptions(threads=2))(x)
    assert compare_logits(a, b).relative_diff <= 1e-5


def test_refused_files(tmp_path, r18):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(r18[1].read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="not a complete ONNX model"):
        open_backend(cut)
    # valid icnet_ros metadata on a graph without the exported interface
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="icnet_ros", value=onnx.load(str(r18[1])).metadata_props[0].value)
    onnx.save(model, str(tmp_path / "identity.onnx"))
    with pytest.raises(CheckpointError) as e:
        open_backend(tmp_path / "identity.onnx")
    assert "expected one input 'input'" in str(e.value) and "\n" not in str(e.value)


def test_missing_runtime(r18, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import really fails
    with pytest.raises(MissingRuntimeError) as e:
        open_backend(r18[1])
    assert e.value.extra == "onnx" and "pip install 'icnet_ros[onnx]'" in str(e.value)


@pytest.mark.slow
def test_r50_parity(tmp_path_factory):
    ckpt, path = _export(tmp_path_factory, "icnet_r50", 0.5, (224, 288), seed=1)
    backend = open_backend(path, BackendOptions())
    model = load_model(ckpt)
    g = torch.Generator().manual_seed(4)
    for n in (1, 3):
        check_parity(model, backend, torch.randn(n, 3, 224, 288, generator=g))


def test_paper_head_parity(tmp_path_factory):
    """The paper's classifier at 1/4 (icnet_r50_half): logits twice the FCN head's size, the output buffer sized by
    the metadata's architecture (ceil(H/8) was assumed), at an odd aspect ratio and two batch sizes."""
    ckpt, path = _export(tmp_path_factory, "icnet_r50_half", 0.25, (96, 160), seed=2)
    backend = open_backend(path, BackendOptions(threads=1))
    model = load_model(ckpt)
    assert model.config.head == "paper" and backend.logits_size(96, 160) == (24, 40)
    g = torch.Generator().manual_seed(5)
    for n in (1, 2):
        check_parity(model, backend, torch.randn(n, 3, 96, 160, generator=g))


@pytest.mark.slow
def test_default_model_parity_on_camvid_val(tmp_path):
    files = sorted((require(CAMVID / "val") / "images").iterdir())[:4]
    path = export_onnx(None, tmp_path / "default.onnx", size=(352, 480))
    backend = open_backend(path, BackendOptions())
    model = load_model(default_model_path())
    normalizer = Normalizer(model.meta["normalization"])
    frames = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    x = normalizer(F.interpolate(x, size=(352, 480), mode="bilinear", align_corners=False), "RGB",
                   channels_last_input=False).contiguous()
    check_parity(model, backend, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()),
                    reason="this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
def test_cuda_execution_provider(r18):
    # (skipped before the r18 fixture exports its model: on a GPU machine without onnxruntime-gpu the export cost
    # seconds of a short device call for a skip)
    ckpt, path = r18
    backend = open_backend(path, BackendOptions(device=torch.device("cuda")))
    assert backend.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    assert backend.device.type == "cuda"
    model = load_model(ckpt)
    x = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    got = backend(x.cuda())
    assert got.device.type == "cuda"
    # cuDNN / TensorRT may use TF32 and other algorithms: argmax agreement, logits close
    agreement = compare_logits(ref, got.float().cpu())
    assert agreement.argmax_agreement >= 0.99 and agreement.relative_diff <= 1e-2, str(agreement)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # a call from another stream is ordered correctly
        y = backend(x.cuda())
    torch.cuda.synchronize()
    torch.testing.assert_close(y, got)


def _tiny_onnx(path, ckpt, size=(64, 64), classes=11, in_shape=None, out_shape=None, **changes):
    return tiny_onnx(path, export_meta(ckpt, size, **changes), size, classes, in_shape, out_shape)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "r18.safetensors")


def test_graph_input_is_the_metadata_network_size(tmp_path, tiny_ckpt):
    """The graph's fixed input must be the (bounded) network_size of the metadata: a graph fixed at 4160 x 4160
    under metadata of 64 x 64 was taken as the network size (every frame upscaled to it)."""
    backend = open_backend(_tiny_onnx(tmp_path / "ok.onnx", tiny_ckpt), BackendOptions(threads=1))
    assert backend.fixed_size == (64, 64)
    assert backend(torch.zeros(2, 3, 64, 64)).shape == (2, 11, 8, 8)
    path = _tiny_onnx(tmp_path / "big.onnx", tiny_ckpt, in_shape=["N", 3, 4160, 4160])
    with pytest.raises(CheckpointError) as e:
        open_backend(path, BackendOptions(threads=1))
    assert "graph's input is 4160x4160, the metadata's network_size 64x64" in str(e.value)
    assert "\n" not in str(e.value)
    # a graph whose H and W are symbolic (an edited export) runs at the metadata's size: it was taken as "any
    # size", and input_size auto's frames of another size failed in ORT, every one, with a multi-line message
    from icnet_ros.engine import Segmenter

    free = open_backend(_tiny_onnx(tmp_path / "free.onnx", tiny_ckpt, in_shape=["N", 3, "H", "W"],
                                   out_shape=["N", 11, "h", "w"]), BackendOptions(threads=1))
    assert free.fixed_size == (64, 64)
    seg = Segmenter(str(tmp_path / "free.onnx"), device="cpu", warmup=False)
    assert seg.network_size(360, 480) == (64, 64)
    assert seg.segment([np.zeros((360, 480, 3), np.uint8)])[0].label.shape == (360, 480)


def _tensorrt_ep_options(monkeypatch, path, cache_dir):
    """The TensorRT execution provider's options _providers gives for ``path`` on a (faked) CUDA device."""
    import types

    from icnet_ros.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    fake_ort = types.SimpleNamespace(get_available_providers=lambda: ["TensorrtExecutionProvider",
                                                                       "CUDAExecutionProvider",
                                                                       "CPUExecutionProvider"])
    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)
    backend.path, backend.device = path, torch.device("cuda", 0)
    backend.meta = {"network_size": [64, 64], "provenance": {"exported": {"batch": 2, "dynamic_batch": True}}}
    providers = backend._providers(fake_ort, BackendOptions(device=torch.device("cuda", 0), cache_dir=cache_dir))
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider"
    # a stream of the backend's own (7), not the caller's legacy default stream (0): TensorRT syncs on that one
    assert options["user_compute_stream"] == providers[1][1]["user_compute_stream"] == "7"
    return options


def test_tensorrt_ep_cache_follows_the_file_content(tmp_path, monkeypatch):
    """ORT's TensorRT engine cache ids hash the file name and tensor names, not the weights: re-exporting new
    weights to the same path reused the stale engine. The cache folder now carries the file's SHA-256; it is made
    0700, and a cache another user could write is refused (engines are native code)."""
    import os

    from icnet_ros.checkpoint import file_sha256

    model = tmp_path / "road.onnx"
    model.write_bytes(b"weights one")
    first = _tensorrt_ep_options(monkeypatch, model, None)["trt_engine_cache_path"]
    assert first.startswith(str(tmp_path / "road.onnx.ort-trt" / f"road.{file_sha256(model)[:16]}.ort"))
    assert os.stat(first).st_mode & 0o777 == 0o700
    assert _tensorrt_ep_options(monkeypatch, model, None)["trt_engine_cache_path"] == first  # unchanged: reused
    model.write_bytes(b"weights two")  # same path, same tensor names, new weights
    second = _tensorrt_ep_options(monkeypatch, model, None)["trt_engine_cache_path"]
    assert second != first and os.path.dirname(second) == os.path.dirname(first)
    # engine_cache: under it; a folder or file that group or others can write (or another user's) is refused
    cache = tmp_path / "cache"
    options = _tensorrt_ep_options(monkeypatch, model, str(cache))
    assert options["trt_engine_cache_path"].startswith(str(cache / "road.")) and options["trt_timing_cache_path"]
    folder = options["trt_engine_cache_path"]
    (Path(folder) / "TensorrtExecutionProvider_cache.engine").write_bytes(b"engine")
    os.chmod(Path(folder) / "TensorrtExecutionProvider_cache.engine", 0o664)  # fine in a private folder
    _tensorrt_ep_options(monkeypatch, model, str(cache))
    os.chmod(folder, 0o755)
    with pytest.raises(CheckpointError, match="TensorrtExecutionProvider_cache.engine in the cache folder is "
                                              "writable by its group"):
        _tensorrt_ep_options(monkeypatch, model, str(cache))
    os.chmod(folder, 0o777)
    with pytest.raises(CheckpointError, match=r"refusing ONNX Runtime's TensorRT engine cache: the cache folder .* "
                                              r"is writable by its group and other users \(mode 0777\)"):
        _tensorrt_ep_options(monkeypatch, model, str(cache))
    # no engine_cache and a model in a folder others can write: this user's cache, as the native backend does
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    (shared / "road.onnx").write_bytes(b"weights one")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = _tensorrt_ep_options(monkeypatch, shared / "road.onnx", None)["trt_engine_cache_path"]
    assert path.startswith(str(tmp_path / "xdg" / "icnet_ros" / "tensorrt" / "ort-trt" / "road.")), path


def test_tensorrt_ep_cache_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    """engine_cache itself must be the user's own, not only the provider's 0700 subfolder made in it: another user
    who can write engine_cache could swap that subfolder for one holding their engine between the check and the
    load (the native TensorRT backend refused such an engine_cache already)."""
    import os
    import re

    model = tmp_path / "road.onnx"
    model.write_bytes(b"weights")
    cache = tmp_path / "shared_cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(CheckpointError, match=rf"the cache folder {re.escape(str(cache))} is writable by its group "
                                              r"and other users \(mode 0777\)"):
        _tensorrt_ep_options(monkeypatch, model, str(cache))
    assert list(cache.iterdir()) == []  # nothing made in it
    os.chmod(cache, 0o755)
    assert _tensorrt_ep_options(monkeypatch, model, str(cache))["trt_engine_cache_path"].startswith(str(cache))


def test_tensorrt_ep_cache_folder_names_the_runtime_versions(tmp_path):
    """ORT's TensorRT provider fails the session, without rebuilding, on a cached engine it cannot deserialize:
    the engines of another onnxruntime or TensorRT (a patch upgrade) are kept apart by the folder's name."""
    from icnet_ros.backends.onnxruntime import trt_cache_folder
    from icnet_ros.checkpoint import file_sha256

    model = tmp_path / "road.onnx"
    model.write_bytes(b"weights")
    try:
        import tensorrt

        trt = f".trt{tensorrt.__version__}"
    except (ImportError, OSError):
        trt = ""
    folder = trt_cache_folder(model, str(tmp_path / "cache"))
    assert folder == tmp_path / "cache" / f"road.{file_sha256(model)[:16]}.ort{ort.__version__}{trt}"


def test_remove_cached_engines_removes_only_the_engine_files(tmp_path):
    """What the backend removes before it makes the session once more after 'could not deserialize engine from
    cache': the provider's .engine and .profile files in its own folder, not the timing cache, other files or
    what a link points to."""
    from icnet_ros.backends.onnxruntime import remove_cached_engines

    folder = tmp_path / "road.0123456789abcdef.ort1"
    folder.mkdir()
    names = ("TRTKernel_graph_main_1_sm90.engine", "TRTKernel_graph_main_1_sm90.profile",
             "TensorrtExecutionProvider_cache_sm90.timing", "notes.txt")
    for name in names:
        (folder / name).write_bytes(b"x")
    outside = tmp_path / "elsewhere.engine"
    outside.write_bytes(b"keep")
    (folder / "link.engine").symlink_to(outside)
    assert remove_cached_engines(folder) == [folder / names[0], folder / names[1]]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names[2:], "link.engine"])
    assert outside.read_bytes() == b"keep"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the TensorRT execution provider")
def test_tensorrt_ep_rebuilds_a_cached_engine_it_cannot_deserialize(tmp_path, r18):
    """A torn engine in the cache failed the session ('TensorRT EP could not deserialize engine from cache'); the
    backend removes the engine files of its own folder and makes the session once more (the engine is rebuilt)."""
    _, path = r18
    options = BackendOptions(device=torch.device("cuda"), cache_dir=str(tmp_path / "cache"))
    backend = open_backend(path, options)
    assert backend.provider == "TensorrtExecutionProvider"
    x = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(0)).cuda()
    want = backend(x).clone()
    backend.close()
    engines = list((tmp_path / "cache").rglob("*.engine"))
    assert engines
    for f in engines:  # a torn write
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    backend = open_backend(path, options)
    assert backend.provider == "TensorrtExecutionProvider"
    assert compare_logits(want, backend(x)).ok(rtol=1e-3)
    assert all(f.stat().st_size > 0 for f in (tmp_path / "cache").rglob("*.engine"))
    backend.close()


def test_graph_output_classes_are_the_metadata_classes(tmp_path, tiny_ckpt):
    """A graph with 200 output classes under metadata listing 11 is refused at load naming both (it failed only on
    the first frame); also when the graph leaves the class axis symbolic (ORT infers it) or declares 11 but computes
    200."""
    cases = {"more": dict(classes=200), "symbolic": dict(classes=200, out_shape=["N", "C", "h", "w"]),
             "declared_11": dict(classes=200, out_shape=["N", 11, 8, 8])}
    for name, kwargs in cases.items():
        with pytest.raises(CheckpointError) as e:
            open_backend(_tiny_onnx(tmp_path / f"{name}.onnx", tiny_ckpt, **kwargs), BackendOptions(threads=1))
        msg = str(e.value)
        assert "\n" not in msg and "the graph's output class dimension is 200, the metadata needs 11" in msg, msg


def test_fixed_batch_is_bounded(tmp_path, tiny_ckpt):
    """A graph with a fixed batch pads every call to it: a fixed batch beyond 64 is refused at load."""
    backend = open_backend(_tiny_onnx(tmp_path / "b4.onnx", tiny_ckpt, in_shape=[4, 3, 64, 64]),
                           BackendOptions(threads=1))
    assert backend.max_batch == 4 and backend.exact_batch
    path = _tiny_onnx(tmp_path / "b100k.onnx", tiny_ckpt, in_shape=[100_000, 3, 64, 64])
    with pytest.raises(CheckpointError, match="the graph's fixed batch is 100000, not 1 to 64"):
        open_backend(path, BackendOptions(threads=1))
