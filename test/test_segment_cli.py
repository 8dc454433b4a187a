"""icnet-segment end to end on real files (synthetic images and videos, and the shared CamVid / video data when
present), plus the frame sources of icnet_ros.video it is built on."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import (CAMVID, REPO, VIDEO, file_size_limit, jpeg_of_many_scans, make_checkpoint, mkv_without_duration,
                     require)

from icnet_ros.classes import CAMVID as CAMVID_CLASSES
from icnet_ros.tools.segment import _Item, _Writer, main
from icnet_ros.video import (Frame, ImageFiles, ImageFolder, SourceError, VideoFile, VideoWriter, iter_frames,
                             open_source, read_image, write_image)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "r18.safetensors")


def _img(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _video(path, n=8, size=(96, 128), fps=12.0):
    with VideoWriter(path, fps) as vw:
        for i in range(n):
            vw.write(_img(*size, seed=i))
    return path


def _noise(h, w, seed):
    """An incompressible frame: its PNG (or MP4 frame) is as large as its pixels."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_with_orientation(path, bgr, orientation=6):
    """``bgr`` saved as a JPEG whose EXIF Orientation tag asks viewers to rotate it (6: 90 degrees clockwise)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(path, exif=exif.tobytes(), quality=95)
    return path


def _palette_bgr():
    lut = np.zeros((256, 3), np.uint8)
    lut[: CAMVID_CLASSES.num_classes] = np.asarray(CAMVID_CLASSES.palette, np.uint8)[:, ::-1]
    return lut


# ---------------------------------------------------------------------------------------------- frame sources
def test_image_sources(tmp_path):
    d = tmp_path / "imgs"
    write_image(d / "b.png", _img(64, 80, 1))
    write_image(d / "a.jpg", _img(70, 90, 2))
    write_image(d / "sub" / "c.png", _img(64, 64, 3))
    (d / "notes.txt").write_text("not an image")
    grey = _img(64, 64, 4)[:, :, 0]
    write_image(tmp_path / "grey.png", grey)

    folder = ImageFolder(d, fps=5.0)
    frames = list(folder)
    assert len(folder) == 2 and [f.name for f in frames] == ["a", "b"]
    assert all(isinstance(f, Frame) and f.bgr.dtype == np.uint8 and f.bgr.ndim == 3 for f in frames)
    assert [f.index for f in frames] == [0, 1] and frames[1].timestamp_s == pytest.approx(0.2)
    assert frames[1].bgr.shape == (64, 80, 3)
    assert [f.name for f in ImageFolder(d, recursive=True)] == ["a", "b", "sub__c"]
    (g,) = list(open_source(tmp_path / "grey.png"))
    assert g.bgr.shape == (64, 64, 3) and (g.bgr[:, :, 0] == grey).all()
    assert isinstance(open_source(d), ImageFolder) and isinstance(open_source(tmp_path / "grey.png"), ImageFiles)


def test_video_source(tmp_path):
    path = _video(tmp_path / "clip.mp4", n=9, fps=12.0)
    src = open_source(path)
    assert isinstance(src, VideoFile) and src.is_video and src.fps == pytest.approx(12.0) and len(src) == 9
    frames = list(src)
    assert len(frames) == 9 and frames[0].bgr.shape == (96, 128, 3)
    assert frames[3].name == "clip_000003" and frames[3].timestamp_s == pytest.approx(3 / 12)
    sub = VideoFile(path, start=1, stride=3, max_frames=2)
    assert len(sub) == 2 and [f.index for f in sub] == [1, 4]
    assert [f.index for f in VideoFile(path, start=20)] == []
    assert [s.description for s, _ in iter_frames([open_source(path), ImageFiles([])])] == [str(path)] * 9


def test_videos_with_a_colon_in_a_relative_name_are_read_and_written(tmp_path, monkeypatch):
    """FFmpeg takes what precedes a colon as a protocol: a relative ISO-timestamp name (2024-05-01T12:30:00.mp4)
    could not be opened ("unsupported container or codec?"), and a video could not be written into run:1/ ("name
    it .mp4"). Paths now reach FFmpeg absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run:1").mkdir()
    with VideoWriter("run:1/2024-05-01T12:30:00.mp4", 10.0) as writer:
        for i in range(4):
            writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
    src = open_source("run:1/2024-05-01T12:30:00.mp4")
    assert len(src) == 4 and [f.bgr.shape for f in src] == [(64, 96, 3)] * 4


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="input not found"):
        open_source(tmp_path / "nope.png")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(SourceError, match="unsupported input"):
        open_source(tmp_path / "data.csv")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match="cannot decode"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(tmp_path / "empty")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(tmp_path / "broken.mp4")


def test_result_files_write_a_links_target_and_a_pipe_as_it_is(tmp_path):
    """Result files (--json, --markdown) are written whole by renaming a temporary file over them: a 'latest.json'
    symbolic link was replaced by a file (the run it named left as it was), and a pipe or a device such as
    /dev/stdout would have been renamed over. Now a link's target is written (the link kept), and a path that is
    not a regular file is written to as it is; the check before the run takes both."""
    import os

    from icnet_ros.tools.cli_checks import output_file_problem
    from icnet_ros.video import write_text_atomically

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run.json").write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "runs" / "run.json")
    assert output_file_problem(str(link)) is None
    write_text_atomically(link, "new")
    assert link.is_symlink() and (tmp_path / "runs" / "run.json").read_text() == "new"
    read, write = os.pipe()
    try:
        pipe = f"/proc/self/fd/{write}"
        assert output_file_problem(pipe) is None
        write_text_atomically(pipe, "through the pipe")
        assert os.read(read, 100) == b"through the pipe" and os.path.exists(pipe)
    finally:
        os.close(read)
        os.close(write)


def test_a_result_written_to_dev_stdout_is_appended_to_a_redirected_stdout(tmp_path):
    """--json /dev/stdout with stdout redirected to a log (`>> run.log`): /dev/stdout -> /proc/self/fd/1 -> the log,
    so the atomic write renamed a temporary file over the log (its earlier lines, and the lines printed after, lost).
    Now a path through a process's open files is appended to, as a pipe or a device is."""
    import json

    log = tmp_path / "run.log"
    log.write_text("earlier\n")
    code = ("from icnet_ros.tools.cli_checks import output_file_problem, write_json\n"
            "print('before', flush=True)\n"
            "assert output_file_problem('/dev/stdout') is None\n"
            "assert write_json('/dev/stdout', {'fps': 1.5}) is None\n"
            "print('after', flush=True)\n")
    with open(log, "a") as out:
        r = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[:2] == ["earlier", "before"] and lines[-1] == "after", lines
    assert json.loads("\n".join(lines[2:-1])) == {"fps": 1.5}


