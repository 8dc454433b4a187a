"""Train ICNet with cascade label guidance: iteration-based SGD + poly decay, AMP on CUDA, periodic validation,
best-on-val native checkpoints, exact resume, and DDP under torchrun.

.. code-block:: bash

    icnet-train config/train/camvid_r50_half.yaml                       # one process (CPU or one GPU)
    icnet-train config/train/smoke.yaml optim.iterations=50 train.output_dir=runs/try   # key=value overrides
    torchrun --nproc_per_node=4 -m icnet_ros.train config/train/camvid_effnet_lite0.yaml train.sync_bn=true
    icnet-train config/train/camvid_r50_half.yaml train.resume=auto     # continue runs/... where it stopped

Outputs in ``train.output_dir``: ``best.safetensors`` (highest val mIoU), ``last.safetensors`` (latest weights),
``train_state.pt`` (optimizer, scheduler, AMP scaler, per-rank RNG, sampler position: what resume needs),
``metrics.jsonl`` (or ``train_log.csv`` / ``val_log.csv``), ``config.yaml`` (resolved config), ``summary.json``,
and TensorBoard events when TensorBoard is installed.

``optim.batch_size`` is per process; the global batch is batch_size x processes. Under torchrun the backend is
NCCL on GPUs and gloo on CPU; one process is the plain case of the same code.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import (MAX_LICENSE_CHARS, MMSEG_NORMALIZATION, CheckpointError, build_meta, load_state_dict_into,
                         network_width_for, save_checkpoint)
from .classes import ClassSet
from .data.datasets import (DataSpec, DatasetError, SegmentationDataset, ShardSampler, TrainBatchSampler,
                            build_dataset, collate_segmentation, resolve_class_set, split_names, worker_init)
from .data.transforms import base_scale, train_transforms
from .evaluate import evaluate, metrics_report, resolve_device
from .losses import CascadeLoss, upsample_logits
from .metrics import ConfusionMatrix, format_table
from .models.icnet import MODEL_CONFIGS, ICNet, ICNetConfig, build_icnet
from .preprocess import Normalizer
from .sizes import SIZE_DIVISOR, aligned_size

STATE_FILE = "train_state.pt"
STATE_VERSION = 1

# ------------------------------------------------------------------------------------------------ configuration

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "arch": "icnet_r50_half",  # preset (icnet_r18, icnet_r50, icnet_r101, icnet_r50_half) or null
        "backbone": None, "width": None, "ppm": None, "cff": None, "aux_heads": None, "aux_dropout": None,
        "pretrained": None,  # "imagenet": ImageNet weights for efficientnet_lite* backbones
        "init_from": None,  # a native checkpoint to start from (tensors whose shapes differ are skipped)
    },
    "data": {
        "root": "../shared/data/camvid", "layout": "auto", "class_set": None, "class_file": None,
        "image_dir": "{split}/images", "label_dir": "{split}/labels", "label_suffix": "",
        "train_split": "train", "val_split": "val",  # "train+val" concatenates; val_split null: no validation
        "train_limit": None, "val_limit": None,  # first N samples only (smoke runs)
        "input_scale": 1.0,  # working resolution relative to the files (2.0: CamVid at 960x720)
        "base_size": None,  # [H, W]: fit images into this box instead of input_scale
        "ratio_range": [0.5, 2.0], "crop_size": [512, 512], "cat_max_ratio": 0.75, "flip": 0.5,
        "photometric": True,
        "eval_size": None,  # [H, W] network input for validation (default: native x input_scale)
        "license": None,  # the terms of the data, recorded in checkpoints as the weights' license (one line)
    },
    "loss": {
        "main_weight": 1.0, "sub24_weight": 0.4, "sub12_weight": 0.4, "class_weights": None,
        "ohem": False, "ohem_thresh": 0.7, "ohem_min_kept": 100000,
    },
    "optim": {
        "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
        "poly_power": 0.9, "min_lr": 1e-4, "warmup_iters": 0, "warmup_ratio": 0.1,
        "iterations": 80000, "batch_size": 8, "amp": True, "grad_clip": None,
    },
    "train": {
        "output_dir": "runs/icnet", "seed": 0, "device": "auto", "workers": 2,
        "cpu_threads": None,  # torch intra-op threads per process (default: torch's choice)
        "eval_interval": 1000, "eval_batch_size": 4, "log_interval": 50, "checkpoint_interval": 1000,
        "log_format": "jsonl",  # jsonl | csv
        "tensorboard": "auto",  # auto (when installed) | true | false
        "sync_bn": False, "channels_last": "auto", "train_miou": True, "progress": True,
        "resume": None,  # null | auto | a run directory | a train_state.pt
        "stop_at": None,  # stop (resumably) after this many iterations; the schedule still spans optim.iterations
        "time_limit": None,  # seconds: stop (resumably, after a validation) once the loop has run this long
    },
}

# keys whose default is None: the types they accept
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "model.arch": (str,), "model.backbone": (str,), "model.width": (int, float), "model.ppm": (str,),
    "model.cff": (str,), "model.aux_heads": (bool,), "model.aux_dropout": (int, float),
    "model.pretrained": (str,), "model.init_from": (str,), "data.class_set": (str,), "data.class_file": (str,),
    "data.val_split": (str,), "data.train_limit": (int,), "data.val_limit": (int,), "data.base_size": (list,),
    "data.eval_size": (list,), "data.license": (str,), "loss.class_weights": (list,), "optim.grad_clip": (int, float),
    "train.resume": (str,), "train.stop_at": (int,), "train.time_limit": (int, float), "train.cpu_threads": (int,),
}


# keys with a non-null default that may be set to null
_NULLABLE = {"model.arch", "data.val_split"}


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key."""


