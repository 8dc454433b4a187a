"""Training (``icnet-train``; the command line and its usage are in :mod:`icnet_ros.train.cli`).

One concept per module:

.. code-block:: text

    config.py        sections, defaults, YAML + key=value overrides, checking; the data spec, architecture and
                     normalization a config builds
    schedule.py      PolyLR: poly decay with linear warm-up
    ema.py           ModelEMA: an exponential moving average of the weights (optim.ema_decay)
    distributed.py   torchrun process group, collective helpers (no-ops with one process)
    metrics_log.py   metrics.jsonl / CSV / TensorBoard
    provenance.py    git commit, init_from chain, hardware: what checkpoints record about their making
    model.py         the model a run starts from (fresh, ImageNet encoder, model.init_from)
    trainer.py       Trainer: the loop, validation, checkpoints, exact resume
    cli.py           icnet-train (``main``); ``python -m icnet_ros.train`` and torchrun run ``__main__.py``
"""
from .cli import build_parser, main
from .config import (DEFAULTS, ConfigError, config_dirs, data_spec, find_config, load_config, model_config,
                     normalization_for, parse_override, validate_config)
from .distributed import (DistInfo, barrier, broadcast_buffers, gather_objects, parameter_digest,
                          setup_distributed)
from .ema import ModelEMA
from .metrics_log import MetricsLog
from .model import build_model, init_from_checkpoint
from .provenance import git_commit, hardware, init_provenance
from .schedule import PolyLR
from .trainer import STATE_FILE, STATE_VERSION, Trainer

__all__ = ["DEFAULTS", "STATE_FILE", "STATE_VERSION", "ConfigError", "DistInfo", "MetricsLog", "ModelEMA", "PolyLR",
           "Trainer", "barrier", "broadcast_buffers", "build_model", "build_parser", "config_dirs", "data_spec",
           "find_config", "gather_objects", "git_commit", "hardware", "init_from_checkpoint", "init_provenance",
           "load_config", "main", "model_config", "normalization_for", "parameter_digest", "parse_override",
           "setup_distributed", "validate_config"]
