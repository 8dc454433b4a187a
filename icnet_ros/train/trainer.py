"""One training run (one process of it under torchrun): set-up, the iteration loop with cascade label guidance,
periodic validation with best-on-val checkpoints, checkpoints with complete metadata, optional weight averaging
(:mod:`.ema`), and exact resume from ``train_state.pt``."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, build_meta, load_state_dict_into, network_width_for, save_checkpoint
from ..data.datasets import (DatasetError, SegmentationDataset, ShardSampler, TrainBatchSampler, build_dataset,
                             collate_segmentation, resolve_class_set, split_names, worker_init)
from ..data.transforms import base_scale, train_transforms
from ..evaluate import evaluate, metrics_report
from ..losses import CascadeLoss, upsample_logits
from ..metrics import ConfusionMatrix, format_table
from ..models.icnet import ICNetConfig
from ..preprocess import Normalizer
from ..sizes import SIZE_DIVISOR, aligned_size
from .config import ConfigError, data_spec, model_config, normalization_for, validate_for_run
from .distributed import barrier, broadcast_buffers, gather_objects, parameter_digest, setup_distributed
from .ema import ModelEMA
from .metrics_log import MetricsLog
from .model import build_model
from .provenance import git_commit, hardware, init_provenance
from .schedule import PolyLR

STATE_FILE = "train_state.pt"
STATE_VERSION = 1


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
        validate_for_run(config, self.class_set, self.info.world_size, self.device.type)
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
        if any(int(v) % SIZE_DIVISOR for v in d["crop_size"]):
            h, w = (int(v) for v in d["crop_size"])
            ah, aw = aligned_size(h, w)
            self.say(f"warning: data.crop_size {h}x{w} is not a multiple of {SIZE_DIVISOR}: ICNet's branches are "
                     "misaligned at such sizes, while validation and inference run at multiples of "
                     f"{SIZE_DIVISOR} (e.g. data.crop_size=[{ah},{aw}])")
        self._check_checkpoint_metadata()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _check_checkpoint_metadata(self) -> None:
        """Build the metadata the checkpoints will record now, so that a value they cannot hold (a network width
        above checkpoint.MAX_NETWORK_WIDTH from data.input_scale / data.base_size / data.eval_size) stops the run
        before training rather than at the first save."""
        d = self.config["data"]
        try:
            build_meta(self.arch, self.class_set, self.normalization, self.eval_input_size(), {},
                       network_width=self.network_width(), license=d["license"])
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

    @property
    def averaged(self) -> nn.Module:
        """The model that validation measures and the checkpoints hold: the EMA copy when on, else the model."""
        return self.ema.module if self.ema is not None else self.model

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
        save_checkpoint(self.averaged, path, meta)
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
            if self.ema is not None:  # last.safetensors holds the average; training goes on from these
                state["train_weights"] = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
            tmp = self.out_dir / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.out_dir / STATE_FILE)
        barrier(self.info)

    def resume(self, where: str) -> bool:
        """Restore weights, optimizer, scheduler, scaler, RNG and position from a run directory or state file.
        ``auto``: the output directory's state when there is one (else start fresh)."""
        from safetensors.torch import load_file

        from ..checkpoint import read_metadata

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
        saved = load_file(str(weights), device="cpu")
        raw = state.get("train_weights")  # present when the run averaged its weights: then ``weights`` is the EMA
        if raw is not None:
            load_state_dict_into(self.model, raw, source=str(path), allow_missing_aux=False)
        else:
            load_state_dict_into(self.model, saved, source=str(weights), allow_missing_aux=False)
        if self.ema is not None:  # the average goes on from the saved one (from the weights when there was none)
            load_state_dict_into(self.ema.module, saved if raw is not None else self.model.state_dict(),
                                 source=str(weights), allow_missing_aux=False)
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
        self.log.truncate(self.iteration, warn=self.say)
        self.say(f"resumed from {path} at iteration {self.iteration}")
        return True

    # ---- validation
    def validate(self, iteration: int) -> dict[str, Any]:
        d = self.config["data"]
        broadcast_buffers(self.model, self.info)
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
        cm = evaluate(self.averaged, self._val_loader(), self.normalizer, self.class_set.num_classes,
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
            if self.ema is not None:
                self.ema.update()
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
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
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
