"""The engine's options are defined once (icnet_ros.engine_config); node parameters and CLI flags derive from it."""
from __future__ import annotations

import numpy as np
import pytest

from icnet_ros import engine_config, node_params
from icnet_ros.engine import Segmenter
from icnet_ros.engine_config import ConfigError, SegmenterConfig
from icnet_ros.tools import segment


def test_node_parameters_are_the_engine_options():
    for name, option in engine_config.OPTIONS.items():
        spec = node_params.SPECS.get(name)
        if not option.node:
            assert spec is None or name == "outputs", name  # the node's outputs: what it advertises per camera
            continue
        assert spec is not None, f"engine option {name} is not a node parameter"
        assert spec.default == option.text_default()
        assert spec.description.startswith(option.description)
        assert spec.constraints == option.allowed
        # every engine option changes at run time: live ones in place, the others by hot swap (a new Segmenter)
        assert not spec.read_only and spec.hot_swap == (not option.live)
    # the node's config carries the checked engine config
    cfg = node_params.parse({"input_size": "540x720", "confidence_threshold": 0.3, "backend": "torch"})
    assert cfg.engine.input_size == (540, 720) and cfg.engine.confidence_threshold == 0.3
    with pytest.raises(node_params.ParameterError, match="must be one of auto, torch"):
        node_params.parse({"backend": "tflite"})


def test_cli_flags_are_the_engine_options():
    parser = segment.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name, option in engine_config.OPTIONS.items():
        if option.cli:
            assert name in flags, f"icnet-segment lacks {option.flag}"
            assert option.description in flags[name].help
    args = parser.parse_args(["x.png", "-o", "out", "--input-size", "540", "720", "--confidence-threshold", "0.2",
                              "--no-optimize", "--backend", "torch"])
    cfg = engine_config.from_args(args)
    assert cfg.input_size == (540, 720) and cfg.confidence_threshold == 0.2 and cfg.optimize is False
    assert cfg.outputs == ("label", "color", "overlay")  # the tool's own default
    assert engine_config.from_args(parser.parse_args(["x", "-o", "o", "--input-size", "540x720"])).input_size == (540, 720)


@pytest.mark.parametrize("value, parsed", [
    ("auto", "auto"), ("native", "native"), (None, "native"), ("checkpoint", "checkpoint"), ("540x720", (540, 720)),
    ("540 720", (540, 720)), ("540,720", (540, 720)), ((540, 720), (540, 720)), ("1.5", 1.5), (2, 2.0)])
def test_input_size_forms(value, parsed):
    assert engine_config.parse_input_size(value) == parsed


@pytest.mark.parametrize("changes, match", [
    (dict(input_size="32x64"), "must each be >= 64"), (dict(input_size="big"), "input_size = 'big'"),
    (dict(overlay_alpha=2), r"overlay_alpha = 2: must be in \[0.0, 1.0\]"), (dict(precision="int4"), "precision"),
    (dict(compile="fast"), "compile"), (dict(nope=1), "unknown engine option"), (dict(size_divisor=0), "size_divisor")])
def test_bad_values_name_the_option(changes, match):
    with pytest.raises(ConfigError, match=match):
        SegmenterConfig().replace(**changes)


def test_values_of_any_type_are_parsed_or_refused_naming_the_option():
    """Options come from YAML, params files and code: a value of another type is a ConfigError naming the option
    (or is taken), never a bare TypeError from inside a parser."""
    others = [None, True, 0, -1, 1.5, float("nan"), "", "x", [], [1], [512, None], [[480, 640], [720, None]], {},
              {"a": 1}, object()]
    for name in engine_config.OPTIONS:
        for value in others:
            try:
                SegmenterConfig().replace(**{name: value})
            except ConfigError as e:
                assert str(e).startswith(f"{name} = ") and "\n" not in str(e), str(e)
    assert SegmenterConfig().replace(engine_cache=None).engine_cache == ""  # none, not a folder named 'None'