def config_dirs() -> list[Path]:
    """Where config names are looked up: ./config/train, the source tree's, the installed package share."""
    dirs = [Path.cwd() / "config" / "train", Path(__file__).resolve().parents[1] / "config" / "train"]
    try:  # colcon / ament install
        from ament_index_python.packages import get_package_share_directory

        dirs.append(Path(get_package_share_directory("icnet_ros")) / "config" / "train")
    except Exception:  # noqa: BLE001 - no ament index, or the package is not in it
        pass
    return list(dict.fromkeys(dirs))


def find_config(name: str) -> Path:
    """``name`` as a path, else ``NAME[.yaml]`` in one of :func:`config_dirs`."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    dirs = config_dirs()
    for d in dirs:
        if (d / stem).is_file():
            return d / stem
    raise ConfigError(f"config not found: {name} (also looked for {stem} in {', '.join(map(str, dirs))})")


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` with a YAML value (``[1, 2]``, ``null``, ``true``, ``0.01``, ``text``)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults <- YAML file <- ``key=value`` overrides, checked: unknown keys and wrong types are errors."""
    import yaml

    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = find_config(str(path))
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise ConfigError(f"{p}: expected a mapping of sections ({', '.join(DEFAULTS)})")
        for section, values in doc.items():
            if section not in DEFAULTS:
                raise ConfigError(f"{p}: unknown section {section!r}; known: {', '.join(DEFAULTS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: section {section!r} must be a mapping")
            for k, v in values.items():
                _set(config, f"{section}.{k}", v, source=str(p))
    for item in overrides:
        key, value = parse_override(item)
        _set(config, key, value, source="command line")
    validate_config(config)
    return config


def _set(config: dict, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in DEFAULTS or not key:
        raise ConfigError(f"{source}: unknown key {dotted!r}; sections: {', '.join(DEFAULTS)}")
    if key not in DEFAULTS[section]:
        raise ConfigError(f"{source}: unknown key {dotted!r}; known in {section}: {', '.join(DEFAULTS[section])}")
    default = DEFAULTS[section][key]
    if value is not None:
        allowed = _OPTIONAL_TYPES.get(dotted) if default is None else (
            (int, float) if isinstance(default, float) else (type(default),))
        if isinstance(default, str) and isinstance(value, bool) and dotted in ("train.channels_last",
                                                                               "train.tensorboard"):
            allowed = (bool,)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = "/".join(t.__name__ for t in allowed)
            raise ConfigError(f"{source}: {dotted} must be {names}, got {value!r}")
    elif default is not None and dotted not in _NULLABLE:
        raise ConfigError(f"{source}: {dotted} cannot be null")
    config[section][key] = value


def _pair(config: dict, key: str, minimum: float = 1) -> None:
    section, _, k = key.partition(".")
    v = config[section][k]
    if v is None:
        return
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and x >= minimum for x in v)):
        raise ConfigError(f"{key} must be a list of two numbers >= {minimum}, got {v!r}")


