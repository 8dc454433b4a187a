"""Native TensorRT backend: an engine built from an ``icnet-export`` ONNX file, cached, run on torch CUDA tensors.

``open_backend(path, options)`` takes the ``.onnx`` file (the model: its metadata is the icnet_ros metadata, see
:mod:`icnet_ros.export`). The engine is built on first use (minutes for a large model) and cached in
``options.cache_dir`` or beside the ONNX file (in :func:`user_cache_dir` when that folder cannot hold engines:
writable by others or another user's, where engines may not be read from, or read-only), under a name made of the
ONNX file's SHA-256, the TensorRT version, the GPU's name and compute capability and the precision: a changed ONNX
file, another TensorRT or another GPU builds a new engine (a file that TensorRT cannot deserialize is rebuilt as
well). Writes are atomic.

An engine file (``.engine``/``.plan``, e.g. from ``icnet-export --format tensorrt --output road.engine``) runs
directly; its metadata is the side file ``road.engine.json`` written with it (the ONNX metadata plus a
``tensorrt`` export record: TensorRT version, GPU, precision, the ONNX file's SHA-256). An engine that this
TensorRT or GPU cannot load is a one-line error asking to rebuild it from the ONNX file.

Trust: a serialized engine is native code (NVIDIA: deserializing an untrusted engine is like running untrusted
code), so an engine file, prebuilt or cached, is deserialized only when it is a regular file owned by the current
user (or root), not writable by group or others, in a folder that is likewise owned and not group- or
world-writable (the rule ssh applies to keys; :func:`engine_trust_problem`); otherwise a one-line
:class:`~icnet_ros.checkpoint.CheckpointError` says why and how to fix it. Cache folders are created with mode
0700, engine files with 0644. The runtime also refuses engines that embed host code (plugin libraries).

Precision: the engine runs in the ONNX file's precision. An fp16 export (``icnet-export --fp16``: fp16 weights
and activations, fp32 input and output) builds a strongly typed fp16 engine; this is the only fp16 route in
TensorRT 11, which removed the builder's FP16 flag. ``options.precision == "fp16"`` with an fp32 file sets that
flag on TensorRT 10 (TensorRT then picks fp16 kernels per layer) and is a one-line error on TensorRT 11.

Batch: a dynamic batch axis gets one optimisation profile for batches 1..the export's ``batch``
(:func:`icnet_ros.export.profile_batch`), optimised for that batch; ``max_batch`` says so to the Segmenter.

Execution follows TensorRT's own samples (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) on
torch's current CUDA stream with the torch tensors' memory: no copies, no host synchronisation.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, file_sha256
from ..export import (INPUT_NAME, MAX_EXPORT_BATCH, MAX_METADATA_BYTES, OUTPUT_NAME, export_record,
                      parse_export_meta, profile_batch, read_onnx_metadata)
from ..models.icnet import ICNetConfig
from .base import BackendOptions, checked_input, logits_buffer, require

log = logging.getLogger(__name__)
#: builder workspace limit (TensorRT uses less when it can)
WORKSPACE_BYTES = 2 << 30
_LOGGER: Any = None


def _trt() -> Any:
    return require("tensorrt", "tensorrt", "tensorrt")


def _logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:  # one logger per process, as TensorRT recommends
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def engine_path(onnx_path: Path, meta: dict[str, Any], device: torch.device, precision: str,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the engine for ``onnx_path`` on ``device`` in ``precision`` is cached (see the module docstring)."""
    trt = _trt()
    digest = file_sha256(onnx_path)[:16]
    batch = profile_batch(meta)
    name = (f"{onnx_path.stem}.{digest}.trt{trt.__version__}.{_gpu_tag(device)}.{precision}"
            f"{f'.b{batch}' if batch else ''}.engine")
    if cache_dir:
        folder = Path(cache_dir).expanduser()
    else:
        folder = onnx_path.parent if can_hold_engines(onnx_path.parent) else user_cache_dir()
    return folder / name


def can_hold_engines(folder: Path) -> bool:
    """Whether engines may be cached in ``folder``: not writable by others nor another user's (an engine there would
    be refused when read back: :func:`engine_trust_problem`) and writable by this process (an install share or a
    read-only mount could not take it after minutes of building)."""
    return folder.is_dir() and folder_problem(folder) is None and os.access(folder, os.W_OK | os.X_OK)