def test_auto_input_size_follows_the_recorded_width(tmp_path):
    from helpers import make_checkpoint

    from icnet_ros.checkpoint import load_model

    model = load_model(make_checkpoint(tmp_path / "m.safetensors"))
    plain = Segmenter(model, device="cpu", warmup=False)  # no network_width recorded: native
    assert plain.network_size(360, 480) == (352, 480)
    model.meta = {**model.meta, "network_width": 736}
    auto = Segmenter(model, device="cpu", warmup=False)
    assert auto.input_policy == "width"
    assert auto.network_size(360, 480) == (544, 736)  # 480x360 CamVid frames at x1.5
    assert auto.network_size(720, 1280) == (416, 736)  # HD: the same width, aspect kept
    assert auto.network_size(1080, 1920) == (416, 736)
    assert "auto (width 736)" in auto.describe()
    assert Segmenter(model, device="cpu", warmup=False, input_size="native").network_size(360, 480) == (352, 480)
    # narrow frames are upscaled 4x at most; an extreme aspect ratio is refused before any allocation
    assert auto.network_size(120, 160) == (480, 640)
    (r,) = auto.segment([np.zeros((120, 160, 3), np.uint8)])
    assert r.label.shape == (120, 160) and r.model_size == (480, 640)
    for shape in ((6000, 184), (30000, 100, 3)):  # 24000x736, 120000x400
        with pytest.raises(ValueError, match="upscaled to a .* network input, more than 16777216 pixels"):
            auto.segment([np.zeros(shape, np.uint8)])
    with pytest.raises(ValueError, match="gives a 4000x4 network input, below the minimum"):
        auto.segment([np.zeros((1000, 1, 3), np.uint8)])
    scaled = Segmenter(model, device="cpu", warmup=False, input_size=4.0)
    with pytest.raises(ValueError, match="more than 16777216 pixels"):
        scaled.segment([np.zeros((1100, 1100), np.uint8)])
    assert scaled.network_size(1000, 1000) == (4000, 4000)  # within the bound: as asked


def test_reconfigure_live_options_between_calls(tmp_path):
    from helpers import make_checkpoint

    seg = Segmenter(make_checkpoint(tmp_path / "m.safetensors"), device="cpu", warmup=False,
                    outputs=("label", "overlay"))
    frame = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    before = seg.segment([frame])[0]
    cfg = seg.reconfigure(overlay_alpha=1.0, input_size="64x96", confidence_threshold=0.99)
    assert cfg is seg.config and cfg.overlay_alpha == 1.0 and cfg.input_size == (64, 96)
    after = seg.segment([frame])[0]
    assert after.model_size == (64, 96) and before.model_size == (96, 128)
    assert (after.label == 255).mean() > 0.5  # almost nothing is 99% certain for a random model
    with pytest.raises(ConfigError, match="cannot change on a running Segmenter"):
        seg.reconfigure(device="cpu")
    with pytest.raises(ConfigError, match="overlay_alpha"):
        seg.reconfigure(overlay_alpha=-1)
    assert seg.config.overlay_alpha == 1.0  # a refused change changes nothing


@pytest.mark.parametrize("tool, names", [("icnet_ros.evaluate", ("backend", "device", "input_size", "size_divisor")),
                                         ("icnet_ros.tools.bench", ("device", "optimize", "compile", "cuda_graphs"))])
def test_other_tools_take_engine_flags_from_the_config(tool, names):
    import importlib

    parser = importlib.import_module(tool).build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name in names:
        assert name in flags and engine_config.OPTIONS[name].description in flags[name].help, (tool, name)


def test_warmup_at_the_cameras_sizes(tmp_path):
    from helpers import make_checkpoint

    assert engine_config.check("warmup", "360x480;720x1280") == ((360, 480), (720, 1280))
    assert engine_config.check("warmup", (96, 128)) == ((96, 128),)
    # the node parameter's text forms (a string parameter: "true" is its default)
    assert engine_config.check("warmup", "true") is True and engine_config.check("warmup", " False ") is False
    assert node_params.SPECS["warmup"].default == "true"
    assert node_params.parse({"warmup": "96x128;128x160"}).engine.warmup == ((96, 128), (128, 160))
    with pytest.raises(ConfigError, match="warmup"):
        engine_config.check("warmup", "big")
    with pytest.raises(node_params.ParameterError, match="'warmup' = '64x': must be true, false or frame sizes"):
        node_params.parse({"warmup": "64x"})
    # each size is warmed up (at every batch, in the node) while the node's services wait: a size given twice once,
    # and a list longer than cameras have sizes refused (6000 copies of one size took 24 s)
    assert engine_config.check("warmup", "96x128;96x128;128x160;96x128") == ((96, 128), (128, 160))
    assert engine_config.check("warmup", ";".join(["64x96"] * 6000)) == ((64, 96),)
    with pytest.raises(ConfigError, match="at most 16 frame sizes") as refused:
        engine_config.check("warmup", ";".join(f"64x{64 + i}" for i in range(2000)))
    assert len(str(refused.value)) < 300 and "... (15029 characters)" in str(refused.value)  # not the whole value
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    seg = Segmenter(ckpt, device="cpu", warmup="96x128;128x160")
    assert seg.last_latency_s is not None and seg.warmed_up == [(96, 128, 1), (128, 160, 1)]  # it ran there
    assert Segmenter(ckpt, device="cpu", warmup="false").warmed_up == []
    assert Segmenter(ckpt, device="cpu", input_size="64x96").warmed_up == [(64, 96, 1)]  # true: the fixed size
    seg.warmup((64, 80), batch=3)
    assert seg.warmed_up[-1] == (64, 80, 3) and seg.last_latency_s is not None


