"""Native checkpoints: metadata round trip, fp16, aux-less files, and every error path with a clear message."""
import json
import os
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from helpers import make_checkpoint, record_icnet_builds
from icnet_ros import CheckpointError, build_icnet, load_model, read_metadata, save_checkpoint
from icnet_ros.checkpoint import build_meta
from icnet_ros.classes import CAMVID


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", input_size=(360, 480),
                           provenance={"command": "test", "iterations": 3})


def test_round_trip_weights_and_metadata(ckpt):
    model = load_model(ckpt)
    assert not model.training
    meta = model.meta
    assert meta["format"] == "icnet_ros" and meta["arch"]["backbone"] == "resnet18"
    assert meta["classes"] == list(CAMVID.classes) and meta["palette"][3] == [128, 64, 128]
    assert meta["ignore_index"] == 255 and meta["input_size"] == [360, 480]
    assert meta["normalization"]["channel_order"] == "RGB" and len(meta["normalization"]["std"]) == 3
    assert meta["provenance"] == {"command": "test", "iterations": 3}
    assert read_metadata(ckpt) == meta
    # same weights as a second load; outputs deterministic
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), load_model(ckpt)(x))
    assert model(x).shape == (1, 11, 12, 16)


def test_fp16_and_no_aux(tmp_path, ckpt):
    model = load_model(ckpt)
    half = tmp_path / "half.safetensors"
    save_checkpoint(model, half, fp16=True, include_aux=False)
    assert half.stat().st_size < ckpt.stat().st_size * 0.55
    m2 = load_model(half)
    assert m2.auxiliary_head is None and m2.meta["arch"]["aux_heads"] is False
    assert next(m2.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        a, b = model(x), m2(x)
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_model(tmp_path)


def test_truncated_file(tmp_path, ckpt):
    bad = tmp_path / "truncated.safetensors"
    data = ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)


def test_safetensors_without_icnet_metadata(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an icnet_ros checkpoint"):
        load_model(other)


def test_pth_files_are_pointed_at_the_converter(tmp_path):
    p = tmp_path / "model.pth"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="icnet-convert"):
        load_model(p)