def user_cache_dir() -> Path:
    """This user's engine cache when the ONNX file's folder cannot hold engines (others may write it, another user
    owns it, or it is read-only) and no ``engine_cache`` is given: ``$XDG_CACHE_HOME/icnet_ros/tensorrt`` (default
    ``~/.cache/icnet_ros/tensorrt``), made 0700."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "icnet_ros" / "tensorrt"


def folder_problem(folder: Path, what: str = "the folder") -> str | None:
    """Why ``folder`` must not hold engines (:func:`_stat_problem`), or None."""
    try:
        return _stat_problem(os.stat(folder), f"{what} {folder}", _current_uid())
    except OSError as e:
        return f"cannot stat {what} {folder}: {e.strerror or e}"


def _gpu_tag(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', props.name).strip('-')}-sm{props.major}{props.minor}"


def metadata_path(engine: str | os.PathLike) -> Path:
    """The side file with an engine's icnet_ros metadata: ``<engine>.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_engine_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The icnet_ros metadata of a model the tensorrt backend runs: an exported ``.onnx`` file, or an engine file
    with its ``.json`` side file. CheckpointError (one line) when missing or invalid."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".onnx":
        return read_onnx_metadata(path)
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    side = metadata_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: TensorRT engine without its metadata file {side.name} (build engines with "
                              "icnet-export --format tensorrt, or run the exported .onnx file)")
    try:
        if side.stat().st_size > MAX_METADATA_BYTES:
            raise CheckpointError(f"{side}: larger than {MAX_METADATA_BYTES} bytes; not an icnet_ros metadata file")
        text = side.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{side}: cannot read: {e}") from None
    return parse_export_meta(text, side)


def _engine_record(meta: dict[str, Any]) -> dict[str, Any]:
    record = export_record(meta)
    return record if record.get("format") == "tensorrt" else {}


def _write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically, as a 0644 file (never group- or world-writable, whatever the umask;
    see :func:`engine_trust_problem`); a missing folder is created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed run; O_EXCL below never follows a planted link
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _current_uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _stat_problem(st: os.stat_result, what: str, uid: int | None, check_mode: bool = True) -> str | None:
    """Why a file or folder with stat ``st`` is not trusted to hold an engine (owner, write bits), or None."""
    if uid is not None and st.st_uid not in (uid, 0):
        return f"{what} is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
    if check_mode and st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("other users", 0o002)) if st.st_mode & bit)
        return f"{what} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def engine_trust_problem(path: str | os.PathLike, file_stat: os.stat_result | None = None) -> str | None:
    """Why the TensorRT engine file ``path`` must not be deserialized, or None when it may be: the file must be a
    regular file and it and its folder (that of the path as given and, through a symbolic link, the target's)
    owned by the current user or root and writable by neither group nor others, as ssh requires of keys.
    ``file_stat``: the file's ``os.fstat`` when the caller holds it open (then that file is judged)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    uid = _current_uid()
    try:
        st = file_stat if file_stat is not None else os.stat(path)
    except OSError as e:
        return f"cannot stat it: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    problem = _stat_problem(st, "the file", uid)
    if problem:
        return problem
    folders = [path.parent]
    real = Path(os.path.realpath(path)).parent
    if real != path.parent:
        folders.append(real)
    for folder in folders:
        try:
            problem = _stat_problem(os.stat(folder), f"its folder {folder}", uid)
        except OSError as e:
            return f"cannot stat its folder {folder}: {e.strerror or e}"
        if problem:
            return problem
    return None


def cache_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why engines must not be loaded from the cache folder ``folder``, or None (ONNX Runtime's TensorRT execution
    provider loads the engines of its cache folder itself): the folder as :func:`engine_trust_problem` requires of an
    engine's folder, each file in it a regular file of the user or root, and not writable by group or others unless
    the folder is private (mode 0700: nobody else reaches its files, whatever umask the runtime wrote them with)."""
    folder = Path(folder)
    uid = _current_uid()
    try:
        st = os.stat(folder)
        problem = _stat_problem(st, f"the cache folder {folder}", uid)
        if problem:
            return problem
        private = not st.st_mode & 0o077
        for f in sorted(folder.iterdir()):
            fst = os.stat(f)
            if not stat.S_ISREG(fst.st_mode):
                return f"{f.name} in the cache folder is not a regular file"
            problem = _stat_problem(fst, f"{f.name} in the cache folder", uid, check_mode=not private)
            if problem:
                return problem
    except OSError as e:
        return f"cannot read the cache folder {folder}: {e.strerror or e}"
    return None