def test_input_size_flag_before_positional_arguments():
    """'--input-size 540 720 a.png' and '--input-size 1.5 a.png' keep a.png an input (argparse hands the flag every
    token up to the next option); after the split the size parses as everywhere else."""
    assert engine_config.split_size_tokens(["540", "720", "a.png"]) == (["540", "720"], ["a.png"])
    assert engine_config.split_size_tokens(["1.5", "a.png", "b"]) == (["1.5"], ["a.png", "b"])
    assert engine_config.split_size_tokens(["540x720"]) == (["540x720"], [])
    import argparse

    with pytest.raises(ConfigError, match="follows the size"):
        engine_config.from_args(argparse.Namespace(input_size=["1.5", "a.png"]))


def test_segment_takes_inputs_after_the_size(tmp_path):
    import cv2

    from helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    img = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    out = tmp_path / "out"
    assert segment.main(["--model", str(ckpt), "--device", "cpu", "--input-size", "64", "96", str(tmp_path / "a.png"),
                         "-o", str(out), "--quiet", "--outputs", "label"]) == 0
    assert any(out.rglob("*.png"))
    assert segment.main(["--model", str(ckpt), "-o", str(out), "--input-size", "1.5"]) == 2  # no INPUT


def test_input_size_is_bounded_by_the_largest_network_input(tmp_path, capsys):
    """At most MAX_UPSCALED_PIXELS (4096x4096), the bound of an upscaled frame, of an icnet-export size and of a
    model file's size: before, 100000x100000 was accepted and the first frame ended in a 112 GiB MemoryError
    traceback. The node's parameter (same parser) refuses it too."""
    assert engine_config.parse_input_size("4096x4096") == (4096, 4096)
    for bad in ("100000x100000", "4096 4097", (8192, 4096)):
        with pytest.raises(ValueError, match="exceeds the largest network input, 16777216 pixels"):
            engine_config.parse_input_size(bad)
    with pytest.raises(node_params.ParameterError, match="16777216"):
        node_params.parse({"input_size": "100000x100000"})
    assert segment.main(["x.png", "-o", str(tmp_path / "o"), "--input-size", "100000x100000"]) == 2
    assert capsys.readouterr().err == ("icnet-segment: error: input_size = '100000x100000': 100000x100000 = "
                                       "10000000000 pixels exceeds the largest network input, 16777216 pixels "
                                       "(4096x4096)\n")
    assert not (tmp_path / "o").exists()


def test_engine_cache_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    """engine_cache naming a file (or a path under one) was a FileExistsError / bare errno from the OpenVINO and
    ONNX Runtime backends, and the native TensorRT backend failed only after minutes of building: now a
    ConfigError naming the option when the config is checked, for the Segmenter, icnet-segment and the node."""
    import os

    from helpers import export_meta, make_checkpoint, tiny_onnx

    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^engine_cache = '.*afile': not a folder$"):
        SegmenterConfig().replace(engine_cache=str(afile))
    with pytest.raises(ConfigError, match=r"engine_cache = .*: not a folder \(.*afile is a file\)"):
        SegmenterConfig().replace(engine_cache=afile / "sub" / "cache")
    with pytest.raises(node_params.ParameterError, match="engine_cache"):
        node_params.parse({"engine_cache": str(afile)})
    for fine in (tmp_path, tmp_path / "new" / "cache", ""):  # a folder, one to be made, none
        assert SegmenterConfig().replace(engine_cache=fine).engine_cache == os.fspath(fine)
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    onnx_file = tiny_onnx(tmp_path / "m.onnx", export_meta(ckpt))
    with pytest.raises(ConfigError, match="engine_cache = .*: not a folder"):
        Segmenter(onnx_file, backend="onnxruntime", device="cpu", engine_cache=str(afile), warmup=False)
    assert segment.main([str(tmp_path / "x.png"), "--model", str(onnx_file), "-o", str(tmp_path / "o"),
                         "--engine-cache", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-segment: error: engine_cache = ") and err.count("\n") == 1, err
