"""``icnet-play``: publish a video, an image folder or an image as a camera (sensor_msgs/Image + CameraInfo).

    icnet-play video.mp4                                   # /camera/image_raw + /camera/camera_info, video fps
    icnet-play frames/ --rate 10 --loop --frame-id front_camera --topic /front/image_raw
    icnet-play video.mp4 --compressed jpeg                 # sensor_msgs/CompressedImage on <topic>/compressed

Every frame gets the current ROS time as stamp and ``--frame-id``; camera_info (same header) comes from
``--camera-info`` (a camera_calibration YAML file) or is a pinhole model with ``--fov`` degrees horizontal field of
view. Publishers are reliable (REP-2003: sensor drivers publish reliable; best-effort subscribers still match).
Lets users try icnet_node without a camera. The DDS settings come from the environment, as for any ROS tool.
An image of a folder that cannot be read (corrupt, truncated, not an image, or over ``--max-pixels``: refused from
its header, as by icnet-segment) is skipped, as a camera driver drops a bad frame: one warning per file, the count in
the summary, and exit status 1 at the end (the stream went on without it); nothing past ``--max-frames`` is read. A
video whose frames are over ``--max-pixels`` is refused; one whose container declares no frame count (Matroska/WebM
from live recorders) is played to its end; one from which no frame decodes (damaged data behind a container that
declares frames) is ``no frames in X``, exit status 2, before anything is published. The summary (also after
Ctrl-C) gives the frames published and their rate, measured from the first frame's publishing to the last's: N
frames span N - 1 periods (``published 3 frames at 2.0 fps (the first to the last in 1.0 s)`` for ``--rate 2
--max-frames 3``). SIGTERM stops it as Ctrl-C does (the summary, exit status 143; 130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..camera_info import image_size, scale_camera_info
from ..ros_spin import cleanup, init_without_signal_handlers
from ..sizes import parse_hw
from ..video import (DEFAULT_IMAGE_FPS, Frame, FrameSource, ImageTooLargeError, SourceError, has_decodable_frames,
                     open_source, quiet_stderr)
from .cli_checks import add_max_pixels_argument, max_pixels_problem

ENCODINGS = ("bgr8", "rgb8", "mono8")
#: the slowest --rate (fps) other than 0: a frame every 1000 s at most (--rate 1e-300 made time.sleep overflow)
MIN_RATE = 0.001


def parse_size(text: str) -> tuple[int, int]:
    """'360x480' -> (360, 480) (height x width), for argparse."""
    try:
        return parse_hw(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def convert_frame(bgr: np.ndarray, encoding: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A BGR frame from a source -> the array to publish in ``encoding`` (optionally resized to (H, W))."""
    import cv2

    if size is not None and bgr.shape[:2] != tuple(size):
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    if encoding == "bgr8":
        return bgr
    if encoding == "rgb8":
        return np.ascontiguousarray(bgr[:, :, ::-1])
    if encoding == "mono8":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def pinhole_camera_info(width: int, height: int, fov_deg: float = 60.0) -> dict[str, Any]:
    """CameraInfo fields of an ideal pinhole camera (no distortion) with ``fov_deg`` horizontal field of view."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    cx, cy = width / 2.0, height / 2.0
    return {"width": width, "height": height, "distortion_model": "plumb_bob", "d": [0.0] * 5,
            "k": [f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0], "r": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "p": [f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0]}


def load_camera_info(path: str | Path) -> dict[str, Any]:
    """CameraInfo fields from a ROS camera_calibration YAML file (image_width, camera_matrix, ...)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
        fields = {"width": int(doc["image_width"]), "height": int(doc["image_height"]),
                  "distortion_model": str(doc.get("distortion_model", "plumb_bob")),
                  "d": [float(v) for v in doc["distortion_coefficients"]["data"]],
                  "k": [float(v) for v in doc["camera_matrix"]["data"]],
                  "r": [float(v) for v in (doc.get("rectification_matrix") or {}).get(
                      "data", [1, 0, 0, 0, 1, 0, 0, 0, 1])],
                  "p": [float(v) for v in doc["projection_matrix"]["data"]]}
    except (OSError, KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError,
            yaml.YAMLError) as e:  # (an .inf size, deep nesting, a syntax error: one line, PyYAML's marks joined)
        raise ValueError(f"{path}: not a camera_calibration YAML file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    if len(fields["k"]) != 9 or len(fields["r"]) != 9 or len(fields["p"]) != 12:
        raise ValueError(f"{path}: camera_matrix needs 9 values, rectification_matrix 9, projection_matrix 12")
    return fields


def camera_topics(topic: str, compressed: str | None = None) -> tuple[str, str]:
    """(image topic, camera_info topic) a Player publishes for ``--topic`` ``topic``."""
    from ..node_params import base_topic, sibling_topic

    base, _ = base_topic(topic)
    return (f"{base}/compressed" if compressed else base), sibling_topic(base, "camera_info")


class Player:
    """Publishes frames as one camera: ``<topic>`` (Image) or ``<topic>/compressed`` and ``<ns>/camera_info``."""

    def __init__(self, node: Any, topic: str = "/camera/image_raw", frame_id: str = "camera",
                 encoding: str = "bgr8", compressed: str | None = None, camera_info: dict[str, Any] | None = None,
                 fov_deg: float = 60.0, size: tuple[int, int] | None = None, reliable: bool = True,
                 depth: int = 10) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if compressed not in (None, "jpeg", "png"):
            raise ValueError(f"compressed must be jpeg or png, got {compressed!r}")
        self.node, self.frame_id, self.encoding, self.compressed = node, frame_id, encoding, compressed
        self.size, self.fov_deg, self.camera_info = size, fov_deg, camera_info
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable else
                         ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
        self.image_topic, info_topic = camera_topics(topic, compressed)
        self._msg_types = (Image, CompressedImage, CameraInfo)
        self.image_pub = node.create_publisher(CompressedImage if compressed else Image, self.image_topic, qos)
        self.info_pub = node.create_publisher(CameraInfo, info_topic, qos)
        self.published = 0
        #: a context manager around each frame's publishing and counting (StopSignals.held: a Ctrl-C then never
        #: falls between the two, which left a frame subscribers got uncounted)
        self.held: Callable[[], Any] = contextlib.nullcontext
        #: time.monotonic() when the first and the last frame were published (None before the first)
        self.first_published: float | None = None
        self.last_published: float | None = None
        self._info_cache: tuple[tuple[int, int], Any] | None = None

    def wait_for_subscribers(self, count: int, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until ``count`` subscriptions match the image publisher (discovery takes a moment)."""
        deadline = time.monotonic() + timeout
        while self.image_pub.get_subscription_count() < count:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.05)
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until reliable subscribers acknowledged everything published (True at once for best effort)."""
        from rclpy.duration import Duration

        ok = self.image_pub.wait_for_all_acked(Duration(seconds=timeout))
        return self.info_pub.wait_for_all_acked(Duration(seconds=timeout)) and ok

    def _info_msg(self, width: int, height: int) -> Any:
        if self._info_cache is None or self._info_cache[0] != (width, height):
            _, _, CameraInfo = self._msg_types
            fields = self.camera_info or pinhole_camera_info(width, height, self.fov_deg)
            src = CameraInfo(**{k: v for k, v in fields.items()})
            if self.camera_info is not None and all(image_size(src)) and image_size(src) != (height, width):
                # the calibration's images have another size than the frames played: scale as image_proc's resize
                info = scale_camera_info(src, image_size(src), (height, width), CameraInfo())
            else:
                info = src
            self._info_cache = ((width, height), info)
        return self._info_cache[1]

    def publish(self, bgr: np.ndarray, stamp: Any = None) -> Any:
        """Publish one BGR frame (converted to the encoding, resized) and its camera_info; returns the header."""
        from ..ros_image import numpy_to_compressed, numpy_to_image

        Image, CompressedImage, _ = self._msg_types
        img = convert_frame(bgr, self.encoding, self.size)
        stamp = stamp if stamp is not None else self.node.get_clock().now().to_msg()
        if self.compressed:
            order = {"bgr8": "BGR", "rgb8": "RGB", "mono8": "BGR"}[self.encoding]
            fmt, data = numpy_to_compressed(img, order, self.compressed)
            msg = CompressedImage(format=fmt)
            msg.data = data
        else:
            msg = numpy_to_image(img, self.encoding, Image())
        msg.header.stamp = stamp
        msg.header.frame_id = self.frame_id
        info = self._info_msg(img.shape[1], img.shape[0])
        info.header = msg.header
        self.info_pub.publish(info)
        now = time.monotonic()
        with self.held():
            self.image_pub.publish(msg)
            self.published += 1
            if self.first_published is None:
                self.first_published = now
            self.last_published = now
        return msg.header


def rate_summary(n: int, first: float | None, last: float | None) -> str:
    """'published N frames at R fps (the first to the last in S s)': the rate over the N - 1 periods between the
    first frame's publishing (``first``, time.monotonic()) and the last's (``last``); no rate for fewer than 2."""
    if n < 2 or first is None or last is None:
        return f"published {n} frame{'' if n == 1 else 's'}"
    span = last - first
    rate = f"{(n - 1) / span:.1f} fps" if span > 0 else "max rate"
    return f"published {n} frames at {rate} (the first to the last in {span:.1f} s)"


class UnreadableImages:
    """``on_error`` callback for an image source: skips an image that cannot be read, with one warning per file
    (also when ``--loop`` comes back to it); ``paths`` lists the files skipped."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.paths: list[Path] = []

    def __call__(self, path: Path, error: SourceError) -> None:
        if path not in self.paths:
            self.paths.append(path)
            from tqdm import tqdm

            hint = " (--max-pixels)" if isinstance(error, ImageTooLargeError) else ""
            tqdm.write(f"{self.prog}: warning: skipped an image: {error}{hint}", file=sys.stderr)

    def install(self, source: FrameSource) -> UnreadableImages:
        if not source.is_video:
            source.on_error = self  # type: ignore[attr-defined]
        return self

    def summary(self) -> str:
        """'; skipped N unreadable image(s)' for a summary line ('' when none was)."""
        return f"; skipped {len(self.paths)} unreadable image(s)" if self.paths else ""


def frames(source: FrameSource, loop: bool, max_frames: int | None) -> Iterator[Frame]:
    """The source's frames, repeated when ``loop``, at most ``max_frames``. The cap is checked before the next frame
    is asked for: nothing past it is read (an image after it is neither decoded nor, when unreadable, warned about
    and counted)."""
    count = 0
    if max_frames is not None and max_frames <= 0:
        return
    while True:
        empty = True
        it = iter(source)
        try:
            for f in it:
                empty = False
                yield f
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        finally:
            close = getattr(it, "close", None)  # a generator: its clean-up (a video's decoder) runs now
            if close is not None:
                close()
        if not loop or empty:
            return


def play(player: Player, source: FrameSource, rate: float, loop: bool = False, max_frames: int | None = None,
         stop: threading.Event | None = None, after_publish: Callable[[int, Any], None] | None = None,
         progress: bool = False) -> int:
    """Publish the source's frames at ``rate`` Hz (0: as fast as ``after_publish`` lets it). Returns the count.

    ``after_publish(index, header)`` runs after each frame (the demo uses it to wait for the node's output)."""
    from tqdm import tqdm

    period = 1.0 / rate if rate > 0 else 0.0
    # None: a video that declares no frame count (DemoRun.play also passes lists of frames)
    count = source.frame_count if isinstance(source, FrameSource) else len(source)
    total = None if loop or count is None else (min(count, max_frames) if max_frames is not None else count)
    bar = tqdm(total=total, unit="frame", desc="publishing", disable=not progress, leave=False)
    next_t = time.monotonic()
    n = 0
    try:
        for f in frames(source, loop, max_frames):
            if stop is not None and stop.is_set():
                break
            if period:
                delay = next_t - time.monotonic()
                if delay > 0:
                    if stop is not None:
                        if stop.wait(delay):
                            break
                    else:
                        time.sleep(delay)
                next_t = max(next_t + period, time.monotonic() - period)  # no burst after a stall
            header = player.publish(f.bgr)
            n += 1
            bar.update(1)
            if after_publish is not None:
                after_publish(n - 1, header)
    finally:
        bar.close()
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icnet-play", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("source", help="video file, folder of images, or one image")
    p.add_argument("--topic", default="/camera/image_raw", help="image topic (default: %(default)s); camera_info "
                   "goes next to it")
    p.add_argument("--frame-id", default="camera", help="header frame_id (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="frames per second, 0 or at least "
                   f"{MIN_RATE:g} (default: the video's rate, {DEFAULT_IMAGE_FPS:g} for images; 0 = as fast as "
                   "possible)")
    p.add_argument("--loop", action="store_true", help="start over at the end (until Ctrl-C or --max-frames)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    add_max_pixels_argument(p, extra="; with --size, the published size (the sources then up to 16384x16384)")
    p.add_argument("--encoding", choices=ENCODINGS, default="bgr8", help="image encoding (default: %(default)s)")
    p.add_argument("--compressed", choices=("jpeg", "png"), default=None,
                   help="publish sensor_msgs/CompressedImage on <topic>/compressed instead")
    p.add_argument("--size", type=parse_size, default=None, metavar="HxW", help="resize frames, e.g. 360x480")
    p.add_argument("--camera-info", default=None, metavar="YAML", help="camera_calibration YAML file (default: "
                   "an ideal pinhole camera, see --fov)")
    p.add_argument("--fov", type=float, default=60.0, help="horizontal field of view of the default pinhole "
                   "camera_info, degrees (default: %(default)s)")
    p.add_argument("--best-effort", action="store_true", help="best-effort publishers (default: reliable)")
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="wait until N subscribers match before the first frame (default: %(default)s)")
    p.add_argument("--wait-timeout", type=float, default=30.0, help="seconds for --wait-subscribers "
                   "(default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_ros_tool

    # SIGTERM as Ctrl-C (as icnet-segment and icnet-record): the summary, exit status 143 (before, SIGTERM ended the
    # process at once, with no summary)
    return run_ros_tool("icnet-play", argv, _main)


def _rate_problem(rate: float, what: str = "--rate") -> str | None:
    """Why ``rate`` (fps) cannot be played (None when it can): not finite, negative, or slower than
    :data:`MIN_RATE` (a period of over 1000 s; 1e-300 made time.sleep raise OverflowError)."""
    if not (math.isfinite(rate) and rate >= 0):
        return f"{what} must be a finite number >= 0 (0: as fast as possible), got {rate}"
    if 0 < rate < MIN_RATE:
        return (f"{what} must be 0 (as fast as possible) or at least {MIN_RATE:g} fps (a frame every "
                f"{1 / MIN_RATE:g} s), got {rate:g}")
    return None


def _main(argv: list[str] | None, stop: Any) -> int:
    args = build_parser().parse_args(argv)
    problem = _rate_problem(args.rate) if args.rate is not None else None
    if problem:
        print(f"icnet-play: error: {problem}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.wait_timeout) and args.wait_timeout > 0):
        print(f"icnet-play: error: --wait-timeout must be a finite number > 0, got {args.wait_timeout}",
              file=sys.stderr)
        return 2
    if args.max_frames is not None and args.max_frames < 1:
        print(f"icnet-play: error: --max-frames must be >= 1, got {args.max_frames}", file=sys.stderr)
        return 2
    problem = max_pixels_problem(args.max_pixels)
    if not problem and args.size and args.size[0] * args.size[1] > args.max_pixels:  # (100000x100000: 30 GB a frame)
        problem = (f"--size {args.size[0]}x{args.size[1]} = {args.size[0] * args.size[1]} pixels exceeds --max-pixels "
                   f"{args.max_pixels} (the node's max_pixels drops larger frames)")
    if problem:
        print(f"icnet-play: error: {problem}", file=sys.stderr)
        return 2
    from .cli_checks import topic_problem

    # checked as rclpy checks it, before the node exists: create_publisher's exception was a 21-line traceback
    problem = topic_problem(args.topic, "--topic", "icnet_play") or next(
        (p for p in (topic_problem(t, f"--topic {args.topic!r} publishes on", "icnet_play")
                     for t in camera_topics(args.topic, args.compressed)) if p), None)
    if problem:
        print(f"icnet-play: error: {problem}", file=sys.stderr)
        return 2
    try:
        # with --size the node gets the resized frames (their size checked above): a source larger than
        # --max-pixels is fine to shrink (a 4096x2160 video to 720x1280), decoding bounded by the most a limit can be
        from ..ros_image import MAX_MAX_PIXELS

        with quiet_stderr():  # FFmpeg's lines about a damaged video: said below in one
            source = open_source(args.source, max_pixels=MAX_MAX_PIXELS if args.size else args.max_pixels)
        camera_info = load_camera_info(args.camera_info) if args.camera_info else None
        if camera_info is None:
            pinhole_camera_info(1, 1, args.fov)  # validates --fov
        # a video's first frame decoded now: one that declares frames none of which decodes (before: 'published 0
        # frames', exit status 0) or declares no frame count is decided by decoding it
        empty = not has_decodable_frames(source)
    except (SourceError, ValueError) as e:
        hint = " (--max-pixels)" if isinstance(e, ImageTooLargeError) else ""
        print(f"icnet-play: error: {e}{hint}", file=sys.stderr)
        return 2
    if empty:
        print(f"icnet-play: error: no frames in {args.source}", file=sys.stderr)
        return 2
    skipped = UnreadableImages("icnet-play").install(source)
    rate = args.rate if args.rate is not None else (source.fps or DEFAULT_IMAGE_FPS)
    problem = _rate_problem(rate, f"the frame rate of {args.source}") if args.rate is None else None
    if problem:  # a container that declares a frame every hour (or 1e-300 fps)
        print(f"icnet-play: error: {problem}; give --rate", file=sys.stderr)
        return 2

    import rclpy

    init_without_signal_handlers()  # Ctrl-C: a KeyboardInterrupt here, handled below
    stop.install()  # SIGTERM as Ctrl-C (and SIGINT's handler again, which the line above reset)
    node = rclpy.create_node("icnet_play")
    player = None
    n = 0
    interrupted = False
    try:
        player = Player(node, args.topic, args.frame_id, args.encoding, args.compressed, camera_info, args.fov,
                        args.size, reliable=not args.best_effort)
        player.held = stop.held
        if args.wait_subscribers and not player.wait_for_subscribers(args.wait_subscribers, args.wait_timeout):
            print(f"icnet-play: error: fewer than {args.wait_subscribers} subscriber(s) on {player.image_topic} "
                  f"after {args.wait_timeout:g} s", file=sys.stderr)
            return 1
        print(f"icnet-play: {source.description} -> {player.image_topic} at "
              f"{'max rate' if rate == 0 else f'{rate:g} fps'}{' (loop)' if args.loop else ''}", flush=True)
        n = play(player, source, rate, args.loop, args.max_frames, progress=args.progress)
        player.flush()  # reliable: let the last samples be acknowledged before the participant goes away
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # each step on its own: a (second) Ctrl-C during one must not skip the others or end in a traceback
        interrupted = cleanup(source.close, node.destroy_node, rclpy.try_shutdown) or interrupted
    if player is not None:  # the rate from the publishing times: neither start-up nor the flush count
        summary = rate_summary(player.published, player.first_published, player.last_published)
    else:
        summary = rate_summary(n, None, None)
    summary += skipped.summary()
    if interrupted:
        print(f"icnet-play: interrupted: {summary}", file=sys.stderr, flush=True)
        return stop.exit_code
    print(f"icnet-play: {summary}", flush=True)
    return 1 if skipped.paths else 0


if __name__ == "__main__":
    sys.exit(main())
