"""``icnet-record``: save the images received on ROS topics to disk (overlays by default).

    icnet-record                                              # /camera/semantic/overlay -> ./out/overlays/*.png
    icnet-record /front/semantic/overlay /rear/semantic/overlay --output out/ --max-frames 100
    icnet-record /camera/semantic/color --video color.mp4 --fps 10 --idle-timeout 5

Files are named ``<index>_<stamp sec>.<nanosec>.<ext>``, the index zero-padded to 9 digits (per topic), so they
sort in arrival order and can be matched to their input frames by stamp. When several topics are recorded, each has
its own folder, named after it (``/front/semantic/overlay`` -> ``front_semantic_overlay``); topics that would share a
folder name (``/a/b`` and ``/a_b``) each get ``-<8 hex digits>`` of their name's SHA-1 appended to it. A folder that
already holds such files (an earlier recording, whose files a second one would overwrite: the same indices, and the
same stamps when a bag is replayed) is refused before anything starts. sensor_msgs/Image in rgb8, bgr8, rgba8,
bgra8, mono8 and mono16 (16-bit PNG) is supported; ``<topic>/compressed`` topics are saved as received, named .jpg or
.png after their bytes (the ``format`` field when the bytes are neither). ``--video`` is checked before anything starts
(a file type or ``--fps`` its writer refuses, e.g. ``.webm`` or ``--fps 1e5``: one line, exit status 2) and when closed
(every frame in it, readable): a broken video is one error line and exit status 1. With one topic, each frame is placed
in the video by its header stamp, the previous frame repeated where frames are missing (at most 10 s and 300 frames of a
gap), so that the video keeps the topic's timing when frames were dropped on the way; frames closer than ``1 / --fps``
follow each other, and several topics go into one video in arrival order. A compressed frame whose header declares more
than ``--max-pixels`` pixels, or one that does not decode, is saved but not added to the video: a warning, and the count
in the final line (a video none of the frames could be added to is an error, exit status 1). Writing happens on a
separate thread, so slow disks do not stall the subscription; the frames waiting for it hold at most ``--max-queue-mb``
(default 512): beyond that a frame is dropped, counted and warned about (the exit status is then 1), never buffered
without bound. Ctrl-C or SIGTERM stops the recording as ``--max-frames`` does (the final line; the same signal delivered
twice at once, as ``timeout`` and ``ros2 launch`` deliver it, counts once); during start-up it is one line,
``icnet-record: interrupted``, exit status 130 / 143. When the recording stops, every frame received is written before
icnet-record exits, however long the disk takes (a line says how many frames wait when it takes more than a few
seconds); Ctrl-C during that wait stops it: the frames never written are counted in the final line (``not written N``),
``--video`` is left unfinished (an error line) and the exit status is 1. ``--reliability auto`` (default) subscribes
reliable when every publisher of a topic is reliable (no frame lost), best effort otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOPIC = "/camera/semantic/overlay"
DEFAULT_OUTPUT = "out/overlays"
#: the names of the files a recording writes (see the module docstring; 6 digits: an index of an earlier version)
RECORDING_FILE = re.compile(r"^\d{6,}_\d+\.\d{9}\.(png|jpg)$")
INDEX_DIGITS = 9  # the file index's zero padding: names sort in arrival order up to 10^9 frames per topic
MAX_DEPTH = 10000  # --depth's upper bound (the subscription's history)
MAX_QUEUE_MB = 1 << 20  # --max-queue-mb's upper bound (1 TiB)
#: seconds :meth:`Recorder.close` waits for the writes before it calls ``on_wait`` (icnet-record says it waits)
WAIT_NOTICE_S = 3.0
#: the longest gap between two frames' stamps (s) that a video placing frames by their stamps fills by repeating the
#: previous frame; after a longer one (a paused bag, another clock) the video goes on from the new stamp
VIDEO_MAX_GAP_S = 10.0
#: ... and at most this many repeated frames for one gap (each is encoded: --fps 1000 made 10 s a 46 s fill)
VIDEO_MAX_REPEATS = 300


def to_bgr(img: np.ndarray, encoding: str) -> np.ndarray:
    """A decoded Image array -> what cv2.imwrite expects (BGR, grey, or 16-bit grey)."""
    import cv2

    if encoding in ("bgr8", "mono8", "mono16", "8UC1", "8UC3", "16UC1"):
        return img
    if encoding == "rgb8":
        return img[:, :, ::-1]
    if encoding == "rgba8":
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGBA2BGR)
    if encoding == "bgra8":
        return img[:, :, :3]
    raise ValueError(f"cannot save images with encoding {encoding!r}")


def topic_slug(topic: str) -> str:
    return topic.strip("/~").replace("/", "_") or "image"


def topic_folder_names(topics: list[str]) -> dict[str, str]:
    """The folder name of each topic when each has its own folder: its :func:`topic_slug`; when several topics have
    the same slug (``/a/b`` and ``/a_b``: their frames overwrote each other's), each of them gets ``-`` and 8 hex
    digits of the SHA-1 of its name appended (a slug has no ``-``: ROS names cannot hold one)."""
    slugs = {t: topic_slug(t) for t in topics}
    counts = Counter(slugs.values())
    return {t: s if counts[s] == 1 else f"{s}-{hashlib.sha1(t.encode()).hexdigest()[:8]}" for t, s in slugs.items()}


def topic_folder_map(output: str | Path, topics: list[str], subdirs: bool | None = None) -> dict[str, Path]:
    """The folder each topic of a recording of ``topics`` writes into: ``output``, or one folder per topic
    (``subdirs``; default: when several are recorded)."""
    output = Path(output).expanduser()
    if not (len(topics) > 1 if subdirs is None else subdirs):
        return {t: output for t in topics}
    return {t: output / name for t, name in topic_folder_names(topics).items()}


def topic_folders(output: str | Path, topics: list[str]) -> list[Path]:
    """The folders a recording of ``topics`` writes into (one per topic when several are recorded)."""
    return list(dict.fromkeys(topic_folder_map(output, topics).values()))


def existing_recording(folder: Path) -> Path | None:
    """A file of an earlier recording in ``folder`` (named as :class:`Recorder` names its files), else None."""
    try:
        return next((p for p in folder.iterdir() if RECORDING_FILE.match(p.name)), None)
    except OSError:  # no folder yet (or none readable: the writes will say why)
        return None


class Recorder:
    """Subscribes to image topics on ``node`` and writes every received frame (and optionally a video).

    Counters: ``received``, ``saved``, ``failed``, ``dropped`` (the write queue held ``max_queue_bytes``),
    ``unwritten`` (received and none of those: waiting to be written, or never written when :meth:`close` stopped
    waiting). With a ``video``, ``not_in_video`` counts the frames saved but not added to it: a compressed frame
    declaring more than ``max_pixels`` pixels in its header (None: no limit; a raw frame's pixels are in memory
    already), or one that does not decode. ``video_timing`` (default: when one topic is recorded) places each frame in
    the video by its header stamp: frame ``round((stamp - first stamp) * fps)``, the previous frame repeated up to
    there (see :meth:`_video_repeats`); without it frames follow each other in arrival order."""

    def __init__(self, node: Any, topics: list[str], output: str | Path, fmt: str = "png",
                 reliability: str = "auto", depth: int = 100, video: str | Path | None = None,
                 fps: float = 10.0, subdirs: bool | None = None, max_queue_bytes: int = 512 << 20,
                 max_pixels: int | None = None, video_timing: bool | None = None) -> None:
        if fmt not in ("png", "jpg"):
            raise ValueError(f"format must be png or jpg, got {fmt!r}")
        if reliability not in ("auto", "reliable", "best_effort"):
            raise ValueError(f"reliability must be auto, reliable or best_effort, got {reliability!r}")
        if not topics:
            raise ValueError("no topics to record")
        if max_queue_bytes <= 0:
            raise ValueError(f"max_queue_bytes must be > 0, got {max_queue_bytes}")
        self.node, self.topics, self.fmt, self.depth = node, list(topics), fmt, depth
        self.output = Path(output).expanduser()
        self.reliability = reliability
        self.subdirs = len(topics) > 1 if subdirs is None else subdirs
        self._folders = topic_folder_map(self.output, self.topics, self.subdirs)
        self.max_pixels = max_pixels
        self.not_in_video = 0
        self.received = 0
        self.saved = 0
        self.failed = 0
        self.dropped = 0
        self.max_queue_bytes = int(max_queue_bytes)
        self._queued_bytes = 0
        self.first_received: float | None = None
        self.last_received: float | None = None
        self._counts: dict[str, int] = {t: 0 for t in topics}
        self._lock = threading.Condition()
        self._queue: queue.Queue[tuple[Any, str, Path] | None] = queue.Queue()
        self._stop_writing = threading.Event()  # close stopped waiting: the writer takes no further frame
        self._closing = False  # close() began: no frame is taken any more
        # set when the writer thread ends: after a KeyboardInterrupt in Thread.join, Python 3.11's is_alive() says
        # False while the thread still runs
        self._writer_done = threading.Event()
        self._subs: dict[str, Any] = {}
        self._video = None
        self.video_error: str | None = None
        self.video_timing = len(self.topics) == 1 if video_timing is None else video_timing
        # the writer thread's: the stamp (s) video frame 0 stands for, the last frame's stamp, the last frame
        self._video_start: float | None = None
        self._video_stamp: float | None = None
        self._video_last: Any = None
        if video is not None:
            from ..video import VideoWriter

            self._video = VideoWriter(video, fps)
        self.output.mkdir(parents=True, exist_ok=True)
        self._writer = threading.Thread(target=self._write_loop, name="icnet_record_writer", daemon=True)
        self._writer.start()
        self.subscribe_ready()

    # -- subscriptions
    def _qos(self, topic: str) -> Any | None:
        """The QoS to subscribe ``topic`` with, or None while 'auto' has no publisher to look at yet."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        if self.reliability == "auto":
            infos = self.node.get_publishers_info_by_topic(topic)
            if not infos:
                return None
            reliable = all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
        else:
            reliable = self.reliability == "reliable"
        return QoSProfile(depth=self.depth, reliability=ReliabilityPolicy.RELIABLE if reliable else
                          ReliabilityPolicy.BEST_EFFORT)

    def subscribe_ready(self) -> bool:
        """Subscribe the topics whose QoS is known (all of them unless 'auto' waits for publishers).
        Returns True when every topic is subscribed."""
        from sensor_msgs.msg import CompressedImage, Image

        for topic in self.topics:
            if topic in self._subs:
                continue
            qos = self._qos(topic)
            if qos is None:
                continue
            msg_type = CompressedImage if topic.endswith("/compressed") else Image
            self._subs[topic] = self.node.create_subscription(msg_type, topic,
                                                              lambda m, t=topic: self._on_msg(t, m), qos)
        return len(self._subs) == len(self.topics)

    def publisher_count(self) -> int:
        return sum(s.get_publisher_count() for s in self._subs.values())

    def silent_topics(self) -> list[str]:
        """The topics that have received nothing and have no publisher (or are not subscribed yet); a topic whose
        camera sent frames and then left is not one of them."""
        with self._lock:
            counts = dict(self._counts)
        return [t for t in self.topics if counts[t] == 0
                and (t not in self._subs or self._subs[t].get_publisher_count() == 0)]

    # -- receiving and writing
    def _on_msg(self, topic: str, msg: Any) -> None:
        with self._lock:
            if self._closing:  # a callback the executor had begun as close() destroyed the subscriptions: the
                return  # writer may be past its last frame, so the frame is not taken (nor counted)
            index = self._counts[topic]
            self._counts[topic] += 1
            self.received += 1
            now = time.monotonic()
            self.first_received = self.first_received or now
            self.last_received = now
            self._lock.notify_all()
            size = len(msg.data)
            # one frame is always taken (an empty queue), whatever its size
            if self._queued_bytes and self._queued_bytes + size > self.max_queue_bytes:
                self.dropped += 1
                dropped = self.dropped
            else:
                self._queued_bytes += size
                dropped = 0
        if dropped:
            self.node.get_logger().warning(
                f"{topic}: frame {index} dropped: {self._queued_bytes >> 20} MiB wait to be written (limit "
                f"{self.max_queue_bytes >> 20} MiB; {dropped} dropped so far): the disk is slower than the topic; "
                "use --format jpg, a faster disk or a larger --max-queue-mb", throttle_duration_sec=5.0)
            return
        stem = f"{index:0{INDEX_DIGITS}d}_{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}"
        self._queue.put((msg, topic, self._folders[topic] / stem))

    @property
    def unwritten(self) -> int:
        """Frames received and neither saved, failed nor dropped: waiting to be written (or being written)."""
        with self._lock:
            return self.received - self.saved - self.failed - self.dropped

    def _write_loop(self) -> None:
        try:
            self._write_items()
        finally:
            with self._lock:  # atomic with close()'s "not done yet: stop writing"
                abandoned = self._stop_writing.is_set()
                if not abandoned:
                    self._writer_done.set()  # close() finishes the video
            if abandoned:
                # close() stopped waiting (its timeout, a second Ctrl-C) and left the video to this thread: it is
                # abandoned, its temporary file removed (nothing was ever at its name; before, the file stayed)
                if self._video is not None:
                    self._video.close()
                self._writer_done.set()

    def _write_items(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop_writing.is_set():
                return
            msg, topic, stem = item
            try:
                self._write(msg, topic, stem)
                ok = True
            except Exception as e:  # noqa: BLE001 - keep recording; report the failure
                ok = False
                self.node.get_logger().error(f"{topic}: cannot save frame {stem.name}: {e}")
            with self._lock:
                if ok:
                    self.saved += 1
                else:
                    self.failed += 1
                self._queued_bytes -= len(msg.data)
                self._lock.notify_all()

    def _write(self, msg: Any, topic: str, stem: Path) -> None:
        from ..ros_image import compressed_to_numpy, compression_format, image_to_numpy, sniff_codec
        from ..video import write_bytes_atomically, write_image

        stem.parent.mkdir(parents=True, exist_ok=True)
        if topic.endswith("/compressed"):
            # the bytes say what they are; the format field only when they are neither PNG nor JPEG (an empty format
            # with JPEG bytes was saved as .png)
            codec = sniff_codec(msg.data) or compression_format(msg.format)
            if not codec:
                raise ValueError(f"the data ({len(msg.data)} bytes) is neither PNG nor JPEG and the format "
                                 f"{msg.format!r} names no codec")
            path = stem.with_name(stem.name + (".jpg" if codec == "jpeg" else ".png"))
            write_bytes_atomically(path, bytes(msg.data))  # whole or not at all, as write_image: never a cut file
            bgr = None
            if self._video is not None and self.video_error is None:
                # the file is saved: a frame the video cannot take is a warning, not a failed frame (its header is
                # checked first: a small message can declare gigabytes of pixels)
                try:
                    img, order = compressed_to_numpy(msg, self.max_pixels)
                    bgr = img[:, :, ::-1] if order == "RGB" else img
                except Exception as e:  # noqa: BLE001 - any decoder failure: the frame stays out of the video
                    self._not_in_video(topic, stem, e)
        else:
            bgr = to_bgr(image_to_numpy(msg), msg.encoding)
            if bgr.dtype == np.uint16 and self.fmt == "jpg":
                path = stem.with_name(stem.name + ".png")  # 16-bit images need PNG
            else:
                path = stem.with_name(f"{stem.name}.{self.fmt}")
            write_image(path, np.ascontiguousarray(bgr))  # (its pixels are in memory already: no --max-pixels)
        if self._video is not None and bgr is not None and self.video_error is None:
            if bgr.ndim == 2:
                bgr = np.repeat(bgr[:, :, None], 3, axis=2)
            if bgr.dtype != np.uint8:
                bgr = (bgr >> 8).astype(np.uint8)
            frame = np.ascontiguousarray(bgr)
            try:
                for _ in range(self._video_repeats(msg.header.stamp)):  # frames missing before this one
                    self._video.write(self._video_last)
                self._video.write(frame)
                self._video_last = frame
            except OSError as e:  # the video stops here; this frame and the next ones are still saved as images
                self.video_error = str(e)
                self.node.get_logger().error(f"{e}; no more frames go to the video, the images are still saved")

    def _video_repeats(self, stamp: Any) -> int:
        """How many times the previous video frame is repeated before the frame stamped ``stamp`` goes in, so that it
        lands at frame ``round((stamp - start) * fps)`` (``start``: the first frame's stamp): frames dropped on the
        way (a recorder, a node or a network that could not keep up) leave the previous frame on screen for their
        time instead of compressing the video (11 frames of 25 for 1 s at 25 fps made 0.44 s of video). No repeat
        without ``video_timing``, for a stamp equal to the previous one (zero stamps) or earlier (then the video
        goes on from it), or after a gap longer than :data:`VIDEO_MAX_GAP_S` or :data:`VIDEO_MAX_REPEATS` frames (a
        paused bag, another clock: the video goes on from the new stamp); frames closer than ``1 / fps`` follow each
        other."""
        if not self.video_timing or self._video is None:
            return 0
        t = stamp.sec + stamp.nanosec * 1e-9
        frames, fps = self._video.frames, self._video.fps
        previous, self._video_stamp = self._video_stamp, t
        if previous is not None and t == previous:
            return 0
        missing = 0 if previous is None or t < previous else round((t - self._video_start) * fps) - frames
        if previous is None or t < previous or missing > min(VIDEO_MAX_GAP_S * fps, VIDEO_MAX_REPEATS):
            self._video_start = t - frames / fps  # the first frame, stamps that went back, a long gap: go on from t
            return 0
        return max(0, missing)

    def _not_in_video(self, topic: str, stem: Path, why: Exception) -> None:
        with self._lock:
            self.not_in_video += 1
        self.node.get_logger().warning(f"{topic}: frame {stem.name} saved, not added to the video: {why}",
                                       throttle_duration_sec=5.0)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` frames were received."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.received < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float | None = None, on_wait: Callable[[int], None] | None = None) -> None:
        """Stop receiving, write every queued frame, finish the video: :meth:`VideoWriter.finish` reads it back and
        checks every frame is there; its OSError is kept in ``video_error`` (never raised: close runs in finally
        blocks), None when the video is fine or there is none; a KeyboardInterrupt during the finish is raised on,
        with ``video_error`` set and the temporary file removed.

        Waits for the writes without limit by default (``timeout`` seconds at most); ``on_wait(unwritten)`` is
        called once when they take more than :data:`WAIT_NOTICE_S`. When the wait ends first (the timeout, or a
        KeyboardInterrupt, which is raised on), the writer takes no further frame (the one it writes completes;
        ``unwritten`` counts the others) and the video is not finished (the writer may still use it): ``video_error``
        says so."""
        with self._lock:
            self._closing = True
        for sub in self._subs.values():
            self.node.destroy_subscription(sub)
        self._subs.clear()
        self._queue.put(None)  # after every frame taken (none is after _closing): the writer's last item
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._writer_done
        try:
            if on_wait is not None:
                if not done.wait(WAIT_NOTICE_S if timeout is None else min(WAIT_NOTICE_S, timeout)):
                    on_wait(self.unwritten)
            done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:  # atomic with the writer's last step: either it ended first or it sees this
                gave_up = not done.is_set()
                if gave_up:
                    self._stop_writing.set()
            if gave_up:
                if self._video is not None and self.video_error is None:
                    self.video_error = (f"cannot write {self._video.path}: not finished (the recording stopped "
                                        "before every frame was written)")
        if gave_up or self._video is None:  # (the writer closes an abandoned video)
            return
        if self.video_error is not None:  # a write failed: the video is broken, only released
            self._video.close()
            return
        try:
            self._video.finish()
        except OSError as e:
            self.video_error = str(e)
            return
        except BaseException:  # a (second) Ctrl-C while the video is read back: said, its temporary file removed
            self.video_error = f"cannot write {self._video.path}: not finished (interrupted)"
            self._video.close()
            raise
        if self._video.frames == 0 and self.not_in_video:  # a video was asked for, and none could be written
            self.video_error = (f"no video written to {self._video.path}: none of the {self.not_in_video} frame(s) "
                                "saved could be added to it (see the warnings)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icnet-record", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("topics", nargs="*", default=[DEFAULT_TOPIC], help=f"image topics (default: {DEFAULT_TOPIC})")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="output folder (default: %(default)s)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format (default: png)")
    p.add_argument("--video", default=None, help="also write the frames to this video file (e.g. overlay.mp4)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of --video (default: %(default)s)")
    from .cli_checks import add_max_pixels_argument

    add_max_pixels_argument(p, bounds="compressed frames whose header declares more pixels (height x width) are "
                                      "saved but not added to --video (not decoded)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (all topics)")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop when no frame arrived for this many "
                   "seconds (counted from the first frame)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--reliability", choices=("auto", "reliable", "best_effort"), default="auto",
                   help="subscription reliability (default: auto = reliable when all publishers are)")
    p.add_argument("--depth", type=int, default=100, help=f"subscription queue depth, at most {MAX_DEPTH} (default: "
                   "%(default)s)")
    p.add_argument("--max-queue-mb", type=float, default=512.0, help="memory for frames waiting to be written; "
                   f"beyond it frames are dropped and counted; at most {MAX_QUEUE_MB} (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_ros_tool

    # SIGTERM as Ctrl-C, also while the tool imports and starts (before: rclpy's handlers from rclpy.init on, so a
    # signal during the imports was a 32-line KeyboardInterrupt traceback and SIGTERM a silent exit status -15)
    return run_ros_tool("icnet-record", argv, _main)


def _main(argv: list[str] | None, stop: Any) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_frames", "idle_timeout", "duration", "max_queue_mb", "depth", "fps"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            print(f"icnet-record: error: --{name.replace('_', '-')} must be a finite number > 0, got {v}",
                  file=sys.stderr)
            return 2
        if v is not None and v <= 0:
            print(f"icnet-record: error: --{name.replace('_', '-')} must be > 0, got {v}", file=sys.stderr)
            return 2
    from .cli_checks import max_pixels_problem, output_file_problem, output_folder_problem, topic_problem

    # (a larger --depth was a TypeError traceback from the QoS, a --max-queue-mb of 1e308 an OverflowError)
    for flag, v, limit in (("--depth", args.depth, MAX_DEPTH), ("--max-queue-mb", args.max_queue_mb, MAX_QUEUE_MB)):
        if v > limit:
            print(f"icnet-record: error: {flag} must be at most {limit}, got {v}", file=sys.stderr)
            return 2
    problem = max_pixels_problem(args.max_pixels)
    if problem:
        print(f"icnet-record: error: {problem}", file=sys.stderr)
        return 2

    # topics checked as rclpy checks them, before the node exists: create_subscription's exception was a traceback
    problem = next((p for p in (topic_problem(t, "topic", "icnet_record") for t in args.topics) if p), None)
    # the folder created and written to now, before rclpy starts (/sys/x was "[Errno 1] Operation not permitted")
    problem = (problem or output_folder_problem(args.output, create=True)
               or output_file_problem(args.video, "--video"))
    if not problem and args.video is not None:
        # a file type or --fps the writer refuses (x, x.webm, x.gif; --fps 1e5) failed at the first frame or the end
        from ..video import video_writer_problem

        reason = video_writer_problem(args.video, args.fps)
        problem = f"--video {args.video}: {reason}" if reason else None
    if problem:
        print(f"icnet-record: error: {problem}", file=sys.stderr)
        return 2
    for folder in topic_folders(args.output, args.topics):
        earlier = existing_recording(folder)
        if earlier is not None:
            print(f"icnet-record: error: --output {args.output}: {folder} already holds a recording ({earlier.name}); "
                  "a new one would overwrite its files: choose another --output or remove them", file=sys.stderr)
            return 2
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from ..ros_spin import cleanup, init_without_signal_handlers

    node = executor = recorder = None
    t0 = time.monotonic()
    reason = "interrupted"
    try:
        init_without_signal_handlers()  # Ctrl-C: a KeyboardInterrupt, handled below
        stop.install()  # SIGTERM as Ctrl-C (and SIGINT's handler again, which the line above reset)
        node = rclpy.create_node("icnet_record")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        recorder = Recorder(node, args.topics, args.output, args.format, args.reliability, args.depth,
                            args.video, args.fps, max_queue_bytes=max(1, int(args.max_queue_mb * (1 << 20))),
                            max_pixels=args.max_pixels)
        print(f"icnet-record: {', '.join(args.topics)} -> {recorder.output}/", flush=True)
        hinted = False
        while True:
            executor.spin_once(timeout_sec=0.1)
            recorder.subscribe_ready()
            now = time.monotonic()
            silent = recorder.silent_topics() if not hinted and now - t0 > 5.0 else []
            if silent:  # per topic: a mistyped second topic beside a working one is named too
                hinted = True
                print(f"icnet-record: still waiting for a publisher on {', '.join(silent)} (check the topic "
                      "name, ROS_DOMAIN_ID and the DDS settings)", flush=True)
            if args.max_frames is not None and recorder.received >= args.max_frames:
                reason = f"{args.max_frames} frames"
                break
            if args.duration is not None and now - t0 >= args.duration:
                reason = f"{args.duration:g} s"
                break
            if (args.idle_timeout is not None and recorder.last_received is not None
                    and now - recorder.last_received >= args.idle_timeout):
                reason = f"no frame for {args.idle_timeout:g} s"
                break
    except (KeyboardInterrupt, ExternalShutdownException):  # Ctrl-C, SIGTERM: the recording stops
        pass
    except (ValueError, OSError) as e:
        print(f"icnet-record: error: {e}", file=sys.stderr)
        return 2
    finally:
        # each step on its own: a (second) signal during one must not skip the others or end in a traceback; a
        # KeyboardInterrupt in the recorder's close leaves the frames not written counted below
        steps = [] if recorder is None else [lambda: recorder.close(on_wait=wait_notice("icnet-record"))]
        steps += [] if executor is None else [lambda: executor.shutdown(timeout_sec=1.0)]
        steps += [] if node is None else [node.destroy_node]
        cleanup(*steps, rclpy.try_shutdown)
    dt = time.monotonic() - t0
    if recorder is None:  # Ctrl-C before the recording started
        print("icnet-record: interrupted", file=sys.stderr, flush=True)
        return stop.exit_code
    line, status = final_report(recorder, reason, dt)
    print(line, flush=True)
    if recorder.video_error:
        print(f"icnet-record: error: {recorder.video_error}", file=sys.stderr, flush=True)
    return status


def wait_notice(prog: str, what: str = "frame") -> Callable[[int], None]:
    """``on_wait`` for :meth:`Recorder.close`: one line saying how many ``what`` s still wait to be written."""
    return lambda n: print(f"{prog}: writing the {n} {what}(s) still queued (Ctrl-C: stop, leaving them "
                           "unwritten)", flush=True)


def final_report(recorder: Recorder, reason: str, seconds: float) -> tuple[str, int]:
    """The closed recording's final line and exit status: 1 when a frame was not saved (failed, dropped, or never
    written: the wait for the writes was stopped) or the video is broken, else 0 (frames saved but not added to the
    video are counted in the line, with the warnings said when they were written)."""
    unwritten = recorder.unwritten
    line = (f"icnet-record: stopped ({reason}): received {recorder.received}, saved {recorder.saved}"
            f"{f', failed {recorder.failed}' if recorder.failed else ''}"
            f"{f', dropped {recorder.dropped} (write queue full)' if recorder.dropped else ''}"
            f"{f', not written {unwritten} (the writing was stopped)' if unwritten else ''}"
            f"{f', {recorder.not_in_video} not added to the video' if recorder.not_in_video else ''}"
            f" in {seconds:.1f} s -> {recorder.output}/")
    ok = not (recorder.failed or recorder.dropped or unwritten or recorder.video_error)
    return line, 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
