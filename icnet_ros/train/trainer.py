"""One training run (one process of it under torchrun): set-up, the iteration loop with cascade label guidance,
periodic validation with best-on-val checkpoints, checkpoints with complete metadata, optional weight averaging
(:mod:`.ema`), and exact resume from ``train_state.pt``."""
from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, build_meta, load_state_dict_into, network_width_for, save_checkpoint
from ..data.datasets import (DatasetError, SegmentationDataset, ShardSampler, TrainBatchSampler,
                             build_dataset, collate_segmentation, one_line_error, resolve_class_set, split_names,
                             worker_init)
from ..data.transforms import MAX_RESIZED_PIXELS, base_scale, train_transforms
from ..evaluate import evaluate, metrics_report
from ..losses import CascadeLoss, upsample_logits
from ..metrics import ConfusionMatrix, format_table
from ..models.icnet import MIN_INPUT_SIZE, ICNetConfig
from ..preprocess import Normalizer
from ..sizes import SIZE_DIVISOR, aligned_size
from ..tools.cli_checks import ignore_signal
from .config import ConfigError, data_spec, model_config, normalization_for, validate_for_run
from .distributed import barrier, broadcast_buffers, gather_objects, parameter_digest, setup_distributed
from .ema import ModelEMA
from .metrics_log import MetricsLog, write_error
from .model import build_model
from .provenance import git_commit, hardware, init_provenance
from .schedule import PolyLR

STATE_FILE = "train_state.pt"
STATE_VERSION = 1
#: what a run leaves in its output folder: a fresh run does not start among another run's files
RUN_FILES = (STATE_FILE, "last.safetensors", "best.safetensors", "metrics.jsonl", "train_log.csv", "val_log.csv",
             "summary.json")