def test_a_file_larger_than_any_image_within_max_pixels_is_refused_unread(tmp_path):
    """A 200 GB file named .png (sparse: no disk used) was read whole before its header was looked at: numpy's
    MemoryError escaped (a traceback, the rest of the folder never segmented), and a file that fitted cost its size
    in memory just to be refused. Now refused from its size, unread, as over max_pixels."""
    from icnet_ros.ros_image import DEFAULT_MAX_PIXELS
    from icnet_ros.video import ImageTooLargeError

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(200 << 30)
    with pytest.raises(ImageTooLargeError, match=f"image {huge}: a file of {200 << 30} bytes is larger than any "
                                                 f"image within the limit of {DEFAULT_MAX_PIXELS} pixels can be"):
        read_image(huge, DEFAULT_MAX_PIXELS)
    from icnet_ros.video import max_file_size

    # the bound: the raw pixels of the largest image allowed plus metadata (3840x2160: about 200 MB)
    assert 8 * DEFAULT_MAX_PIXELS < max_file_size(DEFAULT_MAX_PIXELS) < 256 << 20
    small = tmp_path / "small.png"
    write_image(small, _noise(64, 64, 1))
    assert read_image(small, 64 * 64).shape == (64, 64, 3)  # within the bound: read


def test_a_jpeg_is_decoded_as_stored_without_its_exif_orientation(tmp_path):
    """OpenCV rotates a JPEG by its EXIF Orientation tag unless told not to: icnet-segment, icnet-play and icnet-demo
    turned a 64x96 photo tagged 'rotate 90' into 96x64, while the node (CompressedImage), icnet-eval and training
    see it as stored, so icnet-segment's labels did not line up with the dataset's. Now every path sees the stored
    pixels."""
    from types import SimpleNamespace

    from icnet_ros.data import read_image as dataset_read_image
    from icnet_ros.ros_image import compressed_to_numpy

    path = _jpeg_with_orientation(tmp_path / "tagged.jpg", _img(64, 96, 5))
    img = read_image(path)
    assert img.shape == (64, 96, 3)
    np.testing.assert_array_equal(img[:, :, ::-1], dataset_read_image(path))  # icnet-eval / training: RGB
    node, order = compressed_to_numpy(SimpleNamespace(format="jpeg", data=path.read_bytes()))
    assert order == "RGB" and node.shape == (64, 96, 3)
    assert np.abs(node.astype(int) - img[:, :, ::-1]).max() <= 2  # another libjpeg build: +-1 at most


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path, capfd):
    """A progressive JPEG with its last scan repeated: the node refuses more than 100 scans from the header in a
    millisecond; the CLIs' reader decoded it (seconds for a 4K one with a few thousand scans, 'Inconsistent
    progression sequence' from libjpeg on stderr). Now the same header walk refuses it first."""
    bomb, fine = tmp_path / "scans.jpg", tmp_path / "fine.jpg"
    bomb.write_bytes(jpeg_of_many_scans(150))
    fine.write_bytes(jpeg_of_many_scans(0))
    with pytest.raises(SourceError, match=f"cannot decode image {bomb}: JPEG has more than 100 scans"):
        read_image(bomb)
    assert read_image(fine).shape == (64, 64, 3)
    assert capfd.readouterr().err == ""


def test_a_damaged_png_is_refused_without_a_line_from_libpng(tmp_path, capfd):
    """A truncated PNG: OpenCV's libpng wrote 'libpng error: PNG input buffer is incomplete' to stderr next to the
    tool's own line for it. The node's header walk (chunks, CRCs) refuses it before libpng sees it."""
    ok, png = cv2.imencode(".png", _noise(64, 64, 2))
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.tobytes()[: png.size * 9 // 10])
    with pytest.raises(SourceError) as refused:
        read_image(cut)
    assert capfd.readouterr().err == ""
    assert str(refused.value).startswith(f"cannot decode image {cut}: PNG chunk b'IDAT'"), refused.value


def test_a_video_without_a_frame_count_is_read_to_its_end(tmp_path):
    """A Matroska file without a Duration (live recorders write them): OpenCV's frame count is -9.2e16, which became
    len() == 0, and icnet-play / icnet-demo said 'no frames'. Now the count is unknown (None; len() raises
    TypeError) and the video is read to its end."""
    path = mkv_without_duration(tmp_path / "rec.mkv", n=12)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) < 0  # the case at hand
    cap.release()
    src = open_source(path)
    assert src.frame_count is None and src.has_frames()
    with pytest.raises(TypeError, match="declares no frame count"):
        len(src)
    assert [f.index for f in src] == list(range(12))
    assert [f.index for f in VideoFile(path, max_frames=5)] == list(range(5))
    assert VideoFile(path, max_frames=0).frame_count == 0
    empty = tmp_path / "empty.avi"  # a count of 0: unknown too; it has no frame
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64)).release()
    assert open_source(empty).frame_count is None and not open_source(empty).has_frames()
    assert len(open_source(_video(tmp_path / "clip.mp4", n=3))) == 3  # a declared count stands


def test_a_video_over_max_pixels_is_refused_when_opened(tmp_path):
    """Videos bypassed max_pixels: 4096x4096 frames (48 MiB each) were decoded although the same frame sent to the
    node is dropped. Now the frame size the container declares is checked when the video is opened."""
    from icnet_ros.video import ImageTooLargeError

    path = _video(tmp_path / "clip.mp4", n=2, size=(96, 128))
    with pytest.raises(ImageTooLargeError, match=f"^video {path}: 128x96 = 12288 pixels per frame exceeds the limit "
                                                 "of 12287 pixels$"):
        open_source(path, max_pixels=12287)
    assert len(list(open_source(path, max_pixels=12288))) == 2


def test_an_image_is_written_whole_or_not_at_all(tmp_path):
    """A write that cannot complete (here a file size limit; a full disk alike) leaves the previous file intact and
    no partial or temporary file, and names the file and the system's reason. Before, numpy's tofile truncated the
    file in place and said '196657 requested and 65536 written', naming no file."""
    out = tmp_path / "label" / "x.png"
    write_image(out, _img(64, 64, 0))
    before = out.read_bytes()
    with file_size_limit(64 * 1024), pytest.raises(OSError) as info:
        write_image(out, _noise(256, 256, 1))  # a ~197 KB PNG
    assert str(info.value) == f"cannot write {out}: File too large"
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["x.png"]
    write_image(out, _noise(256, 256, 1))  # the limit lifted: written
    assert read_image(out).shape == (256, 256, 3)


