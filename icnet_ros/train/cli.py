"""icnet-train: train ICNet with cascade label guidance: iteration-based SGD + poly decay, AMP on CUDA, periodic
validation, best-on-val native checkpoints, exact resume, and DDP under torchrun.

.. code-block:: bash

    icnet-train config/train/camvid_r50_half.yaml                       # one process (CPU or one GPU)
    icnet-train config/train/smoke.yaml optim.iterations=50 train.output_dir=runs/try   # key=value overrides
    torchrun --nproc_per_node=4 -m icnet_ros.train config/train/camvid_effnet_lite0.yaml train.sync_bn=true
    icnet-train config/train/camvid_r50_half.yaml train.resume=auto     # continue runs/... where it stopped

Outputs in ``train.output_dir``: ``best.safetensors`` (highest val mIoU), ``last.safetensors`` (latest weights),
``train_state.pt`` (weights, optimizer, scheduler, AMP scaler, per-rank RNG, sampler position: what resume needs;
Ctrl-C / SIGTERM save it and stop),
``metrics.jsonl`` (or ``train_log.csv`` / ``val_log.csv``), ``config.yaml`` (resolved config), ``summary.json``,
and TensorBoard events when TensorBoard is installed.

``optim.batch_size`` is per process; the global batch is batch_size x processes. Under torchrun the backend is
NCCL on GPUs and gloo on CPU; one process is the plain case of the same code.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..data.datasets import DatasetError, one_line_error
from .config import DEFAULTS, ConfigError, load_config
from .trainer import STATE_FILE, Trainer

if TYPE_CHECKING:
    from ..tools.cli_checks import StopSignals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icnet-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections and keys (defaults): "
                                       + "; ".join(f"{s}: {', '.join(v)}" for s, v in DEFAULTS.items()))
    p.add_argument("config", help="YAML config (a path, or a name in config/train/)")
    # default=[]: without it parse_intermixed_args reports the optional overrides as required when none is given
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="e.g. optim.lr=0.02 data.crop_size=[512,1024]")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """icnet-train. SIGINT / SIGTERM: while training, the state is saved and the run stops (exit status 130 / 143);
    before it (the config, the data, the model being built) or during that save (a second Ctrl-C), one line
    ``icnet-train: interrupted; ...`` and the same status."""
    from ..tools.cli_checks import run_stoppable

    # (the training loop installs its own handlers while it runs; its interruptions are answered in _main)
    return run_stoppable("icnet-train", lambda stop: _main(argv, stop))


def _main(argv: list[str] | None, stop: StopSignals) -> int:
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
        try:
            trainer = Trainer(config, command)
        except (ConfigError, DatasetError, CheckpointError) as e:
            print(f"icnet-train: error: {one_line_error(e)}", file=sys.stderr)
            return 2
        except ValueError as e:  # any other value torch or a module refuses while the run is built: one line too
            print(f"icnet-train: error: cannot build the run from this config: {e}", file=sys.stderr)
            return 2
        trainer.train()
    except (ConfigError, DatasetError, CheckpointError) as e:
        print(f"icnet-train: error: {one_line_error(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the run diverged: the files saved before it did are kept
        print(f"icnet-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while the state was being saved, or one before training started
        saved = ""
        if trainer is not None:
            saved = (f"; the state saved last is in {trainer.out_dir}" if (trainer.out_dir / STATE_FILE).is_file()
                     else f"; no training state was saved in {trainer.out_dir}")
        print(f"icnet-train: interrupted{saved}", file=sys.stderr)
        return stop.exit_code
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.interrupted:  # stopped by SIGINT / SIGTERM after saving: the shell's status for that signal
        return 128 + int(trainer.interrupted)
    return 0