#: what a run writes before its first state: a folder holding only these is started afresh by train.resume=auto
LOG_FILES = ("metrics.jsonl", "train_log.csv", "val_log.csv")


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
        self.resume_from = self._state_to_resume(t["resume"])  # None: a fresh run
        self._check_output_dir()
        if self.info.main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"train.output_dir {self.out_dir}: cannot create it: {e.strerror or e}") from None
        barrier(self.info)
        self.spec = data_spec(config)
        self.class_set = resolve_class_set(self.spec)
        validate_for_run(config, self.class_set, self.info.world_size, self.device.type)
        self.arch = model_config(config, self.class_set)
        self.normalization = normalization_for(self.arch)
        self.normalizer = Normalizer(self.normalization)
        self.use_amp = bool(config["optim"]["amp"]) and self.device.type == "cuda"
        cl = t["channels_last"]
        self.channels_last = self.device.type == "cuda" if cl == "auto" else bool(cl)
        self.log = MetricsLog(self.out_dir, t["log_format"], t["tensorboard"], enabled=self.info.main,
                              state_file=self.out_dir / STATE_FILE)
        self.start_time = time.time()
        self.elapsed_before = 0.0
        self.iteration = 0
        self.best_miou = -1.0
        self.best_iteration = 0
        self.last_val: dict[str, Any] | None = None
        self.last_val_iteration: int | None = None
        self.interrupted: int | None = None  # the signal that stopped the run (SIGINT / SIGTERM)
        self._saved_iteration: int | None = None  # the iteration of the training state last saved or resumed
        self._warned_unlabelled = False
        self._warned_unlabelled_val = False
        #: the iteration whose validation is due and has not run (it ran not yet, or a stop came first): a state
        #: saved meanwhile records it, and the resumed run validates before it trains on
        self._val_due: int | None = None
        self._stop = _StopSignals()
        self._input_size: list[int] | None = None
        self._network_width: int | None = None
        self._first_train_size: tuple[int, int] | None = None
        self._git_commit = git_commit()
        init_from = config["model"]["init_from"]
        # a resumed run takes both from its state (init_from's file may have moved or changed since)
        self._init_provenance = None if self.resume_from else init_provenance(init_from)
        self.license = config["data"]["license"]
        if self.license is None and init_from and not self.resume_from:
            from ..checkpoint import read_metadata

            self.license = read_metadata(Path(init_from).expanduser()).get("license")
            if self.license:
                self.say(f"data.license is not set: the weights keep model.init_from's license: {self.license}")
        self._build()

    def _state_to_resume(self, where: str | None) -> Path | None:
        """The training state train.resume names (``auto``: the output folder's, when there is one), or None."""
        if not where:
            return None
        if where == "auto":
            path = self.out_dir / STATE_FILE
            return path if path.is_file() else None
        path = Path(where).expanduser()
        path = path / STATE_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"train.resume: no training state at {path}")
        return path

    def _check_output_dir(self) -> None:
        """A fresh run does not start in a folder holding another run: its best.safetensors would be replaced by a
        worse one and its logs mixed with the new run's. train.resume=auto starts afresh in a folder holding only
        the logs of a run that saved no state (stopped before its first checkpoint): there is nothing to continue,
        and those logs are dropped (:meth:`resume`); the weights or summary of a run are never replaced."""
        if self.resume_from is not None and self.resume_from.parent.resolve() == self.out_dir.resolve():
            return
        found = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if self.config["train"]["resume"] == "auto" and set(found) <= set(LOG_FILES):
            return
        if found:
            hint = ("continue it with train.resume=auto, " if STATE_FILE in found and self.resume_from is None
                    else "")
            raise ConfigError(f"train.output_dir {self.out_dir} holds another run ({', '.join(found)}): {hint}"
                              "choose another train.output_dir, or move that run away")

    def say(self, msg: str) -> None:
        if self.info.main:
            from tqdm import tqdm

            tqdm.write(f"[icnet-train] {msg}", file=sys.stderr)

    # ---- set-up
    def _build(self) -> None:
        c, d, o, t = self.config, self.config["data"], self.config["optim"], self.config["train"]
        seed = int(t["seed"])
        torch.manual_seed(seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
        model = build_model(c, self.arch, self.say, initial_weights=self.resume_from is None)
        if self.info.distributed and t["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        # optim.ema_decay: validation and the saved files use the average (self.averaged), training the raw model
        self.ema = ModelEMA(model, o["ema_decay"]) if o["ema_decay"] else None
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
                                     lo["ohem_thresh"] if lo["ohem"] else None, lo["ohem_min_kept"],
                                     lo["lovasz_weight"], lo["lovasz_stride"], lo["boundary_weight"],
                                     lo["boundary_radius"]).to(self.device)
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
        if self.info.main:  # label values no class claims are read as ignore: said here, not learnt silently
            for name, ds in ((d["train_split"], self.train_set), (d["val_split"], self.val_set)):
                warning = ds.unclaimed_values_warning() if ds is not None else None
                if warning:
                    self.say(f"warning: {name} split: {warning}")
        if any(int(v) % SIZE_DIVISOR for v in d["crop_size"]):
            h, w = (int(v) for v in d["crop_size"])
            ah, aw = aligned_size(h, w)
            self.say(f"warning: data.crop_size {h}x{w} is not a multiple of {SIZE_DIVISOR}: ICNet's branches are "
                     "misaligned at such sizes, while validation and inference run at multiples of "
                     f"{SIZE_DIVISOR} (e.g. data.crop_size=[{ah},{aw}])")
        self._check_working_size()
        self._check_checkpoint_metadata()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _check_working_size(self) -> None:
        """data.input_scale (or data.base_size) must not bring the training frames below the network's minimum
        input (the first frame tells their size): before, data.input_scale=1e-9 trained on 1x1 frames padded to the
        crop (nothing learnt, exit 0). Frames
        that are that small in their files are not refused here (the scale did not make them so). Nor may the
        largest random resize (data.ratio_range) take them above the image files' bound (a typo such as
        ratio_range=[0.5, 20] asked OpenCV for tens of gigabytes at the first batch)."""
        d = self.config["data"]
        h, w = self.first_train_size()
        s = base_scale(h, w, d["input_scale"], tuple(d["base_size"]) if d["base_size"] else None)
        if min(h, w) * s < MIN_INPUT_SIZE <= min(h, w):
            what = (f"data.base_size {d['base_size']}" if d["base_size"] else f"data.input_scale {d['input_scale']:g}")
            raise ConfigError(f"{what} brings the training frames ({w}x{h}, the first) to {w * s:.0f}x{h * s:.0f}, "
                              f"below the network's minimum input of {MIN_INPUT_SIZE} pixels a side"
                              + ("" if d["base_size"] else
                                 f" (use data.input_scale >= {math.ceil(100 * MIN_INPUT_SIZE / min(h, w)) / 100:g})"))
        big = s * d["ratio_range"][1]  # the largest random resize: bounded (memory), 4x the image files' bound
        if h * w * big * big > MAX_RESIZED_PIXELS:
            what = (f"data.base_size {d['base_size']}" if d["base_size"] else f"data.input_scale {d['input_scale']:g}")
            raise ConfigError(f"data.ratio_range {d['ratio_range']} with {what} resizes the training frames "
                              f"({w}x{h}, the first) up to {w * big:.0f}x{h * big:.0f}, more than "
                              f"{MAX_RESIZED_PIXELS / 1e6:g} megapixels (icnet_ros.data.transforms.MAX_RESIZED_PIXELS)")

    def first_train_size(self) -> tuple[int, int]:
        """(height, width) of the first training image in its file (read once)."""
        if self._first_train_size is None:
            h, w = self.train_set.load(0)[0].shape[:2]
            self._first_train_size = (int(h), int(w))
        return self._first_train_size

    def _check_checkpoint_metadata(self) -> None:
        """Build the metadata the checkpoints will record now, so that a value they cannot hold (a network width
        above checkpoint.MAX_NETWORK_WIDTH from data.input_scale / data.base_size / data.eval_size) stops the run
        before training rather than at the first save."""
        d = self.config["data"]
        try:
            build_meta(self.arch, self.class_set, self.normalization, self.eval_input_size(), {},
                       network_width=self.network_width(), license=self.license)
        except DatasetError:  # the first image is unreadable: that, not the config, is the problem
            raise
        except ValueError as e:  # CheckpointError included
            raise ConfigError(f"data.input_scale {d['input_scale']:g} / data.base_size {d['base_size']} / "
                              f"data.eval_size {d['eval_size']}: the checkpoints cannot record this run: {e}") \
                from None

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

    def network_width(self) -> int | None:
        """The network width recorded in checkpoints (``input_size: auto`` resizes frames to it, keeping their
        aspect ratio): the first training image's width at the working scale (data.input_scale, or
        data.base_size), rounded to a multiple of 32 (CamVid's 480-wide frames at x1.5: 736). None with
        data.eval_size: validation ran at that fixed size, which the checkpoints record as their input size and
        ``auto`` then uses (a recorded width made ``auto`` run other sizes than the ones that chose the best
        checkpoint: eval_size [192, 480] was validated at 192x480, evaluated at 352x480)."""
        d = self.config["data"]
        if d["eval_size"]:
            return None
        if self._network_width is None:
            h, w = self.first_train_size()
            s = base_scale(h, w, d["input_scale"], tuple(d["base_size"]) if d["base_size"] else None)
            self._network_width = network_width_for(w, s)
        return self._network_width

    @property
    def averaged(self) -> nn.Module:
        """The model that validation measures and the checkpoints hold: the EMA copy when on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    # ---- checkpoints and state
    def provenance(self, iteration: int, val_miou: float | None) -> dict[str, Any]:
        return {"source": "icnet-train", "command": shlex.join(self.command), "config": self.config,
                "iterations": iteration, "val_mIoU": None if val_miou is None else round(100 * val_miou, 4),
                "val_iteration": None if val_miou is None else self.last_val_iteration,
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
                          license=self.license)
        path = self.out_dir / name
        try:
            save_checkpoint(self.averaged, path, meta)  # (its temporary file is removed when this fails)
        except OSError as e:
            raise write_error(path, e, self.out_dir / STATE_FILE) from None
        return path

    def check_finite(self, iteration: int) -> None:
        """Non-finite weights are never saved over good ones: :class:`FloatingPointError` (the run diverged). Both
        the trained weights and their average are checked (the average lags: it can still be finite)."""
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        tensors = [(k, v) for m in modules for k, v in m.state_dict().items() if v.is_floating_point()]
        finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu()  # one device sync
        if not bool(finite.all()):
            first = tensors[int((~finite).nonzero()[0])][0]
            raise FloatingPointError(f"training diverged: non-finite weights ({first}, ...) at iteration "
                                     f"{iteration}; the files saved before are kept (lower optim.lr, or enable "
                                     "optim.grad_clip)")

    def save_state(self, iteration: int) -> None:
        """``train_state.pt`` (everything resume needs: the weights too) then ``last.safetensors``, each written
        whole or not at all: an interrupt or a full disk between the two leaves a state that resumes. A collective
        call (gathers every rank's RNG state)."""
        self.check_finite(iteration)
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = gather_objects(rng, self.info)
        if self.info.main:
            def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
                return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}

            state = {"version": STATE_VERSION, "iteration": iteration, "weights": "last.safetensors",
                     "arch": self.arch.to_dict(), "model_weights": cpu(self.model),
                     "ema_weights": cpu(self.ema.module) if self.ema is not None else None,
                     "best_miou": self.best_miou, "best_iteration": self.best_iteration,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.use_amp else None, "rng": rngs,
                     "world_size": self.info.world_size, "elapsed_s": self.elapsed(),
                     "config": json.loads(json.dumps(self.config)), "license": self.license,
                     "initialised_from": self._init_provenance,
                     "last_val": self.last_val, "last_val_iteration": self.last_val_iteration,
                     "val_due": self._val_due == iteration}
            path = self.out_dir / STATE_FILE
            tmp = self.out_dir / (STATE_FILE + ".tmp")
            # serialised in memory, then written: torch.save into a file that cannot grow (a full disk) raised a
            # RuntimeError from its zip writer ('unexpected pos'), a traceback; a plain write's OSError says why
            data = io.BytesIO()
            torch.save(state, data)
            try:
                with open(tmp, "wb") as f:
                    f.write(data.getbuffer())
                os.replace(tmp, path)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, OSError):
                    raise write_error(path, e, path) from None  # (the state saved before, if any, is untouched)
                raise
            self.save_weights("last.safetensors", iteration, self.last_val["mIoU"] if self.last_val else None)
        self._saved_iteration = iteration
        barrier(self.info)

    def resume(self, where: str) -> bool:
        """Restore weights, optimizer, scheduler, scaler, RNG and position from a run directory or state file.
        ``auto``: the output directory's state when there is one (else start fresh)."""
        from safetensors.torch import load_file

        from ..checkpoint import read_metadata

        path = self.resume_from
        if path is None:
            logs = [name for name in LOG_FILES if (self.out_dir / name).exists()]
            self.say(f"train.resume={where}: no {self.out_dir / STATE_FILE}, starting fresh"
                     + (f" (dropping the records in {', '.join(logs)}: that run saved no state)" if logs else ""))
            if self.info.main:  # every format's: a run in another train.log_format left them
                for name in logs:
                    (self.out_dir / name).unlink(missing_ok=True)
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            # (one line: torch's text runs to 9 lines and advises weights_only=False, unsafe and not an option here)
            raise CheckpointError(f"{path}: not a readable training state ({_load_failure(e)})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: not an icnet_ros training state (version {STATE_VERSION})")
        if "model_weights" in state:  # the state holds the weights itself
            if ICNetConfig.from_dict(state["arch"]) != self.arch:
                raise ConfigError(f"train.resume: {path} has architecture {state['arch']} but the config builds "
                                  f"{self.arch.to_dict()}")
            raw, averaged = state["model_weights"], state.get("ema_weights")
            load_state_dict_into(self.model, raw, source=str(path), allow_missing_aux=False)
            source = str(path)
        else:  # a state written before the weights moved into it: they are in last.safetensors
            weights = path.parent / state["weights"]
            meta = read_metadata(weights)
            if int(meta["provenance"].get("iterations", -1)) != int(state["iteration"]):
                raise CheckpointError(f"{weights} is from iteration {meta['provenance'].get('iterations')} but "
                                      f"{path} from {state['iteration']}; the run was interrupted while saving")
            if ICNetConfig.from_dict(meta["arch"]) != self.arch:
                raise ConfigError(f"train.resume: {weights} has architecture {meta['arch']} but the config builds "
                                  f"{self.arch.to_dict()}")
            saved = load_file(str(weights), device="cpu")
            raw = state.get("train_weights")  # present when the run averaged its weights: ``weights`` is the EMA
            averaged = saved if raw is not None else None
            load_state_dict_into(self.model, raw if raw is not None else saved, source=str(path),
                                 allow_missing_aux=False)
            source = str(weights)
        if self.ema is not None:  # the average goes on from the saved one (from the weights when there was none)
            load_state_dict_into(self.ema.module, averaged if averaged is not None else self.model.state_dict(),
                                 source=source, allow_missing_aux=False)
        self.optimizer.load_state_dict(state["optimizer"])
        o = self.config["optim"]
        for group in self.optimizer.param_groups:  # the config's, not the saved ones (as for the learning rate)
            group.update(momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"])
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
        if "license" in state:
            self.license = state["license"] if self.config["data"]["license"] is None else self.license
        init_from = self.config["model"]["init_from"]
        self._init_provenance = state["initialised_from"] if "initialised_from" in state else \
            init_provenance(init_from)
        self.last_val, self.last_val_iteration = state.get("last_val"), state.get("last_val_iteration")
        if state.get("val_due"):  # stopped before the validation of its iteration: it comes first (train())
            if self.val_set is not None:
                self._val_due = self.iteration
            else:
                self.say(f"the resumed run had the validation of iteration {self.iteration} still to do; with "
                         "data.val_split=null it is not done")
        if path.parent.resolve() != self.out_dir.resolve() and self.best_miou >= 0:
            self._take_best_from(path.parent)
        changed = _changed_keys(state.get("config") or {}, self.config)
        if changed:
            self.say(f"warning: config differs from the resumed run in: {', '.join(changed)}")
        self.log.truncate(self.iteration, warn=self.say)
        if path.parent.resolve() == self.out_dir.resolve():  # (a state resumed from elsewhere is not in out_dir)
            self._saved_iteration = self.iteration
        self.say(f"resumed from {path} at iteration {self.iteration}")
        return True

    def _take_best_from(self, run_dir: Path) -> None:
        """A state resumed into another output folder: its best mIoU comes with the checkpoint that reached it,
        copied from the resumed run's folder (before, the new folder had no best.safetensors while its summary named
        the best iteration); when that file is not there, or is not the state's best (its run went on past the
        state), the best is chosen afresh from this run's validations."""
        from ..checkpoint import read_metadata

        source = run_dir / "best.safetensors"
        miou = round(100 * self.best_miou, 4)
        try:
            prov = read_metadata(source).get("provenance") or {}
        except CheckpointError as e:
            problem = f"{source} is not usable ({one_line_error(e)})" if source.exists() else f"no {source}"
        else:
            problem = None
            if (prov.get("iterations"), prov.get("val_mIoU")) != (self.best_iteration, miou):
                problem = (f"{source} is from iteration {prov.get('iterations')} (val mIoU {prov.get('val_mIoU')}), "
                           "not the state's best")
        if problem is None:
            if self.info.main:
                target = self.out_dir / "best.safetensors"
                tmp = self.out_dir / "best.safetensors.tmp"
                try:
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise CheckpointError(f"cannot copy {source} to {target}: {e.strerror or e}") from None
            self.say(f"copied {source} (iteration {self.best_iteration}, val mIoU {miou:.2f}), the resumed run's "
                     "best, into the output folder")
            return
        self.say(f"warning: the resumed state's best (val mIoU {miou:.2f} at iteration {self.best_iteration}) "
                 f"cannot come with it: {problem}; best.safetensors is chosen afresh from this run's validations")
        self.best_miou, self.best_iteration = -1.0, 0

    # ---- validation
    def validate(self, iteration: int) -> dict[str, Any]:
        d = self.config["data"]
        broadcast_buffers(self.model, self.info)
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
        # without data.eval_size: the network inputs of icnet-eval's and the node's default (input_size auto) for
        # the width recorded in the checkpoints, so that the mIoU that selects the best checkpoint is the one
        # measured later (scaling each frame by data.input_scale instead gave 375x500 frames 576x736 at x1.5,
        # icnet-eval 544x736)
        cm = evaluate(self.averaged, self._val_loader(), self.normalizer, self.class_set.num_classes,
                      self.class_set.ignore_index, self.device, input_size=d["eval_size"],
                      network_width=self.network_width(),
                      amp=self.use_amp, progress=self.info.main and self.config["train"]["progress"],
                      desc=f"val @{iteration}")
        metrics = cm.compute()
        self.last_val, self.last_val_iteration = metrics, iteration
        report = metrics_report(metrics, self.class_set.classes)
        self.log.log("val", {"iter": iteration, "mIoU": report["mIoU"], "mAcc": report["mAcc"],
                             "aAcc": report["aAcc"],
                             "IoU": {k: v["IoU"] for k, v in report["per_class"].items()}})
        miou = metrics["mIoU"]
        if not metrics["pixels"] and not self._warned_unlabelled_val:  # the mIoU is undefined (NaN): say why once
            self._warned_unlabelled_val = True
            self.say(f"warning: the validation split {d['val_split']!r} has no labelled pixel (every label pixel is "
                     f"{self.class_set.ignore_index}, ignore): its mIoU is undefined and picks no best.safetensors; "
                     "check that the label files hold the class values or colours of the class set (this warning "
                     "is given once per run)")
        improved = not math.isnan(miou) and miou > self.best_miou
        if improved:
            self.best_miou, self.best_iteration = miou, iteration
            if self.info.main:
                self.check_finite(iteration)
                self.save_weights("best.safetensors", iteration, miou)
        # (with no labelled pixel it said "val mIoU nan (best 0.00 @0)": a best that was never measured)
        best = (f"best {100 * self.best_miou:.2f} @{self.best_iteration}" if self.best_miou >= 0 else "no best yet")
        self.say(f"iter {iteration}: val mIoU " + ("n/a (no labelled pixel)" if math.isnan(miou) else
                                                   f"{100 * miou:.2f}")
                 + f" ({best})" + (" -> best.safetensors" if improved else ""))
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

            _write_text(self.out_dir / "config.yaml", yaml.safe_dump(c, sort_keys=False))
        total = o["iterations"]
        end = min(total, t["stop_at"]) if t["stop_at"] else total
        loader_iter = iter(self._train_loader(self.iteration))
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        n = self.class_set.num_classes
        train_cm = ConfusionMatrix(n, self.class_set.ignore_index, self.device) if t["train_miou"] else None
        bar = tqdm(total=total, initial=self.iteration, desc="train", disable=not (self.info.main and t["progress"]),
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        self.ddp.train()
        deadline = time.monotonic() + t["time_limit"] if t["time_limit"] else None
        with self._stop:
            end = self._loop(end, total, loader_iter, autocast, train_cm, bar, deadline)
            if self.iteration and self._saved_iteration != self.iteration:
                # a state resumed from another folder with nothing left to train (train.stop_at reached): saved
                # here too (before, the folder had no state and train.resume=auto in it was refused)
                self.save_state(self.iteration)
        bar.close()
        del loader_iter
        return self._finish(end)

    def _loop(self, end: int, total: int, loader_iter: Any, autocast: Any, train_cm: ConfusionMatrix | None,
              bar: Any, deadline: float | None) -> int:
        """Iterations until ``end`` (or a time limit, or SIGINT / SIGTERM: then the state is saved where it
        stopped, with the validation of that iteration still due when the stop came before it), after the
        validation a resumed state left due; returns the iteration it stopped at."""
        o, t = self.config["optim"], self.config["train"]
        sums: dict[str, torch.Tensor] = {}
        count, t_data, t_step = 0, 0.0, 0.0
        labelled = torch.zeros((), dtype=torch.long, device=self.device)  # labelled pixels in the logged window
        tick = time.perf_counter()

        def log_pending() -> None:
            """Log the iterations since the last record, as when a run stops (one process: under torchrun the
            other processes are not here to reduce the record with)."""
            if count and not self.info.distributed:
                self._log_train(sums, count, t_data, t_step, self.scheduler.lr_at(self.iteration - 1), train_cm,
                                labelled)

        def stopped_with_workers() -> bool:
            """After a DataLoader error: True when it is the stop signal's (the record logged, the state saved)."""
            if self._stop.received is None or self.info.distributed:
                return False
            log_pending()
            self._stop_with_workers()
            return True

        if self._val_due is not None:  # resumed where a stop came before the validation: that validation first,
            # then training goes on as it would have (before, it was never run: best.safetensors and the val records
            # differed from an uninterrupted run's)
            try:
                self._validate_keeping_work(self.iteration)
            except RuntimeError:  # the validation loader's workers gone with a stop signal (to the group)
                if not stopped_with_workers():
                    raise
                return self.iteration
            self.save_state(self.iteration)  # now recorded as done: a later resume does not validate it again

        while self.iteration < end:
            try:
                images, labels = next(loader_iter)
            except RuntimeError:  # a worker gone with the stop signal (sent to the group): stop here, saving
                if not stopped_with_workers():
                    raise
                end = self.iteration
                break
            except DatasetError as e:
                log_pending()
                raise self._keep_work(e) from None
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
            if self.ema is not None:
                self.ema.update()
            self.iteration += 1
            for k, v in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            labelled += (labels != self.class_set.ignore_index).sum()
            if train_cm is not None:
                with torch.no_grad():
                    train_cm.update_logits(upsample_logits(outputs.main.detach().float(), labels.shape[-2:]), labels)
            count += 1
            bar.update(1)
            t_step += time.perf_counter() - tick
            timed_out, signalled = self._stop_requested(deadline)
            if timed_out:
                end = self.iteration
                self.say(f"train.time_limit ({t['time_limit']:g} s) reached at iteration {self.iteration}")
            if signalled:
                end = self.iteration
                self.interrupted = self._stop.received or signal.SIGTERM
                # a second SIGINT aborts (_StopSignals); a second SIGTERM changes nothing (a process group's
                # stop may deliver several)
                abort = ("Ctrl-C again to abort without saving" if self.interrupted == signal.SIGINT
                         else "a further SIGTERM is ignored; SIGINT aborts without saving")
                self.say(f"{signal.Signals(self.interrupted).name}: stopping at iteration {self.iteration}, saving "
                         f"the state ({abort})")
            if self.iteration % t["log_interval"] == 0 or self.iteration == end:
                rec = self._log_train(sums, count, t_data, t_step, lr, train_cm, labelled)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                sums, count, t_data, t_step = {}, 0, 0.0, 0.0
                labelled = torch.zeros_like(labelled)
            if self.val_set is not None and (
                    self.iteration % t["eval_interval"] == 0 or self.iteration == total or timed_out):
                self._val_due = self.iteration  # a state saved before it has run (a stop, an error) records it
            if self._val_due == self.iteration and not signalled:
                try:
                    self._validate_keeping_work(self.iteration)
                except RuntimeError:  # the validation loader's workers gone with a stop signal (to the group)
                    if not stopped_with_workers():
                        raise
                    end = self.iteration
                    break
            if self.iteration % t["checkpoint_interval"] == 0 or self.iteration == end:
                self.save_state(self.iteration)
            tick = time.perf_counter()
        return end

    def _stop_with_workers(self) -> None:
        """After a DataLoader error when a stop signal came (one process): the workers ended with it (a SIGTERM to
        the process group): announce the stop and save the state."""
        self.interrupted = self._stop.received
        self.say(f"{signal.Signals(self.interrupted).name}: stopping at iteration {self.iteration}, saving the state "
                 "(the DataLoader workers stopped with it)")
        if self.iteration and self._saved_iteration != self.iteration:
            self.save_state(self.iteration)

    def _keep_work(self, error: DatasetError) -> DatasetError:
        """The error to raise when a training file cannot be read (each is first read when its batch comes, maybe
        hours in): the state is saved first when iterations were trained since the state last saved, so that they
        are not lost (one process: under torchrun the other processes are inside the step's collective calls)."""
        message = one_line_error(error)
        if self.info.distributed:
            return DatasetError(f"{message} (fix the file and continue from the last saved state with "
                                "train.resume=auto)")
        if self.iteration and self._saved_iteration != self.iteration:
            self.save_state(self.iteration)
        if self.iteration:
            kept = f"the training state at iteration {self.iteration} is saved"
        else:
            kept = "no iteration was trained"
        return DatasetError(f"{message} ({kept}: fix the file and continue with train.resume=auto)")

    def _validate_keeping_work(self, iteration: int) -> None:
        """Validate; when a validation file cannot be read (they are first read now, maybe after hours of training),
        save the state first so that the iterations trained are not lost (one process: under torchrun the other
        processes are inside the validation's collective calls)."""
        try:
            self.validate(iteration)
        except DatasetError as e:
            if self.info.distributed:
                raise
            self.save_state(iteration)  # (recording the validation as still due: the resumed run does it first)
            raise DatasetError(f"{one_line_error(e)} (the training state at iteration {iteration} is saved: fix the "
                               f"file and continue with train.resume={self.out_dir})") from None
        if self._val_due == iteration:
            self._val_due = None

    def _stop_requested(self, deadline: float | None) -> tuple[bool, bool]:
        """(time limit passed, SIGINT / SIGTERM received); under DDP every process gets the same answer (any
        process's), so that they stop at the same iteration."""
        up = deadline is not None and time.monotonic() >= deadline
        signalled = self._stop.received is not None
        if self.info.distributed:
            flags = torch.tensor([float(up), float(signalled)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            up, signalled = bool(flags[0].item()), bool(flags[1].item())
        return up, signalled

    def _log_train(self, sums: dict[str, torch.Tensor], count: int, t_data: float, t_step: float, lr: float,
                   train_cm: ConfusionMatrix | None, labelled: torch.Tensor) -> dict[str, Any]:
        keys = sorted(sums)
        values = torch.stack([sums[k].float() for k in keys]) / count
        labelled = labelled.clone()
        if self.info.distributed:
            dist.all_reduce(values)
            values /= self.info.world_size
            dist.all_reduce(labelled)
        rec: dict[str, Any] = {"iter": self.iteration, "lr": lr}
        rec.update({k: float(v) for k, v in zip(keys, values.tolist())})
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"training diverged: loss {rec['loss']} at iteration {self.iteration} "
                                     "(lower optim.lr, or enable optim.grad_clip)")
        if not int(labelled) and not self._warned_unlabelled:  # the loss is 0 and nothing is learnt: say so once
            self._warned_unlabelled = True
            self.say(f"warning: the training batches of iterations {self.iteration - count + 1}-{self.iteration} "
                     f"have no labelled pixel (every label pixel is {self.class_set.ignore_index}, ignore): check "
                     "that the label files hold the class values or colours of the class set (this warning is "
                     "given once per run)")
        if train_cm is not None:
            train_cm.all_reduce()
            miou = train_cm.compute()["mIoU"]  # NaN when no pixel was labelled: null (JSON has no NaN)
            rec["train_mIoU"] = round(100 * miou, 4) if math.isfinite(miou) else None
            train_cm.reset()
        rec["time_per_iter"] = round(t_step / count, 5)
        rec["data_time"] = round(t_data / count, 5)
        if self.device.type == "cuda":
            rec["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.log.log("train", rec)
        return rec

    def _finish(self, end: int) -> dict[str, Any]:
        broadcast_buffers(self.model, self.info)
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
        digests = gather_objects(parameter_digest(self.model), self.info)
        in_sync = len(set(digests)) == 1
        if not in_sync:
            self.say(f"ERROR: replicas diverged: parameter digests {digests}")
        # finished: the whole schedule trained and its last validation done (a stop at the last iteration, before
        # its validation, said "finished" and wrote finished: true while exiting 130; without validation such a stop
        # has finished)
        finished = self.iteration >= self.config["optim"]["iterations"] and self._val_due is None
        summary = {"iterations": self.iteration, "finished": finished,
                   "best_val_mIoU": round(100 * self.best_miou, 4) if self.best_miou >= 0 else None,
                   "best_iteration": self.best_iteration if self.best_miou >= 0 else None,
                   "last_val": metrics_report(self.last_val, self.class_set.classes) if self.last_val else None,
                   "wall_time_s": round(self.elapsed(), 1), "processes": self.info.world_size,
                   "device": str(self.device), "replica_param_sha256": digests, "replicas_in_sync": in_sync,
                   "output_dir": str(self.out_dir)}
        if self.info.main:
            _write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
            if self.last_val:
                self.say("validation at the last evaluation:\n" + format_table(self.last_val, self.class_set.classes))
            self.say(f"{'finished' if finished else 'stopped'} at iteration {self.iteration}; outputs in "
                     f"{self.out_dir}" + ("" if finished else f" (resume: train.resume={self.out_dir})"))
        self.log.close()
        barrier(self.info)
        if not in_sync:
            raise RuntimeError(f"DDP replicas diverged (parameter digests {digests})")
        return summary


def _write_text(path: Path, text: str) -> None:
    """Write one of the run's small text files (beside its training state); a failure (a full disk) is one line
    (:func:`~icnet_ros.train.metrics_log.write_error`)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise write_error(path, e, path.with_name(STATE_FILE)) from None


def _load_failure(error: Exception) -> str:
    """Why torch.load could not read a file, in a few words."""
    text = str(error)
    if isinstance(error, EOFError) or "central directory" in text:
        return "empty or cut short"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a {found.group(1)} object: a training state holds only tensors and plain values"
    if "Weights only load failed" in text or "Unsupported operand" in text:
        return "not a file written by torch.save"
    if "zip archive" in text or "inline_container" in text:
        return "a damaged or foreign archive, not one written by torch.save"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


class _StopSignals:
    """SIGINT and SIGTERM while the loop runs: the first asks it to stop after the iteration in progress (the state is
    then saved); a second SIGINT aborts at once (KeyboardInterrupt). Only in the main thread (where Python delivers
    signals); the previous handlers come back afterwards."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None and signal.SIGCHLD not in self._previous:
            # the same stop may end the DataLoader workers (a SIGTERM to the process group): torch's SIGCHLD
            # handler would raise "DataLoader worker is killed by signal" wherever the loop is (the state unsaved)
            # (a Python handler that does nothing, not SIG_DFL: a SIGCHLD already pending would then raise
            # "Signal 17 ignored due to race condition")
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, ignore_signal)
        self.received = self.received or signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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
