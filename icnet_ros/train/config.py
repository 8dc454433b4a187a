"""Training configuration: the sections and defaults, YAML files plus ``section.key=value`` overrides, checking (an
unknown key or a wrong type is a one-line :class:`ConfigError` naming the key), and what the config builds: the
data spec, the architecture and its input normalization."""
from __future__ import annotations

import copy
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import MAX_LICENSE_CHARS, MMSEG_NORMALIZATION, network_width_for
from ..classes import ClassSet
from ..data.datasets import LAYOUTS, DataSpec
from ..models.icnet import MIN_INPUT_SIZE, MODEL_CONFIGS, ICNetConfig
from ..sizes import MAX_THREADS, MAX_UPSCALED_PIXELS, MAX_UPSCALED_TEXT  # MAX_THREADS: train.cpu_threads' bound
from ..tools.cli_checks import output_folder_problem

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "arch": "icnet_r50_half",  # preset (icnet_r18, icnet_r50, icnet_r101, icnet_r50_half) or null
        "backbone": None, "width": None, "ppm": None, "cff": None, "aux_heads": None, "aux_dropout": None,
        "head": None,  # "fcn" (mmseg, 1/8) or "paper" (x2 upsample, 1x1 classifier at 1/4)
        "pretrained": None,  # "imagenet": ImageNet weights for efficientnet_lite* backbones
        "init_from": None,  # a native checkpoint to start from (tensors whose shapes differ are skipped)
    },
    "data": {
        "root": "../shared/data/camvid", "layout": "auto", "class_set": None, "class_file": None,
        "image_dir": "{split}/images", "label_dir": "{split}/labels", "label_suffix": "",
        "train_split": "train", "val_split": "val",  # "train+val" concatenates; val_split null: no validation
        "train_limit": None, "val_limit": None,  # first N samples only (smoke runs)
        "input_scale": 1.0,  # working resolution relative to the files (2.0: CamVid at 960x720)
        "base_size": None,  # [a, b]: instead of input_scale, scale each image so its long side fits max(a, b) and
        # its short side min(a, b), whatever its orientation
        "ratio_range": [0.5, 2.0], "crop_size": [512, 512], "cat_max_ratio": 0.75, "flip": 0.5,
        "photometric": True,
        "eval_size": None,  # [H, W] network input for validation, recorded in checkpoints as their input size
        #                     (what input_size auto then runs); default: input_size auto's for the recorded
        #                     network width, the first training frame's width x input_scale on the 32 grid
        "license": None,  # the terms of the data, recorded in checkpoints as the weights' license (one line)
    },
    "loss": {
        "main_weight": 1.0, "sub24_weight": 0.4, "sub12_weight": 0.4, "class_weights": None,
        "ohem": False, "ohem_thresh": 0.7, "ohem_min_kept": 100000,
        "lovasz_weight": 0.0,  # > 0: add this much Lovasz-softmax (IoU surrogate) to the main branch's loss
        "lovasz_stride": 2,  # Lovasz on every k-th label pixel per direction (its sorts cost ~k**-2)
        "boundary_weight": 0.0,  # > 0: pixels near another class count 1 + this in the cross entropy
        "boundary_radius": 3,  # "near": within this many label pixels (a (2r+1)^2 square)
    },
    "optim": {
        "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
        "poly_power": 0.9, "min_lr": 1e-4, "warmup_iters": 0, "warmup_ratio": 0.1,
        "iterations": 80000, "batch_size": 8, "amp": True, "grad_clip": None,
        "ema_decay": 0.0,  # > 0: validate and save an exponential moving average of the weights (train/ema.py)
    },
    "train": {
        "output_dir": "runs/icnet", "seed": 0, "device": "auto", "workers": 2,
        "cpu_threads": None,  # torch intra-op threads per process, 1..256 (default: torch's choice)
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
    "model.cff": (str,), "model.aux_heads": (bool,), "model.aux_dropout": (int, float), "model.head": (str,),
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
    """Where config names are looked up: ./config/train, the source tree's, the installed package share (pip's
    ``<prefix>/share/icnet_ros``, where setup.py's data_files go: a pip install found none of them, or colcon's)."""
    dirs = [Path.cwd() / "config" / "train", Path(__file__).resolve().parents[2] / "config" / "train",
            Path(sys.prefix) / "share" / "icnet_ros" / "config" / "train"]
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
        if allowed and float in allowed and isinstance(value, str):
            value = _number(value)  # YAML reads 1e-3 (no dot) as text
        elif allowed == (int,) and not isinstance(value, bool) and isinstance(_number(value), float):
            value = _whole_number(dotted, _number(value), value, source)  # 1e4 (text to YAML), 1.0e+4 (a float)
        if allowed and list in allowed and isinstance(value, list):  # every list option holds numbers: [5e-1, 2]
            value = [_number(v) if isinstance(v, str) else v for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: {dotted} must be a finite number, got {value!r}")
        if isinstance(default, str) and isinstance(value, bool) and dotted in ("train.channels_last",
                                                                               "train.tensorboard"):
            allowed = (bool,)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = "/".join(t.__name__ for t in allowed)
            raise ConfigError(f"{source}: {dotted} must be {names}, got {value!r}")
    elif default is not None and dotted not in _NULLABLE:
        raise ConfigError(f"{source}: {dotted} cannot be null")
    config[section][key] = value


def _number(text: Any) -> Any:
    """``text`` as a float when it is written as a number (``1e-3``, ``5E+2``), else unchanged (refused by type);
    a value that is not text is returned as it is."""
    if not isinstance(text, str):
        return text
    try:
        return float(text) if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text) else text
    except ValueError:
        return text


def _whole_number(dotted: str, number: float, written: Any, source: str) -> int:
    """An integer key's value written as a float (``1e4``, ``1.0e+4``): the integer when it is a whole number."""
    if not math.isfinite(number):
        raise ConfigError(f"{source}: {dotted} must be a finite number, got {written!r}")
    if not number.is_integer():
        raise ConfigError(f"{source}: {dotted} must be int (a whole number), got {written!r}")
    return int(number)


def _pair(config: dict, key: str, minimum: float = 1) -> None:
    section, _, k = key.partition(".")
    v = config[section][k]
    if v is None:
        return
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and math.isfinite(x) and x >= minimum for x in v)):
        raise ConfigError(f"{key} must be a list of two finite numbers >= {minimum}, got {v!r}")


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
    if d["layout"] not in ("auto", *LAYOUTS):
        raise ConfigError(f"unknown layout {d['layout']!r} (data.layout); choose from auto, {', '.join(LAYOUTS)}")
    _pair(c, "data.crop_size", MIN_INPUT_SIZE)  # the network's minimum input (both sides)
    if d["crop_size"][0] * d["crop_size"][1] > MAX_UPSCALED_PIXELS:  # the largest network input (bounded memory)
        raise ConfigError(f"data.crop_size {d['crop_size']}: more than {MAX_UPSCALED_TEXT}, the largest network input")
    _pair(c, "data.ratio_range", 1e-6)
    _pair(c, "data.base_size", 16)
    _pair(c, "data.eval_size", MIN_INPUT_SIZE)
    if d["eval_size"]:
        try:  # the network input that checkpoints record is bounded
            network_width_for(d["eval_size"][1], 1.0)
        except ValueError as e:
            raise ConfigError(f"data.eval_size {d['eval_size']}: {e}") from None
    if d["ratio_range"][0] > d["ratio_range"][1]:
        raise ConfigError(f"data.ratio_range must be [low, high] with low <= high, got {d['ratio_range']}")
    if not d["input_scale"] > 0:  # (how small is too small depends on the frames: Trainer._check_working_size)
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
    if min(lo["main_weight"], lo["sub24_weight"], lo["sub12_weight"], lo["lovasz_weight"],
           lo["boundary_weight"]) < 0 \
            or lo["main_weight"] <= 0:
        raise ConfigError("loss weights must be >= 0 and loss.main_weight > 0")
    if lo["lovasz_stride"] < 1:
        raise ConfigError(f"loss.lovasz_stride must be >= 1, got {lo['lovasz_stride']}")
    if lo["boundary_radius"] < 1:
        raise ConfigError(f"loss.boundary_radius must be >= 1, got {lo['boundary_radius']}")
    cw = lo["class_weights"]
    if cw is not None and (not cw or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                             and math.isfinite(w) and w >= 0 for w in cw)):
        raise ConfigError(f"loss.class_weights must be a list of numbers >= 0 (one per class) or null, got {cw!r}")
    if cw is not None and not any(w > 0 for w in cw):
        raise ConfigError(f"loss.class_weights must give at least one class a weight > 0 (with all 0 the loss is 0 "
                          f"and nothing is learnt), got {cw!r}")
    if not 0 < lo["ohem_thresh"] <= 1:
        raise ConfigError(f"loss.ohem_thresh must be in (0, 1], got {lo['ohem_thresh']}")
    if lo["ohem_min_kept"] < 0:
        raise ConfigError(f"loss.ohem_min_kept must be >= 0, got {lo['ohem_min_kept']}")
    if o["iterations"] < 1 or o["batch_size"] < 1 or o["lr"] <= 0 or not 0 <= o["min_lr"] <= o["lr"]:
        raise ConfigError("need optim.iterations >= 1, optim.batch_size >= 1, optim.lr > 0, 0 <= min_lr <= lr")
    if o["batch_size"] < 2 and not t["sync_bn"]:
        raise ConfigError(_BATCH_OF_ONE)
    if not 0 <= o["momentum"] < 1:  # 1 and above: the updates never decay and the run diverges
        raise ConfigError(f"optim.momentum must be >= 0 and < 1 (0.9 is usual), got {o['momentum']}")
    if o["nesterov"] and o["momentum"] == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if not o["weight_decay"] >= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o['weight_decay']}")
    if o["grad_clip"] is not None and not o["grad_clip"] >= 0:
        raise ConfigError(f"optim.grad_clip must be > 0 (the largest gradient norm), or 0 or null for no clipping, "
                          f"got {o['grad_clip']}")
    if not o["poly_power"] >= 0:
        raise ConfigError(f"optim.poly_power must be >= 0 (0: constant learning rate), got {o['poly_power']}")
    if o["warmup_iters"] < 0 or not 0 < o["warmup_ratio"] <= 1:
        raise ConfigError("need optim.warmup_iters >= 0 and optim.warmup_ratio in (0, 1]")
    if not 0 <= o["ema_decay"] < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0: no weight averaging), got {o['ema_decay']}")
    for k in ("eval_interval", "log_interval", "checkpoint_interval", "eval_batch_size"):
        if t[k] < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {t[k]}")
    if not 0 <= t["seed"] < 2**32:  # derived seeds (seed * 1000003 + epoch) stay well inside torch's int64
        raise ConfigError(f"train.seed must be in 0..{2**32 - 1}, got {t['seed']}")
    if t["workers"] < 0:
        raise ConfigError(f"train.workers must be >= 0, got {t['workers']}")
    if t["log_format"] not in ("jsonl", "csv"):
        raise ConfigError(f"train.log_format must be jsonl or csv, got {t['log_format']!r}")
    for k in ("channels_last", "tensorboard"):
        if t[k] not in ("auto", True, False):
            raise ConfigError(f"train.{k} must be auto, true or false, got {t[k]!r}")
    if t["cpu_threads"] is not None and not 1 <= t["cpu_threads"] <= MAX_THREADS:
        raise ConfigError(f"train.cpu_threads must be in 1..{MAX_THREADS} or null, got {t['cpu_threads']}")
    if t["stop_at"] is not None and t["stop_at"] < 1:
        raise ConfigError(f"train.stop_at must be >= 1 or null, got {t['stop_at']}")
    if t["time_limit"] is not None and not t["time_limit"] > 0:
        raise ConfigError(f"train.time_limit must be > 0 seconds or null, got {t['time_limit']}")
    # a file in the way of the output folder fails here, not as a FileExistsError traceback once the run is built
    problem = output_folder_problem(str(t["output_dir"]), "train.output_dir")
    if problem:
        raise ConfigError(problem)