def _untrusted(path: Path, problem: str,
               remedy: str = "or rebuild the engine from the ONNX export in a folder of your own") -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load this TensorRT engine: {problem}; an engine is native code that runs when loaded, "
        f"so it is loaded only from a file and folder owned by you (or root) that no group or other user can write: "
        f"fix with chmod go-w on the file and its folder (and chown them to you), {remedy}")


def read_trusted_engine(path: str | os.PathLike) -> bytes:
    """The bytes of a serialized engine, read only if :func:`engine_trust_problem` finds nothing wrong with the
    file as opened (no swap between the check and the read); CheckpointError (one line) otherwise."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        problem = engine_trust_problem(path, os.fstat(fd))
        if problem:
            raise _untrusted(path, problem)
        return f.read()


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT build progress monitor showing each build phase as a tqdm bar (TensorRT's progress-monitor
    sample, with tqdm)."""
    from tqdm import tqdm

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", unit="step",
                                          leave=parent_phase is None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # True: continue building

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return BuildProgress()


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike, fp16_flag: bool = False,
                 max_batch: int | None = None, progress: bool = True) -> Path:
    """Build a serialized TensorRT engine from an exported ONNX file on the current CUDA device and write it
    atomically to ``output``, with its metadata side file (:func:`metadata_path`).

    ``fp16_flag``: TensorRT 10's weak-typing FP16 flag (an fp32 file); an fp16 file builds strongly typed.
    ``max_batch``: for a dynamic batch axis, the profile covers batches 1..max_batch (default: the export's).
    ``progress``: tqdm bars for the build phases (TensorRT >= 10)."""
    trt = _trt()
    onnx_path, output = Path(onnx_path).expanduser(), Path(output).expanduser()
    meta = read_onnx_metadata(onnx_path)
    fp16_file = export_record(meta).get("fp16") is True
    if max_batch is not None and not 1 <= int(max_batch) <= MAX_EXPORT_BATCH:
        raise ValueError(f"max_batch must be 1 to {MAX_EXPORT_BATCH}, got {max_batch}")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if fp16_file and strongly_typed is not None:  # the file's own types decide (TensorRT 11: always)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16_flag and not fp16_file:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ValueError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only): export "
                             "an fp16 ONNX file (icnet-export --fp16) for an fp16 engine")
        config.set_flag(trt.BuilderFlag.FP16)
    inp = network.get_input(0)
    n, c, h, w = inp.shape
    if n == -1:  # dynamic batch
        n = max_batch or profile_batch(meta) or 1
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, c, h, w), (n, c, h, w), (n, c, h, w))
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # kept alive by `monitor` until the build returns
    log.info("building a TensorRT %s engine for %s (first use; this takes a while)", trt.__version__, onnx_path.name)
    serialized = builder.build_serialized_network(network, config)
    del config, parser, network, builder  # before the progress monitor, which must outlive what uses it
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see TensorRT's log above)")
    device = torch.device("cuda", torch.cuda.current_device())
    record = {"format": "tensorrt", "from": onnx_path.name, "sha256": file_sha256(onnx_path),
              "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device), "gpu_tag": _gpu_tag(device),
              "precision": "fp16" if fp16_file else ("fp16-flag" if fp16_flag else "fp32"), "max_batch": int(n),
              "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
    provenance = meta.get("provenance")
    if not isinstance(provenance, dict):  # a wrong type is treated as absent
        provenance = meta["provenance"] = {}
    if "exported" in provenance:
        record["previous"] = provenance["exported"]
    provenance["exported"] = record
    _write_atomic(metadata_path(output), json.dumps(meta).encode())
    _write_atomic(output, serialized)
    return output


class TensorRTBackend:
    """A :class:`~icnet_ros.backends.base.Backend` running a TensorRT engine on torch CUDA tensors."""

    name = "tensorrt"
    memory_format = torch.contiguous_format

    def __init__(self, path: str | os.PathLike, options: BackendOptions = BackendOptions()) -> None:
        trt = _trt()
        self.path = Path(path).expanduser()
        self.meta = read_engine_metadata(self.path)
        device = torch.device(options.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"backend 'tensorrt' needs a CUDA device, got {options.device} "
                             f"(CUDA available: {torch.cuda.is_available()})")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        if options.precision not in ("fp32", "fp16"):
            raise ValueError(f"backend 'tensorrt' runs fp32 or fp16 engines, not precision {options.precision!r}")
        with torch.cuda.device(self.device):
            runtime = self._runtime = trt.Runtime(_logger(trt))  # kept: it must outlive its engine
            if hasattr(runtime, "engine_host_code_allowed"):  # loading a model never runs code: no embedded
                runtime.engine_host_code_allowed = False      # plugin libraries (TensorRT's default, made explicit)
            if self.path.suffix.lower() == ".onnx":
                engine = self._cached_engine(trt, runtime, options)
            else:  # a prebuilt engine: runs as built
                record = _engine_record(self.meta)
                self.engine_file = self.path
                self.precision = "fp16" if str(record.get("precision", "")).startswith("fp16") else "fp32"
                engine = runtime.deserialize_cuda_engine(read_trusted_engine(self.path))
                if engine is None:
                    raise CheckpointError(
                        f"{self.path}: TensorRT {trt.__version__} cannot load this engine on "
                        f"{torch.cuda.get_device_name(self.device)} (built by TensorRT {record.get('tensorrt')} for "
                        f"{record.get('gpu')}); rebuild it from {record.get('from', 'the ONNX export')}")
            self.engine = engine
            self.context = engine.create_execution_context()
            # TensorRT runs on a stream of its own, ordered with the caller's: on the legacy default stream
            # enqueueV3 adds synchronisations of its own ("may lead to performance issues", TensorRT's warning)
            self._stream = torch.cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise CheckpointError(f"{self.path}: expected tensors {INPUT_NAME!r} and {OUTPUT_NAME!r}, got {names}")
        self.input_dtype = _torch_dtype(trt, engine.get_tensor_dtype(INPUT_NAME))
        self.output_dtype = _torch_dtype(trt, engine.get_tensor_dtype(OUTPUT_NAME))
        self.num_classes = int(self.meta["arch"]["num_classes"])
        self.logits_size = ICNetConfig.from_dict(self.meta["arch"]).logits_size  # validated with the metadata
        in_shape = tuple(int(d) for d in engine.get_tensor_shape(INPUT_NAME))
        network = tuple(self.meta["network_size"])
        if (len(in_shape) != 4 or in_shape[1] != 3 or in_shape[2:] != network
                or not (in_shape[0] == -1 or in_shape[0] >= 1)):
            raise CheckpointError(f"{self.path}: the engine's input is {list(in_shape)}, the metadata's network is "
                                  f"N x 3 x {network[0]} x {network[1]}; rebuild the engine from its ONNX export")
        n, _, h, w = in_shape
        # TensorRT writes the output at the engine's shape into the buffer the metadata sizes: they must agree
        lh, lw = self.logits_size(h, w)
        problem = logits_shape_problem(engine.get_tensor_shape(OUTPUT_NAME),
                                       (None if n == -1 else n, self.num_classes, lh, lw))
        if problem:
            raise CheckpointError(f"{self.path}: the engine's output {problem} (the metadata lists "
                                  f"{self.num_classes} classes at {h}x{w}: logits N x {self.num_classes} x "
                                  f"{lh} x {lw}); not the engine of this model")
        self.fixed_size: tuple[int, int] | None = (h, w)
        if n == -1:
            self.max_batch: int | None = int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        elif n > MAX_EXPORT_BATCH:  # every call is padded to a fixed batch
            raise CheckpointError(f"{self.path}: the engine's fixed batch is {n}, not 1 to {MAX_EXPORT_BATCH}")
        else:
            self.max_batch = int(n)
        self.exact_batch = n != -1
        self.provider = f"{self.device} ({torch.cuda.get_device_name(self.device)}, TensorRT {trt.__version__})"
        self._version = trt.__version__

    def _cached_engine(self, trt: Any, runtime: Any, options: BackendOptions) -> Any:
        """The engine for the ONNX file: from the cache, or built (and cached) now."""
        fp16_file = export_record(self.meta).get("fp16") is True
        fp16_flag = options.precision == "fp16" and not fp16_file
        self.precision = "fp16" if fp16_file or fp16_flag else "fp32"
        tag = "fp16" if fp16_file else ("fp16-flag" if fp16_flag else "fp32")
        self.engine_file = engine_path(self.path, self.meta, self.device, tag, options.cache_dir)
        folder = self.engine_file.parent
        if not folder.exists():  # engine_cache, or this user's cache (engine_path); two nodes may start at once
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.is_dir():  # an untrusted cache folder is refused before minutes of building
            problem = folder_problem(folder, "the cache folder")
            if problem:
                raise _untrusted(self.engine_file, problem, "or set engine_cache to a folder of your own (a new one "
                                 "is created with mode 0700)")
        if self.engine_file.is_file():
            engine = runtime.deserialize_cuda_engine(read_trusted_engine(self.engine_file))
            if engine is not None:
                return engine
            log.warning("cached TensorRT engine %s cannot be loaded; rebuilding it", self.engine_file)
        build_engine(self.path, self.engine_file, fp16_flag=fp16_flag)
        engine = runtime.deserialize_cuda_engine(read_trusted_engine(self.engine_file))
        if engine is None:
            raise RuntimeError(f"TensorRT cannot load the engine it just built: {self.engine_file}")
        return engine

    def __call__(self, x: Tensor) -> Tensor:
        x = checked_input(self, x, self.path.name)
        out = logits_buffer(x, self.num_classes, self.output_dtype, self.logits_size)
        ctx = self.context
        if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise RuntimeError(f"TensorRT refused the input shape {tuple(x.shape)} for {self.path.name}")
        got = tuple(int(d) for d in ctx.get_tensor_shape(OUTPUT_NAME))
        if got != tuple(out.shape):  # TensorRT writes its own shape to the output address: never past the buffer
            raise RuntimeError(f"TensorRT engine {self.path.name} would write logits of shape {list(got)} into a "
                               f"buffer of {list(out.shape)}; not running it")
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # the input is written on the caller's stream
        with torch.cuda.device(self.device):  # TensorRT runs on the current CUDA device
            ok = ctx.execute_async_v3(self._stream.cuda_stream)
        current.wait_stream(self._stream)  # the caller reads the logits on its stream (no host synchronisation)
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's log)")
        return out

    def describe(self) -> str:
        h, w = self.fixed_size
        return (f"tensorrt {self._version} {self.provider} | {self.path.name} {self.precision} | input {h}x{w}, "
                f"batch <= {self.max_batch} | engine {self.engine_file.name}")

    def close(self) -> None:
        self.__dict__.pop("context", None)  # in this order: context, engine, then the runtime
        self.__dict__.pop("engine", None)
        self.__dict__.pop("_runtime", None)


def logits_shape_problem(shape: Any, expected: tuple[int | None, ...]) -> str | None:
    """How an engine's output dims ``shape`` (-1: dynamic, resolved when running) disagree with the logits the
    metadata expects, ``expected`` = (N or None for any, classes, logits H, logits W: ceil(H/8) x ceil(W/8), twice
    that with the paper head); None when they agree."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != len(expected):
        return f"has {len(dims)} dimensions {list(dims)}, not N x classes x H x W logits"
    for name, got, want in zip(("batch", "class", "height", "width"), dims, expected):
        if want is not None and got != -1 and got != want:
            return f"{name} dimension is {got}, expected {want}"
    return None


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if dtype not in table:
        raise CheckpointError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


def open_backend(path: str | os.PathLike, options: BackendOptions = BackendOptions()) -> TensorRTBackend:
    """A TensorRT engine for an exported ONNX file, built or loaded from the cache (see the module docstring)."""
    return TensorRTBackend(path, options)


__all__ = ["TensorRTBackend", "build_engine", "cache_folder_problem", "can_hold_engines", "engine_path",
           "engine_trust_problem", "folder_problem", "logits_shape_problem", "metadata_path", "open_backend",
           "read_engine_metadata", "read_trusted_engine", "user_cache_dir"]