def _with_tensors(tmp_path, name, tensors, meta):
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"icnet_ros": json.dumps(meta)})
    return path


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    meta = build_meta(model.config, CAMVID)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["backbone.backbone.layer1.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. backbone.backbone.layer1.0.conv1.weight"):
        load_model(_with_tensors(tmp_path, "missing.safetensors", missing, meta))
    extra = dict(state, **{"head.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(e.g. head.extra.weight"):
        load_model(_with_tensors(tmp_path, "extra.safetensors", extra, meta))
    shaped = dict(state, **{"decode_head.conv_seg.weight": torch.zeros(12, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*decode_head.conv_seg.weight: checkpoint \(12, 32, 1, 1\)"):
        load_model(_with_tensors(tmp_path, "shape.safetensors", shaped, meta))


@pytest.mark.parametrize("patch, match", [
    ({"format": "something"}, "not an icnet_ros checkpoint"),
    ({"version": 99}, "newer than this icnet_ros"),
    ({"arch": {"backbone": "vgg16", "num_classes": 11}}, "invalid checkpoint metadata"),
    ({"classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 1]]}, "2 classes but arch.num_classes is 11"),
    ({"normalization": {"mean": [0, 0], "std": [1, 1, 1], "channel_order": "RGB"}}, "invalid normalization"),
    # finite in float64, not in the float32 arithmetic: std 1e-300 is 0 there (every logit NaN, every pixel class 0)
    ({"normalization": {"mean": [0, 0, 0], "std": [1e-300, 1, 1], "channel_order": "RGB"}}, "invalid normalization"),
    ({"normalization": {"mean": [1e308, 0, 0], "std": [1, 1, 1], "channel_order": "RGB"}}, "invalid normalization"),
    # the order the network was trained in: without it (or with another spelling) the preprocessing cannot tell
    # whether to swap a frame's channels
    ({"normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, "invalid normalization"),
    ({"normalization": {"mean": [0, 0, 0], "std": [1, 1, 1], "channel_order": "rgb"}}, "invalid normalization"),
    ({"input_size": [10, 10]}, "invalid input_size"),
    ({"network_width": 32}, "invalid network_width"),
    ({"network_width": 100000}, "invalid network_width"),  # auto inference resizes every frame to it: bounded
    ({"network_width": "736"}, "invalid network_width"),
    ({"network_width": True}, "invalid network_width"),
    ({"license": ""}, "invalid license"),
    ({"license": "two\nlines"}, "invalid license"),
    ({"license": "x" * 301}, "invalid license"),
    ({"license": ["CC BY"]}, "invalid license"),
    # values the model or the class set could not use: refused when the file is read, not when it is built
    ({"arch": {"backbone": "efficientnet_lite9", "num_classes": 11}}, "invalid checkpoint metadata: unknown backbone"),
    ({"arch": {"backbone": "resnet18", "num_classes": 11.0}}, "num_classes must be an integer"),
    ({"arch": {"backbone": "resnet18", "num_classes": 11, "aux_dropout": 1.5}}, r"aux_dropout must be in \[0, 1\)"),
    ({"ignore_index": 3}, "ignore_index must be an integer in 11..255"),
    ({"ignore_index": 300}, "ignore_index must be an integer in 11..255"),
    ({"input_size": [8192, 8192]}, "invalid input_size"),  # every frame would run at it (34.8 s, 5 GB to warm up)
    ({"provenance": []}, "invalid provenance"),
    ({"provenance": "text"}, "invalid provenance"),
    ({"provenance": {"exported": [1]}}, "invalid provenance"),
    ({"provenance": {"a": json.loads("[" * 70 + "]" * 70)}}, "nested deeper than 64 levels"),
    ({"dataset": {"x": 1}}, r"bad class set \(dataset\) name"),
    ({"dataset": None}, r"bad class set \(dataset\) name"),
    ({"dataset": "x" * 101}, r"bad class set \(dataset\) name"),
    ({"classes": ["sky"] * 11}, "class names must be distinct, repeated: sky"),
    ({"classes": list(range(11))}, "classes must be a list of names"),
    ({"classes": ["sky", ""] + [f"c{i}" for i in range(9)]}, "bad class name ''"),
    ({"classes": ["sky", "two\nlines"] + [f"c{i}" for i in range(9)]}, "bad class name 'two\\\\nlines'"),
    ({"classes": ["x" * 101] + [f"c{i}" for i in range(10)]}, "at most 100 characters"),
    # values of another type are refused, not converted (Infinity was an OverflowError traceback; "abcdefghijk"
    # 11 classes a..k; "255", true and 12.7 colour values 255, 1 and 12)
    ({"classes": "abcdefghijk"}, "classes must be a list of names"),
    ({"palette": [[float("inf"), 0, 0]] * 11}, r"palette must be a list of \[R, G, B\] integers"),
    ({"palette": [["255", "0", "0"]] * 11}, r"palette must be a list of \[R, G, B\] integers"),
    ({"palette": [[True, False, True]] * 11}, r"palette must be a list of \[R, G, B\] integers"),
    ({"palette": [[12.7, 0, 0]] * 11}, r"palette must be a list of \[R, G, B\] integers"),
    ({"palette": "123"}, r"palette must be a list of \[R, G, B\] integers"),
    ({"ignore_index": float("inf")}, "ignore_index must be an integer"),
    ({"ignore_index": 254.9}, "ignore_index must be an integer"),
])
def test_invalid_metadata(tmp_path, patch, match):
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    meta = {**build_meta(model.config, CAMVID), **patch}
    path = _with_tensors(tmp_path, "meta.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


@pytest.mark.parametrize("key", ["normalization", "input_size", "provenance"])
def test_values_from_the_file_are_shown_escaped_on_one_line(key):
    """A value a file gives is shown escaped in the refusal: a newline in it made a two-line error whose second line
    was a forged log line ("[ERROR] icnet_node: model loaded OK")."""
    from icnet_ros.checkpoint import validate_meta

    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    meta = {**build_meta(model.config, CAMVID), key: "64x64\n[ERROR] icnet_node: model loaded OK"}
    with pytest.raises(CheckpointError, match=f"invalid {key}") as e:
        validate_meta(meta)
    assert "\n" not in str(e.value) and "\\n[ERROR]" in str(e.value), str(e.value)


def test_the_class_count_is_checked_before_a_palette_is_made_for_it(monkeypatch):
    """Metadata listing 300000 classes without a palette is refused at the class count: a palette was made for all
    of them first (3.9 million classes: seconds and hundreds of MiB per load attempt)."""
    import icnet_ros.classes as classes_module
    from icnet_ros.checkpoint import validate_meta

    def no_palette(n):
        raise AssertionError(f"a palette of {n} colours was made")

    monkeypatch.setattr(classes_module, "generic_palette", no_palette)
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    meta = build_meta(model.config, CAMVID)
    meta["classes"] = [f"c{i}" for i in range(300_000)]
    meta.pop("palette", None)
    with pytest.raises(CheckpointError, match="1..255 classes supported, got 300000"):
        validate_meta(meta)


def test_metadata_of_any_json_shape_gives_a_checkpoint_error_or_loads():
    """Metadata comes from files: every top-level and nested value replaced by a value of another JSON type is
    refused with CheckpointError (one line), never a TypeError/AttributeError from deep inside."""
    from icnet_ros.checkpoint import validate_meta

    base = build_meta(build_icnet("icnet_r18", width=0.25, num_classes=11).config, CAMVID)
    for bad in ([], "text", 3, None):
        with pytest.raises(CheckpointError):
            validate_meta(bad)
    others = [None, True, -1, 1.5, "x", [], [1, 2], [["a"]], {}, {"k": 1}]
    refused = 0
    for key, value in base.items():
        nested = [(key, None)] + [(key, k) for k in value] if isinstance(value, dict) else [(key, None)]
        for outer, inner in nested:
            for other in others:
                meta = json.loads(json.dumps(base))
                if inner is None:
                    meta[outer] = other
                else:
                    meta[outer][inner] = other
                try:
                    validate_meta(meta)
                except CheckpointError:
                    refused += 1
    assert refused > 100  # most mutations are refused; the rest (e.g. a provenance field) are harmless


def test_oversized_or_deeply_nested_metadata_is_refused_before_it_is_parsed(tmp_path):
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = build_meta(model.config, CAMVID)
    big = _with_tensors(tmp_path, "big.safetensors", state, {**meta, "provenance": {"x": "y" * (2 << 20)}})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(big))}: metadata of \d+ bytes \(at most 1048576\)$"):
        read_metadata(big)  # (anchored: validate_meta's own size check, after parsing, says nearly the same)
    with pytest.raises(CheckpointError, match=r"metadata of \d+ bytes \(at most 1048576\); shorten its provenance"):
        save_checkpoint(model, tmp_path / "never.safetensors", {**meta, "provenance": {"x": "y" * (2 << 20)}})
    assert not (tmp_path / "never.safetensors").exists()  # what no reader accepts is not written
    path = tmp_path / "header.safetensors"  # a header of 17 MiB (an 89 MiB one parsed into 2.3 GB)
    save_file(state, str(path), metadata={"icnet_ros": json.dumps(meta), "pad": "z" * (17 << 20)})
    with pytest.raises(CheckpointError, match=r"safetensors header of \d+ bytes \(at most 16777216\)"):
        load_model(path)
    path = tmp_path / "deep.safetensors"
    save_file(state, str(path), metadata={"icnet_ros": "[" * 100000 + "]" * 100000})
    with pytest.raises(CheckpointError, match="metadata is not valid JSON"):  # a RecursionError escaped
        read_metadata(path)


def test_a_huge_architecture_in_a_small_file_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """Metadata claiming ResNet-101 at width 4 over a small file's tensors built that model (4.3 GB, 9.5 s) before
    comparing: the comparison now runs on the meta device, from the file's header."""
    import icnet_ros.checkpoint as checkpoint

    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    arch = {**model.config.to_dict(), "backbone": "resnet101", "width": 4.0}
    path = _with_tensors(tmp_path, "huge.safetensors", state, {**build_meta(model.config, CAMVID), "arch": arch})
    built = record_icnet_builds(monkeypatch, checkpoint)
    with pytest.raises(CheckpointError, match="does not match the ICNet architecture: .* missing keys"):
        load_model(path)
    assert built == ["meta"]


def test_metadata_not_json(tmp_path):
    path = tmp_path / "notjson.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"icnet_ros": "{oops"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(path)
    # an integer of 5000 digits: Python's own limit message (no file name, advice to change an interpreter setting)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"icnet_ros": '{"version": ' + "9" * 5000 + "}"})
    with pytest.raises(CheckpointError, match=rf"^{path}: metadata is not valid JSON"):
        read_metadata(path)


@pytest.mark.parametrize("name, bad, match", [
    ("nan", lambda v: torch.full_like(v, float("nan")), "holds NaN or infinite values"),
    ("inf", lambda v: torch.full_like(v, float("inf")), "holds NaN or infinite values"),
    ("complex", lambda v: v.to(torch.complex64), "tensors of the wrong type .*complex64"),
    ("bool", lambda v: v.bool(), "tensors of the wrong type .*bool"),
    ("int8", lambda v: v.to(torch.int8), "tensors of the wrong type .*int8"),
])
def test_weights_that_are_not_finite_floats_are_refused(tmp_path, name, bad, match):
    """NaN or infinite weights loaded silently (every pixel one class, and a misleading warning about the pyramid
    pooling's factorization); other types were cast (complex -> real with a PyTorch warning, bool, int8)."""
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = "decode_head.conv_seg.weight"
    state[key] = bad(state[key])
    path = _with_tensors(tmp_path, f"{name}.safetensors", state, build_meta(model.config, CAMVID))
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_save_is_atomic_and_validates(tmp_path):
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    with pytest.raises(CheckpointError, match="class set 'camvid' has 11 classes but the model predicts 3"):
        build_meta(build_icnet("icnet_r18", width=0.25, num_classes=3).config, CAMVID)
    out = tmp_path / "sub" / "m.safetensors"
    save_checkpoint(model, out)  # default metadata when the model has none
    assert load_model(out).meta["classes"][0] == "class_0"
    assert not list(out.parent.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(IsADirectoryError, match="is a folder; give the checkpoint's file name"):
        save_checkpoint(model, out.parent)  # `icnet-convert model.safetensors outdir`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no stray sub.tmp beside it


def test_network_width_and_license_round_trip(tmp_path):
    licence = "CC BY-NC 4.0 (trained on CamVid; non-commercial use only)"
    path = make_checkpoint(tmp_path / "m.safetensors", network_width=736, license=licence)
    meta = read_metadata(path)
    assert meta["network_width"] == 736 and meta["license"] == licence
    assert load_model(path).meta == meta
    # both optional: absent from files that do not record them (mmseg imports, older files)
    plain = read_metadata(make_checkpoint(tmp_path / "plain.safetensors"))
    assert "network_width" not in plain and "license" not in plain


def test_network_width_for_training_scales():
    from icnet_ros.checkpoint import network_width_for

    assert network_width_for(480, 1.5) == 736  # CamVid at x1.5: 720, rounded to a multiple of 32
    assert network_width_for(480, 2.0) == 960 and network_width_for(480, 1.0) == 480
    assert network_width_for(2048, 0.5) == 1024 and network_width_for(100, 0.1) == 64  # the network's minimum
    with pytest.raises(ValueError, match="above the 4096"):
        network_width_for(2048, 2.5)
    with pytest.raises(ValueError, match="> 0"):
        network_width_for(480, 0)


def test_palettes_in_whole_number_floats_still_load(tmp_path):
    """A palette built in floats (128.0) was written as such by earlier releases (ClassSet kept them) and loaded:
    it still does, as integers; ClassSet now stores integers, so new files carry them."""
    from icnet_ros.classes import ClassSet

    floats = ClassSet("floats", tuple(f"c{i}" for i in range(11)), tuple((float(i), 128.0, 0.0) for i in range(11)))
    assert floats.palette[3] == (3, 128, 0) and all(isinstance(v, int) for c in floats.palette for v in c)
    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    meta = {**build_meta(model.config, CAMVID), "palette": [[float(i), 128.0, 0.0] for i in range(11)]}
    path = _with_tensors(tmp_path, "floats.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()},
                         meta)
    assert load_model(path).meta["palette"][3] == [3.0, 128.0, 0.0]  # the file's metadata as written
    from icnet_ros.classes import class_set_from_meta

    assert class_set_from_meta(read_metadata(path)).palette[3] == (3, 128, 0)
    with pytest.raises(ValueError, match="bad color"):
        ClassSet("x", ("a",), ((12.7, 0, 0),))


def test_a_checkpoint_that_cannot_be_written_is_an_oserror_naming_it(tmp_path):
    """A write that fails (here a file size limit, as a full disk) came out of safetensors as a SafetensorError
    ('Error while serializing: I/O error: File too large (os error 27)'), which no caller expected (icnet-convert
    printed a traceback). Now an OSError 'cannot write <file>: <reason>' (CheckpointWriteError: strerror is the
    reason, filename the file), and no file or temporary file is left; a folder that cannot be made alike."""
    import resource
    import signal

    from icnet_ros.checkpoint import CheckpointWriteError

    model = build_icnet("icnet_r18", width=0.25, num_classes=11)
    out = tmp_path / "sub" / "m.safetensors"
    out.parent.mkdir()
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError) as info:
            save_checkpoint(model, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert isinstance(info.value, CheckpointWriteError) and str(info.value) == f"cannot write {out}: File too large"
    assert info.value.strerror == "File too large" and info.value.filename == str(out)
    assert os.listdir(out.parent) == []
    with pytest.raises(OSError, match=r"^cannot write /proc/icnet_x/m.safetensors: No such file or directory$"):
        save_checkpoint(model, "/proc/icnet_x/m.safetensors")
    save_checkpoint(model, out)  # the limit lifted: written
    assert load_model(out).config == model.config