_BATCH_OF_ONE = ("optim.batch_size 1: BatchNorm in training mode needs at least 2 samples per step (ICNet's "
                 "pyramid pooling reduces each sample to 1 value per channel); use optim.batch_size >= 2, or "
                 "train.sync_bn=true under torchrun with >= 2 GPU processes (SyncBN normalises over all processes' "
                 "samples)")


def validate_for_run(config: dict, class_set: ClassSet, world_size: int = 1, device_type: str = "cpu") -> None:
    """The checks that need what the run knows and the config alone does not: the class count (loss.class_weights),
    the number of processes and the device (the batch BatchNorm normalises over). Raise :class:`ConfigError`."""
    o, t, cw = config["optim"], config["train"], config["loss"]["class_weights"]
    if cw is not None and len(cw) != class_set.num_classes:
        raise ConfigError(f"loss.class_weights has {len(cw)} weights but the dataset has {class_set.num_classes} "
                          f"classes ({class_set.name}: {', '.join(class_set.classes)})")
    sync = bool(t["sync_bn"]) and world_size > 1  # the trainer converts to SyncBN under torchrun only
    if sync and device_type != "cuda":
        raise ConfigError(f"train.sync_bn=true needs CUDA GPUs: torch's SyncBatchNorm does not run on "
                          f"{device_type} processes (set train.sync_bn=false)")
    # optim.batch_size is per process: without SyncBN each process normalises over its own batch only
    if o["batch_size"] * (world_size if sync else 1) < 2:
        raise ConfigError(_BATCH_OF_ONE + (f" (train.sync_bn=true has no effect with {world_size} process)"
                                           if t["sync_bn"] else ""))


def data_spec(config: dict) -> DataSpec:
    d = config["data"]
    return DataSpec(root=d["root"], layout=d["layout"], class_set=d["class_set"], class_file=d["class_file"],
                    image_dir=d["image_dir"], label_dir=d["label_dir"], label_suffix=d["label_suffix"])


def model_config(config: dict, class_set: ClassSet) -> ICNetConfig:
    """The architecture: the preset in model.arch with the non-null model fields and the class count applied."""
    m = config["model"]
    base = MODEL_CONFIGS[m["arch"]].to_dict() if m["arch"] else ICNetConfig().to_dict()
    for k in ("backbone", "width", "ppm", "cff", "aux_heads", "aux_dropout", "head"):
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
        from ..models.efficientnet import IMAGENET_NORMALIZATION

        return dict(IMAGENET_NORMALIZATION)
    return dict(MMSEG_NORMALIZATION)
