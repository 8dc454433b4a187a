"""icnet-play, icnet-record and icnet-demo as real processes talking to this test process over DDS (loopback)."""
from __future__ import annotations

import math
import sys
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import ros_support
from helpers import VIDEO, child_file_size_limit, make_checkpoint, require, signal_once_loaded
from ros_support import Process, RosHarness, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402

from icnet_ros.ros_image import compressed_to_numpy, image_to_numpy  # noqa: E402

pytestmark = pytest.mark.ros

H, W = 120, 160


def write_frames(folder: Path, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` BGR PNG frames with flat regions and noise; returns them in file order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        img = np.zeros((H, W, 3), np.uint8)
        img[: H // 2] = rng.integers(0, 256, 3)
        img[H // 2:] = rng.integers(0, 256, 3)
        img = np.clip(img.astype(int) + rng.integers(-15, 16, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), img)
        frames.append(img)
    return frames


def test_play_folder_loops_with_stamps_frame_id_and_camera_info(ros: RosHarness, tmp_path: Path):
    frames = write_frames(tmp_path / "frames", 3)
    images = ros.collect(Image, "/t_play/image_raw")
    infos = ros.collect(CameraInfo, "/t_play/camera_info")
    res = ros_support.run_module("icnet_ros.tools.play", [
        str(tmp_path / "frames"), "--topic", "/t_play/image_raw", "--frame-id", "cam_x", "--rate", "25", "--loop",
        "--max-frames", "7", "--encoding", "rgb8", "--fov", "90", "--wait-subscribers", "1"], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "published 7 frames" in res.stdout
    # the rate reported is the publishing's: it included the final flush (up to ~3 s of DDS waiting for the
    # acknowledgements), 'published 7 frames in 3.1 s (2.3 fps)' at --rate 20; then n frames over the n - 1
    # periods between the first and the last: 29 fps at --rate 25 ('--rate 2 --max-frames 3': 2.9 fps). Now the
    # rate over those n - 1 periods: about --rate (slower on a busy machine; up to a few % faster when the first
    # frame's publishing was late and the next ones keep to the schedule)
    m = re.search(r"published 7 frames at ([\d.]+) fps \(the first to the last in ([\d.]+) s\)", res.stdout)
    assert m and 12 < float(m.group(1)) <= 27.5 and float(m.group(2)) >= 0.2, res.stdout
    assert images.wait_for(lambda m: len(m) >= 7, 10), f"received {len(images.messages)} of 7 images"
    ros.unsubscribe(images)
    ros.unsubscribe(infos)
    stamps = []
    for i, m in enumerate(images.messages):
        assert m.header.frame_id == "cam_x" and m.encoding == "rgb8" and (m.height, m.width) == (H, W)
        np.testing.assert_array_equal(image_to_numpy(m), frames[i % 3][:, :, ::-1])  # looped, in order
        stamps.append(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec)
    assert all(b > a for a, b in zip(stamps, stamps[1:])), "stamps must increase"
    period = np.median(np.diff(stamps)) / 1e9
    assert 0.02 < period < 0.2, f"published at {1 / period:.1f} fps, asked for 25"
    assert len(infos.messages) >= 5
    f = (W / 2) / math.tan(math.radians(45))
    for info in infos.messages:
        assert info.header.stamp.sec * 10**9 + info.header.stamp.nanosec in stamps
        assert info.header.frame_id == "cam_x" and (info.width, info.height) == (W, H)
        np.testing.assert_allclose(info.k, [f, 0, W / 2, 0, f, H / 2, 0, 0, 1])


def test_play_video_compressed_resized(ros: RosHarness):
    video = require(VIDEO)
    col = ros.collect(CompressedImage, "/t_vid/image_raw/compressed")
    res = ros_support.run_module("icnet_ros.tools.play", [
        str(video), "--topic", "/t_vid/image_raw", "--compressed", "jpeg", "--size", "180x320", "--max-frames", "3",
        "--rate", "0", "--wait-subscribers", "1"], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert col.wait_for(lambda m: len(m) >= 3, 10)
    ros.unsubscribe(col)
    for m in col.messages:
        img, order = compressed_to_numpy(m)
        assert "jpeg" in m.format and order == "RGB" and img.shape == (180, 320, 3)
    assert len(col.messages) == 3


def test_play_rate_is_over_the_periods_between_the_first_and_the_last_frame():
    """'--rate 2 --max-frames 3' printed '3 frames in 1.0 s (2.9 fps)': n frames over the n - 1 periods between the
    first and the last publishing. Now the rate over those n - 1 periods, the same after Ctrl-C."""
    from icnet_ros.tools.play import rate_summary

    assert rate_summary(3, 100.0, 101.0) == "published 3 frames at 2.0 fps (the first to the last in 1.0 s)"
    assert rate_summary(251, 10.0, 20.0) == "published 251 frames at 25.0 fps (the first to the last in 10.0 s)"
    assert rate_summary(1, 5.0, 5.0) == "published 1 frame" and rate_summary(0, None, None) == "published 0 frames"


def test_play_rejects_bad_input(tmp_path: Path):
    res = ros_support.run_module("icnet_ros.tools.play", [str(tmp_path / "missing.mp4")], timeout=60)
    assert res.returncode == 2 and "icnet-play: error: input not found" in res.stderr


def test_play_skips_an_unreadable_image_with_one_warning(ros: RosHarness, tmp_path: Path):
    """A corrupt image in a folder: skipped (one warning line, no traceback), the others published in order, the
    count in the summary and exit status 1."""
    frames = write_frames(tmp_path / "frames", 3, seed=5)
    (tmp_path / "frames" / "frame_001.png").write_bytes(b"garbage, not a PNG")
    images = ros.collect(Image, "/t_playbad/image_raw")
    res = ros_support.run_module("icnet_ros.tools.play", [
        str(tmp_path / "frames"), "--topic", "/t_playbad/image_raw", "--rate", "25", "--wait-subscribers", "1"],
        timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("icnet-play: warning: skipped an image: cannot decode image") and \
        "frame_001.png" in res.stderr
    assert "published 2 frames" in res.stdout and "skipped 1 unreadable image(s)" in res.stdout
    assert images.wait_for(lambda m: len(m) >= 2, 10), f"received {len(images.messages)} of 2 images"
    ros.unsubscribe(images)
    got = [image_to_numpy(m) for m in images.messages]
    assert len(got) == 2 and all((g == f).all() for g, f in zip(got, (frames[0], frames[2])))


def test_play_reads_nothing_past_max_frames(tmp_path: Path, capsys):
    """--max-frames 2 on a folder whose images after the first two are corrupt: the cap was checked only once the
    next frame had been read, so those images were still read, each warned about and counted (icnet-demo then
    exited 1 although every frame asked for was fine). Now nothing past the cap is read. The calls icnet-play and
    icnet-demo make, with and without --loop."""
    from icnet_ros.tools.play import UnreadableImages, frames
    from icnet_ros.video import open_source

    write_frames(tmp_path / "frames", 2)
    for i in range(2, 6):
        (tmp_path / "frames" / f"frame_{i:03d}.png").write_bytes(b"garbage, not a PNG")
    for loop in (False, True):
        source = open_source(tmp_path / "frames")
        skipped = UnreadableImages("icnet-play").install(source)
        assert [f.name for f in frames(source, loop, 2)] == ["frame_000", "frame_001"]
        assert skipped.paths == [] and skipped.summary() == ""
    assert capsys.readouterr().err == ""


def test_play_skips_an_image_over_max_pixels_with_one_warning(tmp_path: Path):
    """icnet-play and icnet-demo decoded image files whatever their size (a 140 KB PNG declaring 12000x12000: a
    412 MiB frame, published for the node to drop). Now --max-pixels (icnet-segment's option and default) refuses
    such an image from its header: one warning naming it, counted with the unreadable images, exit status 1; the
    corrupt image after --max-frames is not read."""
    write_frames(tmp_path / "frames", 4, seed=2)
    big = tmp_path / "frames" / "frame_001.png"
    cv2.imwrite(str(big), np.zeros((240, 320, 3), np.uint8))  # 76800 pixels; the others 19200
    (tmp_path / "frames" / "frame_003.png").write_bytes(b"garbage, not a PNG")
    res = ros_support.run_module("icnet_ros.tools.play", [str(tmp_path / "frames"), "--topic", "/t_playbig/image_raw",
                                                          "--rate", "0", "--max-frames", "2", "--max-pixels", "50000"],
                                 timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr == (f"icnet-play: warning: skipped an image: image {big}: 320x240 = 76800 pixels exceeds the "
                          "limit of 50000 pixels (--max-pixels)\n"), res.stderr
    assert "published 2 frames" in res.stdout and "skipped 1 unreadable image(s)" in res.stdout, res.stdout


def test_play_and_demo_refuse_a_video_over_max_pixels_in_one_line(checkpoint: Path, tmp_path: Path, capsys):
    """--max-pixels is icnet-segment's option, with its default (the node's max_pixels), in icnet-play and
    icnet-demo too; a video whose frames are larger is refused when it is opened, before rclpy starts or the model
    loads (before: 16 Mpx frames decoded and published, for the node to drop each one). In this process."""
    from icnet_ros.ros_image import DEFAULT_MAX_PIXELS
    from icnet_ros.tools import demo, play, segment

    assert [tool.build_parser().parse_args(args).max_pixels for tool, args in (
        (segment, ["x", "-o", "o"]), (play, ["x"]), (demo, []))] == [DEFAULT_MAX_PIXELS] * 3
    video = tmp_path / "wide.avi"  # 3900x2200 = 8580000 pixels, above 3840x2160
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (3900, 2200))
    writer.write(np.zeros((2200, 3900, 3), np.uint8))
    writer.release()
    reason = f"video {video}: 3900x2200 = 8580000 pixels per frame exceeds the limit of {DEFAULT_MAX_PIXELS} pixels"
    assert play.main([str(video)]) == 2
    assert capsys.readouterr().err == f"icnet-play: error: {reason} (--max-pixels)\n"
    # --size shrinks what is published: the limit is the published size's (the video played, not refused)
    res = ros_support.run_module("icnet_ros.tools.play", [str(video), "--size", "720x1280", "--topic",
                                                          "/t_playwide/image_raw", "--rate", "0"], timeout=60)
    assert res.returncode == 0 and "published 1 frame\n" in res.stdout, res.stdout + res.stderr
    out = tmp_path / "out"
    assert demo.main([str(video), "--model", str(checkpoint), "--output", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"icnet-demo: error: {reason} (--max-pixels)\n" and not out.exists()
    assert play.main([str(video), "--max-pixels", "0"]) == 2
    assert capsys.readouterr().err == "icnet-play: error: --max-pixels must be in [1, 268435456] (as the node's " \
        "max_pixels), got 0\n"
    # the demo's node takes it as its max_pixels: a value the node refuses is refused before anything starts
    assert demo.main([str(video), "--model", str(checkpoint), "--output", str(out), "--max-pixels", "268435457"]) == 2
    assert capsys.readouterr().err == "icnet-demo: error: --max-pixels must be in [1, 268435456] (as the node's " \
        "max_pixels), got 268435457\n" and not out.exists()


def test_play_plays_a_video_without_a_frame_count_to_its_end(tmp_path: Path, capsys):
    """A Matroska file without a Duration (browsers' MediaRecorder, OBS): OpenCV's frame count is -9.2e16, and
    icnet-play and icnet-demo said 'no frames in X' although every frame decodes. Now such a video is played to its
    end; one that has no frame is still 'no frames' (decided by decoding it)."""
    from helpers import mkv_without_duration

    from icnet_ros.tools import play

    video = mkv_without_duration(tmp_path / "rec.mkv", n=12)
    res = ros_support.run_module("icnet_ros.tools.play", [str(video), "--topic", "/t_playmkv/image_raw", "--rate",
                                                          "0"], timeout=60)
    assert res.returncode == 0 and "published 12 frames" in res.stdout, res.stdout + res.stderr
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64)).release()
    assert play.main([str(empty)]) == 2
    assert capsys.readouterr().err == f"icnet-play: error: no frames in {empty}\n"


def video_without_decodable_frames(path: Path) -> Path:
    """An MP4 whose container declares 5 frames (10 fps) and whose coded frames are zeros: none decodes."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(5):
        writer.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    i = data.find(b"mdat")
    size = int.from_bytes(data[i - 4:i], "big")
    data[i + 4:i - 4 + size] = bytes(size - 8)  # the coded frames zeroed, the index (the frame count) kept
    path.write_bytes(bytes(data))
    return path


def test_play_and_demo_refuse_a_video_from_which_no_frame_decodes(checkpoint: Path, tmp_path: Path):
    """A video whose container declares frames that do not decode: icnet-play said 'published 0 frames', exit
    status 0, among FFmpeg's 'header damaged' lines, and icnet-demo loaded the model and played it before finding
    out (a 0-frame video was already 'no frames in X', exit status 2). Now its first frame is decoded up front: one
    line 'no frames in X', exit status 2, before anything is published or the model loads."""
    video = video_without_decodable_frames(tmp_path / "zeros.mp4")
    res = ros_support.run_module("icnet_ros.tools.play", [str(video), "--topic", "/t_playzeros/image_raw"],
                                 timeout=60)
    assert (res.returncode, res.stderr) == (2, f"icnet-play: error: no frames in {video}\n"), res.stdout + res.stderr
    assert "published" not in res.stdout
    out = tmp_path / "out"
    res = ros_support.run_module("icnet_ros.tools.demo", [str(video), "--model", str(checkpoint), "--output",
                                                          str(out), "--device", "cpu"], timeout=120)
    assert (res.returncode, res.stderr) == (2, f"icnet-demo: error: no frames in {video}\n"), res.stdout + res.stderr
    assert "loading" not in res.stdout and not out.exists()


def test_bad_counts_are_refused_in_one_line(tmp_path: Path):
    write_frames(tmp_path / "frames", 1)
    for module, args, message in (
            ("icnet_ros.tools.play", [str(tmp_path / "frames"), "--max-frames", "-2"], "--max-frames must be >= 1"),
            ("icnet_ros.tools.record", ["/x", "--reliability", "reliable", "--depth", "-1"], "--depth must be > 0")):
        res = ros_support.run_module(module, args, timeout=60)
        assert res.returncode == 2 and message in res.stderr, res.stdout + res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_play_refuses_a_size_over_max_pixels_in_one_line(tmp_path: Path, capsys):
    """--size had no bound: 100000x100000 was taken and the first frame resized to it (30 GB for bgr8, an
    out-of-memory kill); frames over --max-pixels would be dropped by the node anyway."""
    from icnet_ros.tools import play

    write_frames(tmp_path / "frames", 1)
    assert play.main([str(tmp_path / "frames"), "--size", "100000x100000"]) == 2
    err = capsys.readouterr().err
    assert err == ("icnet-play: error: --size 100000x100000 = 10000000000 pixels exceeds --max-pixels 8294400 (the "
                   "node's max_pixels drops larger frames)\n"), err


def test_a_frame_published_is_counted_when_ctrl_c_strikes_right_after(ros: RosHarness):
    """A Ctrl-C landing between a frame's publish and its count (a KeyboardInterrupt raised at the next bytecode)
    left a frame the subscribers got out of icnet-play's summary ('published 4 frames' after 5 arrived, a CI run
    of the test below). Publishing and counting are now one held step: the interrupt is raised after both."""
    import os
    import signal
    import threading

    from icnet_ros.tools.cli_checks import StopSignals
    from icnet_ros.tools.play import Player

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread")
    player = Player(ros.node, "/t_playheld/image_raw")
    publish = player.image_pub.publish

    def publish_then_interrupt(msg):
        publish(msg)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode, as for a real Ctrl-C

    player.image_pub.publish = publish_then_interrupt
    with StopSignals() as stop:
        player.held = stop.held
        with pytest.raises(KeyboardInterrupt):
            player.publish(np.zeros((8, 8, 3), np.uint8))
    assert player.published == 1 and player.last_published is not None
    ros.node.destroy_publisher(player.image_pub)
    ros.node.destroy_publisher(player.info_pub)


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_play_stops_on_ctrl_c_with_a_summary(ros: RosHarness, tmp_path: Path, signame: str, status: int):
    """SIGINT while publishing: before, rclpy's signal handler shut the context down under the publishers (an
    RCLError 'publisher's context is invalid' traceback, exit status 1) or a KeyboardInterrupt struck inside
    destroy_node. Now one 'interrupted' line with the count, exit status 130. SIGTERM (kill, timeout, a launch
    file's shutdown) ended the process at once with no summary (exit status -15); now it stops as Ctrl-C does,
    exit status 143, as icnet-segment and icnet-record."""
    import signal

    write_frames(tmp_path / "frames", 2)
    topic = f"/t_playint_{signame.lower()}/image_raw"
    images = ros.collect(Image, topic)
    play = Process("icnet_ros.tools.play", [str(tmp_path / "frames"), "--topic", topic, "--rate",
                                            "25", "--loop", "--wait-subscribers", "1"], tmp_path)
    try:
        assert images.wait_for(lambda m: len(m) >= 5, 60), play.output()
        play.proc.send_signal(getattr(signal, signame))
        assert play.wait(30) == status, play.output()
    finally:
        play.kill()
        ros.unsubscribe(images)
    out = play.output()
    m = re.search(r"icnet-play: interrupted: published (\d+) frames at ([\d.]+) fps \(the first to the last in", out)
    assert "Traceback" not in out and m and int(m.group(1)) >= 5 and float(m.group(2)) <= 27.5, out


def test_play_refuses_a_rate_too_slow_to_sleep_in_one_line(tmp_path: Path):
    """--rate 1e-300: the second frame's wait (1e300 s) made time.sleep raise OverflowError (a traceback, exit
    status 1). Now a rate other than 0 below MIN_RATE (a frame every 1000 s) is one line, exit status 2, before
    rclpy starts. (A process: the old code went on to publish.)"""
    from icnet_ros.tools.play import MIN_RATE

    write_frames(tmp_path / "frames", 3)
    for rate in ("1e-300", str(MIN_RATE / 2)):
        res = ros_support.run_module("icnet_ros.tools.play", [str(tmp_path / "frames"), "--rate", rate, "--max-frames",
                                                              "3", "--topic", "/t_playslow/image_raw"], timeout=60)
        assert res.returncode == 2 and res.stderr == (
            f"icnet-play: error: --rate must be 0 (as fast as possible) or at least {MIN_RATE:g} fps (a frame every "
            f"{1 / MIN_RATE:g} s), got {float(rate):g}\n"), (res.returncode, res.stderr[-2000:])


def test_tools_refuse_non_finite_numbers_and_bad_topics_in_one_line(tmp_path: Path, capsys):
    """--rate nan/inf (icnet-play), --fps nan, --idle-timeout nan (icnet-record) were accepted (nan compares false
    with everything): now one line and exit status 2 before anything starts, as a bad topic name for icnet-record
    (before: an InvalidTopicNameException traceback from create_subscription). In this process: the tools stop
    before rclpy is initialised."""
    from icnet_ros.tools import demo, play, record

    write_frames(tmp_path / "frames", 1)
    frames = str(tmp_path / "frames")
    for tool, args, message in (
            # icnet-demo takes icnet-play's rule (before: 1e-300 reached time.sleep's OverflowError, nan was taken)
            (demo, [frames, "--rate", "nan"], "--rate must be a finite number >= 0"),
            (demo, [frames, "--rate", "1e-300"], "--rate must be 0 (as fast as possible) or at least 0.001 fps"),
            (demo, [frames, "--timeout", "nan"], "--timeout must be > 0 and at most 1e+06 s"),
            (demo, [frames, "--timeout", "1e10"], "--timeout must be > 0 and at most 1e+06 s"),  # (an OverflowError)
            (play, [frames, "--rate", "nan"], "--rate must be a finite number >= 0"),
            (play, [frames, "--rate", "inf"], "--rate must be a finite number >= 0"),
            (play, [frames, "--wait-timeout", "nan"], "--wait-timeout must be a finite number > 0"),
            (record, ["/x", "--fps", "nan"], "--fps must be a finite number > 0, got nan"),
            (record, ["/x", "--fps", "0"], "--fps must be > 0, got 0.0"),
            (record, ["/x", "--idle-timeout", "nan"], "--idle-timeout must be a finite number > 0, got nan"),
            (record, ["/x", "--duration", "inf"], "--duration must be a finite number > 0, got inf"),
            (record, ["bad//topic"], "topic 'bad//topic': not a valid ROS topic name (topic name must not "
                                     "contain repeated '/')"),
            (record, ["/ok", "/x y"], "topic '/x y': not a valid ROS topic name"),
            # (before: --max-pixels unknown; an OverflowError and a TypeError traceback once rclpy had started)
            (record, ["/x", "--max-pixels", "0"], "--max-pixels must be in [1, 268435456] (as the node's max_pixels)"),
            (record, ["/x", "--max-queue-mb", "1e308"], "--max-queue-mb must be at most 1048576, got 1e+308"),
            (record, ["/x", "--depth", "4294967296"], "--depth must be at most 10000, got 4294967296")):
        assert tool.main(args) == 2, (args, capsys.readouterr())
        err = capsys.readouterr().err
        prog = {play: "icnet-play", record: "icnet-record", demo: "icnet-demo"}[tool]
        assert err.startswith(f"{prog}: error: ") and message in err and err.count("\n") == 1, (args, err)


def test_record_refuses_a_folder_holding_a_recording(tmp_path: Path, capsys):
    """A second recording into the same folder overwrote the first one's files without a word (names are
    <index>_<stamp>: the same indices, and the same stamps when a bag is replayed). Now the folder is refused
    (one line naming a file of the earlier recording, exit 2); other files in it do not count."""
    from icnet_ros.tools import record

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("")
    (out / "000000_1000.000000005.png.bak").write_text("")
    for args in (["/a"], ["/a", "/b"]):  # a fresh folder, and one that holds other files: accepted
        assert record.existing_recording(record.topic_folders(out, args)[0]) is None
    (out / "000003_1000.000000005.png").write_bytes(b"")  # one topic: files in --output itself
    (out / "b").mkdir()
    (out / "b" / "000000_7.000000000.jpg").write_bytes(b"")  # several topics: one folder per topic
    for args, folder, name in ((["/camera/x"], out, "000003_1000.000000005.png"),
                               (["/a", "/b"], out / "b", "000000_7.000000000.jpg")):
        assert record.main([*args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"icnet-record: error: --output {out}: {folder} already holds a recording ({name}); a new one "
                       "would overwrite its files: choose another --output or remove them\n"), err
    # a folder that cannot be created: said so naming the flag, before rclpy starts (was the bare errno text)
    assert record.main(["/a", "--output", "/sys/icnet_record_test"]) == 2
    assert capsys.readouterr().err.startswith("icnet-record: error: --output /sys/icnet_record_test: cannot create")


def test_play_refuses_an_invalid_topic_in_one_line(tmp_path: Path):
    """--topic is checked as rclpy checks it, before the node exists: before, create_publisher raised a 21-line
    InvalidTopicNameException traceback (exit 1). '/compressed' names a camera whose image topic would be ''."""
    write_frames(tmp_path / "frames", 1)
    for topic, reason in (("bad topic", "must not contain characters other than alphanumerics"),
                          ("/compressed", "publishes on '': not a valid ROS topic name")):
        res = ros_support.run_module("icnet_ros.tools.play", [str(tmp_path / "frames"), "--topic", topic,
                                                              "--max-frames", "1"], timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
        assert lines[0].startswith(f"icnet-play: error: --topic {topic!r}") and reason in lines[0], lines[0]
        assert "published" not in res.stdout


def test_record_saves_every_frame(ros: RosHarness, tmp_path: Path):
    out = tmp_path / "rec"
    rng = np.random.default_rng(5)
    sent = [("rgb8", rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
            ("bgr8", rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
            ("mono8", rng.integers(0, 256, (H, W), dtype=np.uint8)),
            ("rgba8", rng.integers(0, 256, (H, W, 4), dtype=np.uint8))]
    pub = ros.publisher(Image, "/t_rec/semantic/overlay", RosHarness.qos(reliable=True, depth=10))
    rec = Process("icnet_ros.tools.record", ["/t_rec/semantic/overlay", "--output", str(out), "--max-frames", "4",
                                             "--video", str(tmp_path / "rec.mp4"), "--fps", "5"], tmp_path)
    try:
        ros.wait_matched(pub)  # 'auto' reliability: the recorder subscribes once it has seen this publisher
        for i, (enc, img) in enumerate(sent):
            pub.publish(image_msg(img, enc, ros.now(), frame_id=f"f{i}"))
        assert rec.wait(30) == 0, rec.output()
    finally:
        rec.kill()
        ros.node.destroy_publisher(pub)
    assert "received 4, saved 4" in rec.output()
    files = sorted(out.glob("*.png"))
    assert [re.match(r"\d{9}_\d+\.\d{9}\.png$", f.name) is not None for f in files] == [True] * 4
    expected = [sent[0][1][:, :, ::-1], sent[1][1], sent[2][1], sent[3][1][:, :, 2::-1]]
    for f, exp in zip(files, expected):
        got = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got, exp)
    cap = cv2.VideoCapture(str(tmp_path / "rec.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 4


def test_record_bounds_its_write_queue_and_counts_what_it_drops(ros: RosHarness, tmp_path: Path):
    """Frames arriving faster than the disk takes them: at most max_queue_bytes wait (one frame always does), the
    rest are dropped and counted; every frame is saved or dropped, none lost silently."""
    from icnet_ros.tools.record import Recorder

    rng = np.random.default_rng(9)
    frames = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(3)]  # noise: slow PNGs
    size = frames[0].nbytes
    rec = Recorder(ros.node, ["/t_recq/overlay"], tmp_path / "q", reliability="reliable",
                   max_queue_bytes=2 * size)
    try:
        for i in range(40):  # straight into the callback: 40 x 2.7 MB in far less than one PNG's write time
            rec._on_msg("/t_recq/overlay", image_msg(frames[i % 3], "rgb8", ros.now(), frame_id="f"))
        assert rec._queued_bytes <= 2 * size
    finally:
        rec.close()
    assert rec.received == 40 and rec.failed == 0
    assert rec.dropped >= 30 and rec.saved + rec.dropped == 40
    files = sorted((tmp_path / "q").glob("*.png"))
    assert len(files) == rec.saved
    np.testing.assert_array_equal(cv2.imread(str(files[0])), frames[0][:, :, ::-1])
    with pytest.raises(ValueError, match="max_queue_bytes"):
        Recorder(ros.node, ["/t_recq/overlay"], tmp_path / "q", max_queue_bytes=0)


def test_record_writes_every_queued_frame_or_counts_it_as_not_written(ros: RosHarness, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """A slow disk: Recorder.close joined the writer thread for 60 s, then finished the video while the thread still
    wrote; the frames still queued were lost silently ('received 70, saved 65', exit status 0). Now close waits for
    every write by default (on_wait says so after WAIT_NOTICE_S); when its wait ends first (a timeout here, a second
    Ctrl-C in icnet-record), the writer takes no further frame, the others count as not written (exit status 1)
    and the video is not finished under the writer (an error instead). The image writes are slowed here."""
    import icnet_ros.video as video
    from icnet_ros.tools import record

    write_image = video.write_image

    def slow_write(*args, **kwargs):
        time.sleep(0.25)
        return write_image(*args, **kwargs)

    finished: list[object] = []
    finish = video.VideoWriter.finish
    monkeypatch.setattr(video, "write_image", slow_write)
    monkeypatch.setattr(video.VideoWriter, "finish", lambda self: (finished.append(self), finish(self))[1])
    img = np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)

    def recorder(name: str) -> record.Recorder:
        rec = record.Recorder(ros.node, ["/t_recslow/overlay"], tmp_path / name, reliability="reliable",
                              video=tmp_path / f"{name}.mp4")
        for _ in range(8):
            rec._on_msg("/t_recslow/overlay", image_msg(img, "bgr8", ros.now()))
        return rec

    rec = recorder("stopped")
    rec.close(timeout=0.4)
    assert finished == [], "the video was finished while the writer thread was still writing"
    rec._writer.join(5.0)  # the frame being written completes, no other one starts
    assert not rec._writer.is_alive()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".mp4"] == []  # the abandoned video's temporary file
    assert rec.received == 8 and rec.saved <= 4 and rec.failed == rec.dropped == 0  # 2 s of writes had it gone on
    assert rec.unwritten == 8 - rec.saved and len(list((tmp_path / "stopped").glob("*.png"))) == rec.saved
    assert rec.video_error == (f"cannot write {tmp_path / 'stopped.mp4'}: not finished (the recording stopped "
                               "before every frame was written)")
    line, status = record.final_report(rec, "8 frames", 1.0)
    assert status == 1 and line == (f"icnet-record: stopped (8 frames): received 8, saved {rec.saved}, not written "
                                    f"{8 - rec.saved} (the writing was stopped) in 1.0 s -> {tmp_path / 'stopped'}/")

    monkeypatch.setattr(record, "WAIT_NOTICE_S", 0.3)
    waiting: list[int] = []
    rec = recorder("whole")
    rec.close(on_wait=waiting.append)  # no timeout: every frame written, the video finished
    assert len(waiting) == 1 and 1 <= waiting[0] <= 8 and (rec.saved, rec.unwritten) == (8, 0), waiting
    assert len(finished) == 1 and rec.video_error is None
    assert record.final_report(rec, "8 frames", 2.0)[1] == 0
    # a callback the executor began while close destroyed the subscriptions: not taken (it was queued after the
    # writer's last item and counted as not written: exit status 1 for a recording that lost nothing)
    rec._on_msg("/t_recslow/overlay", image_msg(img, "bgr8", ros.now()))
    assert (rec.received, rec.unwritten) == (8, 0)


def test_record_names_compressed_frames_after_their_bytes(ros: RosHarness, tmp_path: Path):
    """A CompressedImage with an empty format and JPEG bytes was saved as .png (the format decided, 'png' when it
    named nothing): now the bytes decide (PNG or JPEG signature), the format only when they are neither."""
    from icnet_ros.ros_image import numpy_to_compressed
    from icnet_ros.tools.record import Recorder

    img = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    jpeg, png = numpy_to_compressed(img, "BGR", "jpeg")[1], numpy_to_compressed(img, "BGR", "png")[1]
    rec = Recorder(ros.node, ["/t_recc/image_raw/compressed"], tmp_path / "c", reliability="reliable")
    try:
        for fmt, data in (("", jpeg), ("png", jpeg), ("", png), ("bgr8; jpeg compressed bgr8", png),
                          ("", b"neither")):
            msg = CompressedImage(format=fmt, data=data)
            msg.header.stamp = ros.now().to_msg()
            rec._on_msg("/t_recc/image_raw/compressed", msg)
    finally:
        rec.close()
    assert (rec.received, rec.saved, rec.failed) == (5, 4, 1)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert [n[:9] + n[-4:] for n in names] == ["000000000.jpg", "000000001.jpg", "000000002.png", "000000003.png"], \
        names
    for name, data in zip(names, (jpeg, jpeg, png, png)):
        assert (tmp_path / "c" / name).read_bytes() == data  # as received


def test_record_video_skips_frames_it_cannot_take_and_topics_get_folders_apart(ros: RosHarness, tmp_path: Path):
    """--video decoded every compressed frame whatever its size (a 2.2 MB JPEG declaring 12000x12000: 1.5 GB of RSS);
    now a compressed frame whose header declares more than max_pixels (icnet-record's --max-pixels) is saved but not
    added to the video, as is a compressed frame that does not decode (before: counted failed, 'cannot save frame',
    although its file was written); a raw frame (its pixels in memory already) goes in at any size, and a video
    none of the frames could go into is an error, not a missing file with exit status 0. Topics whose folder names
    were the same (/a/b/compressed and /a_b/compressed) overwrote each other's frames: each now gets a short hash of
    its name. Indices are 9 digits: past 999999 the names still sort in arrival order (and are still known as a
    recording). Several topics go into the video in arrival order (not placed by their stamps)."""
    import hashlib

    from helpers import jpeg_with_size

    from icnet_ros.ros_image import numpy_to_compressed
    from icnet_ros.tools import record

    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    jpeg = numpy_to_compressed(img, "BGR", "jpeg")[1]
    a, b, raw = "/t_recvid/a/b/compressed", "/t_recvid/a_b/compressed", "/t_recvid/overlay"
    out = tmp_path / "rec"
    rec = record.Recorder(ros.node, [a, b, raw], out, reliability="reliable", video=tmp_path / "rec.mp4",
                          max_pixels=H * W)
    rec._counts[raw] = 999_999  # as after 999999 frames

    def compressed(data: bytes, sec: int) -> CompressedImage:
        msg = CompressedImage(format="jpeg", data=data)
        msg.header.stamp.sec = sec
        return msg

    try:
        for topic, msg in ((a, compressed(jpeg, 5)), (b, compressed(jpeg, 5)),  # the same stamp: the same file name
                           (a, compressed(jpeg_with_size(jpeg, 12000, 12000), 6)),  # 144 Mpx declared
                           (a, compressed(jpeg[:200], 7)), (a, compressed(jpeg, 8)),
                           (raw, image_msg(img, "bgr8", ros.now())),
                           (raw, image_msg(np.repeat(np.repeat(img, 2, 0), 2, 1), "bgr8", ros.now()))):
            rec._on_msg(topic, msg)
    finally:
        rec.close()
    assert (rec.received, rec.saved, rec.failed, rec.not_in_video, rec.video_error) == (7, 7, 0, 2, None)
    line, status = record.final_report(rec, "7 frames", 1.0)
    assert status == 0 and "received 7, saved 7, 2 not added to the video in 1.0 s" in line, line
    slug = "t_recvid_a_b_compressed"
    folders = {t: f"{slug}-{hashlib.sha1(t.encode()).hexdigest()[:8]}" for t in (a, b)}
    assert sorted(p.name for p in out.iterdir()) == sorted([*folders.values(), "t_recvid_overlay"])
    assert [p.read_bytes() for p in sorted((out / folders[a]).iterdir())] == [
        jpeg, jpeg_with_size(jpeg, 12000, 12000), jpeg[:200], jpeg]  # as received, in arrival order
    assert [p.name for p in (out / folders[b]).iterdir()] == ["000000000_5.000000000.jpg"]
    assert [p.name[:10] for p in sorted((out / "t_recvid_overlay").iterdir())] == ["000999999_", "001000000_"]
    assert all(record.existing_recording(out / f) is not None for f in folders.values())
    cap = cv2.VideoCapture(str(tmp_path / "rec.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5  # the good JPEGs and both raw frames
    cap.release()
    only = record.Recorder(ros.node, [a], tmp_path / "rec2", reliability="reliable", video=tmp_path / "rec2.mp4",
                           max_pixels=H * W)
    try:
        only._on_msg(a, compressed(jpeg_with_size(jpeg, 12000, 12000), 9))
    finally:
        only.close()
    line, status = record.final_report(only, "1 frame", 1.0)
    assert status == 1 and only.video_error and "no video written to" in only.video_error, (line, only.video_error)
    assert "none of the 1 frame(s) saved could be added to it" in only.video_error and only.saved == 1


def test_record_reports_a_video_that_cannot_be_finished(ros: RosHarness, tmp_path: Path):
    """Recorder.close called VideoWriter.close, not finish: a video that does not read back with every frame was
    never noticed (exit status 0). Now one error line naming it, exit status 1, no traceback (here the video file
    is removed while the recording runs, so the finished video cannot be read back; it is written to a hidden
    temporary file until finished: nothing is left at its name)."""
    out, video = tmp_path / "rec", tmp_path / "rec.mp4"

    def temporary() -> list[Path]:
        return list(tmp_path.glob(".rec.mp4.*.tmp.mp4"))

    pub = ros.publisher(Image, "/t_recv/overlay", RosHarness.qos(reliable=True, depth=10))
    rec = Process("icnet_ros.tools.record", ["/t_recv/overlay", "--output", str(out), "--video", str(video),
                                             "--idle-timeout", "1.5"], tmp_path)
    try:
        ros.wait_matched(pub)
        for i in range(2):
            pub.publish(image_msg(np.full((H, W, 3), 40 * i, np.uint8), "bgr8", ros.now()))
        ros.wait_until(lambda: len(list(out.glob("*.png"))) == 2 and temporary(), 30, "two frames saved")
        time.sleep(0.3)  # the second frame's video write follows its PNG
        temporary()[0].unlink()
        status = rec.wait(30)
    finally:
        rec.kill()
        ros.node.destroy_publisher(pub)
    out_text = rec.output()
    assert status == 1 and "received 2, saved 2" in out_text and "Traceback" not in out_text, out_text
    assert f"icnet-record: error: cannot write {video}: No such file or directory" in out_text, out_text
    assert not video.exists() and not temporary()


def _record_process(ros: RosHarness, pub: Any, args: list[str], log: Path, publish: Callable[[], None],
                    preexec_fn: Callable[[], None] | None = None) -> int:
    """Run ``icnet-record ARGS`` as a process (output into ``log``), call ``publish`` once ``pub`` matched it, and
    return its exit status; ``pub`` is destroyed at the end."""
    import subprocess

    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.record", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=ros_support.subprocess_env(), preexec_fn=preexec_fn)
        try:
            ros.wait_matched(pub)
            publish()
            return proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            ros.node.destroy_publisher(pub)


def test_a_video_that_fails_mid_recording_costs_no_frame_its_image(ros: RosHarness, tmp_path: Path):
    """The video stops growing (here: a file-size limit, as a full disk would): the frames go on being saved as
    images and count as saved; the video error is one line, exit status 1. Before, every frame after the failure
    counted as failed (its image written all the same) with an error line each."""
    limit = child_file_size_limit(600_000)  # in the child: files stop growing there (EFBIG)
    out, video, log = tmp_path / "rec", tmp_path / "rec.mp4", tmp_path / "rec.log"
    pub = ros.publisher(Image, "/t_recfail/overlay", RosHarness.qos(reliable=True, depth=50))

    def publish() -> None:
        rng = np.random.default_rng(3)
        for _ in range(20):  # noise: ~520 KB a PNG; the video (~100 KB a frame, written in 256 KB blocks)
            # fails at its third block
            pub.publish(image_msg(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), "bgr8", ros.now()))

    status = _record_process(ros, pub, ["/t_recfail/overlay", "--output", str(out), "--video", str(video),
                                        "--max-frames", "20"], log, publish, limit)
    text = log.read_text(errors="replace")
    assert status == 1 and "received 20, saved 20" in text and "failed" not in text.split("stopped")[-1], text
    assert len(list(out.glob("*.png"))) == 20 and "Traceback" not in text
    assert text.count(f"cannot write {video}") >= 1 and "cannot save frame" not in text, text


def test_a_compressed_frame_that_cannot_be_written_leaves_no_file(ros: RosHarness, tmp_path: Path):
    """Compressed frames were written straight to their final names: a full disk (here a file-size limit) left cut
    and empty .png files that looked like frames, counted as failed but read back as saved (and as an earlier
    recording by the next run). Now each file is written whole or not at all, the error naming it."""
    limit = child_file_size_limit(300_000)  # in the child: files stop growing there (EFBIG)
    rng = np.random.default_rng(5)
    small = [cv2.imencode(".png", np.full((H, W, 3), 40 * i, np.uint8))[1].tobytes() for i in range(3)]
    big = [cv2.imencode(".png", rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))[1].tobytes() for _ in range(2)]
    assert max(map(len, small)) < 300_000 < min(map(len, big))
    out, log = tmp_path / "rec", tmp_path / "rec.log"
    pub = ros.publisher(CompressedImage, "/t_recfull/image/compressed", RosHarness.qos(reliable=True, depth=10))

    def publish() -> None:
        for i, data in enumerate((small[0], big[0], small[1], big[1], small[2])):
            msg = CompressedImage(format="png", data=data)
            msg.header.stamp.sec = 100 + i
            pub.publish(msg)

    status = _record_process(ros, pub, ["/t_recfull/image/compressed", "--output", str(out), "--max-frames", "5"],
                             log, publish, limit)
    text = log.read_text(errors="replace")
    assert status == 1 and "received 5, saved 3, failed 2" in text and "Traceback" not in text, text
    assert text.count("cannot write ") == 2, text
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert sorted(p.read_bytes() for p in files) == sorted(small), [(p.name, p.stat().st_size) for p in files]


def test_record_does_not_ask_for_a_publisher_after_recording_frames(ros: RosHarness, tmp_path: Path):
    """The camera published, then left: 5 s into the run icnet-record printed 'still waiting for a publisher ...
    (check the topic name, ROS_DOMAIN_ID and the DDS settings)' after a recording that worked. The hint is per
    topic: it names a second topic that never had a publisher (a typo), and not the camera that sent frames."""
    import subprocess

    out, log = tmp_path / "rec", tmp_path / "rec.log"
    pub = ros.publisher(Image, "/t_recleft/overlay", RosHarness.qos(reliable=True, depth=10))
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.record", "/t_recleft/overlay",
                                 "/t_recleft/overlay_typo", "--reliability", "reliable", "--output", str(out),
                                 "--duration", "6"], stdout=f, stderr=subprocess.STDOUT,
                                env=ros_support.subprocess_env())
        try:
            ros.wait_matched(pub)
            for _ in range(3):
                pub.publish(image_msg(np.zeros((H, W, 3), np.uint8), "bgr8", ros.now()))
            time.sleep(0.5)
        finally:
            ros.node.destroy_publisher(pub)  # the camera leaves
        try:
            status = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    hints = [line for line in text.splitlines() if "still waiting" in line]
    assert status == 0 and "received 3, saved 3" in text, text
    assert hints == ["icnet-record: still waiting for a publisher on /t_recleft/overlay_typo (check the topic name, "
                     "ROS_DOMAIN_ID and the DDS settings)"], text


def test_record_places_video_frames_by_their_stamps(ros: RosHarness, tmp_path: Path):
    """Frames dropped on the way compressed the video: --rate 25 --max-frames 25 through the demo gave 11 overlays
    written back to back at 25 fps, 0.44 s of video for 1 s. Now, with one topic, each frame lands at frame
    round((stamp - first stamp) * fps), the previous frame repeated up to there: stamps 0, 0.1 and 0.3 s at 10 fps
    make 4 frames (the second one twice). Equal stamps follow each other; a gap longer than VIDEO_MAX_GAP_S (10 s)
    is not filled (the video goes on from the new stamp)."""
    from builtin_interfaces.msg import Time

    from icnet_ros.tools import record

    shades = [0, 80, 160, 240, 120]
    rec = record.Recorder(ros.node, ["/t_recstamp/overlay"], tmp_path / "rec", reliability="reliable",
                          video=tmp_path / "rec.mp4", fps=10.0)
    try:
        for shade, t in zip(shades, (0.0, 0.1, 0.3, 0.3, 20.3)):
            stamp = Time(sec=1000 + int(t), nanosec=round((t % 1) * 1e9))
            rec._on_msg("/t_recstamp/overlay", image_msg(np.full((H, W, 3), shade, np.uint8), "bgr8", stamp))
    finally:
        rec.close()
    assert (rec.saved, rec.video_error) == (5, None)
    cap = cv2.VideoCapture(str(tmp_path / "rec.mp4"))
    means = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        means.append(int(round(frame.mean())))
    cap.release()
    expected = [0, 80, 80, 160, 240, 120]
    assert len(means) == len(expected) and all(abs(m - e) <= 8 for m, e in zip(means, expected)), means


def test_record_fills_a_gap_with_a_bounded_number_of_frames(ros: RosHarness, tmp_path: Path):
    """A gap's repeated frames are each encoded: at --fps 1000 a 9.9 s gap took 9899 encodes (46 s at 720p, the
    writer falling behind); at most VIDEO_MAX_REPEATS now (a longer gap is not filled: the video goes on)."""
    from builtin_interfaces.msg import Time

    from icnet_ros.tools import record

    rec = record.Recorder(ros.node, ["/t_recgap/overlay"], tmp_path / "rec", reliability="reliable",
                          video=tmp_path / "rec.mp4", fps=1000.0)
    try:  # (the repeats counted, not written: the video's frame count stays 0)
        assert rec._video_repeats(Time(sec=1000)) == 0  # the first frame
        assert rec._video_repeats(Time(sec=1000, nanosec=200_000_000)) == 200  # 0.2 s at 1000 fps: filled
        assert rec._video_repeats(Time(sec=1009, nanosec=900_000_000)) == 0  # 9.9 s: 9900 frames, not filled
    finally:
        rec.close()


def test_record_video_interrupted_while_it_is_finished_is_an_error(ros: RosHarness, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """A (second) Ctrl-C while Recorder.close finished the video (read back, renamed): close caught only OSError, so
    video_error stayed unset, the hidden temporary file .rec.mp4.<pid>.<n>.tmp.mp4 stayed and icnet-record exited
    0 with no video. Now the KeyboardInterrupt is raised on with video_error set ('not finished (interrupted)'),
    the temporary file removed: exit status 1."""
    import icnet_ros.video as video
    from icnet_ros.tools import record

    def finish_interrupted(self: video.VideoWriter) -> None:
        self._release()
        raise KeyboardInterrupt  # the signal arriving while the file is read back

    monkeypatch.setattr(video.VideoWriter, "finish", finish_interrupted)
    rec = record.Recorder(ros.node, ["/t_recki/overlay"], tmp_path / "rec", reliability="reliable",
                          video=tmp_path / "rec.mp4")
    img = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for _ in range(3):
        rec._on_msg("/t_recki/overlay", image_msg(img, "bgr8", ros.now()))
    with pytest.raises(KeyboardInterrupt):
        rec.close()
    assert rec.video_error == f"cannot write {tmp_path / 'rec.mp4'}: not finished (interrupted)"
    assert record.final_report(rec, "interrupted", 1.0)[1] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]


def test_recorder_keeps_nothing_per_frame(ros: RosHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Recorder.stamps kept the (sec, nanosec) of every frame ever received (about 140 B a frame, 360 MB a day at
    30 fps) and nothing read it. Now no attribute of a recorder grows with the frames received."""
    from icnet_ros.tools import record

    monkeypatch.setattr(record.Recorder, "_write", lambda self, msg, topic, stem: None)  # counting only
    rec = record.Recorder(ros.node, ["/t_recmem/overlay"], tmp_path / "rec", reliability="reliable")
    msg = image_msg(np.zeros((1, 1, 3), np.uint8), "bgr8", ros.now())
    try:
        for _ in range(200):
            rec._on_msg("/t_recmem/overlay", msg)
    finally:
        rec.close()
    assert rec.received == rec.saved == 200
    grown = {k: len(v) for k, v in vars(rec).items() if isinstance(v, (list, dict, set, tuple)) and len(v) >= 200}
    assert grown == {}, grown


def test_video_writer_writes_only_what_ffmpeg_writes_and_the_tools_check_it_first(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch):
    """--video x, x.webm, x.gif, x.png and icnet-record's --fps 0.001 or 1e5 passed the checks and failed at the
    first frame or at the end (the demo after loading the model and playing its whole input), and for .gif OpenCV's
    fallback, its image sequence writer, numbered its files after the temporary file's name: 4 stray
    .overlay.gif.<n>.1.tmp.gif files that nothing removed. Now VideoWriter uses FFmpeg only (a file type it does not
    write fails at the first frame, leaving no file), and video_writer_problem probes the file type and frame rate
    before a run: one line, no file left."""
    import itertools

    import icnet_ros.video as video

    # the first temporary file of a process that wrote an image before (the recorder's PNG): .<name>.<pid>.1.tmp
    monkeypatch.setattr(video, "_TMP_COUNTER", itertools.count(1))
    writer = video.VideoWriter(tmp_path / "overlay.gif", 10)
    with pytest.raises(OSError, match="overlay.gif"):
        for i in range(5):
            writer.write(np.full((H, W, 3), 40 * i, np.uint8))
        writer.finish()
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    for name, fps, reason in (("x", 10, "has no file type"), ("x.webm", 10, "cannot write a 'mp4v' video to a .webm"),
                              ("x.gif", 10, ".gif is an image file type"), ("x.png", 25, ".png is an image file"),
                              ("x.mp4", 0.001, "cannot write a 'mp4v' video at 0.001 fps"),
                              ("x.mp4", 1e5, "cannot write a 'mp4v' video at 100000 fps"),
                              ("x.mp4", 25, None), ("x.mkv", 10, None), ("x.avi", 29.97, None)):
        problem = video.video_writer_problem(tmp_path / name, fps)
        assert (problem is None) if reason is None else (problem is not None and problem.startswith(reason)), \
            (name, fps, problem)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, reason", [
    (["--video", "{tmp}/out.webm"], "--video {tmp}/out.webm: cannot write a 'mp4v' video to a .webm file"),
    (["--video", "{tmp}/out.mp4", "--fps", "1e5"], "--video {tmp}/out.mp4: cannot write a 'mp4v' video at 100000 fps")])
def test_record_refuses_a_video_its_writer_refuses_before_it_starts(tmp_path: Path, args: list[str], reason: str):
    """icnet-record --video out.webm (or --fps 1e5) started, recorded and failed at the first frame (an error per
    frame, the video missing). Now one line, exit status 2, before the node starts; no file is left."""
    res = ros_support.run_module("icnet_ros.tools.record", ["/t_recbadvid/overlay", "--output", str(tmp_path / "rec"),
                                                            "--duration", "3", *(a.format(tmp=tmp_path) for a in args)],
                                 timeout=60)
    assert res.returncode == 2 and res.stderr.startswith(f"icnet-record: error: {reason.format(tmp=tmp_path)}") \
        and res.stderr.count("\n") == 1, res.stdout + res.stderr
    assert res.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["rec"]
    assert list((tmp_path / "rec").iterdir()) == []


def test_record_interrupted_while_it_starts_is_one_line(tmp_path: Path):
    """Ctrl-C while icnet-record imports rclpy (its first second): before, rclpy.init's handlers were not installed
    yet, so SIGINT was a 32-line KeyboardInterrupt traceback (exit status 1) and SIGTERM a silent -15. Now, as
    icnet-play: one line 'icnet-record: interrupted', exit status 130 / 143."""
    import signal
    import subprocess

    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.record", "/t_recstart/overlay", "--output",
                                 str(tmp_path / "rec")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ros_support.subprocess_env(), cwd=str(ros_support.REPO),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        signal_once_loaded(proc, signum, "librcl")  # rclpy's library loading: the import under way
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (128 + signum, "icnet-record: interrupted\n"), (proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------- icnet-demo
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("demo") / "tiny.safetensors")


@pytest.mark.slow
def test_demo_segments_a_folder_and_stops_by_itself(checkpoint: Path, tmp_path: Path):
    frames = write_frames(tmp_path / "frames", 3, seed=3)
    out = tmp_path / "overlays"
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(out), "--device", "cpu"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"published 3 frames; node processed 3; received 3 overlays, saved 3", res.stdout), res.stdout
    files = sorted(out.glob("*.png"))
    assert len(files) == 3
    # the overlays are the Segmenter's, for the same frames (bgr8 in, bgr8 overlay out)
    from icnet_ros.engine import Segmenter

    seg = Segmenter(str(checkpoint), device="cpu", outputs=("overlay",), warmup=False)
    for f, img in zip(files, frames):
        got = cv2.imread(str(f))
        expected = seg.segment([img], channel_order="BGR")[0].overlay
        assert got.shape == (H, W, 3)
        assert (np.abs(got.astype(int) - expected).max(axis=2) <= 1).mean() > 0.99


def test_demo_plays_into_a_compressed_camera_topic(checkpoint: Path, tmp_path: Path):
    """--topic .../compressed (a CompressedImage camera, which the node takes): the player published raw Images on
    the base topic, so nothing matched and the demo failed after --timeout with 'did not connect' (60 s by
    default). Now it publishes JPEG CompressedImages there."""
    write_frames(tmp_path / "frames", 2, seed=4)
    out = tmp_path / "overlays"
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(out), "--device", "cpu", "--topic",
                                                          "/t_democ/image_raw/compressed", "--timeout", "30"],
                                 timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"published 2 frames; node processed 2; received 2 overlays, saved 2", res.stdout), res.stdout
    assert [cv2.imread(str(f)).shape for f in sorted(out.glob("*.png"))] == [(H, W, 3)] * 2


def test_demo_caps_a_folder_at_max_frames_and_skips_an_unreadable_image(checkpoint: Path, tmp_path: Path):
    """--max-frames caps an image folder as a video (the shared play path), and nothing past it is read (the
    corrupt frame_004 was read, warned about and counted); a corrupt image, and one over --max-pixels (refused from
    its header), are skipped with one warning each and counted (exit status 1), never a traceback."""
    write_frames(tmp_path / "frames", 5, seed=6)
    (tmp_path / "frames" / "frame_001.png").write_bytes(b"garbage, not a PNG")
    cv2.imwrite(str(tmp_path / "frames" / "frame_002.png"), np.zeros((240, 320, 3), np.uint8))  # 76800 pixels
    (tmp_path / "frames" / "frame_004.png").write_bytes(b"garbage, not a PNG")
    out = tmp_path / "overlays"
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(out), "--device", "cpu",
                                                          "--max-frames", "2", "--max-pixels", "50000"], timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("icnet-demo: warning: skipped an image")]
    assert "Traceback" not in res.stderr and len(warnings) == 2, res.stderr
    assert "cannot decode image" in warnings[0] and "frame_001.png" in warnings[0]
    assert warnings[1].endswith("frame_002.png: 320x240 = 76800 pixels exceeds the limit of 50000 pixels "
                                "(--max-pixels)"), warnings[1]
    assert "(2 frames," in res.stdout and "skipped 2 unreadable image(s)" in res.stdout, res.stdout
    assert re.search(r"published 2 frames; node processed 2; received 2 overlays, saved 2", res.stdout), res.stdout
    assert len(list(out.glob("*.png"))) == 2


def test_demo_summary_without_a_served_frame_has_no_nan(checkpoint: Path, tmp_path: Path):
    """No frame served (every image of the folder unreadable): the summary said 'latency p50 nan ms, p95 nan ms'."""
    (tmp_path / "frames").mkdir()
    for i in range(2):
        (tmp_path / "frames" / f"frame_{i:03d}.png").write_bytes(b"garbage, not a PNG")
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(tmp_path / "out"), "--device", "cpu"],
                                 timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    summary = next(ln for ln in res.stdout.splitlines() if "published 0 frames" in ln)
    assert "nan" not in summary and "latency p50 -, p95 -" in summary, summary


def test_demo_output_naming_a_file_is_one_line(checkpoint: Path, tmp_path: Path):
    write_frames(tmp_path / "frames", 1)
    (tmp_path / "taken.mp4").write_bytes(b"")
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(tmp_path / "taken.mp4")], timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    assert lines[0].startswith("icnet-demo: error: --output") and "is a file, not a folder" in lines[0]


@pytest.mark.parametrize("tool", ["demo", "record"])
def test_demo_and_record_check_the_video_file_before_they_start(checkpoint: Path, tmp_path: Path, tool: str):
    """--video naming a folder (or a path below a file) is one line and status 2 at once; before, the writer failed
    on every frame of the run and the count of saved frames said 0 while the PNGs had been written."""
    write_frames(tmp_path / "frames", 1)
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "file").write_bytes(b"")
    for video, reason in ((tmp_path / "folder.mp4", "is a folder, not a file"),
                          (tmp_path / "file" / "x.mp4", "is a file, not a folder")):
        args = ([str(tmp_path / "frames"), "--model", str(checkpoint)] if tool == "demo" else ["/camera/x"])
        res = ros_support.run_module(f"icnet_ros.tools.{tool}", args + ["--output", str(tmp_path / "out"),
                                                                        "--video", str(video)], timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
        assert lines[0].startswith(f"icnet-{tool}: error: --video {video}: ") and reason in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_demo_refuses_to_write_over_its_input(checkpoint: Path, tmp_path: Path):
    """'icnet-demo in/drive.mp4 --video in/drive.mp4' replaced the video played by its overlays (exit status 0), and
    'icnet-demo frames --output frames' saved the overlays among the frames (the next run played them as input).
    Now each is one line, exit status 2, before the model loads, nothing written: a --video that is an input file
    (by device and inode: also another spelling, a hard link), an --output that is the input folder (one inside it
    is fine: the folder is read without its subfolders)."""
    frames = write_frames(tmp_path / "frames", 2)
    video = tmp_path / "in" / "drive.mp4"
    video.parent.mkdir()
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for frame in frames:
        writer.write(frame)
    writer.release()
    data = video.read_bytes()
    for source, args, reason in (
            (video, ["--output", str(tmp_path / "out"), "--video", str(tmp_path / "in" / ".." / "in" / "drive.mp4")],
             f"input {video} would be overwritten by --video {tmp_path / 'in' / '..' / 'in' / 'drive.mp4'}"),
            (tmp_path / "frames", ["--output", str(tmp_path / "frames")],
             f"--output {tmp_path / 'frames'}: is the input folder")):
        res = ros_support.run_module("icnet_ros.tools.demo", [str(source), "--model", str(checkpoint),
                                                              "--device", "cpu", *args], timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
        assert lines[0].startswith(f"icnet-demo: error: {reason}") and "loading" not in res.stdout, lines[0]
    assert video.read_bytes() == data and sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame_000.png", "frame_001.png"] and not (tmp_path / "out").exists()
    from icnet_ros.tools.demo import _input_written_over
    from icnet_ros.video import open_source

    (tmp_path / "link.mp4").hardlink_to(video)
    assert _input_written_over(open_source(video), str(tmp_path / "out"), str(tmp_path / "link.mp4")) == (
        f"input {video} would be overwritten by --video {tmp_path / 'link.mp4'}; choose another --video (or move the "
        "input)")
    folder = open_source(tmp_path / "frames")
    assert _input_written_over(folder, str(tmp_path / "frames" / "."), None) == (
        f"--output {tmp_path / 'frames' / '.'}: is the input folder: the overlays would be saved among the images "
        "played (and played as input by a later run); choose another --output")
    (tmp_path / "frames" / "sub").mkdir()
    assert _input_written_over(folder, str(tmp_path / "frames" / "sub"), None) is None
    assert _input_written_over(folder, str(tmp_path / "out"), str(tmp_path / "frames" / "x.mp4")) is None


def test_demo_fails_when_a_frame_was_not_segmented(checkpoint: Path, tmp_path: Path):
    """A folder with a 20x20 image (below the network's 64x64 minimum): 'node processed 2, dropped {rejected: 1}',
    exit status 0, while an unreadable image was exit status 1; frames not taken within --timeout were counted and
    not used. Now, at --rate 0 (every frame segmented), a frame published and not processed, or not taken in time,
    or an overlay published and not received, is one error line and exit status 1; at --rate > 0 the node's drops
    are expected (the summary counts them)."""
    write_frames(tmp_path / "frames", 2, seed=4)
    cv2.imwrite(str(tmp_path / "frames" / "frame_002.png"), np.zeros((20, 20, 3), np.uint8))
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(tmp_path / "out"), "--device", "cpu"],
                                 timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "published 3 frames; node processed 2, dropped {'rejected': 1}" in res.stdout, res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("icnet-demo: error:")]
    assert errors == ["icnet-demo: error: the node processed 2 of the 3 frames published (dropped: rejected 1)"], \
        res.stderr
    from icnet_ros.tools.demo import frames_lost

    camera = {"processed": 3, "dropped": {"superseded": 0}, "computed": {"overlay": 3}}
    result = {"published": 3, "missed": []}
    assert frames_lost(0.0, result, camera, 3) is None
    assert frames_lost(0.0, dict(result, missed=[1]), camera, 2) == (
        "1 frame(s) not taken by the node within --timeout; received 2 of the 3 overlays the node published")
    dropped = {"processed": 1, "dropped": {"superseded": 2}, "computed": {"overlay": 1}}
    assert frames_lost(25.0, result, dropped, 1) is None  # real time: the node's drops are expected
    assert frames_lost(25.0, result, dropped, 0) == "received 0 of the 1 overlays the node published"


def test_demo_takes_the_exported_models_its_backends_run(checkpoint: Path, tmp_path: Path, capsys):
    """--backend offers onnxruntime, openvino and tensorrt, but '--model m.onnx' was refused before the node started
    (the check read every model as a .safetensors checkpoint: 'not a readable safetensors file'). Models are now
    checked as the node and icnet-segment take them (cli_checks.model_problem): an exported .onnx passes, to the
    next check here (an --output that is a file); a missing one is named. In this process: the demo stops before
    DDS is used (the test session's DDS settings are already those the demo would set)."""
    pytest.importorskip("onnx")
    from helpers import export_meta, tiny_onnx

    from icnet_ros.tools.demo import main as demo_main

    model = tiny_onnx(tmp_path / "m.onnx", export_meta(checkpoint))
    write_frames(tmp_path / "frames", 1)
    (tmp_path / "taken").write_bytes(b"")
    for onnx, expected in ((model, f"--output {tmp_path / 'taken'}: is a file"),
                           (tmp_path / "missing.onnx", f"model file not found: {tmp_path / 'missing.onnx'}")):
        assert demo_main([str(tmp_path / "frames"), "--model", str(onnx), "--backend", "onnxruntime", "--output",
                          str(tmp_path / "taken")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"icnet-demo: error: {expected}") and err.count("\n") == 1, err


def test_demo_refuses_an_output_folder_holding_a_recording(checkpoint: Path, tmp_path: Path):
    """A second 'icnet-demo VIDEO --max-frames 3 -o DIR' mixed its overlays into the first run's (6 files in DIR).
    Now refused before anything starts, as icnet-record refuses it: one line, exit status 2, nothing written."""
    write_frames(tmp_path / "frames", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000_1700000000.000000000.png").write_bytes(b"an earlier run's overlay")
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", str(out)], timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    assert lines[0] == (f"icnet-demo: error: --output {out}: already holds a recording (000000_1700000000.000000000"
                        ".png); a new one would mix its overlays into it: choose another --output, or remove its "
                        "files"), lines[0]
    assert len(list(out.iterdir())) == 1


def test_demo_default_output_is_a_new_folder_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without --output (scripts/run.sh VIDEO) each run saves into its own out/overlays/<date>-<time> folder, so a
    second run neither mixes its overlays into the first one's nor is refused."""
    from icnet_ros.tools.demo import DEFAULT_OUTPUT, default_output

    monkeypatch.chdir(tmp_path)
    now = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    first = default_output(now)
    assert first == Path(DEFAULT_OUTPUT) / "20240506-070809" and not first.exists()
    first.mkdir(parents=True)
    second = default_output(now)  # a second run in the same second
    assert second == Path(DEFAULT_OUTPUT) / "20240506-070809-2"


@pytest.mark.parametrize("output, reason", [  # sysfs: read-write here, read-only in a default Docker container
    ("/sys/icnet_rj_out", "cannot create the folder: (Operation not permitted|Read-only file system)"),
    ("/proc/icnet_rj_out", "cannot create the folder: No such file"),
    ("/sys/kernel", "the folder is not writable: (Permission denied|Read-only file system)")])
def test_demo_output_folder_that_cannot_be_written_is_one_line(checkpoint: Path, tmp_path: Path, output: str,
                                                               reason: str):
    """An --output that cannot be created or written (here for root too: /proc, /sys). Before, /sys/x loaded the
    model and ended in a PermissionError traceback, /sys/kernel played the whole input with an error per frame and
    'saved 0'. Now one line naming the folder and the reason, exit status 2, before the model is loaded."""
    write_frames(tmp_path / "frames", 2)
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames"), "--model", str(checkpoint),
                                                          "--output", output, "--device", "cpu"], timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    assert re.match(f"icnet-demo: error: --output {re.escape(output)}: {reason}", lines[0]), lines[0]
    assert "loading" not in res.stdout + res.stderr


@pytest.mark.slow
def test_run_sh_takes_paths_relative_to_the_callers_folder(checkpoint: Path, tmp_path: Path):
    """'bash clone/scripts/run.sh frames --model M' from another folder: run.sh changed to the repository root, so
    relative paths (the input, --model, --output, --video) were looked up there ('input not found'). Now the set-up
    runs in the repository and the demo in the caller's folder; without --output the overlays go to the caller's
    ./out/overlays/<date>-<time>/."""
    import os
    import subprocess

    write_frames(tmp_path / "frames", 2)
    model = os.path.relpath(checkpoint, tmp_path)
    res = subprocess.run(["bash", str(ros_support.REPO / "scripts" / "run.sh"), "frames", "--model", model,
                          "--video", "overlay.mp4", "--device", "cpu"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180, env=ros_support.subprocess_env())
    assert res.returncode == 0, res.stdout + res.stderr
    runs = list((tmp_path / "out" / "overlays").iterdir())
    assert len(runs) == 1 and len(list(runs[0].glob("*.png"))) == 2, res.stdout
    assert (tmp_path / "overlay.mp4").is_file()


def test_demo_without_a_model_points_to_the_model_option(tmp_path: Path):
    write_frames(tmp_path / "frames", 1)
    env = dict(ros_support.subprocess_env(), ICNET_ROS_DEFAULT_MODEL=str(tmp_path / "missing.safetensors"))
    res = ros_support.run_module("icnet_ros.tools.demo", [str(tmp_path / "frames")], timeout=60, env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icnet-demo: error:") and "--model" in lines[0], res.stderr


@pytest.mark.slow
def test_demo_live_mode_serves_the_camera_topic_until_ctrl_c(ros: RosHarness, checkpoint: Path, tmp_path: Path):
    demo = Process("icnet_ros.tools.demo", ["--model", str(checkpoint), "--topic", "/t_live/image_raw/compressed",
                                            "--device", "cpu"], tmp_path, name="demo_live")
    try:
        demo.wait_for_output("waiting for frames", 120)
        # the topics the node publishes (for a compressed camera it printed /t_live/image_raw/semantic/... before)
        assert "-> /t_live/semantic/{label,color,overlay,confidence}" in demo.output(), demo.output()
        pub = ros.publisher(CompressedImage, "/t_live/image_raw/compressed")
        col = ros.collect(Image, "/t_live/semantic/overlay")
        ros.wait_matched(pub)
        ros.wait_matched(col.subscription)
        img = write_frames(tmp_path / "live", 1)[0]
        jpeg = CompressedImage(format="jpeg", data=cv2.imencode(".jpg", img)[1].tobytes())
        for _ in range(5):  # best-effort input: resend until served
            jpeg.header.stamp = ros.now().to_msg()
            pub.publish(jpeg)
            if col.wait_for(lambda m: len(m) >= 1, 3):
                break
        assert col.messages, "the demo node did not serve the camera topic"
        # (a decoded CompressedImage is RGB, and the overlay keeps its input's channel order)
        assert col.messages[0].encoding == "rgb8" and (col.messages[0].height, col.messages[0].width) == (H, W)
        ros.unsubscribe(col)
        ros.node.destroy_publisher(pub)
        assert demo.interrupt(30) == 0, demo.output()
        assert "Traceback" not in demo.output()
    finally:
        demo.kill()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
def test_demo_stopped_by_a_signal_while_playing_saves_whole_files_in_one_line(checkpoint: Path, tmp_path: Path,
                                                                                signum: int):
    """SIGTERM (timeout, kill) or SIGINT (Ctrl-C) while the demo plays a video. Before, rclpy's signal handlers shut
    the context down under the player: 'RCLError: Failed to publish: publisher's context is invalid' tracebacks, the
    node's 'dropping frame (internal_error): RCLError' and now and then the executor thread's 'failed to initialize
    wait set' traceback. Now playing stops, the node stops, the overlays received are saved (whole PNGs, the --video
    finished: it opens, with as many frames), one line 'icnet-demo: interrupted', exit status 143 / 130. The signal
    comes twice at once, as timeout delivers it: the repeat does not break the shutdown (a KeyboardInterrupt in a
    generator's clean-up: 'Exception ignored in ... VideoFile.__iter__' with its traceback, seen in 2 of 8 runs)."""
    video = require(VIDEO)
    out, mp4 = tmp_path / "overlays", tmp_path / "overlay.mp4"
    demo = Process("icnet_ros.tools.demo", [str(video), "--model", str(checkpoint), "--output", str(out), "--video",
                                            str(mp4), "--device", "cpu", "--input-size", "128x224"], tmp_path,
                   name=f"demo_signal_{signum}")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and demo.proc.poll() is None and len(list(out.glob("*.png"))) < 3:
            time.sleep(0.02)
        assert demo.proc.poll() is None, demo.output()
        demo.proc.send_signal(signum)
        demo.proc.send_signal(signum)  # twice at once, as timeout and ros2 launch deliver it (process and group)
        status = demo.wait(60)
    finally:
        demo.kill()
    text = demo.output()
    assert status == 128 + signum, text
    for bad in ("Traceback", "RCLError", "Exception in thread", "[ERROR]"):
        assert bad not in text, text
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith("icnet-demo: interrupted")]
    assert len(lines) == 1, text
    saved = int(re.search(r"saved (\d+) to", lines[0]).group(1))
    files = sorted(out.iterdir())
    assert 3 <= saved < 221 and [f.suffix for f in files] == [".png"] * saved, (lines, files)
    assert all(cv2.imread(str(f)) is not None for f in files)
    cap = cv2.VideoCapture(str(mp4))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == saved
    cap.release()


def test_demo_interrupted_while_it_starts_is_one_line(checkpoint: Path, tmp_path: Path):
    """Ctrl-C while torch is imported (the first seconds): before, a KeyboardInterrupt traceback (main had no
    handler for it); SIGTERM then: one line too, exit status 143."""
    import signal
    import subprocess

    write_frames(tmp_path / "frames", 1)

    def importing_torch(pid: int) -> bool:
        try:
            return "libtorch" in (Path("/proc") / str(pid) / "maps").read_text()
        except OSError:
            return False

    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.demo", str(tmp_path / "frames"), "--model",
                                 str(checkpoint), "--output", str(tmp_path / "out"), "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ros_support.subprocess_env(), cwd=str(ros_support.REPO),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum and err == "icnet-demo: interrupted\n", (proc.returncode, err)


#: a camera_calibration YAML made at 640x480 (fx = fy = 500)
CALIBRATION_YAML = ("image_width: 640\nimage_height: 480\ncamera_name: front\n"
                    "camera_matrix: {rows: 3, cols: 3, data: [500, 0, 320, 0, 500, 240, 0, 0, 1]}\n"
                    "distortion_model: plumb_bob\n"
                    "distortion_coefficients: {rows: 1, cols: 5, data: [0.1, -0.05, 0, 0, 0]}\n"
                    "rectification_matrix: {rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}\n"
                    "projection_matrix: {rows: 3, cols: 4, data: [500, 0, 320, 0, 0, 500, 240, 0, 0, 0, 1, 0]}\n")


def test_play_reads_camera_calibration_yaml(tmp_path: Path):
    from icnet_ros.tools.play import load_camera_info

    path = tmp_path / "cam.yaml"
    path.write_text(CALIBRATION_YAML)
    info = load_camera_info(path)
    assert (info["width"], info["height"]) == (640, 480) and info["k"][0] == 500.0 and info["d"][0] == 0.1
    path.write_text("image_width: 640\n")
    with pytest.raises(ValueError, match="not a camera_calibration YAML"):
        load_camera_info(path)
    # malformed YAML, a tag safe_load refuses, an infinite size, deep nesting: tracebacks before (and PyYAML's
    # multi-line marks in the message); one line now
    for text in ("image_width: [1, 2\nfoo: : :\n", "image_width: !!python/object/apply:os.system ['true']\n",
                 CALIBRATION_YAML.replace("image_width: 640", "image_width: .inf"), "[" * 5000):
        assert text != CALIBRATION_YAML
        path.write_text(text)
        with pytest.raises(ValueError, match="not a camera_calibration YAML") as e:
            load_camera_info(path)
        assert "\n" not in str(e.value), str(e.value)


def test_player_scales_a_calibration_of_another_size(ros: RosHarness, tmp_path: Path):
    """A calibration made at 640x480, frames played at 320x240: K and P scaled by the image size ratio
    (icnet_ros.camera_info, as image_proc's resize); at the calibrated size it passes through unchanged."""
    from icnet_ros.tools.play import Player, load_camera_info

    path = tmp_path / "cam.yaml"
    path.write_text(CALIBRATION_YAML)
    player = Player(ros.node, topic="/t_cal/image_raw", camera_info=load_camera_info(path))
    try:
        half = player._info_msg(320, 240)
        assert (half.width, half.height) == (320, 240)
        assert list(half.k) == [250.0, 0, 160.0, 0, 250.0, 120.0, 0, 0, 1.0] and half.p[0] == 250.0
        assert list(half.d) == [0.1, -0.05, 0, 0, 0]
        full = player._info_msg(640, 480)
        assert list(full.k) == [500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1.0]
    finally:
        ros.node.destroy_publisher(player.image_pub)
        ros.node.destroy_publisher(player.info_pub)
