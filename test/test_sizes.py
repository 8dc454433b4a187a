"""icnet_ros.sizes.aligned_size: network input sizes rounded to ICNet's coarsest stride."""
import pytest

from icnet_ros.sizes import MIN_INPUT_SIZE, SIZE_DIVISOR, aligned_size


def test_rounds_to_the_nearest_multiple_with_halves_up():
    assert SIZE_DIVISOR == 32
    assert aligned_size(360, 480) == (352, 480)      # CamVid native
    assert aligned_size(540, 720) == (544, 736)      # x1.5: 16.875 -> 17, 22.5 -> 23 (a half goes up)
    assert aligned_size(1080, 1920) == (1088, 1920)  # full HD
    assert aligned_size(1024, 2048) == (1024, 2048)  # aligned sizes are kept
    assert aligned_size(112, 111.9) == (128, 96)     # 3.5 -> 4, 3.497 -> 3


def test_minimum_and_exact_mode():
    assert aligned_size(10, 70) == (MIN_INPUT_SIZE, MIN_INPUT_SIZE)
    assert aligned_size(100, 100, 48) == (96, 96)    # the minimum 64 becomes 96 for divisor 48
    assert aligned_size(10, 10, 48) == (96, 96)
    assert aligned_size(359.5, 480.4, 1) == (360, 480)
    assert aligned_size(10, 70, 1) == (MIN_INPUT_SIZE, 70)


@pytest.mark.parametrize("bad", [0, -32])
def test_bad_divisor(bad):
    with pytest.raises(ValueError, match="divisor"):
        aligned_size(100, 100, bad)


def test_every_cli_takes_sizes_the_same_way():
    """HxW and H W, in icnet-segment/eval (engine --input-size), icnet-bench --size, icnet-export --size and
    icnet-convert --input-size."""
    from icnet_ros.sizes import parse_sizes
    from icnet_ros.tools import bench, convert, export

    assert parse_sizes(["540x720"]) == parse_sizes(["540", "720"]) == parse_sizes("540 720") == [(540, 720)]
    assert parse_sizes(["540x720", "720", "960"]) == [(540, 720), (720, 960)]
    for bad in (["540"], ["540", "x"], ["big"]):
        with pytest.raises(ValueError, match="HxW or H W"):
            parse_sizes(bad)
    assert convert._input_size(["540", "720"]) == convert._input_size(["540x720"]) == (540, 720)
    for tokens in (["352x480"], ["352", "480"]):
        args = export.build_parser().parse_args(["m.safetensors", "--format", "onnx", "--size", *tokens,
                                                 "--output", "m.onnx"])
        assert export._check_args(args) == (352, 480)
    for tokens in (["352x480", "544x736"], ["352", "480", "544", "736"]):
        args = bench.build_parser().parse_args(["--size", *tokens])
        assert parse_sizes(args.size, 64) == [(352, 480), (544, 736)]


def test_input_size_policy_the_engine_and_icnet_eval_share():
    from icnet_ros.sizes import InputSizePolicy

    auto = InputSizePolicy.from_option("auto", {"network_width": 736})
    assert auto.kind == "width" and auto.describe() == "auto (width 736)"
    assert auto.network_size(360, 480) == (544, 736) and auto.network_size(1080, 1920) == (416, 736)
    assert auto.network_size(120, 160) == (480, 640)  # upscaled 4x at most
    assert auto.network_size(360, 480, scale=0.5) == (288, 384)  # a test-time scale on the policy's size
    assert InputSizePolicy.from_option("auto", {"input_size": [256, 512]}).describe() == "256x512"
    assert InputSizePolicy.from_option("auto", {}).network_size(100, 130) == (96, 128)  # native, rounded
    assert InputSizePolicy.from_option(1.5, {}, size_divisor=1).network_size(100, 130) == (150, 195)
    exported = InputSizePolicy.from_option("auto", {"network_width": 736}, fixed_size=(128, 192))
    assert exported.network_size(1080, 1920) == (128, 192) and exported.size_divisor == 1


def test_auto_never_shrinks_a_wide_frame_below_the_network_minimum():
    """input_size auto (the node's default) scales a frame to the trained width: a frame wider than about 11.5x its
    height went below 64 rows (64x4000 -> 12x736) and was refused, although it is a valid frame of 64 rows and more
    (native runs it). Now the downscale stops at the minimum, the aspect ratio kept; the engine agrees, and
    frame_size_problem takes input_size as the node's text (it raised on '512x1024')."""
    from icnet_ros.engine import frame_size_problem
    from icnet_ros.sizes import InputSizePolicy

    auto = InputSizePolicy.from_option("auto", {"network_width": 736})
    assert auto.network_size(64, 4000) == (64, 4000) and auto.network_size(86, 1000)[0] == 64
    assert auto.network_size(87, 1000)[0] == 64 and auto.network_size(360, 480) == (544, 736)  # (as before)
    assert auto.network_size(32, 480) == (64, 736)  # (below the minimum already: upscaled as before, 49 -> 64)
    for h, w in ((64, 4000), (86, 1000), (160, 2000)):
        assert frame_size_problem(None, h, w) is None, (h, w)  # the default model, auto
    assert frame_size_problem(None, 32, 480) is not None  # 49x736 before rounding: still refused
    assert frame_size_problem(None, 360, 480, "512x1024") is None
    assert frame_size_problem(None, 360, 480, "1x1").startswith("input_size '1x1': ")


def test_network_sizes_are_rounded_once():
    """The policy's exact size is rounded to the grid once. Rounded to an integer first (Python's round, halves to
    even) and then to the grid, a 219x480 frame at width 736 (exact height 335.8) got 352 rows, not the nearest
    multiple 320, and 100.5 became 100 with divisor 1 where training validation gives 101."""
    from icnet_ros.sizes import InputSizePolicy

    assert InputSizePolicy("width", 736).network_size(219, 480) == (320, 736)
    assert InputSizePolicy("scale", 0.5, 1).network_size(201, 402) == (101, 201)
    assert InputSizePolicy("scale", 0.5, 1).policy_size(201, 402) == (101, 201)  # halves up, as the grid rounds


def test_a_header_no_plugin_can_parse_is_unknown_not_an_exception(tmp_path):
    """Pillow tries every plugin on any bytes: junk that one of them half-recognises raised NotImplementedError
    (DDS), AttributeError (SPIDER) or RuntimeError (AVIF) out of the header check, and icnet-segment ended with a
    traceback at that file instead of one line for it and the rest of the folder segmented."""
    import io

    from helpers import DDS_JUNK
    from icnet_ros.sizes import declared_image_size

    assert declared_image_size(io.BytesIO(DDS_JUNK)) is None
    (tmp_path / "junk.png").write_bytes(DDS_JUNK)
    assert declared_image_size(tmp_path / "junk.png") is None