def test_a_video_frame_that_cannot_be_written_stops_the_writer(tmp_path):
    """OpenCV's VideoWriter.write reports a frame it could not write only through its return value (and a log
    line): before, every later frame failed the same way, silently, and the unplayable MP4 (no index) was
    reported as written. Now the first failed frame raises 'cannot write <path>: <reason>', later frames too (the
    file is never reopened over), and finish() checks a finished video reads back with every frame."""
    path = tmp_path / "overlay" / "clip.mp4"
    vw = VideoWriter(path, 10.0)
    with file_size_limit(128 * 1024), pytest.raises(OSError) as info:
        for i in range(30):  # ~100 KB of MPEG-4 per noise frame, written out in 256 KB blocks
            vw.write(_noise(360, 480, i))
    assert str(info.value) == f"cannot write {path}: File too large" and vw.frames < 6
    with pytest.raises(OSError, match="cannot write"):
        vw.write(_noise(360, 480, 0))
    with pytest.raises(OSError, match="cannot write"):
        vw.finish()
    # a video that was written: finish() reads it back (every frame there)
    good = tmp_path / "good.mp4"
    with VideoWriter(good, 10.0) as vw:
        for i in range(3):
            vw.write(_img(64, 64, i))
    assert len(VideoFile(good)) == 3 and vw.error is None


