"""icnet-train: config handling, the poly schedule, outputs and checkpoint metadata, exact resume, overfitting two
CamVid frames, and a 2-process gloo run under torchrun whose replicas stay in sync."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import CAMVID, REPO, file_size_limit, require
from icnet_ros import load_model
from icnet_ros.checkpoint import MMSEG_NORMALIZATION
from icnet_ros.classes import CAMVID as CAMVID_CLASSES
from icnet_ros.train import (STATE_FILE, ConfigError, PolyLR, build_model, load_config, main, model_config,
                             parameter_digest)

FAST = ["train.progress=false"]


def _records(run_dir, kind):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _smoke(out_dir, *overrides):
    rc = main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out_dir}", *FAST, *overrides])
    assert rc == 0
    return out_dir


# ------------------------------------------------------------------------------------------------ config


def test_config_files_overrides_and_errors(capsys):
    c = load_config("smoke", ["optim.lr=0.05", "data.crop_size=[96, 128]", "data.val_split=null",
                              "loss.class_weights=[1, 2]"])
    assert c["model"]["arch"] == "icnet_r18" and c["model"]["width"] == 0.25 and c["optim"]["lr"] == 0.05
    assert c["data"]["crop_size"] == [96, 128] and c["data"]["val_split"] is None
    assert c["optim"]["momentum"] == 0.9  # default kept
    for name in ("camvid_r50_half", "camvid_effnet_lite0", "cityscapes_r50"):
        load_config(name)
    for name in ("camvid_r50_half", "camvid_effnet_lite0"):  # CamVid is CC BY-NC 4.0: so are weights trained on it
        assert load_config(name)["data"]["license"].startswith("CC BY-NC 4.0")
    arch = model_config(load_config("camvid_r50_half"), CAMVID_CLASSES)
    assert (arch.backbone, arch.width, arch.ppm, arch.num_classes) == ("resnet50", 0.5, "sum", 11)
    for bad, message in [("optim.lrate=1", "unknown key 'optim.lrate'"), ("optim.lr=fast", "optim.lr must be"),
                         ("data.crop_size=[0, 5]", "crop_size must be"), ("model.arch=icnet_r7", "not a preset"),
                         ("train.log_format=xml", "jsonl or csv"), ("optim.iterations=null", "cannot be null"),
                         ("noequals", "section.key=value"), ("data.license=''", "data.license must be"),
                         ("data.license=5", "data.license must be str"),
                         ("loss.lovasz_weight=-1", "loss weights must be >= 0"),
                         ("loss.lovasz_stride=0", "lovasz_stride must be >= 1"),
                         ("loss.boundary_weight=-0.5", "loss weights must be >= 0"),
                         ("loss.boundary_radius=0", "boundary_radius must be >= 1"),
                         ("optim.lr=.inf", "optim.lr must be a finite number"),
                         ("data.input_scale=.nan", "data.input_scale must be a finite number"),
                         ("data.ratio_range=[1, .inf]", "ratio_range must be a list of two finite numbers")]:
        with pytest.raises(ConfigError, match=message):
            load_config("smoke", [bad])
    with pytest.raises(ConfigError, match="config not found"):
        load_config("no_such_config")
    assert main(["smoke", "optim.batch_size=0"]) == 2
    assert "optim.batch_size >= 1" in capsys.readouterr().err
    assert main(["smoke", "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    # YAML reads 1e-3 (no dot) as text: a number is a number however it is written
    c = load_config("smoke", ["optim.lr=1e-3", "optim.weight_decay=5E-4", "optim.min_lr=1e-5"])
    assert (c["optim"]["lr"], c["optim"]["weight_decay"], c["optim"]["min_lr"]) == (0.001, 0.0005, 1e-5)
    # inside lists too (they were refused: "got ['5e-1', 2.0]")
    c = load_config("smoke", ["data.ratio_range=[5e-1, 2.0]", "loss.class_weights=[1e-1, 1, 2E0]",
                              "data.crop_size=[1.28e2, 160]"])
    assert (c["data"]["ratio_range"], c["loss"]["class_weights"]) == ([0.5, 2.0], [0.1, 1, 2.0])
    assert c["data"]["crop_size"] == [128.0, 160]
    assert load_config("smoke", ["train.seed=4294967295"])["train"]["seed"] == 2**32 - 1


def test_integer_keys_take_whole_numbers_in_scientific_notation(tmp_path):
    """The README says numbers may use scientific notation, but integer keys refused it: 'optim.iterations must be
    int, got '1e4''. A whole number however written is that integer (1e4 is text to YAML, 1.0e+4 a float); one that is
    not whole is refused."""
    c = load_config("smoke", ["optim.iterations=1e4", "train.eval_interval=2.5E+2", "data.train_limit=1.0e+1",
                              "train.checkpoint_interval=1000.0"])
    values = (c["optim"]["iterations"], c["train"]["eval_interval"], c["data"]["train_limit"],
              c["train"]["checkpoint_interval"])
    assert values == (10000, 250, 10, 1000) and all(type(v) is int for v in values)
    config_file = tmp_path / "sci.yaml"
    config_file.write_text("optim:\n  iterations: 2e3\n  batch_size: 4.0e+0\n")
    c = load_config(str(config_file))
    assert (c["optim"]["iterations"], c["optim"]["batch_size"]) == (2000, 4)
    for bad, message in [("optim.iterations=1.5e0", r"optim.iterations must be int \(a whole number\), got '1.5e0'"),
                         ("train.seed=2.5", r"train.seed must be int \(a whole number\), got 2.5"),
                         ("optim.iterations=1e999", "optim.iterations must be a finite number"),
                         ("optim.iterations=ten", "optim.iterations must be int, got 'ten'"),
                         ("optim.iterations=true", "optim.iterations must be int, got True")]:
        with pytest.raises(ConfigError, match=message):
            load_config("smoke", [bad])


@pytest.mark.parametrize("override, message", [
    ("data.crop_size=[32, 48]", "crop_size must be a list of two finite numbers >= 64"),  # the network's MIN_INPUT_SIZE
    ("optim.momentum=-0.5", "optim.momentum must be >= 0"),
    # momentum 1 or more: the updates never decay, the run diverged and exited 0
    ("optim.momentum=1", r"optim.momentum must be >= 0 and < 1 \(0.9 is usual\), got 1"),
    ("optim.momentum=1.5", r"optim.momentum must be >= 0 and < 1"),
    # every class weight 0: the loss was 0 and nothing was learnt
    ("loss.class_weights=[0, 0.0]", r"loss.class_weights must give at least one class a weight > 0 .*got \[0, 0.0\]"),
    ("train.cpu_threads=257", r"train.cpu_threads must be in 1..256 or null, got 257"),  # the node's bound
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("loss.class_weights=[a, b]", "loss.class_weights must be a list of numbers >= 0"),
    ("loss.class_weights=[1, -2]", "loss.class_weights must be a list of numbers >= 0"),
    ("loss.ohem_thresh=1.5", r"loss.ohem_thresh must be in \(0, 1\]"),
    ("loss.ohem_min_kept=-1", "loss.ohem_min_kept must be >= 0"),
    ("optim.batch_size=1", "optim.batch_size 1: BatchNorm in training mode needs at least 2 samples"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0"),
    ("optim.poly_power=-2", "optim.poly_power must be >= 0"),
    ("data.eval_size=[64, 5000]", "data.eval_size .*network width 4992 .* above the 4096"),
    ("data.layout=camvd", "unknown layout 'camvd' .*choose from auto, camvid, cityscapes, folders"),
    ("train.seed=-1", r"train.seed must be in 0..4294967295, got -1"),  # numpy refuses negative seeds
    ("train.seed=99999999999999", r"train.seed must be in 0..4294967295"),  # was an int64 overflow traceback
    # a crop above the largest network input: OpenCV was asked for 10.8 GB at the first batch (a traceback)
    ("data.crop_size=[60000, 60000]", r"data.crop_size \[60000, 60000\]: more than 16777216 pixels"),
])
def test_config_refuses_values_that_would_fail_later(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_config_accepts_the_edges_of_the_ranges():
    c = load_config("smoke", ["data.crop_size=[64, 64]", "optim.grad_clip=0", "optim.poly_power=0", "optim.momentum=0",
                              "optim.weight_decay=0", "loss.ohem_thresh=1", "loss.ohem_min_kept=0",
                              "loss.class_weights=[0, 1.5, 2]", "data.eval_size=[64, 4096]"])
    assert c["optim"]["grad_clip"] == 0 and c["optim"]["poly_power"] == 0
    c = load_config("smoke", ["optim.momentum=0.999", "loss.class_weights=[0, 0, 1e-3]", "data.input_scale=0.05",
                              "train.cpu_threads=256"])
    assert (c["optim"]["momentum"], c["data"]["input_scale"], c["train"]["cpu_threads"]) == (0.999, 0.05, 256)
    with pytest.raises(ConfigError, match="nesterov=true needs optim.momentum > 0"):
        load_config("smoke", ["optim.nesterov=true", "optim.momentum=0"])


def test_run_checks_class_weights_and_the_batch_batchnorm_sees():
    """What only the run knows: the class count, the number of processes and the device. optim.batch_size is per
    process; without SyncBN each process normalises over its own batch, with SyncBN (GPUs only) over all of them."""
    from icnet_ros.train.config import validate_for_run

    eleven = load_config("smoke", ["loss.class_weights=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]"])
    validate_for_run(eleven, CAMVID_CLASSES)
    with pytest.raises(ConfigError, match="loss.class_weights has 2 weights but the dataset has 11 classes"):
        validate_for_run(load_config("smoke", ["loss.class_weights=[1, 2]"]), CAMVID_CLASSES)
    one_sync = load_config("smoke", ["optim.batch_size=1", "train.sync_bn=true"])  # may be fine: needs the run
    validate_for_run(one_sync, CAMVID_CLASSES, world_size=2, device_type="cuda")  # SyncBN over 2 samples
    with pytest.raises(ConfigError, match="BatchNorm .* no effect with 1 process"):
        validate_for_run(one_sync, CAMVID_CLASSES, world_size=1, device_type="cuda")
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA GPUs"):
        validate_for_run(one_sync, CAMVID_CLASSES, world_size=2, device_type="cpu")
    with pytest.raises(ConfigError, match="optim.batch_size 1"):  # 4 processes without SyncBN: still 1 per BN
        load_config("smoke", ["optim.batch_size=1", "train.sync_bn=false"])


def test_config_names_are_found_in_a_pip_installs_share_folder(tmp_path, monkeypatch):
    """pip puts setup.py's data_files, config/train/*.yaml among them, under <prefix>/share/icnet_ros: `icnet-train
    smoke` in a pip install (no source tree, no ament index) found no config by name."""
    from icnet_ros.train.config import find_config

    share = tmp_path / "share" / "icnet_ros" / "config" / "train"
    share.mkdir(parents=True)
    (share / "only_installed.yaml").write_text((REPO / "config" / "train" / "smoke.yaml").read_text())
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert find_config("only_installed") == share / "only_installed.yaml"


def test_no_arguments_reports_only_the_config_missing(capsys):
    """The overrides are optional ([KEY=VALUE ...] in the usage): before, 'icnet-train' alone said 'the following
    arguments are required: config, KEY=VALUE'."""
    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1] == \
        "icnet-train: error: the following arguments are required: config", err
    assert main(["smoke", "--print-config"]) == 0 and "iterations:" in capsys.readouterr().out


def test_output_dir_with_a_file_in_the_way_is_a_config_error(tmp_path, capsys):
    """train.output_dir naming a file, or a folder below one, is refused with the other config checks: before, the
    run was built and creating the folder raised a 12-line FileExistsError traceback (exit 1)."""
    (tmp_path / "env.sh").write_text("export X=1\n")
    for out, message in ((tmp_path / "env.sh", "is a file, not a folder"),
                         (tmp_path / "env.sh" / "run", f"{tmp_path / 'env.sh'} is a file, not a folder")):
        with pytest.raises(ConfigError, match=re.escape(f"train.output_dir {out}: {message}")):
            load_config("smoke", [f"train.output_dir={out}"])
        assert main(["smoke", f"train.output_dir={out}", "optim.iterations=1"]) == 2
        err = capsys.readouterr().err
        assert err == f"icnet-train: error: train.output_dir {out}: {message}\n", err
    load_config("smoke", [f"train.output_dir={tmp_path / 'new' / 'run'}"])  # a folder still to be made is fine
    assert not (tmp_path / "new").exists()


def test_bad_values_found_while_building_are_one_line_errors(tmp_path, capsys):
    """Before training starts, without a traceback: the class count, a network width checkpoints cannot record
    (data.input_scale), and a model value the architecture cannot take (dropout probability 1.5)."""
    root = require(CAMVID)
    for override, message in [("loss.class_weights=[1, 2]", "loss.class_weights has 2 weights but the dataset has 11"),
                              ("data.input_scale=10", "network width 4800 .* above the 4096"),
                              # a scale the config allows but that makes CamVid's frames smaller than the network's
                              # minimum input (it trained on them, padded to the crop)
                              ("data.input_scale=0.15", r"data.input_scale 0.15 brings the training frames \(480x360, "
                               r"the first\) to 72x54, below the network's minimum input of 64 pixels a side \(use "
                               r"data.input_scale >= 0.18\)"),
                              ("data.input_scale=1e-9", r"data.input_scale 1e-09 brings the training frames "
                               r"\(480x360, the first\) to 0x0, below"),  # (before: trained on 1x1 frames, exit 0)
                              ("data.base_size=[40, 40]", r"data.base_size \[40, 40\] brings the training frames "
                               r"\(480x360, the first\) to 40x30, below"),
                              # the largest random resize past the image files' bound: OpenCV was asked for
                              # 130 GB at the first batch (a traceback, or swapping without a memory limit)
                              ("data.ratio_range=[1000,1000]", r"data.ratio_range \[1000, 1000\] with data.input_scale "
                               r"0.5 resizes the training frames \(480x360, the first\) up to 240000x180000, more than "
                               r"200 megapixels"),
                              ("model.aux_dropout=1.5", r"aux_dropout must be in \[0, 1\), got 1.5")]:
        out = tmp_path / override.partition("=")[0]
        assert main(["smoke", f"data.root={root}", f"train.output_dir={out}", override, *FAST]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and err.count("icnet-train: error:") == 1, err
        assert not (out / "metrics.jsonl").exists() and not (out / STATE_FILE).exists()


def test_resume_drops_a_partial_last_log_line_and_refuses_a_damaged_middle(tmp_path):
    """A run killed while appending leaves a partial last line: dropped with a warning. A bad line elsewhere was not
    left by an append: resuming is refused and the file left as it was."""
    from icnet_ros.checkpoint import CheckpointError
    from icnet_ros.train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"kind": "train", "iter": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)]
    path.write_text("".join(good) + '{"kind": "train", "iter": 4, "lo', encoding="utf-8")
    messages = []
    MetricsLog(tmp_path, tensorboard=False).truncate(2, warn=messages.append)
    assert path.read_text(encoding="utf-8") == "".join(good[:2])
    assert len(messages) == 1 and "dropped a partial last line" in messages[0]
    with pytest.warns(UserWarning, match="partial last line"):  # default: warnings.warn
        path.write_text("".join(good) + '{"kind": "tr', encoding="utf-8")
        MetricsLog(tmp_path, tensorboard=False).truncate(3)
    assert path.read_text(encoding="utf-8") == "".join(good)
    damaged = good[0] + '{"kind": "tr\n' + good[1]
    path.write_text(damaged, encoding="utf-8")
    with pytest.raises(CheckpointError, match="metrics.jsonl, line 2: not a JSON record"):
        MetricsLog(tmp_path, tensorboard=False).truncate(2)
    assert path.read_text(encoding="utf-8") == damaged
    # CSV logs: a last row without its line end is partial too
    csv_path = tmp_path / "train_log.csv"
    csv_path.write_text("iter,loss\n1,0.5\n2,0.4\n3,0", encoding="utf-8")
    MetricsLog(tmp_path, fmt="csv", tensorboard=False).truncate(5, warn=messages.append)
    assert csv_path.read_text(encoding="utf-8") == "iter,loss\n1,0.5\n2,0.4\n" and "partial last row" in messages[-1]


def test_poly_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = PolyLR(opt, lr=0.01, iterations=100, power=0.9, min_lr=1e-4)
    assert s.step(0) == pytest.approx(0.01) and opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert s.lr_at(50) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert s.lr_at(100) == pytest.approx(1e-4) and s.lr_at(150) == pytest.approx(1e-4)
    w = PolyLR(opt, lr=0.01, iterations=100, power=1.0, min_lr=0.0, warmup_iters=10, warmup_ratio=0.1)
    assert w.lr_at(0) == pytest.approx(0.001) and w.lr_at(5) == pytest.approx(0.0095 * 0.55)
    assert w.lr_at(10) == pytest.approx(0.009)


def test_pretrained_backbones():
    config = load_config("camvid_effnet_lite0")
    arch = model_config(config, CAMVID_CLASSES)
    try:
        from icnet_ros.models.efficientnet import IMAGENET_NORMALIZATION, load_imagenet_state_dict

        reference = load_imagenet_state_dict("efficientnet_lite0")
    except ModuleNotFoundError as e:
        pytest.skip(f"EfficientNet-Lite0 ImageNet weights not installed: {e}")
    model = build_model(config, arch, log=lambda _msg: None)
    stem = model.backbone.backbone.state_dict()
    shared = [k for k in reference if k in stem]
    assert len(shared) > 50 and all(torch.equal(stem[k], reference[k]) for k in shared)
    from icnet_ros.train import normalization_for

    assert normalization_for(arch) == IMAGENET_NORMALIZATION
    resnet = load_config("smoke", ["model.pretrained=imagenet"])
    with pytest.raises(ConfigError, match="efficientnet_lite"):
        build_model(resnet, model_config(resnet, CAMVID_CLASSES))


# ------------------------------------------------------------------------------------------------ runs


def test_run_outputs_metadata_and_exact_resume(tmp_path):
    common = ["optim.iterations=6", "train.checkpoint_interval=3", "train.eval_interval=3", "train.log_interval=1"]
    full = _smoke(tmp_path / "full", *common)
    for name in ("best.safetensors", "last.safetensors", STATE_FILE, "metrics.jsonl", "config.yaml",
                 "summary.json"):
        assert (full / name).is_file(), name
    # native checkpoint with complete metadata
    model = load_model(full / "last.safetensors")
    meta = model.meta
    assert meta["classes"] == list(CAMVID_CLASSES.classes) and meta["normalization"] == MMSEG_NORMALIZATION
    assert meta["input_size"] == [180, 240]  # 480x360 CamVid at data.input_scale 0.5
    assert meta["network_width"] == 256  # 480 x 0.5 = 240, rounded to a multiple of 32
    assert "license" not in meta  # the smoke config records none
    prov = meta["provenance"]
    assert prov["iterations"] == 6 and prov["config"]["optim"]["iterations"] == 6
    assert "smoke" in prov["command"] and prov["hardware"]["device"] == "cpu" and prov["wall_time_s"] > 0
    assert "git_commit" in prov and 0 <= prov["val_mIoU"] <= 100 and prov["val_iteration"] == 6
    best = load_model(full / "best.safetensors").meta["provenance"]
    val = _records(full, "val")
    assert [r["iter"] for r in val] == [3, 6]
    assert best["val_mIoU"] == max(r["mIoU"] for r in val) and best["iterations"] == best["best_iteration"]
    train = _records(full, "train")
    sched = PolyLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), 0.01, 6, 0.9, 1e-4)
    assert [r["iter"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in train] == pytest.approx([sched.lr_at(i) for i in range(6)])
    assert all({"loss_main", "loss_sub24", "loss_sub12", "train_mIoU"} <= set(r) for r in train)
    state = torch.load(full / STATE_FILE, weights_only=True)  # plain tensors and containers only
    assert state["iteration"] == 6 and state["scheduler"]["last_iter"] == 5 and len(state["rng"]) == 1

    # interrupted at 3 (a time-limited job), then resumed: the same schedule, data order and RNG
    part = _smoke(tmp_path / "part", *common, "train.stop_at=3")
    summary = json.loads((part / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["finished"] is False
    with open(part / "metrics.jsonl", "a", encoding="utf-8") as f:  # as if it crashed after logging iteration 4
        f.write(json.dumps({"kind": "train", "iter": 4, "lr": 0.5, "loss": 99.0}) + "\n")
    # the state holds the weights: a last.safetensors lost to an interrupt (or a full disk) after the state was
    # written does not make the run impossible to resume (it was written first, then the state: a gap between them
    # left weights of one iteration beside a state of another, and every resume was refused)
    (part / "last.safetensors").write_bytes(b"cut short")
    _smoke(tmp_path / "part", *common, "train.resume=auto")
    assert [r["iter"] for r in _records(part, "train")] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(train, _records(part, "train")):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    wa, wb = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6) for k in wa)
    assert torch.load(part / STATE_FILE, weights_only=True)["optimizer"]["param_groups"][0]["lr"] == \
        pytest.approx(sched.lr_at(5))

    # resuming into another architecture is refused with a clear message
    with pytest.raises(ConfigError, match="architecture"):
        from icnet_ros.train import Trainer

        Trainer(load_config("smoke", [f"data.root={CAMVID}", f"train.output_dir={part}", "model.width=0.5",
                                      "train.resume=auto", *FAST])).train()


def test_lovasz_term_is_trained_and_logged(tmp_path):
    run = _smoke(tmp_path / "lovasz", "optim.iterations=2", "train.log_interval=1", "loss.lovasz_weight=0.5")
    train = _records(run, "train")
    assert [r["iter"] for r in train] == [1, 2]
    assert all(0 < r["loss_lovasz"] <= 1 for r in train)  # a Jaccard loss surrogate: in [0, 1]
    assert load_model(run / "last.safetensors").meta["provenance"]["config"]["loss"]["lovasz_weight"] == 0.5


def test_boundary_weight_changes_the_cross_entropy_and_is_recorded(tmp_path):
    # same seed, same first batch and weights: only the pixel weighting of the cross entropy differs
    plain = _records(_smoke(tmp_path / "plain", "optim.iterations=1", "train.log_interval=1"), "train")[0]
    run = _smoke(tmp_path / "edge", "optim.iterations=1", "train.log_interval=1", "loss.boundary_weight=10.0",
                 "loss.boundary_radius=2")
    edge = _records(run, "train")[0]
    assert edge["loss_main"] != pytest.approx(plain["loss_main"], rel=1e-4)
    loss = load_model(run / "last.safetensors").meta["provenance"]["config"]["loss"]
    assert (loss["boundary_weight"], loss["boundary_radius"]) == (10.0, 2)


def test_model_ema_update():
    """ema <- d * ema + (1 - d) * model for parameters and float buffers (BN statistics); integer buffers copied."""
    from icnet_ros.train.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEMA(model, 0.75)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    model.train()
    model(torch.randn(2, 3, 5, 5))  # BN statistics move, num_batches_tracked 0 -> 1
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    now = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * start[k] + 0.25 * now[k]), k
        else:
            assert torch.equal(v, now[k]), k
    assert int(ema.state_dict()["1.num_batches_tracked"]) == 1
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, 1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config("smoke", ["optim.ema_decay=1.0"])


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path):
    """optim.ema_decay: the checkpoints hold the average of the weights the plain run goes through (the same
    training trajectory: averaging draws no random numbers), the state the raw weights; resume is exact."""
    from icnet_ros.train import Trainer

    d = 0.6
    common = ["optim.iterations=2", "train.checkpoint_interval=1", "train.eval_interval=1", "train.log_interval=1"]
    w0 = {k: v.clone() for k, v in Trainer(load_config("smoke", [f"data.root={require(CAMVID)}", *FAST, *common,
          f"train.output_dir={tmp_path / 'init'}"])).model.state_dict().items()}
    plain1 = load_file(str(_smoke(tmp_path / "p1", *common, "train.stop_at=1") / "last.safetensors"))
    plain2 = load_file(str(_smoke(tmp_path / "p2", *common) / "last.safetensors"))
    ema = _smoke(tmp_path / "ema", *common, f"optim.ema_decay={d}")
    averaged = load_file(str(ema / "last.safetensors"))
    raw = torch.load(ema / STATE_FILE, weights_only=True)["model_weights"]
    floats = [k for k, v in averaged.items() if v.is_floating_point()]
    assert floats and averaged.keys() == plain2.keys()
    for k in floats:
        want = d * d * w0[k] + d * (1 - d) * plain1[k] + (1 - d) * plain2[k]
        assert torch.allclose(averaged[k], want, rtol=1e-4, atol=1e-6), k
        assert torch.allclose(raw[k], plain2[k], rtol=1e-4, atol=1e-6), k
    assert any(not torch.allclose(averaged[k], plain2[k]) for k in floats)  # the average is not the last step
    # validation measured the average: best.safetensors is one of the averaged checkpoints
    best = load_file(str(ema / "best.safetensors"))
    assert load_model(ema / "best.safetensors").meta["provenance"]["config"]["optim"]["ema_decay"] == d
    best_iter = load_model(ema / "best.safetensors").meta["provenance"]["iterations"]
    after1 = {k: d * w0[k] + (1 - d) * plain1[k] for k in floats}
    assert all(torch.allclose(best[k], (averaged if best_iter == 2 else after1)[k], rtol=1e-4, atol=1e-6)
               for k in floats)

    # interrupted after iteration 1, resumed: the same average and the same raw weights
    _smoke(tmp_path / "part", *common, f"optim.ema_decay={d}", "train.stop_at=1")
    _smoke(tmp_path / "part", *common, f"optim.ema_decay={d}", "train.resume=auto")
    resumed = load_file(str(tmp_path / "part" / "last.safetensors"))
    raw_resumed = torch.load(tmp_path / "part" / STATE_FILE, weights_only=True)["model_weights"]
    for k in floats:
        assert torch.allclose(resumed[k], averaged[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(raw_resumed[k], raw[k], rtol=1e-4, atol=1e-6), k


def test_time_limit_stops_resumably_after_a_validation(tmp_path, capsys):
    """train.time_limit (for jobs with a wall-clock budget): stop early, validate, save the state; resume finishes."""
    common = ["optim.iterations=5", "train.checkpoint_interval=100", "train.eval_interval=100",
              "train.log_interval=100"]
    run = _smoke(tmp_path / "run", *common, "train.time_limit=0.001")
    assert "train.time_limit (0.001 s) reached at iteration 1" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["finished"] is False
    assert [r["iter"] for r in _records(run, "val")] == [1]  # validated at the stop: best.safetensors is current
    assert load_model(run / "best.safetensors").meta["provenance"]["iterations"] == 1
    assert torch.load(run / STATE_FILE, weights_only=True)["iteration"] == 1
    _smoke(tmp_path / "run", *common, "train.resume=auto")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 5 and summary["finished"] is True
    assert [r["iter"] for r in _records(run, "val")] == [1, 5]
    with pytest.raises(ConfigError, match="time_limit"):
        load_config("smoke", ["train.time_limit=0"])


@pytest.mark.slow
def test_overfits_two_camvid_frames(tmp_path, capsys):
    """2 frames, whole frames at 96x128 (multiples of 32, as validation runs), no augmentation: train mIoU must climb
    far above chance (~5%). (300 iterations, 16 s here: loss 1.15 -> 0.24, train mIoU 32 -> 81, eval 66.3; 250 were
    not enough for the loss bound. It ran at 192x256 before: 200 iterations, 25 s, loss 1.12 -> 0.25, train mIoU
    31 -> 71, eval 67.4.)"""
    run = _smoke(tmp_path / "overfit", "data.val_split=train", "data.input_scale=0.26666667",
                 "data.crop_size=[96, 128]", "data.ratio_range=[1, 1]",
                 "data.flip=0", "data.photometric=false", "optim.iterations=300", "optim.lr=0.2", "optim.min_lr=0",
                 "optim.weight_decay=0", "train.eval_interval=300", "train.log_interval=50",
                 "train.checkpoint_interval=300")
    train = _records(run, "train")
    val = _records(run, "val")[-1]
    with capsys.disabled():
        print(f"\noverfit: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, train mIoU (train mode, "
              f"last 50 iterations) {train[0]['train_mIoU']} -> {train[-1]['train_mIoU']}, eval-mode mIoU on the "
              f"2 frames {val['mIoU']}")
    assert train[-1]["loss"] < 0.25 * train[0]["loss"]
    assert train[-1]["train_mIoU"] > 65.0
    # the saved model, evaluated by icnet-eval on those frames, reproduces the in-training validation
    assert val["mIoU"] > 60.0
    from icnet_ros.evaluate import main as eval_main

    capsys.readouterr()
    assert eval_main(["--model", str(run / "best.safetensors"), "--data", str(CAMVID), "--split", "train",
                      "--limit", "2", "--workers", "0", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # input_size auto: the recorded network width (128; the frames are 360x480 -> 96x128), as validation ran
    assert report["mIoU"] == pytest.approx(val["mIoU"], abs=1e-3) and report["input_policy"] == "auto (width 128)"


def test_checkpoints_record_network_width_and_license(tmp_path):
    """network_width follows the working scale (data.input_scale x the frames' width, or data.eval_size), rounded to
    a multiple of 32; data.license is recorded as the weights' license."""
    one = ["optim.iterations=1", "train.eval_interval=1", "train.checkpoint_interval=1", "data.val_limit=1"]
    licence = "CC BY-NC 4.0 (trained on CamVid; non-commercial use only)"
    run = _smoke(tmp_path / "x15", *one, "data.input_scale=1.5", "data.val_split=null", f"data.license={licence}")
    meta = load_model(run / "last.safetensors").meta
    assert meta["network_width"] == 736 and meta["license"] == licence  # 480 x 1.5 = 720 -> 736
    # validated at a fixed data.eval_size: that size is recorded and input_size auto runs it (a recorded width made
    # auto run 352x480 frames at 96x160's width, 128x160 here: other sizes than the ones that chose the checkpoint)
    run = _smoke(tmp_path / "eval_size", *one, "data.eval_size=[96, 160]")
    meta = load_model(run / "best.safetensors").meta
    assert "network_width" not in meta and meta["input_size"] == [96, 160]
    from icnet_ros.sizes import InputSizePolicy

    policy = InputSizePolicy.from_option("auto", meta)
    assert (policy.kind, policy.param) == ("fixed", (96, 160))


def test_crop_size_off_the_network_grid_warns(tmp_path, capsys):
    _smoke(tmp_path / "grid", "data.crop_size=[100, 150]", "optim.iterations=1", "train.eval_interval=1",
           "train.checkpoint_interval=1", "data.val_limit=1")
    err = capsys.readouterr().err
    assert "data.crop_size 100x150 is not a multiple of 32" in err and "data.crop_size=[96,160]" in err
    _smoke(tmp_path / "on_grid", "data.crop_size=[96, 160]", "optim.iterations=1", "train.eval_interval=1",
           "train.checkpoint_interval=1", "data.val_limit=1")
    assert "not a multiple of 32" not in capsys.readouterr().err


def test_torchrun_two_processes_gloo_replicas_in_sync(tmp_path):
    root = require(CAMVID)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "icnet_ros.train",
         "config/train/smoke.yaml", f"data.root={root}", f"train.output_dir={out}", "optim.iterations=4",
         "train.eval_interval=4", "train.log_interval=2", "train.checkpoint_interval=4", "train.log_format=csv",
         *FAST], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 4
    digests = summary["replica_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["replicas_in_sync"]
    # the digest is that of the saved weights, and training changed them
    model = load_model(out / "last.safetensors")
    assert parameter_digest(model) == digests[0]
    assert model.meta["provenance"]["hardware"]["processes"] == 2
    torch.manual_seed(0)
    assert parameter_digest(build_icnet_like(model)) != digests[0]
    # CSV logs: one row per logged iteration, the validation after the last
    train_csv = (out / "train_log.csv").read_text().splitlines()
    assert train_csv[0].startswith("iter,lr,loss") and len(train_csv) == 3
    assert len((out / "val_log.csv").read_text().splitlines()) == 2


def test_init_from_checkpoint_with_other_classes(tmp_path):
    from helpers import make_checkpoint
    from icnet_ros.classes import CITYSCAPES
    from icnet_ros.train import init_from_checkpoint

    src = load_model(make_checkpoint(tmp_path / "src.safetensors", num_classes=11))
    config = load_config("smoke", [f"model.init_from={tmp_path / 'src.safetensors'}"])
    messages = []
    model = build_model(config, model_config(config, CITYSCAPES), log=messages.append)
    theirs, ours = src.state_dict(), model.state_dict()
    assert torch.equal(ours["backbone.conv_sub1.0.conv.weight"], theirs["backbone.conv_sub1.0.conv.weight"])
    assert torch.equal(ours["neck.cff_12.conv_low.bn.running_var"], theirs["neck.cff_12.conv_low.bn.running_var"])
    assert ours["decode_head.conv_seg.weight"].shape[0] == 19  # classifier kept fresh
    assert "kept fresh: auxiliary_head.0.conv_seg.bias" in messages[0]
    with pytest.raises(Exception, match="checkpoint not found"):
        init_from_checkpoint(model, str(tmp_path / "missing.safetensors"))


def test_init_from_takes_a_home_relative_path_and_refuses_a_damaged_file(tmp_path, monkeypatch, capsys):
    """model.init_from=~/x.safetensors passed the metadata check (which expands ~) and then ended in a 39-line
    FileNotFoundError traceback; tensors holding NaN (a diverged run) were copied in unchecked. The file is read as
    every checkpoint is now: ~ expanded, damage a one-line CheckpointError from icnet-train (exit status 2)."""
    from helpers import make_checkpoint
    from icnet_ros.train import init_from_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    src = load_model(make_checkpoint(tmp_path / "src.safetensors", num_classes=11))
    config = load_config("smoke", [])
    model = build_model(config, model_config(config, CAMVID_CLASSES), log=lambda m: None)
    messages = []
    init_from_checkpoint(model, "~/src.safetensors", log=messages.append)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    assert messages[0].startswith(f"initialised {len(src.state_dict())}/")
    from icnet_ros.checkpoint import save_checkpoint

    with torch.no_grad():
        src.backbone.conv_sub1[0].conv.weight.fill_(float("nan"))
    save_checkpoint(src, tmp_path / "nan.safetensors", src.meta)
    assert main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={tmp_path / 'run'}", *FAST,
                 "model.init_from=~/nan.safetensors"]) == 2
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'nan.safetensors'}: tensor backbone.conv_sub1.0.conv.weight holds NaN or infinite values"
            in err and "Traceback" not in err), err


def test_label_values_no_class_claims_are_reported_before_training(tmp_path, capsys):
    """A dataset whose labels hold a value no class claims (road exported as 40) trained with exit status 0 and
    no word, road never learnt; the run now says so at start, per split."""
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / split / "images" / f"f{i}.png"), np.full((64, 96, 3), 40 * i, np.uint8))
            label = np.full((64, 96), 3 if split == "val" else 40, np.uint8)
            label[:, :48] = 0
            cv2.imwrite(str(tmp_path / split / "labels" / f"f{i}.png"), label)
    assert main(["smoke", f"data.root={tmp_path}", f"train.output_dir={tmp_path / 'run'}", *FAST,
                 "optim.iterations=1", "train.eval_interval=1", "data.input_scale=1", "data.crop_size=[64, 96]"]) == 0
    err = capsys.readouterr().err
    assert ("[icnet-train] warning: train split: label values 40 belong to no class of 'camvid' (its classes take "
            "0..10; 255 is ignore): 2 of the 2 label files checked hold them") in err, err
    assert "val split: label values" not in err


def test_fine_tuning_records_the_starting_checkpoint(tmp_path):
    """A model trained in stages keeps the whole chain in its provenance (checkpoint, SHA-256, its provenance)."""
    import hashlib

    from helpers import make_checkpoint

    start = make_checkpoint(tmp_path / "stage1.safetensors", provenance={"source": "icnet-train", "command": "stage 1",
                                                                        "val_mIoU": 12.5})
    run = _smoke(tmp_path / "stage2", f"model.init_from={start}", "optim.iterations=2", "train.eval_interval=2",
                 "train.checkpoint_interval=2")
    prov = load_model(run / "best.safetensors").meta["provenance"]
    assert prov["command"] != "stage 1" and prov["config"]["model"]["init_from"] == str(start)
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    assert prov["initialised_from"] == {"checkpoint": str(start), "sha256": digest, "source": "icnet-train",
                                       "command": "stage 1", "val_mIoU": 12.5}
    # a third stage nests the second's record, which holds the first's
    run3 = _smoke(tmp_path / "stage3", f"model.init_from={run / 'best.safetensors'}", "optim.iterations=1",
                  "train.eval_interval=1", "train.checkpoint_interval=1")
    chain = load_model(run3 / "best.safetensors").meta["provenance"]["initialised_from"]
    assert chain["checkpoint"] == str(run / "best.safetensors")
    assert chain["initialised_from"]["command"] == "stage 1"
    # without model.init_from there is nothing to record
    assert "initialised_from" not in load_model(start).meta["provenance"]


def build_icnet_like(model):
    from icnet_ros.models import build_icnet

    return build_icnet(model.config)


def test_a_fresh_run_does_not_start_in_another_runs_folder(tmp_path, capsys):
    """Without train.resume a run in a folder holding another run replaced its best.safetensors by a worse one and
    appended to its logs: refused before anything is written; train.resume=auto continues it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.safetensors").write_bytes(b"an earlier run's best model")
    for extra in ([], ["train.resume=auto"]):  # auto without a state starts fresh: also not among another run's files
        assert main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", *FAST, *extra]) == 2
        err = capsys.readouterr().err
        assert f"train.output_dir {out} holds another run (best.safetensors): choose another" in err, err
    assert (out / "best.safetensors").read_bytes() == b"an earlier run's best model"
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors"]


def test_resume_keeps_its_own_record_and_takes_the_configs_optimizer(tmp_path):
    """A resumed run takes model.init_from's record from its state (the file may have moved or changed), the
    config's momentum and weight decay (they were silently the saved ones while provenance recorded the new),
    and without data.license keeps init_from's license; non-finite weights are never saved over good ones; a state
    written before the weights moved into it still resumes (from last.safetensors)."""
    from icnet_ros.checkpoint import file_sha256, read_metadata
    from icnet_ros.train import Trainer

    from helpers import make_checkpoint

    licence = "CC BY-NC 4.0 (test weights)"
    init = make_checkpoint(tmp_path / "init.safetensors", license=licence)
    sha = file_sha256(init)
    run = tmp_path / "run"
    common = [f"data.root={require(CAMVID)}", f"train.output_dir={run}", *FAST, "optim.iterations=3",
              "train.checkpoint_interval=1", "train.eval_interval=5", "train.log_interval=1",
              f"model.init_from={init}"]
    assert main(["smoke", *common, "train.stop_at=1"]) == 0
    assert read_metadata(run / "last.safetensors")["license"] == licence  # inherited, and said so
    init.unlink()  # moved away: resume needs neither its weights nor its record
    trainer = Trainer(load_config("smoke", [*common, "train.resume=auto", "optim.momentum=0.5",
                                            "optim.weight_decay=0"]))
    assert trainer.resume("auto")
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 0.0)
    assert trainer.provenance(1, None)["initialised_from"]["sha256"] == sha and trainer.license == licence

    before = (run / STATE_FILE).read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="training diverged: non-finite weights"):
        trainer.save_state(1)
    assert (run / STATE_FILE).read_bytes() == before

    # with weight averaging the average lags the diverged weights (still finite): the trained weights count too
    averaging = Trainer(load_config("smoke", [f"data.root={CAMVID}", f"train.output_dir={tmp_path / 'ema'}", *FAST,
                                              "optim.ema_decay=0.9"]))
    with torch.no_grad():
        next(averaging.model.parameters()).view(-1)[0] = float("inf")
    assert all(torch.isfinite(v).all() for v in averaging.ema.module.state_dict().values() if v.is_floating_point())
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        averaging.save_state(0)
    assert not (tmp_path / "ema" / STATE_FILE).exists()

    state = torch.load(run / STATE_FILE, weights_only=True)  # as written before this change
    for key in ("model_weights", "ema_weights", "arch", "license", "initialised_from"):
        state.pop(key)
    torch.save(state, run / STATE_FILE)
    legacy = Trainer(load_config("smoke", [*common[:-1], "train.resume=auto"]))
    assert legacy.resume("auto")
    saved = load_file(str(run / "last.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in legacy.model.state_dict().items())


def test_resume_into_another_folder_brings_the_best_checkpoint(tmp_path, capsys):
    """train.resume=<another run's folder> with a new train.output_dir took the best mIoU from the state but not the
    checkpoint that reached it: the new folder had no best.safetensors while its summary named the best iteration
    (and a later, worse validation could not replace it). The resumed run's best.safetensors is copied; when it is
    not there (a state file on its own), the best is chosen afresh from the new run's validations."""
    common = ["smoke", f"data.root={require(CAMVID)}", *FAST, "optim.iterations=4", "train.eval_interval=2",
              "train.checkpoint_interval=2", "train.log_interval=1", "train.stop_at=2"]
    first = tmp_path / "first"
    assert main([*common, f"train.output_dir={first}"]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    assert main([*common, f"train.output_dir={moved}", f"train.resume={first}"]) == 0
    assert f"copied {first / 'best.safetensors'} (iteration 2, val mIoU" in capsys.readouterr().err
    assert (moved / "best.safetensors").read_bytes() == (first / "best.safetensors").read_bytes()
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["best_iteration"] == 2 and summary["best_val_mIoU"] is not None
    # nothing was left to train (stop_at 2): the state is saved in the new folder all the same, so that it resumes
    # (before: no train_state.pt there, and train.resume=auto refused the folder as holding another run)
    assert main([*common[:-1], f"train.output_dir={moved}", "train.resume=auto"]) == 0
    assert f"resumed from {moved / STATE_FILE} at iteration 2" in capsys.readouterr().err
    assert json.loads((moved / "summary.json").read_text())["finished"] is True

    alone = tmp_path / "alone" / STATE_FILE  # the state without its folder
    alone.parent.mkdir()
    alone.write_bytes((first / STATE_FILE).read_bytes())
    fresh = tmp_path / "fresh"
    assert main([*common[:-1], f"train.output_dir={fresh}", f"train.resume={alone}"]) == 0
    err = capsys.readouterr().err
    assert f"cannot come with it: no {alone.parent / 'best.safetensors'}; best.safetensors is chosen afresh" in err, err
    assert load_model(fresh / "best.safetensors").meta["provenance"]["iterations"] == 4  # its only validation
    assert json.loads((fresh / "summary.json").read_text())["best_iteration"] == 4


def test_an_unreadable_training_state_is_one_line(tmp_path, capsys):
    """A file that is not a training state gave a 9-line error quoting torch's advice to load it with
    weights_only=False (unsafe, and not an option of icnet-train). One line names the file and says why."""
    import pathlib

    garbage, empty, objects = tmp_path / "junk.pt", tmp_path / "empty.pt", tmp_path / "objects.pt"
    garbage.write_text("garbage\n")
    empty.write_bytes(b"")
    torch.save({"version": 1, "path": pathlib.PurePosixPath("/x")}, objects)
    for path, why in ((garbage, "not a file written by torch.save"), (empty, "empty or cut short"),
                      (objects, "it holds a pathlib.PurePosixPath object: a training state holds only tensors and "
                                "plain values")):
        out = tmp_path / f"run_{path.stem}"
        assert main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", *FAST,
                     f"train.resume={path}"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"icnet-train: error: {path}: not a readable training state ({why})", err
        assert err.count("\n") - err.count("[icnet-train]") == 1 and "weights_only" not in err, err


def _signal_training_group(out, sig, *extra, before_signal=None, env=None):
    """Start a long smoke training run with one DataLoader worker in a process group of its own, send ``sig`` to
    the whole group once two iterations are logged (as a terminal's Ctrl-C or ``timeout`` does; after calling
    ``before_signal()``); returns (exit status, stderr)."""
    import time

    args = [sys.executable, "-m", "icnet_ros.train", "smoke", f"data.root={require(CAMVID)}",
            f"train.output_dir={out}", *FAST, "optim.iterations=1000", "train.log_interval=1",
            "train.checkpoint_interval=1000", "train.eval_interval=1000", "train.workers=1", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pytest.fail(f"no two iterations logged: {proc.communicate()}")
            time.sleep(0.1)
        if before_signal is not None:
            before_signal()
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return proc.returncode, err


def test_sigint_saves_the_state_and_the_run_resumes(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, DataLoader workers included) stops after the iteration in
    progress, saves the state and exits with status 130 without a traceback (before: a KeyboardInterrupt traceback,
    every iteration since the last checkpoint lost); the run then resumes."""
    import signal

    out = tmp_path / "run"
    rc, err = _signal_training_group(out, signal.SIGINT)
    assert rc == 130 and "Traceback" not in err, err
    stopped = torch.load(out / STATE_FILE, weights_only=True)["iteration"]
    assert any(f"SIGINT: stopping at iteration {stopped}, saving the state ({why})" in err  # (see the SIGTERM test)
               for why in ("Ctrl-C again to abort without saving", "the DataLoader workers stopped with it")), err
    assert f"stopped at iteration {stopped}" in err and f"train.resume={out}" in err
    assert max(r["iter"] for r in _records(out, "train")) == stopped
    assert main(["smoke", f"data.root={CAMVID}", f"train.output_dir={out}", *FAST, "optim.iterations=1000",
                 "train.log_interval=1", "train.eval_interval=1000", "train.resume=auto",
                 f"train.stop_at={stopped + 1}"]) == 0
    assert max(r["iter"] for r in _records(out, "train")) == stopped + 1


_SIGNAL_AT = """
import os, signal, sys
from icnet_ros.train import main
from icnet_ros.train.trainer import Trainer
at = int(sys.argv[1])
check = Trainer._stop_requested
def _stop_requested(self, deadline):  # right after iteration `at` is trained: a SIGINT (Ctrl-C) to this process
    if self.iteration == at:
        os.kill(os.getpid(), signal.SIGINT)
    return check(self, deadline)
Trainer._stop_requested = _stop_requested
sys.exit(main(sys.argv[2:]))
"""


def _same_run(a, b):
    """Two run folders hold the same validation records and bit-identical best / last weights."""
    assert _records(a, "val") == _records(b, "val")
    for name in ("best.safetensors", "last.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_a_stop_at_a_validation_iteration_validates_on_resume(tmp_path):
    """Ctrl-C during an iteration that validates skipped that validation but saved the state there: the resume
    went on from the next iteration, so that validation was lost for good (best.safetensors could differ from an
    uninterrupted run's); at the last iteration the stopped run said "finished at iteration 4" (exit 130) and wrote
    finished: true, and its resume did nothing. The state records the validation as due; the resume runs it first,
    and the result is bit-identical to an uninterrupted run's."""
    driver = tmp_path / "signal_at.py"
    driver.write_text(_SIGNAL_AT)
    common = [f"data.root={require(CAMVID)}", *FAST, "optim.iterations=4", "train.eval_interval=2",
              "train.checkpoint_interval=100", "train.log_interval=1", "train.cpu_threads=1"]
    full = _smoke(tmp_path / "full", *common)
    assert [r["iter"] for r in _records(full, "val")] == [2, 4]
    out = tmp_path / "run"

    def stopped_at(at, *extra):
        proc = subprocess.run([sys.executable, str(driver), str(at), "smoke", f"train.output_dir={out}", *common,
                               *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
        state = torch.load(out / STATE_FILE, weights_only=True)
        assert state["iteration"] == at and state["val_due"] is True
        return proc.stderr

    err = stopped_at(2)  # at a validation iteration mid-schedule
    assert "SIGINT: stopping at iteration 2" in err and f"stopped at iteration 2; outputs in {out}" in err, err
    assert _records(out, "val") == []
    err = stopped_at(4, "train.resume=auto")  # resumed: validates 2 first; then stopped at the last iteration
    assert [r["iter"] for r in _records(out, "val")] == [2]
    assert "iter 2: val mIoU" in err and err.index("iter 2: val mIoU") < err.index("SIGINT: stopping"), err
    assert "finished" not in err and f"stopped at iteration 4; outputs in {out} (resume: train.resume={out})" in err
    assert json.loads((out / "summary.json").read_text())["finished"] is False
    _smoke(out, *common, "train.resume=auto")
    assert json.loads((out / "summary.json").read_text())["finished"] is True
    assert torch.load(out / STATE_FILE, weights_only=True)["val_due"] is False  # a further resume does not repeat it
    _same_run(full, out)


def test_sigterm_to_the_process_group_saves_the_state(tmp_path):
    """SIGTERM to the whole process group (coreutils timeout, Slurm, systemd, kill -- -PGID) reached the
    DataLoader worker too: it died, and the run ended with "DataLoader worker (pid N) is killed by signal:
    Terminated", a traceback and nothing saved. The main process saves the state and exits with 143; the stop
    message says what a second signal does, or, when the loop was waiting for the worker's next batch as the
    signal ended it (more likely on a loaded machine), that the workers stopped with it."""
    import signal

    out = tmp_path / "run"
    rc, err = _signal_training_group(out, signal.SIGTERM, "train.cpu_threads=1")
    assert rc == 143 and "Traceback" not in err and "killed by signal" not in err, err
    stopped = torch.load(out / STATE_FILE, weights_only=True)["iteration"]
    assert any(f"SIGTERM: stopping at iteration {stopped}, saving the state ({why})" in err
               for why in ("a further SIGTERM is ignored; SIGINT aborts without saving",
                           "the DataLoader workers stopped with it")), err
    assert max(r["iter"] for r in _records(out, "train")) == stopped


@pytest.mark.parametrize("where", ["training", "validation"])
def test_sigterm_to_the_group_while_waiting_for_data_saves_the_state(tmp_path, where):
    """The group's SIGTERM ends the DataLoader worker while the loop waits for its next batch, or while validation
    waits for its images (the worker reads slowly here): the wait ends in a DataLoader error, taken as the stop it
    is: state saved, exit 143, one line (a worker that ignored SIGTERM instead hung the DataLoader's exit,
    icnet-eval's too; during validation the error was a traceback, exit 1, nothing saved)."""
    import signal
    import time

    hook = tmp_path / "hook"
    hook.mkdir()
    flag, waiting = tmp_path / "slow", tmp_path / "waiting"
    (hook / "sitecustomize.py").write_text(f"""
import os, time
import icnet_ros.data.datasets as datasets
_read = datasets.read_image
def read_image(path):
    while os.path.exists({str(flag)!r}) and {"/val/" if where == "validation" else ""!r} in str(path):
        open({str(waiting)!r}, "a").close()  # a read is held
        time.sleep(0.1)
    return _read(path)
datasets.read_image = read_image
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"

    def starve():
        flag.write_text("")
        seen, since = (out / "metrics.jsonl").read_text(), time.monotonic()
        while time.monotonic() - since < 3:  # until the batches read before are used up and the loop waits
            now = (out / "metrics.jsonl").read_text()
            seen, since = (now, time.monotonic()) if now != seen else (seen, since)
            time.sleep(0.1)

    def in_validation():
        flag.write_text("")  # from now on every validation image is held: the first validation (10) waits
        deadline = time.monotonic() + 60
        while not waiting.exists():
            assert time.monotonic() < deadline, "validation never started"
            time.sleep(0.05)
        time.sleep(0.5)
    rc, err = _signal_training_group(out, signal.SIGTERM, "train.cpu_threads=1",
                                     *(["train.eval_interval=10"] if where == "validation" else []),
                                     before_signal=starve if where == "training" else in_validation, env=env)
    assert rc == 143 and "Traceback" not in err, err
    stopped = torch.load(out / STATE_FILE, weights_only=True)["iteration"]
    assert f"SIGTERM: stopping at iteration {stopped}, saving the state (the DataLoader workers stopped with it)" \
        in err, err
    assert max(r["iter"] for r in _records(out, "train")) == stopped
    assert where == "training" or stopped == 10
    if where == "validation":  # the validation the stop ended is due: the resume runs it (it was lost for good)
        assert torch.load(out / STATE_FILE, weights_only=True)["val_due"] is True and _records(out, "val") == []
        flag.unlink()
        assert main(["smoke", f"data.root={CAMVID}", f"train.output_dir={out}", *FAST, "optim.iterations=1000",
                     "train.eval_interval=10", "train.resume=auto", "train.stop_at=10"]) == 0
        assert [r["iter"] for r in _records(out, "val")] == [10]
        assert torch.load(out / STATE_FILE, weights_only=True)["val_due"] is False


def _camvid_subset(root, counts):
    """A CamVid-layout copy (symbolic links) of the first frames of each split."""
    for split, n in counts.items():
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
        for stem in sorted(p.stem for p in (require(CAMVID) / split / "images").iterdir())[:n]:
            os.symlink(CAMVID / split / "images" / f"{stem}.jpg", root / split / "images" / f"{stem}.jpg")
            os.symlink(CAMVID / split / "labels" / f"{stem}.png", root / split / "labels" / f"{stem}.png")
    return root


def test_an_unreadable_training_frame_keeps_the_iterations_trained(tmp_path, capsys):
    """A training frame that cannot be read (a label of another size), first met mid-run: the run ended (exit 2)
    without saving the iterations trained, and train.resume=auto then refused the folder ('holds another run
    (metrics.jsonl)'). The state is saved first; once the file is fixed, the run continues."""
    root = _camvid_subset(tmp_path / "camvid", {"train": 6, "val": 2})
    bad = sorted((root / "train" / "labels").iterdir())[4]
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    bad.unlink()
    cv2.imwrite(str(bad), label[:-10])  # 10 rows short
    out = tmp_path / "run"
    common = ["smoke", f"data.root={root}", "data.train_limit=null", f"train.output_dir={out}", *FAST,
              "optim.iterations=6", "train.checkpoint_interval=100", "train.eval_interval=100", "train.log_interval=1"]
    assert main(common) == 2
    err = capsys.readouterr().err
    stopped = torch.load(out / STATE_FILE, weights_only=True)["iteration"]
    assert stopped >= 1 and max(r["iter"] for r in _records(out, "train")) == stopped
    assert f"{bad} is 480x350 (the training state at iteration {stopped} is saved: fix the file and continue " \
           "with train.resume=auto)" in err, err
    assert err.count("icnet-train: error:") == 1 and "Traceback" not in err, err
    bad.unlink()
    cv2.imwrite(str(bad), label)
    assert main([*common, "train.resume=auto"]) == 0
    assert f"resumed from {out / STATE_FILE} at iteration {stopped}" in capsys.readouterr().err
    assert [r["iter"] for r in _records(out, "train")] == list(range(1, 7))


@pytest.mark.parametrize("log_format", ["jsonl", "csv"])
def test_resume_auto_starts_afresh_among_the_logs_of_a_run_that_saved_no_state(tmp_path, capsys, log_format):
    """A run stopped before its first state (killed, or its first batch unreadable) leaves only its log:
    train.resume=auto refused the folder ('holds another run'), though there is nothing to continue. It starts
    afresh and drops those records, whatever format they are in (a csv run left a jsonl log it said it dropped);
    a run without train.resume is still refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iter": 5, "lr": 0.01, "loss": 3.0}) + "\n")
    common = ["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", *FAST, "optim.iterations=2",
              "train.log_interval=1", "train.eval_interval=100", f"train.log_format={log_format}"]
    assert main(common) == 2
    assert f"train.output_dir {out} holds another run (metrics.jsonl): choose another" in capsys.readouterr().err
    assert main([*common, "train.resume=auto"]) == 0
    assert "starting fresh (dropping the records in metrics.jsonl: that run saved no state)" in \
        capsys.readouterr().err
    assert (out / "metrics.jsonl").is_file() == (log_format == "jsonl")
    if log_format == "jsonl":
        assert [r["iter"] for r in _records(out, "train")] == [1, 2]
    else:
        assert (out / "train_log.csv").read_text().count("\n") == 3  # header + iterations 1, 2


def _run_without_labelled_pixels(tmp_path: Path, split: str, capsys: pytest.CaptureFixture, *overrides: str
                                 ) -> tuple[Path, str]:
    """A smoke run (exit status 0) whose ``split`` labels are all CamVid's void (11): no labelled pixel. Returns
    the run's folder and its stderr."""
    root = _camvid_subset(tmp_path / "camvid", {"train": 2, "val": 2})
    for path in (root / split / "labels").iterdir():
        void = np.full_like(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), 11)
        path.unlink()
        cv2.imwrite(str(path), void)
    out = tmp_path / "run"
    assert main(["smoke", f"data.root={root}", f"train.output_dir={out}", *FAST, "train.log_interval=1",
                 *overrides]) == 0
    return out, capsys.readouterr().err


def test_labels_without_a_labelled_pixel_are_reported_once_and_logged_as_null(tmp_path, capsys):
    """Labels that hold no labelled pixel (every one ignore: here CamVid's void) trained silently at loss 0;
    the train mIoU of such a window was written as a bare NaN, which is not JSON."""
    out, err = _run_without_labelled_pixels(tmp_path, "train", capsys, "optim.iterations=3", "train.eval_interval=100")
    assert err.count("warning: the training batches of iterations 1-1 have no labelled pixel") == 1, err
    assert err.count("no labelled pixel") == 1
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text
    assert [r["train_mIoU"] for r in _records(out, "train")] == [None, None, None]


def test_validation_without_a_labelled_pixel_says_there_is_no_best(tmp_path, capsys):
    """Validation labels without a labelled pixel (all CamVid's void): the mIoU is undefined and the progress line
    said "val mIoU nan (best 0.00 @0)", a best never measured. It says so, that there is no best yet, and warns once
    why."""
    out, err = _run_without_labelled_pixels(tmp_path, "val", capsys, "optim.iterations=2", "train.eval_interval=1")
    assert err.count("warning: the validation split 'val' has no labelled pixel (every label pixel is 255, ignore): "
                     "its mIoU is undefined and picks no best.safetensors") == 1, err
    for i in (1, 2):
        assert f"iter {i}: val mIoU n/a (no labelled pixel) (no best yet)\n" in err, err
    assert "nan" not in err and "best 0.00" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_mIoU"] is None and not (out / "best.safetensors").exists()


def test_interrupt_before_any_state_says_none_was_saved(tmp_path, capsys, monkeypatch):
    """A second Ctrl-C (or one before the loop) said 'the state saved last is in DIR' when no state was ever
    saved there."""
    from icnet_ros.train.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    common = ["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", *FAST, "optim.iterations=2"]
    monkeypatch.setattr(Trainer, "train", interrupted)
    assert main(common) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"icnet-train: interrupted; no training state was saved in {out}"
    monkeypatch.undo()
    assert main([*common, "train.stop_at=1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(Trainer, "train", interrupted)
    assert main([*common, "train.resume=auto"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"icnet-train: interrupted; the state saved last is in {out}"


def test_an_unreadable_validation_image_keeps_the_iterations_trained(tmp_path, capsys):
    """Validation files are first read at the first validation, maybe hours in: the state is saved before the
    error ends the run (none was: every iteration was lost); the error is one line naming the file."""
    root = tmp_path / "camvid"
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
        for stem in sorted(p.stem for p in (CAMVID / split / "images").iterdir())[:2]:
            os.symlink(CAMVID / split / "images" / f"{stem}.jpg", root / split / "images" / f"{stem}.jpg")
            os.symlink(CAMVID / split / "labels" / f"{stem}.png", root / split / "labels" / f"{stem}.png")
    bad = sorted((root / "val" / "images").iterdir())[1]  # (the first one is read at start: its size is recorded)
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[:3000])  # cut short: OpenCV decodes it (grey below the cut) and says so only on stderr
    out = tmp_path / "run"
    assert main(["smoke", f"data.root={root}", f"train.output_dir={out}", *FAST, "optim.iterations=4",
                 "train.eval_interval=2", "train.checkpoint_interval=100", "train.log_interval=1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {bad}: truncated JPEG" in err and "the training state at iteration 2 is saved" in err
    assert err.count("icnet-train: error:") == 1 and "Traceback" not in err, err
    assert torch.load(out / STATE_FILE, weights_only=True)["iteration"] == 2
    # fixed, the run continues with the validation that failed (the resume went on without it: lost for good), as
    # an uninterrupted run
    bad.unlink()
    bad.write_bytes(data)
    common = ["smoke", f"data.root={root}", *FAST, "optim.iterations=4", "train.eval_interval=2",
              "train.checkpoint_interval=100", "train.log_interval=1"]
    assert main([*common, f"train.output_dir={out}", "train.resume=auto"]) == 0
    assert [r["iter"] for r in _records(out, "val")] == [2, 4]
    assert main([*common, f"train.output_dir={tmp_path / 'full'}"]) == 0
    _same_run(tmp_path / "full", out)


def test_csv_log_keeps_columns_aligned_when_a_new_term_appears(tmp_path):
    """A resumed run with another loss term logs a new column: the header grows (rows were written under the old
    header, shifting every value after the new key into the wrong column)."""
    import csv

    from icnet_ros.train import MetricsLog

    log = MetricsLog(tmp_path, "csv", tensorboard=False)
    log.log("train", {"iter": 1, "loss": 1.5, "loss_main": 1.0})
    log.log("train", {"iter": 2, "loss": 2.5, "loss_lovasz": 0.25, "loss_main": 2.0})
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv", newline="")))
    assert rows == [{"iter": "1", "loss": "1.5", "loss_main": "1.0", "loss_lovasz": ""},
                    {"iter": "2", "loss": "2.5", "loss_main": "2.0", "loss_lovasz": "0.25"}]


@pytest.mark.parametrize("log_format", ["jsonl", "csv"])
def test_a_log_that_cannot_be_written_is_one_line(tmp_path, log_format):
    """A full disk (here a file size limit) while appending to the metrics log: a one-line CheckpointError
    (icnet-train's exit 2), not a 40-line OSError traceback from the middle of the loop."""
    from icnet_ros.checkpoint import CheckpointError
    from icnet_ros.train import MetricsLog

    name = "metrics.jsonl" if log_format == "jsonl" else "train_log.csv"
    state = tmp_path / STATE_FILE
    log = MetricsLog(tmp_path, log_format, tensorboard=False, state_file=state)
    log.log("train", {"iter": 1, "loss": 1.5})
    with file_size_limit((tmp_path / name).stat().st_size + 4):
        with pytest.raises(CheckpointError, match=re.escape(f"cannot write {tmp_path / name}: File too large; "
                                                            "no training state was saved yet")):
            log.log("train", {"iter": 2, "loss": 2.5})
        state.write_bytes(b"")  # (as far as the message goes)
        with pytest.raises(CheckpointError, match=re.escape(f"cannot write {tmp_path / name}: File too large; "
                                                            "the training state saved last is kept")):
            log.log("train", {"iter": 2, "loss": 2.5})


def test_a_full_disk_for_the_runs_config_file_is_one_line(tmp_path, capsys):
    """config.yaml is written as the run starts: a full disk there ended the run in an OSError traceback (exit 1);
    now one line, exit 2, like a checkpoint that cannot be written."""
    out, name = tmp_path / "run", "config.yaml"
    out.mkdir()
    (out / name).symlink_to("/dev/full")
    assert main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", "optim.iterations=2",
                 "train.log_interval=1", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert f"cannot write {out / name}: No space left on device; no training state was saved yet\n" in err, err


def test_a_full_disk_while_saving_the_state_is_one_line(tmp_path, capsys):
    """torch.save into a file that cannot grow raised a RuntimeError from its zip writer ('unexpected pos'): a
    traceback, exit 1. The state is serialised in memory and written with a plain write: one line, exit 2, nothing
    left behind (here a file size limit stands in for the full disk)."""
    out = tmp_path / "run"
    with file_size_limit(300_000):  # config.yaml fits, the training state does not
        rc = main(["smoke", f"data.root={require(CAMVID)}", f"train.output_dir={out}", "optim.iterations=2",
                   "train.checkpoint_interval=1", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"icnet-train: error: cannot write {out / STATE_FILE}: File too large; no "
                                    "training state was saved yet"), err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_the_random_resize_bound_takes_large_frames_at_the_default_ratio(tmp_path):
    """The bound on data.ratio_range's largest resize is for typos ([0.5, 20]), not for large camera frames: a
    4000x3200 frame (12.8 Mpx) at the default x2 is 51 Mpx, which trains (it was refused at the image files' 50 Mpx
    bound)."""
    from icnet_ros.train import Trainer

    for split in ("images", "labels"):
        (tmp_path / "train" / split).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "train" / "images" / "a.png"), np.zeros((3200, 4000, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "train" / "labels" / "a.png"), np.zeros((3200, 4000), np.uint8))
    common = ["smoke", [f"data.root={tmp_path}", "data.layout=camvid", "data.val_split=null",
                        "data.input_scale=1.0", f"train.output_dir={tmp_path / 'run'}", *FAST]]
    Trainer(load_config(common[0], [*common[1], "data.ratio_range=[0.5, 2.0]"]), ["icnet-train"])
    with pytest.raises(ConfigError, match=r"data.ratio_range \[0.5, 20\] .* up to 80000x64000, more than 200"):
        Trainer(load_config(common[0], [*common[1], "data.ratio_range=[0.5, 20]"]), ["icnet-train"])


def test_git_commit_is_none_for_a_copy_inside_another_repository(tmp_path):
    """The package installed into a folder another repository ignores (a project's .venv, a workspace's install/):
    git finds that repository, whose commit was recorded (as clean) in every checkpoint."""
    import shutil

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("site/\n")
    subprocess.run([*git, "add", ".gitignore"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    shutil.copytree(REPO / "icnet_ros", tmp_path / "site" / "icnet_ros",
                    ignore=shutil.ignore_patterns("weights", "__pycache__"))
    code = "from icnet_ros.train.provenance import git_commit; print(git_commit())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "None", out
    here = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert here.stdout.strip().removesuffix("-dirty") == head.stdout.strip()  # the checkout itself still records it


def test_a_data_error_from_a_dataloader_worker_is_its_own_message():
    """torch re-raises a worker's error with the worker's traceback in its text (~20 lines after
    "icnet-train: error:"): the message is its last line."""
    from torch._utils import ExceptionWrapper

    from icnet_ros.data.datasets import DatasetError, one_line_error

    try:
        raise DatasetError("cannot read image a.jpg: truncated JPEG")
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(DatasetError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)
    assert one_line_error(info.value) == "cannot read image a.jpg: truncated JPEG"
    assert one_line_error(DatasetError("plain")) == "plain"


def test_validation_runs_the_network_inputs_icnet_eval_runs(tmp_path):
    """Validation scaled each frame by data.input_scale and rounded that to the grid (375x500 at x1.5: 576x736),
    while icnet-eval and the node (input_size auto) scale frames to the recorded network width (544x736): the mIoU
    that picked the best checkpoint was measured at another input than every later one. Now both run 544x736."""
    from icnet_ros.sizes import InputSizePolicy
    from icnet_ros.train import Trainer

    root = tmp_path / "camvid500"
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
        stem = sorted(p.stem for p in (require(CAMVID) / split / "images").iterdir())[0]
        image = cv2.imread(str(CAMVID / split / "images" / f"{stem}.jpg"))
        label = cv2.imread(str(CAMVID / split / "labels" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(root / split / "images" / f"{stem}.png"), cv2.resize(image, (500, 375)))
        cv2.imwrite(str(root / split / "labels" / f"{stem}.png"),
                    cv2.resize(label, (500, 375), interpolation=cv2.INTER_NEAREST))
    trainer = Trainer(load_config("smoke", [f"data.root={root}", f"train.output_dir={tmp_path / 'run'}", *FAST,
                                            "data.input_scale=1.5", "data.crop_size=[96, 128]"]))
    seen = []
    trainer.averaged.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    trainer.validate(0)
    policy = InputSizePolicy("width", trainer.network_width())
    assert trainer.network_width() == 736 and seen == [policy.network_size(375, 500)] == [(544, 736)]
