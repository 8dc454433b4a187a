"""Native TensorRT backend: engine built from the ONNX export, cached under a name that changes with the ONNX file,
reused when unchanged; argmax agreement with the torch model in fp32 and fp16; dynamic batch within the profile.
Needs a CUDA GPU and the tensorrt package (skipped otherwise); the CPU-side refusals run everywhere."""
import pytest
import torch
from helpers import make_checkpoint

from icnet_ros.backends.base import BackendOptions, MissingRuntimeError
from icnet_ros.checkpoint import load_model
from icnet_ros.optimize import compare_logits

SIZE = (160, 224)


def _export(folder, seed=0, fp16=False, batch=3):
    from icnet_ros.export import export_onnx

    pytest.importorskip("onnxscript")
    ckpt = make_checkpoint(folder / f"r18_{seed}.safetensors", seed=seed)
    return ckpt, export_onnx(ckpt, folder / f"r18_{seed}{'_fp16' if fp16 else ''}.onnx", size=SIZE, batch=batch,
                             fp16=fp16)


def test_refused_without_gpu_or_runtime(tmp_path):
    """Without tensorrt: the one-line missing-runtime error; with it but on the CPU: a one-line ValueError."""
    from icnet_ros.backends.tensorrt import open_backend

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingRuntimeError, match=r"icnet_ros\[tensorrt\]"):
            open_backend(tmp_path / "m.onnx", BackendOptions())
        return
    _, path = _export(tmp_path)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        open_backend(path, BackendOptions(device=torch.device("cpu")))



def test_engine_metadata_side_file(tmp_path):
    """Engine files carry their metadata in ENGINE.json (no tensorrt needed to read it)."""
    import json

    from icnet_ros.backends.tensorrt import metadata_path, read_engine_metadata
    from icnet_ros.checkpoint import CheckpointError

    from icnet_ros.checkpoint import read_metadata

    engine = tmp_path / "road.engine"
    engine.write_bytes(b"serialized engine")
    with pytest.raises(CheckpointError, match="without its metadata file road.engine.json"):
        read_engine_metadata(engine)
    side = metadata_path(engine)
    assert side.name == "road.engine.json"
    side.write_text("{not json")
    with pytest.raises(CheckpointError, match="road.engine.json: icnet_ros metadata is not valid JSON"):
        read_engine_metadata(engine)
    meta = read_metadata(make_checkpoint(tmp_path / "r18.safetensors"))
    meta["network_size"] = list(SIZE)
    meta["provenance"]["exported"] = {"format": "tensorrt", "precision": "fp16"}
    side.write_text(json.dumps(meta))
    assert read_engine_metadata(engine) == meta
    del meta["network_size"]
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="network_size"):
        read_engine_metadata(engine)


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_parity_batch_and_cache(tmp_path, trt):
    from icnet_ros.backends.tensorrt import open_backend

    ckpt, path = _export(tmp_path)
    cache = tmp_path / "cache"
    backend = open_backend(path, BackendOptions(device=torch.device("cuda"), cache_dir=str(cache)))
    assert backend.name == "tensorrt" and backend.fixed_size == SIZE and backend.max_batch == 3
    assert backend.input_dtype == torch.float32 and "\n" not in backend.describe()
    engine = backend.engine_file
    assert engine.parent == cache and trt.__version__ in engine.name and engine.is_file()
    model = load_model(ckpt).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 3):
        x = torch.randn(n, 3, *SIZE, device="cuda", generator=g)
        with torch.no_grad():
            ref = model(x)
        got = backend(x)
        torch.cuda.synchronize()
        agreement = compare_logits(ref, got)  # TensorRT may use TF32 in fp32 engines
        assert agreement.argmax_agreement >= 0.99 and agreement.relative_diff <= 1e-2, str(agreement)
    with pytest.raises(ValueError, match="maximum batch 3"):
        backend(torch.zeros(4, 3, *SIZE, device="cuda"))
    backend.close()
    # unchanged ONNX: the cached engine is loaded, not rebuilt
    mtime = engine.stat().st_mtime_ns
    again = open_backend(path, BackendOptions(device=torch.device("cuda"), cache_dir=str(cache)))
    assert again.engine_file == engine and engine.stat().st_mtime_ns == mtime
    # a changed ONNX file (other weights, same name) gets a new engine
    _, path2 = _export(tmp_path, seed=1)
    path.write_bytes(path2.read_bytes())
    rebuilt = open_backend(path, BackendOptions(device=torch.device("cuda"), cache_dir=str(cache)))
    assert rebuilt.engine_file != engine and rebuilt.engine_file.is_file()
    # a corrupt cached engine is rebuilt
    rebuilt.engine_file.write_bytes(b"garbage")
    fixed = open_backend(path, BackendOptions(device=torch.device("cuda"), cache_dir=str(cache)))
    assert fixed.engine_file.stat().st_size > 1000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_engine_file_runs_directly(tmp_path, trt):
    from icnet_ros.backends.tensorrt import metadata_path, open_backend
    from icnet_ros.tools.export import main as export_main

    ckpt = make_checkpoint(tmp_path / "r18.safetensors")
    engine = tmp_path / "road.engine"
    assert export_main([str(ckpt), "--format", "tensorrt", "--size", "160x224", "--batch", "2", "--output",
                        str(engine)]) == 0
    assert engine.is_file() and (tmp_path / "road.onnx").is_file() and metadata_path(engine).is_file()
    backend = open_backend(engine, BackendOptions(device=torch.device("cuda")))
    assert backend.engine_file == engine and backend.max_batch == 2
    assert backend.meta["provenance"]["exported"]["format"] == "tensorrt"
    x = torch.randn(2, 3, *SIZE, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    with torch.no_grad():
        ref = load_model(ckpt).cuda()(x)
    got = backend(x)
    torch.cuda.synchronize()
    assert compare_logits(ref, got).argmax_agreement >= 0.99


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_engine(tmp_path, trt):
    from icnet_ros.backends.tensorrt import open_backend

    ckpt, path = _export(tmp_path, fp16=True, batch=2)
    backend = open_backend(path, BackendOptions(device=torch.device("cuda"), precision="fp16"))
    assert backend.precision == "fp16" and backend.engine_file.parent == path.parent  # cached beside the ONNX
    x = torch.randn(2, 3, *SIZE, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        ref = load_model(ckpt).cuda()(x)
    got = backend(x)
    torch.cuda.synchronize()
    assert compare_logits(ref, got).argmax_agreement >= 0.98