# ---------------------------------------------------------------------------------------------- CLI
def test_segment_images_and_folder(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "one.png", _img(96, 128, 1))
    write_image(tmp_path / "in" / "two.jpg", _img(75, 101, 2))
    write_image(tmp_path / "single.png", _img(64, 64, 3))
    out = tmp_path / "out"
    rc = main([str(tmp_path / "in"), str(tmp_path / "single.png"), "--model", str(ckpt), "--output", str(out),
               "--device", "cpu", "--outputs", "label,color,overlay,confidence", "--quiet", "--batch", "2"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "3 frames from 2 input(s)" in summary and "fps" in summary
    lut = _palette_bgr()
    sources = {"one": tmp_path / "in" / "one.png", "two": tmp_path / "in" / "two.jpg",
               "single": tmp_path / "single.png"}
    for name, shape in (("one", (96, 128)), ("two", (75, 101)), ("single", (64, 64))):
        label = cv2.imread(str(out / "label" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(str(out / "color" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / "overlay" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        conf = cv2.imread(str(out / "confidence" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert label.shape == shape and label.dtype == np.uint8 and label.max() < CAMVID_CLASSES.num_classes
        assert color.shape == overlay.shape == (*shape, 3) and conf.shape == shape
        np.testing.assert_array_equal(color, lut[label])  # colour PNG = palette of the label PNG (BGR file)
        src = read_image(sources[name])
        expected = np.round(0.5 * color.astype(float) + 0.5 * src.astype(float))
        assert np.abs(overlay.astype(float) - expected).max() <= 1


def test_segment_video_writes_mp4_overlay(tmp_path, ckpt, capsys):
    video = _video(tmp_path / "clip.mp4", n=6)
    out = tmp_path / "out"
    assert main([str(video), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--stride", "2"]) == 0
    labels = sorted((out / "label" / "clip").glob("*.png"))
    assert [p.name for p in labels] == ["clip_000000.png", "clip_000002.png", "clip_000004.png"]
    assert len(list((out / "color" / "clip").glob("*.png"))) == 3
    assert not (out / "overlay" / "clip").exists()  # no per-frame overlays without --overlay-frames
    cap = cv2.VideoCapture(str(out / "overlay" / "clip.mp4"))
    n = 0
    while True:
        ok, f = cap.read()
        if not ok:
            break
        assert f.shape == (96, 128, 3)
        n += 1
    assert n == 3 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(6.0)
    cap.release()


def test_name_collisions_get_prefixed(tmp_path, ckpt):
    for d in ("a", "b"):
        write_image(tmp_path / d / "same.png", _img(64, 64, ord(d)))
    out = tmp_path / "out"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "-m", str(ckpt), "-o", str(out), "--device", "cpu",
                 "--quiet", "--outputs", "label"]) == 0
    assert sorted(p.name for p in (out / "label").iterdir()) == ["a__same.png", "b__same.png"]


def test_fixed_input_size_and_model_output_size(tmp_path, ckpt):
    write_image(tmp_path / "x.png", _img(150, 210, 5))
    out = tmp_path / "out"
    assert main([str(tmp_path / "x.png"), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet",
                 "--input-size", "64x96", "--output-size", "model", "--outputs", "label,overlay"]) == 0
    assert cv2.imread(str(out / "label" / "x.png"), cv2.IMREAD_UNCHANGED).shape == (64, 96)
    assert cv2.imread(str(out / "overlay" / "x.png")).shape == (64, 96, 3)


def test_errors_are_one_line_exit_2(tmp_path, ckpt, capsys):
    write_image(tmp_path / "x.png", _img(64, 64, 0))
    assert main([str(tmp_path / "missing.png"), "-m", str(ckpt), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-segment: error: input not found") and err.count("\n") == 1
    assert main([str(tmp_path / "x.png"), "-m", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "Traceback" not in err and err.count("\n") == 1
    assert main([str(tmp_path / "x.png"), "-m", str(ckpt), "-o", str(tmp_path / "o"), "--outputs", "depth"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert main([str(tmp_path / "x.png"), "-m", str(ckpt), "-o", str(tmp_path / "o"), "--device", "cpu",
                 "--precision", "fp16"]) == 2
    assert "not supported on the CPU" in capsys.readouterr().err


def test_an_exported_model_whose_runtime_is_missing_is_one_line(tmp_path, ckpt):
    """A .onnx model where onnxruntime cannot be imported (a base install without the [onnx] extra; here blocked in
    a fresh interpreter): one line naming the extra, exit status 2 (before: a MissingRuntimeError traceback, exit 1;
    icnet-eval and icnet-export already said it in one line)."""
    from icnet_ros.export import export_onnx

    model = export_onnx(ckpt, tmp_path / "m.onnx", size=(64, 64))
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    code = ("import sys; sys.modules['onnxruntime'] = None; from icnet_ros.tools.segment import main; "
            f"sys.exit(main([{str(image)!r}, '-m', {str(model)!r}, '-o', {str(tmp_path / 'out')!r}, '-q']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("icnet-segment: error: backend 'onnxruntime' needs the Python "
                                                 "package 'onnxruntime', which is not installed: pip install "
                                                 "'icnet_ros[onnx]'"), r.stderr


def test_default_model_missing_exits_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ICNET_ROS_DEFAULT_MODEL", str(tmp_path / "missing.safetensors"))
    write_image(tmp_path / "x.png", _img(64, 64, 0))
    assert main([str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-segment: error: the default model is not installed") and err.count("\n") == 1


def test_shared_data_camvid_images_and_video(tmp_path, ckpt, capsys):
    images = sorted(require(CAMVID / "val" / "images").glob("*.jpg"))[:2]
    video = require(VIDEO)
    out = tmp_path / "out"
    assert main([*map(str, images), str(video), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet",
                 "--max-frames", "2", "--input-size", "0.5", "--outputs", "label,overlay"]) == 0
    assert "4 frames from 3 input(s)" in capsys.readouterr().out
    assert cv2.imread(str(out / "label" / f"{images[0].stem}.png"), cv2.IMREAD_UNCHANGED).shape == (360, 480)
    assert len(list((out / "label" / VIDEO.stem).glob("*.png"))) == 2
    cap = cv2.VideoCapture(str(out / "overlay" / f"{VIDEO.stem}.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 960 and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()


def test_inputs_with_the_same_name_never_overwrite_each_other(tmp_path, ckpt, capsys):
    """a/x.png + b/x.png, frame.png + frame.jpg in one folder, v1/clip.mp4 + v2/clip.mp4: every input gets its own
    outputs (parent folder, else extension, added only where names collide); a name without a collision stays."""
    write_image(tmp_path / "a" / "x.png", _img(64, 64, 1))
    write_image(tmp_path / "b" / "x.png", _img(64, 64, 2))
    write_image(tmp_path / "mixed" / "frame.png", _img(64, 64, 3))
    write_image(tmp_path / "mixed" / "frame.jpg", _img(64, 64, 4))
    write_image(tmp_path / "mixed" / "alone.png", _img(64, 64, 5))
    for d in ("v1", "v2"):
        _video(tmp_path / d / "clip.mp4", n=2, size=(64, 64))
    out = tmp_path / "out"
    args = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "mixed"),
            str(tmp_path / "v1" / "clip.mp4"), str(tmp_path / "v2" / "clip.mp4")]
    assert main([*args, "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet",
                 "--outputs", "label,overlay"]) == 0
    assert "9 frames from 5 input(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "label").glob("*.png")) == [
        "a__x.png", "alone.png", "b__x.png", "frame_jpg.png", "frame_png.png"]
    assert sorted(p.name for p in (out / "overlay").glob("*.mp4")) == ["v1__clip.mp4", "v2__clip.mp4"]
    for d in ("v1__clip", "v2__clip"):
        assert sorted(p.name for p in (out / "label" / d).iterdir()) == ["clip_000000.png", "clip_000001.png"]
    # each output is its own input's: the overlays differ as the inputs do
    ov = {n: cv2.imread(str(out / "overlay" / f"{n}.png")) for n in ("a__x", "b__x", "frame_png", "frame_jpg")}
    assert len({v.tobytes() for v in ov.values()}) == 4
    # the same file given twice: numbered, never overwritten
    out2 = tmp_path / "out2"
    assert main([str(tmp_path / "a" / "x.png")] * 2 + ["-m", str(ckpt), "-o", str(out2), "--device", "cpu",
                                                       "--quiet", "--outputs", "label"]) == 0
    assert sorted(p.name for p in (out2 / "label").iterdir()) == ["x_1.png", "x_2.png"]


def test_images_over_max_pixels_are_refused_before_decoding(tmp_path, ckpt, capsys):
    """A 12000x12000 PNG header (a few hundred bytes) is refused from its header: one line, the other images are
    segmented, exit status 2; the default limit is the node's max_pixels."""
    from helpers import png_with_size

    from icnet_ros.ros_image import DEFAULT_MAX_PIXELS

    ok, png = cv2.imencode(".png", _img(64, 64, 1))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(png_with_size(png.tobytes(), 12000, 12000))
    write_image(tmp_path / "in" / "good.png", _img(64, 80, 2))
    write_image(tmp_path / "wide.jpg", _img(64, 96, 3))
    out = tmp_path / "out"
    base = ["-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label"]
    assert main([str(tmp_path / "in"), str(tmp_path / "wide.jpg"), *base]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "bomb.png" in lines[0] and "12000x12000" in lines[0], captured.err
    assert f"limit of {DEFAULT_MAX_PIXELS}" in lines[0] and "Traceback" not in captured.err
    assert "2 frames" in captured.out and "1 input(s) refused" in captured.out
    assert sorted(p.name for p in (out / "label").iterdir()) == ["good.png", "wide.png"]
    # a lower limit, against the header's size: 80x64 = 5120 pixels pass, 96x64 = 6144 do not
    out.joinpath("label", "wide.png").unlink()
    assert main([str(tmp_path / "in" / "good.png"), str(tmp_path / "wide.jpg"), *base, "--max-pixels", "6000"]) == 2
    err = capsys.readouterr().err  # sizes as width x height, as the node's max_pixels check says them
    assert "96x64 = 6144 pixels" in err and not (out / "label" / "wide.png").exists()
    assert main([str(tmp_path / "wide.jpg"), *base, "--max-pixels", "0"]) == 2
    assert "--max-pixels must be in [1, 268435456]" in capsys.readouterr().err


def test_fourcc_must_be_four_characters(tmp_path, ckpt, capsys):
    video = _video(tmp_path / "clip.mp4", n=1, size=(64, 64))
    for bad in ("mp4", "mp4vv", ""):
        assert main([str(video), "-m", str(ckpt), "-o", str(tmp_path / "o"), "--fourcc", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icnet-segment: error: --fourcc") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="exactly 4"):
        VideoWriter(tmp_path / "x.mp4", 10.0, "h264x")


def test_a_fourcc_without_an_encoder_is_refused_before_any_frame(tmp_path, ckpt, capsys):
    """pip's OpenCV has no encoder for avc1 (browser-playable H.264, the codec users try first): the run segmented
    and wrote every input before the video, then stopped at its first frame with FFmpeg's lines and no MP4."""
    cv2.imwrite(str(tmp_path / "a.png"), _img(96, 128, 0))
    video = _video(tmp_path / "clip.mp4", n=3)
    for fourcc in ("avc1", "ABCD"):
        out = tmp_path / fourcc
        assert main([str(tmp_path / "a.png"), str(video), "-m", str(ckpt), "-o", str(out), "--fourcc", fourcc,
                     "-q"]) == 2
        err = capsys.readouterr().err
        assert err == (f"icnet-segment: error: overlay video ({fourcc!r}, 12 fps): this OpenCV build has no "
                       f"{fourcc!r} encoder for .mp4 files ('mp4v' has one)\n"), err
        assert not any(out.rglob("*")), list(out.rglob("*"))  # nothing segmented, nothing written
    assert main([str(tmp_path / "a.png"), str(video), "-m", str(ckpt), "-o", str(tmp_path / "labels"), "--fourcc",
                 "avc1", "--outputs", "label", "-q"]) == 0  # no overlay video: no encoder needed


def test_a_full_disk_before_the_run_is_named_as_such_not_as_the_video_type(tmp_path, ckpt, capsys):
    """The overlay video's probe (written before the run) fails on a full disk too: that said 'name it .mp4' of a
    file named .mp4; now the folder that cannot be written and the system's reason."""
    video = _video(tmp_path / "clip.mp4", n=2)
    out = tmp_path / "out"
    with file_size_limit(200):
        assert main([str(video), "-m", str(ckpt), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == f"icnet-segment: error: overlay video ('mp4v', 12 fps): cannot write {out}: File too large\n", err


def test_a_video_that_cannot_be_written_stops_the_run_in_one_line_and_leaves_no_file(tmp_path, ckpt, capsys):
    """The disk fills up (here: a file size limit) while the overlay video is written: one line naming the video
    and the reason, exit status 2 (before: exit 0, an MP4 nothing could open; then an unplayable MP4, without its
    index, left at the video's name, though a file is promised whole or not at all). Now the video is written to a
    hidden temporary file, renamed once it reads back: nothing at its name (a previous run's video there stays as it
    was), no temporary file left; an abandoned writer (close) leaves nothing either, and a finished one only the
    video."""
    src = tmp_path / "noise.avi"
    with VideoWriter(src, 10.0, "MJPG") as vw:
        for i in range(8):
            vw.write(_noise(360, 480, i))
    out = tmp_path / "out"
    with file_size_limit(128 * 1024):
        rc = main([str(src), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "overlay",
                   "--input-size", "64x96"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"icnet-segment: error: cannot write {out / 'overlay' / 'noise.mp4'}: File too large\n"
    assert os.listdir(out / "overlay") == []
    previous = _video(out / "overlay" / "noise.mp4", n=2, size=(64, 64)).read_bytes()
    with file_size_limit(128 * 1024):
        assert main([str(src), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs",
                     "overlay", "--input-size", "64x96"]) == 2
    capsys.readouterr()
    assert os.listdir(out / "overlay") == ["noise.mp4"] and (out / "overlay" / "noise.mp4").read_bytes() == previous
    # the writer itself: a video is at its name only once finished
    path = tmp_path / "v" / "clip.mp4"
    vw = VideoWriter(path, 10.0)
    for i in range(3):
        vw.write(_img(64, 64, i))
    assert not path.exists() and [p.name for p in path.parent.iterdir()] == [vw.temp_path.name]
    vw.close()  # abandoned
    assert os.listdir(path.parent) == []
    with VideoWriter(path, 10.0) as vw:
        for i in range(3):
            vw.write(_img(64, 64, i))
    assert os.listdir(path.parent) == ["clip.mp4"] and len(VideoFile(path)) == 3


def test_ctrl_c_finishes_the_video_with_the_frames_done(tmp_path, ckpt):
    """Ctrl-C (a real SIGINT, to an icnet-segment process: this test process may hold rclpy's signal handlers,
    which a SIGINT to itself would run) during a video: reading stops, the frames already segmented are written and
    the MP4 is finished: it plays, with exactly the frames whose PNGs were written; exit status 130. Before, the
    writer was abandoned: an MP4 without its index (unplayable) and queued outputs lost."""
    video = _video(tmp_path / "clip.mp4", n=400, size=(64, 64))
    out = tmp_path / "out"
    labels = out / "label" / "clip"

    def under_way(_proc):  # a few frames written: the run is well under way, far from its end
        return labels.is_dir() and len(os.listdir(labels)) >= 3

    rc, err = _interrupt_when([sys.executable, "-m", "icnet_ros.tools.segment", str(video), "-m", str(ckpt), "-o",
                               str(out), "--device", "cpu", "--quiet", "--outputs", "label,overlay"], under_way)
    written = len(list(labels.glob("*.png")))
    assert rc == 130 and f"interrupted after {written} frame(s)" in err and "Traceback" not in err, err
    assert 3 <= written < 400
    cap = cv2.VideoCapture(str(out / "overlay" / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == written
    cap.release()


def _interrupt_when(cmd, ready, timeout=60.0, signum=signal.SIGINT):
    """Run ``cmd``, send ``signum`` (SIGINT) once ``ready(process)`` is true, return (return code, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not ready(proc) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigterm_finishes_the_video_as_ctrl_c_does(tmp_path, ckpt):
    """SIGTERM (timeout, kill, a service manager) during a video: before, the process died at once and left an MP4
    without its index ('moov atom not found': nothing opens it). Now handled as Ctrl-C: the frames segmented are
    written, the MP4 plays with exactly those frames, exit status 143."""
    video = _video(tmp_path / "clip.mp4", n=400, size=(64, 64))
    out = tmp_path / "out"
    labels = out / "label" / "clip"

    def under_way(_proc):
        return labels.is_dir() and len(os.listdir(labels)) >= 3

    rc, err = _interrupt_when([sys.executable, "-m", "icnet_ros.tools.segment", str(video), "-m", str(ckpt), "-o",
                               str(out), "--device", "cpu", "--quiet", "--outputs", "label,overlay"], under_way,
                              signum=signal.SIGTERM)
    written = len(list(labels.glob("*.png")))
    assert rc == 143 and f"interrupted after {written} frame(s)" in err and "Traceback" not in err, (rc, err)
    assert 3 <= written < 400
    cap = cv2.VideoCapture(str(out / "overlay" / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == written
    cap.release()


def test_an_output_folder_that_cannot_be_made_is_one_line_before_the_model_loads(tmp_path, ckpt, capsys):
    """-o /proc/x (cannot be created, also for root), -o naming a file, -o /sys/kernel (not writable): one line
    naming the folder, exit status 2, before the model is loaded (a broken model file is not even read). Before:
    '[Errno 2] No such file or directory: ...' or '[Errno 17] File exists' after the model was loaded, and
    /sys/kernel failed on the first file written."""
    write_image(tmp_path / "x.png", _img(64, 64, 0))
    (tmp_path / "afile").write_bytes(b"")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    # (sysfs is read-write here, read-only in a default Docker container: either reason)
    for out, reason in (("/proc/icnet_rj_out", "cannot create the folder: No such file or directory"),
                        (str(tmp_path / "afile"), "is a file, not a folder"),
                        ("/sys/kernel", "the folder is not writable: (Permission denied|Read-only file system)")):
        for model in (ckpt, broken):
            rc = main([str(tmp_path / "x.png"), "-m", str(model), "-o", out, "--device", "cpu", "--quiet"])
            err = capsys.readouterr().err
            assert rc == 2 and re.fullmatch(f"icnet-segment: error: --output {re.escape(out)}: {reason}\n", err), err


def test_a_video_that_cannot_be_opened_is_skipped_as_an_empty_one(tmp_path, ckpt, capsys):
    """An empty (0-byte) or damaged .mp4 among other inputs: one error line naming it, the others segmented, exit
    status 2 at the end, as README says of an empty video. Before, 'cannot open video' ended the whole run before
    anything was written."""
    write_image(tmp_path / "a.png", _img(64, 64, 1))
    write_image(tmp_path / "b.png", _img(64, 64, 2))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    out = tmp_path / "out"
    inputs = [str(tmp_path / name) for name in ("a.png", "empty.mp4", "junk.mp4", "b.png")]
    rc = main([*inputs, "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2 and len(lines) == 2 and "Traceback" not in captured.err, captured.err
    for line, name in zip(lines, ("empty.mp4", "junk.mp4")):
        assert line.startswith("icnet-segment: error: ") and str(tmp_path / name) in line and line.endswith("; skipped")
    assert sorted(p.name for p in (out / "label").iterdir()) == ["a.png", "b.png"]
    assert "2 frames from 2 input(s)" in captured.out and "2 input(s) skipped" in captured.out
    # a missing input or an unsupported file is still a command-line error, before anything runs
    assert main([str(tmp_path / "a.png"), str(tmp_path / "missing.mp4"), "-m", str(ckpt), "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"icnet-segment: error: input not found: {tmp_path / 'missing.mp4'}\n"


def test_help_shows_no_rst_markup(capsys):
    """The epilog (the module docstring) showed reST's double backticks (``--output``)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "label/<name>.png" in text


def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path, ckpt):
    """SIGINT once torch's library is mapped into the process: the import of torch is under way (it takes about a
    second more). Before, that import ran outside the interrupt handler: a KeyboardInterrupt traceback."""
    write_image(tmp_path / "x.png", _img(64, 64, 0))

    def importing_torch(proc):
        try:
            return "libtorch" in (Path("/proc") / str(proc.pid) / "maps").read_text()
        except OSError:
            return False

    rc, err = _interrupt_when([sys.executable, "-m", "icnet_ros.tools.segment", str(tmp_path / "x.png"), "-m",
                               str(ckpt), "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"], importing_torch)
    assert rc == 130 and err.startswith("icnet-segment: interrupted") and err.count("\n") == 1, err


def test_unreadable_and_too_small_images_are_skipped_one_line_each(tmp_path, ckpt, capsys):
    """A corrupt, a truncated and a too small image among good ones: one line each naming the file (the small one
    with the command line's --input-size hint), the others segmented, the count in the summary, exit status 2.
    Before, the first of them ended the run (and the engine's hint said input_size=(H, W))."""
    d = tmp_path / "in"
    write_image(d / "a_good.png", _img(64, 80, 1))
    (d / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ok, png = cv2.imencode(".png", _noise(64, 64, 2))
    (d / "c_truncated.png").write_bytes(png.tobytes()[: png.size // 2])
    write_image(d / "d_tiny.png", _img(10, 10, 3))
    write_image(d / "e_good.png", _img(64, 64, 4))
    out = tmp_path / "out"
    rc = main([str(d), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label",
               "--batch", "2", "--input-size", "native"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("icnet-segment:")]
    assert rc == 2 and len(lines) == 3 and "Traceback" not in captured.err, captured.err
    for line, name in zip(lines, ("b_corrupt.png", "c_truncated.png", "d_tiny.png")):
        assert line.startswith("icnet-segment: error: ") and str(d / name) in line and line.endswith("; skipped")
    assert "--input-size HxW" in lines[2] and "input_size=" not in lines[2]
    assert sorted(p.name for p in (out / "label").iterdir()) == ["a_good.png", "e_good.png"]
    assert "2 frames" in captured.out and "3 input(s) skipped" in captured.out


def test_an_empty_video_is_an_error_and_a_truncated_one_a_warning(tmp_path, ckpt, capsys):
    """A video without a frame is skipped with an error (exit status 2; before: exit 0, nothing written, nothing
    said); one whose container declares more frames than can be decoded gets a warning with both counts (before:
    it stopped silently at 110 of 221)."""
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64)).release()
    full = _video(tmp_path / "full.avi", n=20, size=(64, 64))
    cut = tmp_path / "cut.avi"  # the header declares 20 frames; the second half is gone
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    base = ["-m", str(ckpt), "--device", "cpu", "--quiet", "--outputs", "label"]
    assert main([str(empty), *base, "-o", str(tmp_path / "o1")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"icnet-segment: error: no frame could be decoded from video {empty} (empty or damaged); " \
                           "skipped\n" and "1 input(s) skipped" in captured.out
    assert main([str(cut), *base, "-o", str(tmp_path / "o2")]) == 0
    err = capsys.readouterr().err
    decoded = len(list((tmp_path / "o2" / "label" / "cut").glob("*.png")))
    assert 0 < decoded < 20
    assert err == f"icnet-segment: warning: video {cut}: {decoded} of the 20 frames its container declares could " \
                  "be decoded (truncated or damaged?); the others are missing\n"


def test_a_recursive_input_leaves_its_own_output_folders_out(tmp_path, ckpt, capsys):
    """'icnet-segment in -o in --recursive' twice: the second run segments the one input again, not the outputs of
    the first (before: 1 frame, then 3, with label__a, overlay__a, ... written as outputs of outputs)."""
    d = tmp_path / "in"
    write_image(d / "a.png", _img(64, 64, 1))
    args = [str(d), "-o", str(d), "--recursive", "-m", str(ckpt), "--device", "cpu", "--quiet",
            "--outputs", "label,overlay"]
    assert main(args) == 0 and "1 frames from 1 input(s)" in capsys.readouterr().out
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "1 frames from 1 input(s)" in captured.out
    assert captured.err == f"icnet-segment: note: 2 image(s) under the output folder {d} left out of {d}\n"
    assert sorted(p.name for p in (d / "label").iterdir()) == ["a.png"]


def test_the_writer_keeps_no_state_per_frame(tmp_path):
    """The background writer used to append every output path to a list nothing read (~1 KB per video frame for
    the whole run); what it holds now does not grow with the number of frames."""
    from types import SimpleNamespace

    w = _Writer(tmp_path, frozenset({"label", "overlay"}), False, "mp4v", {0: 10.0})
    frame = _img(64, 64, 0)
    r = SimpleNamespace(label=frame[:, :, 0], overlay=frame)
    for i in range(50):
        w.put(_Item(0, f"clip_{i:06d}", frame, True, "clip", f"clip.mp4 frame {i}"), r)
    w.close()
    assert len(list((tmp_path / "label" / "clip").iterdir())) == 50 and len(VideoFile(tmp_path / "overlay" /
                                                                                       "clip.mp4")) == 50
    sizes = {k: len(v) for k, v in vars(w).items() if isinstance(v, (list, dict, set, tuple))}
    assert all(n <= 1 for n in sizes.values()), sizes


def test_bad_files_in_a_folder_are_one_line_each_the_rest_segmented(tmp_path, ckpt, capfd):
    """A folder with two good images (one a JPEG tagged 'rotate 90') and four bad files: bytes a Pillow plugin
    raises NotImplementedError on (DDS), a 200 GB sparse file, a JPEG of 150 scans and a truncated PNG. Each bad
    one is one error line naming it (and nothing else on stderr: no libpng line, no traceback), the good ones are
    segmented as stored, exit status 2. Before: a traceback at the DDS bytes or the huge file, and the rest of the
    folder never segmented."""
    from helpers import DDS_JUNK

    d = tmp_path / "in"
    write_image(d / "a_good.png", _img(64, 80, 1))
    (d / "b_dds.png").write_bytes(DDS_JUNK)
    with open(d / "c_huge.png", "wb") as f:
        f.truncate(200 << 30)
    (d / "d_scans.jpg").write_bytes(jpeg_of_many_scans(150))
    ok, png = cv2.imencode(".png", _noise(64, 64, 2))
    (d / "e_cut.png").write_bytes(png.tobytes()[: png.size * 9 // 10])
    _jpeg_with_orientation(d / "f_tagged.jpg", _img(64, 96, 3))
    out = tmp_path / "out"
    rc = main([str(d), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label"])
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2 and len(lines) == 4, captured.err
    for line, name in zip(lines, ("b_dds.png", "c_huge.png", "d_scans.jpg", "e_cut.png")):
        assert line.startswith("icnet-segment: error: ") and str(d / name) in line and line.endswith("; skipped")
    assert lines[1].endswith("(--max-pixels); skipped") and "more than 100 scans" in lines[2]
    assert sorted(p.name for p in (out / "label").iterdir()) == ["a_good.png", "f_tagged.png"]
    assert cv2.imread(str(out / "label" / "f_tagged.png"), cv2.IMREAD_UNCHANGED).shape == (64, 96)
    assert "2 frames" in captured.out and "1 input(s) refused" in captured.out and "3 input(s) skipped" in captured.out


def test_a_video_over_max_pixels_is_refused_and_the_rest_segmented(tmp_path, ckpt, capsys):
    """--max-pixels now bounds videos too (the frame size their container declares, when opened): one line naming
    the video, counted as refused, the other inputs segmented, exit status 2."""
    video = _video(tmp_path / "clip.mp4", n=2, size=(96, 128))
    write_image(tmp_path / "x.png", _img(64, 80, 1))
    out = tmp_path / "out"
    rc = main([str(video), str(tmp_path / "x.png"), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet",
               "--outputs", "label", "--max-pixels", "12000"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err == (f"icnet-segment: error: video {video}: 128x96 = 12288 pixels per frame "
                                        "exceeds the limit of 12000 pixels (--max-pixels); skipped\n"), captured.err
    assert "1 frames from 1 input(s)" in captured.out and "1 input(s) refused" in captured.out
    assert sorted(p.name for p in (out / "label").iterdir()) == ["x.png"]


# ---------------------------------------------------------------------------------------------- review fixes
def test_an_input_the_run_would_write_over_is_refused_before_the_model_loads(tmp_path, ckpt, capsys):
    """An input that is one of the run's own outputs: 'icnet-segment o/overlay/clip.mp4 -o o' replaced the video by
    its overlay while reading it (a solidWhiteRight.mp4 of 221 frames kept 8) and exited 0; 'o/overlay/x.png -o o'
    rewrote the image. Now one line naming the input and the output, exit status 2, before the model is loaded (a
    broken model file is not even read), the input untouched; also through another spelling of the output folder
    (a link) and for an image in the folder a video's frames go to. An input inside an output folder that no output
    is written over is segmented."""
    o = tmp_path / "o"
    video = _video(o / "overlay" / "clip.mp4", n=3, size=(64, 64))
    write_image(o / "overlay" / "x.png", _img(64, 64, 1))
    write_image(o / "label" / "clip" / "clip_000001.png", _img(64, 64, 2))
    (tmp_path / "link").symlink_to(o)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    before = {p: p.read_bytes() for p in o.rglob("*") if p.is_file()}
    cases = (([video], str(o), (), video, o / "overlay" / "clip.mp4"),
             ([o / "overlay" / "x.png"], str(o), (), o / "overlay" / "x.png", o / "overlay" / "x.png"),
             ([o / "overlay" / "x.png"], str(tmp_path / "link"), ("--outputs", "overlay"), o / "overlay" / "x.png",
              tmp_path / "link" / "overlay" / "x.png"),
             ([tmp_path / "link" / "label" / "clip" / "clip_000001.png", video], str(o), ("--outputs", "label"),
              tmp_path / "link" / "label" / "clip" / "clip_000001.png", o / "label" / "clip" / "clip_000001.png"))
    for inputs, out, extra, victim, output in cases:
        rc = main([*map(str, inputs), "-m", str(broken), "-o", out, "--device", "cpu", "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err == (f"icnet-segment: error: input {victim} would be overwritten by the output "
                                   f"{output}; choose another --output (or move the input out of it)\n"), err
    assert {p: p.read_bytes() for p in o.rglob("*") if p.is_file()} == before
    # inside an output folder, written over by nothing: segmented (its label goes beside)
    assert main([str(o / "overlay" / "x.png"), "-m", str(ckpt), "-o", str(o), "--device", "cpu", "--quiet",
                 "--outputs", "label"]) == 0
    assert (o / "label" / "x.png").is_file() and (o / "overlay" / "x.png").read_bytes() == before[o / "overlay" /
                                                                                                   "x.png"]


def test_batch_is_bounded_and_out_of_memory_is_one_line_with_the_video_finished(tmp_path, ckpt, capsys,
                                                                                 monkeypatch):
    """--batch had no upper bound: --batch 120 on HD video ran out of memory with a RuntimeError traceback and left a
    broken MP4. Now --batch above MAX_BATCH (the node's max_batch bound) is one line before anything runs, and an
    out-of-memory error while segmenting (here torch's CPU allocator's, raised by the Segmenter at its third batch)
    is one line with the hint, exit status 2, the frames segmented before written and the video finished (it plays,
    with those frames), as on Ctrl-C."""
    from icnet_ros.engine import Segmenter
    from icnet_ros.sizes import MAX_BATCH

    video = _video(tmp_path / "clip.mp4", n=8, size=(64, 64))
    out = tmp_path / "out"
    args = [str(video), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label,overlay"]
    assert main([*args, "--batch", str(MAX_BATCH + 1)]) == 2
    assert capsys.readouterr().err == (f"icnet-segment: error: --batch must be in [0, {MAX_BATCH}] (0: 4 on CUDA, 1 "
                                       f"on CPU), got {MAX_BATCH + 1}\n")
    assert not out.exists()
    segment, calls = Segmenter.segment, []

    def running_out(self, frames, **kwargs):
        calls.append(len(frames))
        if len(calls) == 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 514375680 bytes. Error code 12 (Cannot allocate memory)")
        return segment(self, frames, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", running_out)
    rc = main([*args, "--batch", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("icnet-segment: error: out of memory segmenting 1 frame(s) of 64x64 at once ([enforce "
                               "fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 514375680 bytes. Error code 12 (Cannot allocate memory)); try a "
                               "smaller --batch (or --input-size)\n"), err
    assert len(list((out / "label" / "clip").glob("*.png"))) == 2
    assert os.listdir(out / "overlay") == ["clip.mp4"] and len(VideoFile(out / "overlay" / "clip.mp4")) == 2


def test_opencvs_out_of_memory_is_one_line(tmp_path, ckpt, capsys, monkeypatch):
    """On the CPU the Segmenter's resizes run on OpenCV, whose allocation failure is a cv2.error (code -4), neither
    a RuntimeError nor a MemoryError: it ended icnet-segment with a 43-line traceback, exit 1. (The error is
    OpenCV's own, from an allocation it cannot make, raised where the Segmenter would raise it.)"""
    from icnet_ros.engine import Segmenter

    video = _video(tmp_path / "clip.mp4", n=4, size=(64, 64))
    out = tmp_path / "out"

    def running_out(self, frames, **kwargs):
        cv2.resize(np.zeros((4, 4, 3), np.float32), (300000, 300000))  # 1 TB: OpenCV cannot allocate it

    monkeypatch.setattr(Segmenter, "segment", running_out)
    rc = main([str(video), "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--quiet", "--outputs", "label"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("icnet-segment: error: out of memory segmenting 1 frame(s) of 64x64 at once "
                                      "(OpenCV") and "Insufficient memory" in err and err.count("\n") == 1, err


def test_threads_are_bounded_as_the_nodes_num_threads(tmp_path):
    """--threads had no upper bound: icnet-segment --threads 100000 crashed (a segmentation fault, exit status
    -11), 5000 hung. Now icnet-segment and icnet-bench refuse more than MAX_THREADS in one line, exit status 2,
    the bound the node's num_threads parameter has."""
    from icnet_ros.node_params import PARAMS
    from icnet_ros.sizes import MAX_THREADS

    spec = next(p for p in PARAMS if p.name == "num_threads")
    assert spec.constraints == f"[0, {MAX_THREADS}]" and spec.check(MAX_THREADS) is None
    assert spec.check(MAX_THREADS + 1)
    write_image(tmp_path / "x.png", _img(64, 64, 0))
    for module, args, message in (
            ("icnet_ros.tools.segment", [str(tmp_path / "x.png"), "-o", str(tmp_path / "o")],
             f"icnet-segment: error: --threads must be in [1, {MAX_THREADS}], got 100000\n"),
            ("icnet_ros.tools.bench", ["--arch", "icnet_r18", "--width", "0.25", "--size", "64x96", "--device", "cpu"],
             f"icnet-bench: error: --threads must be >= 1 and <= {MAX_THREADS} (0: torch's choice), got 100000\n")):
        res = subprocess.run([sys.executable, "-m", module, *args, "--threads", "100000"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr == message, (res.returncode, res.stderr[-2000:])
    assert not (tmp_path / "o").exists()


def test_the_progress_bar_counts_skipped_inputs_and_no_rate_without_a_frame(tmp_path, ckpt, capsys):
    """3 unreadable images of 4: the progress bar ended at '1/4 25%' (a skipped image never moved it); now it ends
    at 4/4. With no frame segmented the summary said '0.00 fps overall, inf fps segmentation'; now no rate."""
    write_image(tmp_path / "a.png", _img(64, 64, 1))
    bad = []
    for name in ("b", "c", "d"):
        (tmp_path / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        bad.append(str(tmp_path / f"{name}.png"))
    out = tmp_path / "out"
    assert main([str(tmp_path / "a.png"), *bad, "-m", str(ckpt), "-o", str(out), "--device", "cpu",
                 "--outputs", "label"]) == 2
    captured = capsys.readouterr()
    last = re.split(r"[\r\n]", captured.err.strip())[-1]
    assert re.search(r"icnet-segment: 100%.*\| 4/4 ", last), captured.err
    assert "1 frames from 4 input(s)" in captured.out and "fps overall" in captured.out
    assert main([*bad, "-m", str(ckpt), "-o", str(out), "--device", "cpu", "--outputs", "label"]) == 2
    captured = capsys.readouterr()
    assert re.search(r"icnet-segment: 100%.*\| 3/3 ", re.split(r"[\r\n]", captured.err.strip())[-1]), captured.err
    assert "0 frames from 3 input(s) in " in captured.out and "fps" not in captured.out and "inf" not in captured.out
