"""Native TensorRT backend: engine built from the ONNX export, cached under a name that changes with the ONNX file,
reused when unchanged; argmax agreement with the torch model in fp32 and fp16; dynamic batch within the profile.
Needs a CUDA GPU and the tensorrt package (skipped otherwise); the CPU-side refusals run everywhere."""
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------ without a GPU
# A stand-in for the tensorrt module and CUDA, so that the backend's load and call paths (the trust check, the
# shape checks) run on the CPU: engines are "deserialized" into FakeEngine objects with the shapes a test gives.

class FakeContext:
    def __init__(self, engine):
        self.engine, self.input_shape, self.addresses, self.executed, self.streams = engine, None, {}, 0, []

    def set_input_shape(self, name, shape):
        n, c, h, w = shape
        ok = tuple(self.engine.shapes["input"][1:]) == (c, h, w)
        if ok:
            self.input_shape = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        if name == "input":
            return self.input_shape
        return self.engine.resolved_output(self.input_shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        self.executed += 1
        self.streams.append(stream)
        return True


class FakeEngine:
    def __init__(self, trt, shapes, max_batch=3, resolved_output=None):
        self.trt, self.shapes, self.max_batch = trt, shapes, max_batch
        self.num_io_tensors = 2
        self._resolved = resolved_output

    def get_tensor_name(self, i):
        return ["input", "logits"][i]

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_profile_shape(self, name, profile):
        _, c, h, w = self.shapes[name]
        return (1, c, h, w), (self.max_batch, c, h, w), (self.max_batch, c, h, w)

    def resolved_output(self, input_shape):
        if self._resolved is not None:
            return self._resolved(input_shape)
        n, _, h, w = input_shape
        return (n, self.shapes["logits"][1], -(-h // 8), -(-w // 8))

    def create_execution_context(self):
        return FakeContext(self)


def fake_trt(monkeypatch, **engine_kwargs):
    """Patch the tensorrt backend onto a fake tensorrt module and a fake CUDA; returns the fake module, whose
    ``deserialized`` lists the bytes each deserialize_cuda_engine call got and ``runtimes`` the runtimes made."""
    import contextlib
    import types

    from icnet_ros.backends import tensorrt as backend_module

    trt = types.SimpleNamespace(__version__="10.99-fake", deserialized=[], runtimes=[],
                                DataType=types.SimpleNamespace(FLOAT="float", HALF="half"))
    engine_kwargs.setdefault("shapes", {"input": (-1, 3, *SIZE), "logits": (-1, 11, SIZE[0] // 8, SIZE[1] // 8)})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = True
            trt.runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            trt.deserialized.append(bytes(data))
            return FakeEngine(trt, **engine_kwargs)

    trt.Logger, trt.Runtime = Logger, Runtime
    monkeypatch.setattr(backend_module, "_trt", lambda: trt)
    monkeypatch.setattr(backend_module, "_LOGGER", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    streams = trt.streams = []  # (what, stream): TensorRT's stream waits for the caller's, the caller for it

    class FakeStream:
        def __init__(self, device=None, handle=0):
            self.cuda_stream = handle

        def wait_stream(self, other):
            streams.append((self.cuda_stream, other.cuda_stream))

    caller = FakeStream(handle=1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(handle=2))
    return trt


def _engine_file(folder, tmp_path, classes=None):
    """road.engine (placeholder bytes) and its metadata side file in ``folder``."""
    import json

    from icnet_ros.backends.tensorrt import metadata_path
    from icnet_ros.checkpoint import read_metadata

    folder.mkdir(exist_ok=True)
    engine = folder / "road.engine"
    engine.write_bytes(b"serialized engine")
    meta = read_metadata(make_checkpoint(tmp_path / "r18.safetensors"))
    meta["network_size"] = list(SIZE)
    meta["provenance"]["exported"] = {"format": "tensorrt", "precision": "fp32"}
    metadata_path(engine).write_text(json.dumps(meta))
    return engine


def test_engine_trust_rule(tmp_path):
    """Engines are native code: a file and folder of the user (or root), writable by neither group nor others, as
    ssh requires of keys; anything else is refused with the reason and the fix, before reading a byte."""
    import os

    from icnet_ros.backends.tensorrt import engine_trust_problem, read_trusted_engine
    from icnet_ros.checkpoint import CheckpointError

    folder = tmp_path / "engines"
    folder.mkdir()
    os.chmod(folder, 0o755)
    engine = folder / "road.engine"
    engine.write_bytes(b"engine bytes")
    os.chmod(engine, 0o644)
    assert engine_trust_problem(engine) is None and read_trusted_engine(engine) == b"engine bytes"
    os.chmod(engine, 0o666)
    assert "writable by its group and other users (mode 0666)" in engine_trust_problem(engine)
    with pytest.raises(CheckpointError) as e:
        read_trusted_engine(engine)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(engine)) and "native code" in msg and "chmod go-w" in msg
    os.chmod(engine, 0o644)
    for mode in (0o777, 0o775, 0o757):
        os.chmod(folder, mode)
        assert f"its folder {folder} is writable" in engine_trust_problem(engine)
        with pytest.raises(CheckpointError, match="refusing to load this TensorRT engine"):
            read_trusted_engine(engine)
    os.chmod(folder, 0o700)
    assert engine_trust_problem(engine) is None
    # another user's file (as its stat says), even read-only
    st = os.stat(engine)
    other = os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, os.getuid() + 4242, st.st_gid,
                            st.st_size, 0, 0, 0))
    assert f"owned by uid {os.getuid() + 4242}" in engine_trust_problem(engine, other)
    # a link from a private folder to an engine in a world-writable one: the target's folder counts too
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "x.engine").write_bytes(b"planted")
    os.chmod(shared / "x.engine", 0o644)
    (folder / "link.engine").symlink_to(shared / "x.engine")
    assert f"its folder {shared} is writable" in engine_trust_problem(folder / "link.engine")
    # not a regular file (a FIFO would block a plain read): refused, without blocking
    os.mkfifo(folder / "fifo.engine")
    assert engine_trust_problem(folder / "fifo.engine") == "it is not a regular file"
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_trusted_engine(folder / "fifo.engine")


def test_untrusted_engine_is_never_deserialized(tmp_path, monkeypatch):
    """The backend checks the engine file before TensorRT sees a byte of it (a fake TensorRT records what it is
    given), and its runtime refuses engines with embedded host code."""
    import os

    from icnet_ros.backends.tensorrt import open_backend
    from icnet_ros.checkpoint import CheckpointError

    trt = fake_trt(monkeypatch)
    engine = _engine_file(tmp_path / "engines", tmp_path)
    cuda = BackendOptions(device=torch.device("cuda"))
    os.chmod(engine.parent, 0o777)
    with pytest.raises(CheckpointError, match="refusing to load this TensorRT engine: its folder"):
        open_backend(engine, cuda)
    os.chmod(engine.parent, 0o755)
    os.chmod(engine, 0o664)
    with pytest.raises(CheckpointError, match="refusing to load this TensorRT engine: the file is writable"):
        open_backend(engine, cuda)
    assert trt.deserialized == []
    os.chmod(engine, 0o644)
    backend = open_backend(engine, cuda)
    assert trt.deserialized == [b"serialized engine"] and backend.engine_file == engine
    assert trt.runtimes[-1].engine_host_code_allowed is False


def test_engine_cache_folder_is_private(tmp_path, monkeypatch):
    """Cached engines: written 0644 in a cache folder created 0700 (whatever the umask); an untrusted cache folder is
    refused before a build."""
    import os

    from icnet_ros.backends import tensorrt as backend_module
    from icnet_ros.checkpoint import CheckpointError

    old = os.umask(0o002)  # a user-private-group umask: files would be group-writable
    try:
        target = tmp_path / "cache" / "sub" / "m.engine"
        backend_module._write_atomic(target, b"engine")
    finally:
        os.umask(old)
    assert os.stat(target).st_mode & 0o777 == 0o644 and os.stat(target.parent).st_mode & 0o777 == 0o700
    assert backend_module.engine_trust_problem(target) is None

    trt = fake_trt(monkeypatch)
    runtime = trt.Runtime(None)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    backend = backend_module.TensorRTBackend.__new__(backend_module.TensorRTBackend)
    backend.path, backend.device, backend.meta = onnx_file, torch.device("cuda", 0), {"provenance": {}}
    monkeypatch.setattr(backend_module, "engine_path", lambda path, meta, device, tag, cache_dir: Path(cache_dir)
                        / "m.engine")
    built = []
    monkeypatch.setattr(backend_module, "build_engine", lambda *a, **k: built.append(a))
    shared = tmp_path / "shared_cache"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CheckpointError, match="the cache folder .* is writable.*set engine_cache"):
        backend._cached_engine(trt, runtime, BackendOptions(device=torch.device("cuda"), cache_dir=str(shared)))
    assert built == []
    fresh = tmp_path / "new_cache" / "engines"
    with pytest.raises(CheckpointError):  # the fake build writes nothing: reading it back fails, after the build
        backend._cached_engine(trt, runtime, BackendOptions(device=torch.device("cuda"), cache_dir=str(fresh)))
    assert len(built) == 1 and os.stat(fresh).st_mode & 0o777 == 0o700


def test_engines_of_an_onnx_file_in_a_shared_folder_go_to_the_users_cache(tmp_path, monkeypatch):
    """Without engine_cache, the engine is cached beside the .onnx file when that folder may hold engines, else (a
    group-writable folder: umask 002, a shared data folder) in this user's cache, where reading it back is allowed;
    beside it, the first run would build for minutes and then refuse its own engine."""
    import os

    from icnet_ros.backends import tensorrt as backend_module

    fake_trt(monkeypatch)
    monkeypatch.setattr(backend_module, "_gpu_tag", lambda device: "GPU-sm90")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    meta = {"provenance": {}}
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    os.chmod(own, 0o755)
    (own / "m.onnx").write_bytes(b"onnx")
    assert backend_module.engine_path(own / "m.onnx", meta, torch.device("cuda"), "fp32").parent == own
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    (shared / "m.onnx").write_bytes(b"onnx")
    cached = backend_module.engine_path(shared / "m.onnx", meta, torch.device("cuda"), "fp32")
    assert cached.parent == tmp_path / "xdg" / "icnet_ros" / "tensorrt"
    assert backend_module.engine_path(shared / "m.onnx", meta, torch.device("cuda"), "fp32",
                                      cache_dir=str(shared)).parent == shared  # a given engine_cache is used as is
    # a read-only folder (an install share, a read-only mount): the engine could not be written after minutes of
    # building. These tests run as root, whom permissions do not stop, so the folder's writability is what is faked.
    real_access = os.access
    monkeypatch.setattr(backend_module.os, "access", lambda p, mode: False if Path(p) == own else real_access(p, mode))
    assert backend_module.engine_path(own / "m.onnx", meta, torch.device("cuda"), "fp32").parent == cached.parent


def test_logits_shape_rule():
    """The output TensorRT would write against the logits the metadata sizes (-1: resolved when running)."""
    from icnet_ros.backends.tensorrt import logits_shape_problem

    assert logits_shape_problem((-1, 11, 20, 28), (None, 11, 20, 28)) is None
    assert logits_shape_problem((2, -1, 20, 28), (2, 11, 20, 28)) is None
    assert logits_shape_problem((-1, 200, 20, 28), (None, 11, 20, 28)) == "class dimension is 200, expected 11"
    assert logits_shape_problem((-1, 11, 40, 28), (None, 11, 20, 28)) == "height dimension is 40, expected 20"
    assert logits_shape_problem((4, 11, 20, 28), (2, 11, 20, 28)) == "batch dimension is 4, expected 2"
    assert "3 dimensions" in logits_shape_problem((11, 20, 28), (None, 11, 20, 28))


def test_engine_output_shape_checked_at_load_and_per_call(tmp_path, monkeypatch):
    """An engine whose output disagrees with the metadata (200 classes for 11, another map size, another input) is
    refused at load; one whose output only resolves when running is checked against the buffer before each run."""
    from icnet_ros.backends.tensorrt import open_backend
    from icnet_ros.checkpoint import CheckpointError

    engine = _engine_file(tmp_path / "engines", tmp_path)
    cuda = BackendOptions(device=torch.device("cuda"))
    h8, w8 = SIZE[0] // 8, SIZE[1] // 8
    for shapes, match in (({"input": (-1, 3, *SIZE), "logits": (-1, 200, h8, w8)}, "class dimension is 200, "
                                                                                      "expected 11"),
                          ({"input": (-1, 3, *SIZE), "logits": (-1, 11, 2 * h8, w8)}, "height dimension"),
                          ({"input": (-1, 3, *SIZE), "logits": (-1, 11, h8)}, "3 dimensions"),
                          ({"input": (-1, 3, 2 * SIZE[0], SIZE[1]), "logits": (-1, 11, h8, w8)}, "engine's input"),
                          ({"input": (-1, 5, *SIZE), "logits": (-1, 11, h8, w8)}, "engine's input")):
        fake_trt(monkeypatch, shapes=shapes)
        with pytest.raises(CheckpointError, match=match) as e:
            open_backend(engine, cuda)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(engine))
    # dynamic classes: resolved to 200 when running -> refused before TensorRT writes a byte
    fake_trt(monkeypatch, shapes={"input": (-1, 3, *SIZE), "logits": (-1, -1, h8, w8)},
             resolved_output=lambda s: (s[0], 200, h8, w8))
    backend = open_backend(engine, cuda)
    backend.device = torch.device("cpu")  # the fake runs on host memory
    with pytest.raises(RuntimeError, match=r"would write logits of shape \[2, 200, .*into a buffer of \[2, 11,"):
        backend(torch.zeros(2, 3, *SIZE))
    assert backend.context.executed == 0
    # the real model's shapes run
    trt = fake_trt(monkeypatch)
    backend = open_backend(engine, cuda)
    backend.device = torch.device("cpu")
    assert backend.fixed_size == SIZE and backend.max_batch == 3 and not backend.exact_batch
    assert backend(torch.zeros(2, 3, *SIZE)).shape == (2, 11, h8, w8) and backend.context.executed == 1
    # on a stream of its own (not the legacy default stream), ordered after and before the caller's stream
    assert backend.context.streams == [2] and trt.streams == [(2, 1), (1, 2)]


def test_engine_fixed_batch_is_bounded(tmp_path, monkeypatch):
    from icnet_ros.backends.tensorrt import open_backend
    from icnet_ros.checkpoint import CheckpointError

    engine = _engine_file(tmp_path / "engines", tmp_path)
    h8, w8 = SIZE[0] // 8, SIZE[1] // 8
    fake_trt(monkeypatch, shapes={"input": (1000, 3, *SIZE), "logits": (1000, 11, h8, w8)})
    with pytest.raises(CheckpointError, match="the engine's fixed batch is 1000, not 1 to 64"):
        open_backend(engine, BackendOptions(device=torch.device("cuda")))
    fake_trt(monkeypatch, shapes={"input": (4, 3, *SIZE), "logits": (4, 11, h8, w8)})
    backend = open_backend(engine, BackendOptions(device=torch.device("cuda")))
    assert backend.max_batch == 4 and backend.exact_batch