def validate_config(c: dict) -> None:
    """Raise :class:`ConfigError` naming the first bad value."""
    m, d, lo, o, t = c["model"], c["data"], c["loss"], c["optim"], c["train"]
    if m["arch"] is not None and m["arch"] not in MODEL_CONFIGS:
        raise ConfigError(f"model.arch {m['arch']!r} is not a preset; known: {', '.join(MODEL_CONFIGS)} "
                          "(or null with model.backbone etc.)")
    if m["arch"] is None and m["backbone"] is None:
        raise ConfigError("set model.arch (a preset) or model.backbone")
    if m["pretrained"] not in (None, "imagenet"):
        raise ConfigError(f"model.pretrained must be null or 'imagenet', got {m['pretrained']!r}")
    _pair(c, "data.crop_size", 32)
    _pair(c, "data.ratio_range", 1e-6)
    _pair(c, "data.base_size", 16)
    _pair(c, "data.eval_size", 64)
    if d["ratio_range"][0] > d["ratio_range"][1]:
        raise ConfigError(f"data.ratio_range must be [low, high] with low <= high, got {d['ratio_range']}")
    if d["input_scale"] <= 0:
        raise ConfigError(f"data.input_scale must be > 0, got {d['input_scale']}")
    if not 0 < d["cat_max_ratio"] <= 1 or not 0 <= d["flip"] <= 1:
        raise ConfigError("data.cat_max_ratio must be in (0, 1] and data.flip in [0, 1]")
    for k in ("train_limit", "val_limit"):
        if d[k] is not None and d[k] < 1:
            raise ConfigError(f"data.{k} must be >= 1 or null, got {d[k]}")
    if d["license"] is not None and (not d["license"].strip() or len(d["license"]) > MAX_LICENSE_CHARS
                                     or not d["license"].isprintable()):
        raise ConfigError(f"data.license must be one line of printable text, 1 to {MAX_LICENSE_CHARS} "
                          f"characters, got {d['license'][:80]!r}")
    if min(lo["main_weight"], lo["sub24_weight"], lo["sub12_weight"]) < 0 or lo["main_weight"] <= 0:
        raise ConfigError("loss weights must be >= 0 and loss.main_weight > 0")
    if o["iterations"] < 1 or o["batch_size"] < 1 or o["lr"] <= 0 or not 0 <= o["min_lr"] <= o["lr"]:
        raise ConfigError("need optim.iterations >= 1, optim.batch_size >= 1, optim.lr > 0, 0 <= min_lr <= lr")
    if o["warmup_iters"] < 0 or not 0 < o["warmup_ratio"] <= 1:
        raise ConfigError("need optim.warmup_iters >= 0 and optim.warmup_ratio in (0, 1]")
    for k in ("eval_interval", "log_interval", "checkpoint_interval", "eval_batch_size"):
        if t[k] < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {t[k]}")
    if t["workers"] < 0:
        raise ConfigError(f"train.workers must be >= 0, got {t['workers']}")
    if t["log_format"] not in ("jsonl", "csv"):
        raise ConfigError(f"train.log_format must be jsonl or csv, got {t['log_format']!r}")
    for k in ("channels_last", "tensorboard"):
        if t[k] not in ("auto", True, False):
            raise ConfigError(f"train.{k} must be auto, true or false, got {t[k]!r}")
    if t["cpu_threads"] is not None and t["cpu_threads"] < 1:
        raise ConfigError(f"train.cpu_threads must be >= 1 or null, got {t['cpu_threads']}")
    if t["stop_at"] is not None and t["stop_at"] < 1:
        raise ConfigError(f"train.stop_at must be >= 1 or null, got {t['stop_at']}")
    if t["time_limit"] is not None and not t["time_limit"] > 0:
        raise ConfigError(f"train.time_limit must be > 0 seconds or null, got {t['time_limit']}")


def data_spec(config: dict) -> DataSpec:
    d = config["data"]
    return DataSpec(root=d["root"], layout=d["layout"], class_set=d["class_set"], class_file=d["class_file"],
                    image_dir=d["image_dir"], label_dir=d["label_dir"], label_suffix=d["label_suffix"])


def model_config(config: dict, class_set: ClassSet) -> ICNetConfig:
    """The architecture: the preset in model.arch with the non-null model fields and the class count applied."""
    m = config["model"]
    base = MODEL_CONFIGS[m["arch"]].to_dict() if m["arch"] else ICNetConfig().to_dict()
    for k in ("backbone", "width", "ppm", "cff", "aux_heads", "aux_dropout"):
        if m[k] is not None:
            base[k] = m[k]
    base["num_classes"] = class_set.num_classes
    try:
        return ICNetConfig.from_dict(base)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


def normalization_for(arch: ICNetConfig) -> dict[str, Any]:
    """ImageNet EfficientNet-Lite preprocessing for those backbones, mmseg's otherwise."""
    if arch.backbone.startswith("efficientnet_lite"):
        from .models.efficientnet import IMAGENET_NORMALIZATION

        return dict(IMAGENET_NORMALIZATION)
    return dict(MMSEG_NORMALIZATION)


# ------------------------------------------------------------------------------------------------ schedule

class PolyLR:
    """``lr(i) = (lr - min_lr) * (1 - i / iterations) ** power + min_lr``, with optional linear warm-up from
    ``warmup_ratio * lr`` over the first ``warmup_iters``. Applied to every parameter group before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, iterations: int, power: float = 0.9,
                 min_lr: float = 0.0, warmup_iters: int = 0, warmup_ratio: float = 0.1) -> None:
        self.optimizer = optimizer
        self.base_lr, self.iterations, self.power, self.min_lr = lr, iterations, power, min_lr
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        self.last_iter = -1

    def lr_at(self, i: int) -> float:
        frac = min(i, self.iterations) / self.iterations
        lr = (self.base_lr - self.min_lr) * (1.0 - frac) ** self.power + self.min_lr
        if i < self.warmup_iters:
            lr *= self.warmup_ratio + (1.0 - self.warmup_ratio) * i / self.warmup_iters
        return lr

    def step(self, i: int) -> float:
        """Set the learning rate of iteration ``i`` (0-based) and return it."""
        lr = self.lr_at(i)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_iter = i
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "iterations": self.iterations, "power": self.power, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "warmup_ratio": self.warmup_ratio, "last_iter": self.last_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])


# ------------------------------------------------------------------------------------------------ distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = resolve_device(device_name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"train.device: {e}") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = _dt.timedelta(minutes=30)
        try:  # binding the device up front (torch >= 2.3) avoids NCCL guessing it
            dist.init_process_group(backend=backend, timeout=timeout,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except TypeError:
            dist.init_process_group(backend=backend, timeout=timeout)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running statistics), so that all replicas evaluate and save the same
    model (without SyncBN each rank updates its statistics from its own batches)."""
    if info.distributed:
        for b in module.buffers():
            dist.broadcast(b, 0)


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over all parameters (CPU float32 bytes): identical replicas give identical digests."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ logging

class MetricsLog:
    """Append records to ``metrics.jsonl`` (one JSON object per line, with ``kind``) or to ``{kind}_log.csv``;
    mirror scalars to TensorBoard when available. Only rank 0 writes."""

    def __init__(self, out_dir: Path, fmt: str = "jsonl", tensorboard: bool | str = "auto",
                 enabled: bool = True) -> None:
        self.out_dir, self.fmt, self.enabled = out_dir, fmt, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                if tensorboard is True:
                    raise ConfigError("train.tensorboard=true but TensorBoard is not installed "
                                      "(pip install tensorboard)") from None

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.fmt == "jsonl":
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": kind, **record}) + "\n")
        else:
            path = self.out_dir / f"{kind}_log.csv"
            flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in record.items()}
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(flat), extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(flat)
        if self.tb is not None:
            step = int(record.get("iter", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iter":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def truncate(self, after_iter: int) -> None:
        """Drop records logged after iteration ``after_iter`` (a resumed run repeats those iterations)."""
        if not self.enabled:
            return
        paths = [self.out_dir / "metrics.jsonl"] if self.fmt == "jsonl" else sorted(self.out_dir.glob("*_log.csv"))
        for path in paths:
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if self.fmt == "jsonl":
                keep = [ln for ln in lines if ln.strip() and _record_iter(json.loads(ln)) <= after_iter]
            else:
                rows = list(csv.DictReader(lines))
                keep = lines[:1] + [ln for ln, row in zip(lines[1:], rows) if _record_iter(row) <= after_iter]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _record_iter(record: dict[str, Any]) -> int:
    try:
        return int(record.get("iter", 0))
    except (TypeError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------------ provenance

def git_commit() -> str | None:
    """The commit of the source tree this module runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def init_provenance(path: str | None) -> dict[str, Any] | None:
    """What model.init_from's checkpoint records of itself (file name, SHA-256 and its own provenance, nested:
    a model fine-tuned in stages keeps the whole chain), or None without model.init_from."""
    if not path:
        return None
    from .checkpoint import file_sha256, read_metadata

    p = Path(path).expanduser()
    own = dict(read_metadata(p).get("provenance") or {})  # a clear CheckpointError for a missing or foreign file
    return {"checkpoint": str(path), "sha256": file_sha256(p), **own}


def hardware(device: torch.device, info: DistInfo) -> dict[str, Any]:
    hw: dict[str, Any] = {"device": str(device.type), "processes": info.world_size, "torch": torch.__version__,
                          "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    else:
        hw["cpu"] = platform.processor() or platform.machine()
    return hw


# ------------------------------------------------------------------------------------------------ model set-up

def build_model(config: dict, arch: ICNetConfig, log: Any = print) -> ICNet:
    """A fresh ICNet of ``arch``; ImageNet weights for EfficientNet-Lite backbones with model.pretrained, and
    model.init_from's tensors where shapes match."""
    model = build_icnet(arch)
    m = config["model"]
    if m["pretrained"] == "imagenet":
        if not arch.backbone.startswith("efficientnet_lite"):
            raise ConfigError(f"model.pretrained=imagenet is available for efficientnet_lite* backbones only, not "
                              f"{arch.backbone!r} (train it from scratch: model.pretrained=null)")
        try:
            from .models.efficientnet import load_imagenet_weights
        except ImportError as e:
            raise ConfigError(f"EfficientNet-Lite support (icnet_ros.models.efficientnet) is unavailable: {e}") \
                from e
        try:
            path = load_imagenet_weights(model.backbone.backbone, arch.backbone)
        except ModuleNotFoundError as e:
            raise ConfigError(str(e)) from e
        log(f"loaded ImageNet weights for {arch.backbone} from {path}")
    if m["init_from"]:
        init_from_checkpoint(model, m["init_from"], log)
    return model


def init_from_checkpoint(model: ICNet, path: str, log: Any = print) -> None:
    """Copy the tensors of native checkpoint ``path`` whose names and shapes match (e.g. all but the classifiers
    when the class count differs)."""
    from safetensors.torch import load_file

    from .checkpoint import read_metadata

    read_metadata(path)  # validates it is a native checkpoint
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    with torch.no_grad():
        for k, v in usable.items():
            own[k].copy_(v.to(own[k].dtype))
    log(f"initialised {len(usable)}/{len(own)} tensors from {path}"
        + (f"; kept fresh: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}" if skipped else ""))


# ------------------------------------------------------------------------------------------------ training

class Trainer:
    """One training run (one process of it under torchrun)."""

    def __init__(self, config: dict, command: list[str] | None = None) -> None:
        self.config = config
        self.command = command or sys.argv
        t = config["train"]
        if t["cpu_threads"]:
            torch.set_num_threads(int(t["cpu_threads"]))
        self.info, self.device = setup_distributed(t["device"])
        self.out_dir = Path(t["output_dir"]).expanduser()
        if self.info.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.info)
        self.spec = data_spec(config)
        self.class_set = resolve_class_set(self.spec)
        self.arch = model_config(config, self.class_set)
        self.normalization = normalization_for(self.arch)
        self.normalizer = Normalizer(self.normalization)
        self.use_amp = bool(config["optim"]["amp"]) and self.device.type == "cuda"
        cl = t["channels_last"]
        self.channels_last = self.device.type == "cuda" if cl == "auto" else bool(cl)
        self.log = MetricsLog(self.out_dir, t["log_format"], t["tensorboard"], enabled=self.info.main)
        self.start_time = time.time()
        self.elapsed_before = 0.0
        self.iteration = 0
        self.best_miou = -1.0
        self.best_iteration = 0
        self.last_val: dict[str, Any] | None = None
        self._input_size: list[int] | None = None
        self._network_width: int | None = None
        self._git_commit = git_commit()
        self._init_provenance = init_provenance(config["model"]["init_from"])
        self._build()

    def say(self, msg: str) -> None:
        if self.info.main:
            from tqdm import tqdm

            tqdm.write(f"[icnet-train] {msg}", file=sys.stderr)

    # ---- set-up
    def _build(self) -> None:
        c, d, o, t = self.config, self.config["data"], self.config["optim"], self.config["train"]
        seed = int(t["seed"])
        torch.manual_seed(seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
        model = build_model(c, self.arch, self.say)
        if self.info.distributed and t["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        if self.info.distributed:
            unused = self.arch.aux_heads and min(c["loss"]["sub24_weight"], c["loss"]["sub12_weight"]) == 0
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        else:
            self.ddp = model
        torch.manual_seed(seed + 7919 * (self.info.rank + 1))  # per-rank stream for dropout
        lo = c["loss"]
        self.criterion = CascadeLoss(lo["main_weight"], lo["sub24_weight"], lo["sub12_weight"],
                                     self.class_set.ignore_index, lo["class_weights"],
                                     lo["ohem_thresh"] if lo["ohem"] else None, lo["ohem_min_kept"]).to(self.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                                         weight_decay=o["weight_decay"], nesterov=o["nesterov"])
        self.scheduler = PolyLR(self.optimizer, o["lr"], o["iterations"], o["poly_power"], o["min_lr"],
                                o["warmup_iters"], o["warmup_ratio"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # data
        mean = self.normalization["mean"]
        pad = mean if self.normalization["channel_order"] == "RGB" else mean[::-1]
        transform = train_transforms(tuple(d["crop_size"]), tuple(d["ratio_range"]), d["input_scale"],
                                     tuple(d["base_size"]) if d["base_size"] else None, d["cat_max_ratio"],
                                     d["flip"], d["photometric"], pad, self.class_set.ignore_index)
        self.train_set = build_dataset(self.spec, d["train_split"], transform, d["train_limit"], self.class_set)
        self.val_set: SegmentationDataset | None = None
        if d["val_split"]:
            self.val_set = build_dataset(self.spec, d["val_split"], None, d["val_limit"], self.class_set)
        if d["val_split"] and set(split_names(d["val_split"])) & set(split_names(d["train_split"])):
            self.say(f"warning: validation split {d['val_split']!r} overlaps the training split "
                     f"{d['train_split']!r}: validation mIoU will not measure generalisation")
        self.say(f"{len(self.train_set)} training samples ({d['train_split']})"
                 + (f", {len(self.val_set)} validation samples ({d['val_split']})" if self.val_set else "")
                 + f"; {self.class_set.num_classes} classes ({self.class_set.name}); {self.info.world_size} "
                 f"process(es) on {self.device}; AMP {'on' if self.use_amp else 'off'}")
        if any(int(v) % SIZE_DIVISOR for v in d["crop_size"]):
            h, w = (int(v) for v in d["crop_size"])
            ah, aw = aligned_size(h, w)
            self.say(f"warning: data.crop_size {h}x{w} is not a multiple of {SIZE_DIVISOR}: ICNet's branches are "
                     "misaligned at such sizes, while validation and inference run at multiples of "
                     f"{SIZE_DIVISOR} (e.g. data.crop_size=[{ah},{aw}])")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _train_loader(self, start_batch: int) -> DataLoader:
        t, o = self.config["train"], self.config["optim"]
        sampler = TrainBatchSampler(len(self.train_set), o["batch_size"], int(t["seed"]), self.info.rank,
                                    self.info.world_size, start=start_batch)
        # own generator: creating loader iterators must not draw from the global RNG (exact resume)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=t["workers"],
                          collate_fn=collate_segmentation, worker_init_fn=worker_init,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator())

    def _val_loader(self) -> DataLoader:
        assert self.val_set is not None
        t = self.config["train"]
        return DataLoader(self.val_set, batch_size=t["eval_batch_size"],
                          sampler=ShardSampler(len(self.val_set), self.info.rank, self.info.world_size),
                          num_workers=t["workers"], collate_fn=collate_segmentation, worker_init_fn=worker_init,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator())

    def eval_input_size(self) -> list[int] | None:
        """The inference size recorded in checkpoints: data.eval_size, else the first validation (or training)
        image at the working scale when that differs from the files' size, else None (native)."""
        d = self.config["data"]
        if d["eval_size"]:
            return [int(v) for v in d["eval_size"]]
        if d["input_scale"] == 1.0 and not d["base_size"]:
            return None
        if self._input_size is None:
            ds = self.val_set or self.train_set
            h, w = ds.load(0)[0].shape[:2]
            s = base_scale(h, w, d["input_scale"], tuple(d["base_size"]) if d["base_size"] else None)
            self._input_size = [max(64, round(h * s)), max(64, round(w * s))]
        return list(self._input_size)

    def network_width(self) -> int:
        """The network width recorded in checkpoints (``input_size: auto`` resizes frames to it): data.eval_size's
        width, else the first training image's width at the working scale (data.input_scale, or data.base_size),
        rounded to a multiple of 32 (CamVid's 480-wide frames at x1.5: 736)."""
        d = self.config["data"]
        if d["eval_size"]:
            return network_width_for(int(d["eval_size"][1]), 1.0)
        if self._network_width is None:
            h, w = self.train_set.load(0)[0].shape[:2]
            s = base_scale(h, w, d["input_scale"], tuple(d["base_size"]) if d["base_size"] else None)
            self._network_width = network_width_for(w, s)
        return self._network_width

    # ---- checkpoints and state
    def provenance(self, iteration: int, val_miou: float | None) -> dict[str, Any]:
        return {"source": "icnet-train", "command": " ".join(self.command), "config": self.config,
                "iterations": iteration, "val_mIoU": None if val_miou is None else round(100 * val_miou, 4),
                "val_split": self.config["data"]["val_split"],
                "best_val_mIoU": round(100 * self.best_miou, 4) if self.best_miou >= 0 else None,
                "best_iteration": self.best_iteration if self.best_miou >= 0 else None,
                "wall_time_s": round(self.elapsed(), 1), "hardware": hardware(self.device, self.info),
                "git_commit": self._git_commit,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **({"initialised_from": self._init_provenance} if self._init_provenance else {})}

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def save_weights(self, name: str, iteration: int, val_miou: float | None) -> Path:
        meta = build_meta(self.arch, self.class_set, self.normalization, self.eval_input_size(),
                          self.provenance(iteration, val_miou), network_width=self.network_width(),
                          license=self.config["data"]["license"])
        path = self.out_dir / name
        save_checkpoint(self.model, path, meta)
        return path

    def save_state(self, iteration: int) -> None:
        """``last.safetensors`` plus ``train_state.pt``; a collective call (gathers every rank's RNG state)."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = gather_objects(rng, self.info)
        if self.info.main:
            val = self.last_val["mIoU"] if self.last_val else None
            self.save_weights("last.safetensors", iteration, val)
            state = {"version": STATE_VERSION, "iteration": iteration, "weights": "last.safetensors",
                     "best_miou": self.best_miou, "best_iteration": self.best_iteration,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.use_amp else None, "rng": rngs,
                     "world_size": self.info.world_size, "elapsed_s": self.elapsed(),
                     "config": json.loads(json.dumps(self.config))}
            tmp = self.out_dir / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.out_dir / STATE_FILE)
        barrier(self.info)

    def resume(self, where: str) -> bool:
        """Restore weights, optimizer, scheduler, scaler, RNG and position from a run directory or state file.
        ``auto``: the output directory's state when there is one (else start fresh)."""
        from safetensors.torch import load_file

        from .checkpoint import read_metadata

        if where == "auto":
            path = self.out_dir / STATE_FILE
            if not path.is_file():
                self.say(f"train.resume=auto: no {path}, starting fresh")
                return False
        else:
            path = Path(where).expanduser()
            path = path / STATE_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"train.resume: no training state at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise CheckpointError(f"{path}: not a readable training state: {e}") from e
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: not an icnet_ros training state (version {STATE_VERSION})")
        weights = path.parent / state["weights"]
        meta = read_metadata(weights)
        if int(meta["provenance"].get("iterations", -1)) != int(state["iteration"]):
            raise CheckpointError(f"{weights} is from iteration {meta['provenance'].get('iterations')} but "
                                  f"{path} from {state['iteration']}; the run was interrupted while saving")
        if ICNetConfig.from_dict(meta["arch"]) != self.arch:
            raise ConfigError(f"train.resume: {weights} has architecture {meta['arch']} but the config builds "
                              f"{self.arch.to_dict()}")
        load_state_dict_into(self.model, load_file(str(weights), device="cpu"), source=str(weights),
                             allow_missing_aux=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.use_amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            mine = rngs[self.info.rank]
            torch.set_rng_state(mine["torch"])
            if self.device.type == "cuda" and mine.get("cuda") is not None:
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self.say(f"warning: the state was saved by {len(rngs)} process(es), now {self.info.world_size}: "
                     "RNG streams and data order will differ from an uninterrupted run")
        self.iteration = int(state["iteration"])
        self.best_miou, self.best_iteration = float(state["best_miou"]), int(state["best_iteration"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        changed = _changed_keys(state.get("config") or {}, self.config)
        if changed:
            self.say(f"warning: config differs from the resumed run in: {', '.join(changed)}")
        self.log.truncate(self.iteration)
        self.say(f"resumed from {path} at iteration {self.iteration}")
        return True

    # ---- validation
    def validate(self, iteration: int) -> dict[str, Any]:
        d = self.config["data"]
        broadcast_buffers(self.model, self.info)
        cm = evaluate(self.model, self._val_loader(), self.normalizer, self.class_set.num_classes,
                      self.class_set.ignore_index, self.device,
                      input_size=d["eval_size"], input_scale=d["input_scale"], base_size=d["base_size"],
                      amp=self.use_amp, progress=self.info.main and self.config["train"]["progress"],
                      desc=f"val @{iteration}")
        metrics = cm.compute()
        self.last_val = metrics
        report = metrics_report(metrics, self.class_set.classes)
        self.log.log("val", {"iter": iteration, "mIoU": report["mIoU"], "mAcc": report["mAcc"],
                             "aAcc": report["aAcc"],
                             "IoU": {k: v["IoU"] for k, v in report["per_class"].items()}})
        miou = metrics["mIoU"]
        improved = not math.isnan(miou) and miou > self.best_miou
        if improved:
            self.best_miou, self.best_iteration = miou, iteration
            if self.info.main:
                self.save_weights("best.safetensors", iteration, miou)
        self.say(f"iter {iteration}: val mIoU {100 * miou:.2f} (best {100 * max(self.best_miou, 0):.2f} "
                 f"@{self.best_iteration})" + (" -> best.safetensors" if improved else ""))
        barrier(self.info)
        return metrics

    # ---- the loop
    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        c, o, t = self.config, self.config["optim"], self.config["train"]
        if t["resume"]:
            self.resume(t["resume"])
        if self.info.main:
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
        total = o["iterations"]
        end = min(total, t["stop_at"]) if t["stop_at"] else total
        loader_iter = iter(self._train_loader(self.iteration))
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        n = self.class_set.num_classes
        train_cm = ConfusionMatrix(n, self.class_set.ignore_index, self.device) if t["train_miou"] else None
        sums: dict[str, torch.Tensor] = {}
        count, t_data, t_step = 0, 0.0, 0.0
        bar = tqdm(total=total, initial=self.iteration, desc="train", disable=not (self.info.main and t["progress"]),
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        self.ddp.train()
        deadline = time.monotonic() + t["time_limit"] if t["time_limit"] else None
        tick = time.perf_counter()
        while self.iteration < end:
            images, labels = next(loader_iter)
            t_data += time.perf_counter() - tick
            lr = self.scheduler.step(self.iteration)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True).long()
            # the normaliser returns a channels-last view of the NHWC batch: match the model's memory format
            x = self.normalizer(images, "RGB").contiguous(
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            with autocast:
                outputs = self.ddp(x)
            loss, parts = self.criterion(outputs, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if o["grad_clip"]:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), o["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.iteration += 1
            for k, v in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            if train_cm is not None:
                with torch.no_grad():
                    train_cm.update_logits(upsample_logits(outputs.main.detach().float(), labels.shape[-2:]), labels)
            count += 1
            bar.update(1)
            t_step += time.perf_counter() - tick
            timed_out = deadline is not None and self._time_up(deadline)
            if timed_out:
                end = self.iteration
                self.say(f"train.time_limit ({t['time_limit']:g} s) reached at iteration {self.iteration}")
            if self.iteration % t["log_interval"] == 0 or self.iteration == end:
                rec = self._log_train(sums, count, t_data, t_step, lr, train_cm)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                sums, count, t_data, t_step = {}, 0, 0.0, 0.0
            if self.val_set is not None and (self.iteration % t["eval_interval"] == 0 or self.iteration == total
                                             or timed_out):
                self.validate(self.iteration)
            if self.iteration % t["checkpoint_interval"] == 0 or self.iteration == end:
                self.save_state(self.iteration)
            tick = time.perf_counter()
        bar.close()
        del loader_iter
        return self._finish(end)

    def _time_up(self, deadline: float) -> bool:
        """Whether the time limit has passed; under DDP every process gets rank 0's answer (they stop together)."""
        up = time.monotonic() >= deadline
        if self.info.distributed:
            flag = torch.tensor([1.0 if up else 0.0], device=self.device)
            dist.broadcast(flag, src=0)
            up = bool(flag.item())
        return up

    def _log_train(self, sums: dict[str, torch.Tensor], count: int, t_data: float, t_step: float, lr: float,
                   train_cm: ConfusionMatrix | None) -> dict[str, Any]:
        keys = sorted(sums)
        values = torch.stack([sums[k].float() for k in keys]) / count
        if self.info.distributed:
            dist.all_reduce(values)
            values /= self.info.world_size
        rec: dict[str, Any] = {"iter": self.iteration, "lr": lr}
        rec.update({k: float(v) for k, v in zip(keys, values.tolist())})
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"training diverged: loss {rec['loss']} at iteration {self.iteration} "
                                     "(lower optim.lr, or enable optim.grad_clip)")
        if train_cm is not None:
            train_cm.all_reduce()
            rec["train_mIoU"] = round(100 * train_cm.compute()["mIoU"], 4)
            train_cm.reset()
        rec["time_per_iter"] = round(t_step / count, 5)
        rec["data_time"] = round(t_data / count, 5)
        if self.device.type == "cuda":
            rec["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.log.log("train", rec)
        return rec

    def _finish(self, end: int) -> dict[str, Any]:
        broadcast_buffers(self.model, self.info)
        digests = gather_objects(parameter_digest(self.model), self.info)
        in_sync = len(set(digests)) == 1
        if not in_sync:
            self.say(f"ERROR: replicas diverged: parameter digests {digests}")
        finished = self.iteration >= self.config["optim"]["iterations"]
        summary = {"iterations": self.iteration, "finished": finished,
                   "best_val_mIoU": round(100 * self.best_miou, 4) if self.best_miou >= 0 else None,
                   "best_iteration": self.best_iteration if self.best_miou >= 0 else None,
                   "last_val": metrics_report(self.last_val, self.class_set.classes) if self.last_val else None,
                   "wall_time_s": round(self.elapsed(), 1), "processes": self.info.world_size,
                   "device": str(self.device), "replica_param_sha256": digests, "replicas_in_sync": in_sync,
                   "output_dir": str(self.out_dir)}
        if self.info.main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            if self.last_val:
                self.say("validation at the last evaluation:\n" + format_table(self.last_val, self.class_set.classes))
            self.say(f"{'finished' if finished else 'stopped'} at iteration {self.iteration}; outputs in "
                     f"{self.out_dir}" + ("" if finished else f" (resume: train.resume={self.out_dir})"))
        self.log.close()
        barrier(self.info)
        if not in_sync:
            raise RuntimeError(f"DDP replicas diverged (parameter digests {digests})")
        return summary


def _changed_keys(old: dict, new: dict) -> list[str]:
    ignore = {"train.resume", "train.stop_at", "train.time_limit", "train.progress", "train.workers",
              "train.output_dir"}
    out = []
    for section, values in new.items():
        for k, v in values.items():
            key = f"{section}.{k}"
            if key not in ignore and (old.get(section) or {}).get(k, v) != v:
                out.append(key)
    return out


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icnet-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections and keys (defaults): "
                                       + "; ".join(f"{s}: {', '.join(v)}" for s, v in DEFAULTS.items()))
    p.add_argument("config", help="YAML config (a path, or a name in config/train/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=0.02 data.crop_size=[512,1024]")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"icnet-train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    trainer = None
    try:
        command = ["icnet-train", *(argv if argv is not None else sys.argv[1:])]
        trainer = Trainer(config, command)
        trainer.train()
    except (ConfigError, DatasetError, CheckpointError) as e:
        print(f"icnet-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker: everything is written and the process group destroyed. Skip the interpreter's
        # finalisation, where Gloo's C++ threads can still be torn down and abort the process ("terminate called
        # without an active exception", SIGABRT; seen once in the 2-process test after a complete run), which
        # torchrun would report as a failed training
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
