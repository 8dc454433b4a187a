"""icnet-segment: offline segmentation of images, image folders and video files.

Writes, under ``--output``:

- ``label/<name>.png``: class ids (uint8, single channel; 255 = unknown), at the frame's resolution;
- ``color/<name>.png``: the colour mask (class palette);
- ``overlay/<name>.png`` for image inputs, ``overlay/<video>.mp4`` for a video input (``--overlay-frames`` also
  writes the video's overlays as PNGs);
- ``confidence/<name>.png`` when requested: ``round(255 * max softmax probability)``.

Video frames are named ``<video stem>_<frame index:06d>`` and written to ``<kind>/<video stem>/``. Image names are
the file stems (relative paths for ``--recursive`` folders). Names stay as they are unless two inputs would write
the same one (a/x.png and b/x.png, frame.png and frame.jpg in one folder, v1/clip.mp4 and v2/clip.mp4): then each
of those gets the fewest parent folders that tell them apart (``a__x``, ``b__x``; for videos ``v1__clip``), else
its extension (``frame_png``, ``frame_jpg``), else both, else a number, so no output is ever overwritten by
another input's. A ``--recursive`` folder leaves out the images under the output folders (``-o`` inside the input:
a rerun does not segment its own outputs). Images whose header declares more than ``--max-pixels`` pixels (or
whose file is larger than such an image can be) are refused before decoding, as are videos whose frames are larger,
and an image that cannot be read (corrupt, truncated, a JPEG or PNG the node would refuse) or is too small for the
network, or a video with no frame, is skipped: one error line each naming the file, the other inputs are
segmented, and the exit status is 2. Images are decoded as stored (a JPEG's EXIF orientation is not applied, as by
the node and icnet-eval). A video that ends before the frame count its container declares gets a warning (one that
declares none is read to its end). Outputs are written whole (a PNG or a video through a hidden temporary file,
renamed once complete; a video checked once finished): a full disk stops the run with ``cannot write <file>:
<reason>``, exit status 2, and leaves no partial file. An input that the run would write an output over (given from
inside the output folder: ``out/overlay/x.png -o out``) is refused, and the output folder is created and checked
writable, before the model is loaded. A video that cannot be opened (empty file, damaged, unknown container) is
skipped as an empty one is. ``--batch`` is at most 64 (the node's max_batch) and ``--threads`` at most 256; running
out of memory is one line, exit status 2, with the frames already segmented written and the videos finished. Ctrl-C
(or SIGTERM) stops reading, writes the frames already segmented, finishes the videos (playable, with those frames)
and exits with status 130 (143 for SIGTERM). Decoding and file writing run in background threads, overlapping the
inference.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import engine_config
from ..sizes import MAX_BATCH, MAX_THREADS
from .cli_checks import add_max_pixels_argument, max_pixels_problem

KINDS = ("label", "color", "overlay", "confidence")
_END = object()


@dataclass
class _Item:
    source_index: int
    name: str
    bgr: Any
    is_video: bool
    video_stem: str
    origin: str = ""  # the input file, named in messages (a video's frame: "<video> frame <index>")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icnet-segment", description="Segment images, image folders and videos with an ICNet checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1].replace("``", ""))
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders of images, video files")
    p.add_argument("--model", "-m", default=None, help="model file: native .safetensors, exported .onnx, OpenVINO "
                   ".xml or TensorRT .engine / .plan (default: the package model)")
    p.add_argument("--output", "-o", required=True, help="output folder (created)")
    p.add_argument("--batch", type=int, default=0,
                   help=f"frames per forward pass, at most {MAX_BATCH} (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--recursive", action="store_true", help="walk sub-folders of folder inputs")
    p.add_argument("--stride", type=int, default=1, help="videos: segment every N-th frame (default 1)")
    p.add_argument("--max-frames", type=int, default=None, help="videos: at most this many frames each")
    p.add_argument("--overlay-frames", action="store_true", help="videos: also write overlay PNGs per frame")
    p.add_argument("--fourcc", default="mp4v", help="video codec for overlay videos, 4 characters (default mp4v; "
                   "one this OpenCV cannot encode, e.g. avc1 with pip's, is refused before the run)")
    add_max_pixels_argument(p)
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's choice; 1 can be faster on an "
                   "oversubscribed machine)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    engine_config.add_arguments(p, defaults={"outputs": ("label", "color", "overlay")})  # what to write
    return p


class _Writer:
    """Writes results in a background thread (PNG encoding is slow); videos stay open until closed. Keeps no
    per-frame state (a run over a long video holds only the open video writers). A video is written to a temporary
    file and renamed once finished (:class:`~icnet_ros.video.VideoWriter`): :meth:`close` finishes them, and
    :meth:`abandon` (a run that ended otherwise) removes those not finished, so no video is left broken at its
    name."""

    def __init__(self, out: Path, kinds: frozenset[str], overlay_frames: bool, fourcc: str,
                 video_fps: dict[int, float]) -> None:
        self.out, self.kinds, self.overlay_frames, self.fourcc = out, kinds, overlay_frames, fourcc
        self.video_fps = video_fps
        self.videos: dict[int, Any] = {}
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(maxsize=16)
        #: frames whose outputs are written (what an interrupted run reports: a Ctrl-C inside Queue.put, once the
        #: frame was queued, left the main thread's count one short)
        self.written = 0
        self._end_sent = False
        # set when the thread ends (after a KeyboardInterrupt in Thread.join, Python 3.11's is_alive() can say False
        # while the thread still runs)
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="icnet-segment-writer", daemon=True)
        self.thread.start()

    def put(self, item: _Item, result: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((item, result))

    def _loop(self) -> None:
        try:
            while True:
                job = self.q.get()
                if job is _END:
                    return
                if self.error is not None:
                    continue  # drain
                try:
                    self._write(*job)
                    self.written += 1
                except BaseException as e:  # noqa: BLE001 - reported to the main thread
                    self.error = e
        finally:
            self._done.set()

    def _end(self) -> None:
        """Let the thread write what is queued and end; wait for it."""
        if not self._end_sent:
            self.q.put(_END)
            self._end_sent = True
        self._done.wait()

    def _write(self, item: _Item, r: Any) -> None:
        from icnet_ros.video import VideoWriter, write_image

        sub = Path(item.video_stem) if item.is_video else Path()
        for kind in ("label", "color", "confidence"):
            if kind in self.kinds:
                write_image(self.out / kind / sub / f"{item.name}.png", getattr(r, kind))
        if "overlay" in self.kinds:
            if item.is_video:
                vw = self.videos.get(item.source_index)
                if vw is None:
                    path = self.out / "overlay" / f"{item.video_stem}.mp4"
                    vw = self.videos[item.source_index] = VideoWriter(path, self.video_fps[item.source_index],
                                                                      self.fourcc)
                vw.write(r.overlay)
            if not item.is_video or self.overlay_frames:
                write_image(self.out / "overlay" / sub / f"{item.name}.png", r.overlay)

    def close(self) -> None:
        """Write what was queued, finish every video (each checked: it reads back with its frames, then renamed to
        its name; a broken one is removed) and raise the first error."""
        self._end()
        for vw in self.videos.values():
            try:
                vw.finish()
            except OSError as e:
                self.error = self.error or e
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop writing (what is queued is dropped) and remove every video not finished: its temporary file (the
        run ended by an unexpected error, or a second Ctrl-C during :meth:`close`). Finished videos stay."""
        if self.error is None:
            self.error = RuntimeError("abandoned")  # the thread drains the queue without writing
        self._end()
        for vw in self.videos.values():
            vw.close()


class _Progress:
    """The frames the progress bar accounts for besides those taken from the queue, counted by the reader thread:
    frames skipped without being queued (an image that cannot be read, the rest of a skipped video) advance the bar,
    frames a video's container declares but that cannot be decoded shrink its total. Before, neither moved it: 3
    unreadable images of 4 ended the bar at '1/4 25%'. :meth:`apply` brings the bar up to date (main thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.skipped = self.missing = 0
        self._applied = (0, 0)

    def skip(self, n: int = 1) -> None:
        with self._lock:
            self.skipped += n

    def miss(self, n: int) -> None:
        with self._lock:
            self.missing += n

    def apply(self, bar: Any) -> None:
        with self._lock:
            skipped, missing = self.skipped, self.missing
        new_skipped, new_missing = skipped - self._applied[0], missing - self._applied[1]
        self._applied = (skipped, missing)
        if new_missing and bar.total is not None:
            bar.total = max(bar.n, bar.total - new_missing)
        if new_skipped:
            bar.update(new_skipped)
        elif new_missing:
            bar.refresh()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """``q.put(item)`` unless ``stop`` is set first (False then): a reader blocked on a full queue ends too."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader(sources: list[Any], names: list[dict[int, str] | str], q: queue.Queue, stop: threading.Event,
            skip_sources: set[int], report: Any, progress: _Progress) -> None:
    """Decode frames in a background thread into ``q``; ends with _END (or an exception object). Sources in
    ``skip_sources`` stop being read; ``report(message, skipped)`` says that a video had no frame (an input
    skipped) or fewer than its container declares (a warning); ``progress`` counts a video's frames not read
    (skipped) or not there (missing)."""
    try:
        for si, src in enumerate(sources):
            decoded = 0
            with src:
                for frame in src:
                    if stop.is_set():
                        return
                    if si in skip_sources:
                        break
                    if src.is_video:  # frames keep their names, in the video's own (unique) folder
                        item = _Item(si, frame.name, frame.bgr, True, names[si],  # type: ignore[arg-type]
                                     f"{src.path} frame {frame.index}")
                    else:
                        item = _Item(si, names[si][frame.index], frame.bgr, False, "",  # type: ignore[index]
                                     str(src.paths[frame.index]))
                    if not _put(q, item, stop):
                        return
                    decoded += 1
            expected = src.frame_count if src.is_video else None  # None: the container declares none
            if expected is not None and decoded < expected:
                (progress.skip if si in skip_sources else progress.miss)(expected - decoded)
            if src.is_video and si not in skip_sources:
                if decoded == 0 and src.max_frames != 0:
                    report(f"no frame could be decoded from video {src.path} (empty or damaged); skipped", True)
                elif expected is not None and decoded < expected:
                    report(f"video {src.path}: {decoded} of the {expected} frames its container declares could be "
                           "decoded (truncated or damaged?); the others are missing", False)
        _put(q, _END, stop)
    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
        _put(q, e, stop)


def _disambiguate(entries: list[tuple[Any, str, Path, Path]]) -> dict[Any, str]:
    """``entries`` (key, name, root folder, file) -> key: a unique output name. A name used once stays as it is;
    names used more than once become, for every entry that shares them, the first of these that tells them apart
    (and collides with no other name): the root's last folder + ``__`` + name, the name + ``_`` + the file's
    extension, both, the last two folders (and the extension), ... up to the whole path, and last a number."""
    groups: dict[str, list[tuple[Any, str, Path, Path]]] = {}
    for e in entries:
        groups.setdefault(e[1], []).append(e)
    out = {key: name for key, name, _, _ in entries if len(groups[name]) == 1}
    taken = set(out.values())
    for name, group in groups.items():  # in input order: the same inputs give the same names
        if len(group) == 1:
            continue
        folders = [Path(os.path.abspath(root)).parts[1:] for _, _, root, _ in group]  # without the anchor
        exts = [file.suffix.lstrip(".").lower() for _, _, _, file in group]
        chosen = None
        for depth, ext in [(1, False), (0, True), (1, True)] + [(d, e) for d in range(2, 1 + max(map(len, folders)))
                                                                for e in (False, True)]:
            names = ["__".join([*f[len(f) - min(depth, len(f)):], name]) + (f"_{x}" if ext and x else "")
                     for f, x in zip(folders, exts)]
            if len(set(names)) == len(names) and not taken.intersection(names):
                chosen = names
                break
        if chosen is None:  # the same file given twice: numbered
            chosen, k = [], 1
            for _ in group:
                while f"{name}_{k}" in taken:
                    k += 1
                chosen.append(f"{name}_{k}")
                k += 1
        for (key, _, _, _), n in zip(group, chosen):
            out[key] = n
        taken.update(chosen)
    return out


def _output_names(sources: list[Any]) -> list[dict[int, str] | str]:
    """Per source: for images, frame index -> output name; for a video, the name of its output folder and video
    file. No two inputs get the same output path (:func:`_disambiguate`); names that do not collide are kept."""
    images, videos = [], []
    for si, src in enumerate(sources):
        if src.is_video:
            videos.append((si, src.path.stem, src.path.parent, src.path))
        else:
            root = getattr(src, "folder", None)
            for i, (path, name) in enumerate(zip(src.paths, src.names)):
                images.append(((si, i), name, root if root is not None else path.parent, path))
    image_names, video_names = _disambiguate(images), _disambiguate(videos)
    out: list[dict[int, str] | str] = []
    for si, src in enumerate(sources):
        out.append(video_names[si] if src.is_video else
                   {i: image_names[(si, i)] for i in range(len(src.paths))})
    return out


class _OutOfMemory(Exception):
    """A batch that ran out of memory (host or device): one line, the videos finished."""


def _inputs_written_over(sources: list[Any], names: list[dict[int, str] | str], out: Path, kinds: frozenset[str],
                         overlay_frames: bool) -> list[tuple[Path, Path]]:
    """(input file, output) for each input file this run would write an output over: an image or video given from
    inside the output folder whose output is the file itself (``icnet-segment out/overlay/x.png -o out``, a video at
    ``out/overlay/<name>.mp4``), or an image in the folder a video's frames are written to, named as one of them.
    Found by the files' identity (device and inode), so also through links and other spellings of a path. An input
    inside an output folder that no output is written over is segmented (folder inputs leave such images out)."""
    inputs: dict[tuple[int, int], Path] = {}
    for src in sources:
        for path in ([src.path] if src.is_video else src.paths):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                inputs.setdefault((st.st_dev, st.st_ino), path)

    def written_over(path: Path) -> Path | None:
        try:
            st = os.stat(path)
        except OSError:  # no such file yet: no input either
            return None
        return inputs.get((st.st_dev, st.st_ino))

    image_kinds = [k for k in KINDS if k in kinds]
    frame_kinds = [k for k in image_kinds if k != "overlay" or overlay_frames]
    found = []
    for src, name in zip(sources, names):
        if src.is_video:
            planned = [out / "overlay" / f"{name}.mp4"] if "overlay" in kinds else []
            frame = re.compile(re.escape(src.path.stem) + r"_\d{6,}\.png")  # its frames' names, any index
            for kind in frame_kinds:
                with contextlib.suppress(OSError):  # the frames' folder exists (a rerun): its files
                    planned += [Path(e.path) for e in os.scandir(out / kind / str(name)) if frame.fullmatch(e.name)]
        else:
            planned = [out / kind / f"{n}.png" for n in name.values()  # type: ignore[union-attr]
                       for kind in image_kinds]
        for path in planned:
            victim = written_over(path)
            if victim is not None:
                found.append((victim, path))
    return found


def _batches(q: queue.Queue, batch: int) -> Iterator[list[_Item]]:
    items: list[_Item] = []
    while True:
        got = q.get()
        if got is _END:
            break
        if isinstance(got, BaseException):
            raise got
        items.append(got)
        # a batch never mixes sizes needlessly: flush when full or when the next frame is not yet decoded
        if len(items) >= batch or (q.empty() and items):
            yield items
            items = []
    if items:
        yield items


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_stoppable

    return run_stoppable("icnet-segment", lambda stop: _main(argv, stop))  # SIGTERM as Ctrl-C: videos finished


def _cli_hint(message: str) -> str:
    """An engine message in the command line's words."""
    return message.replace("a fixed input_size HxW", "--input-size HxW")


def _main(argv: list[str] | None, stop_signals: Any) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(args.input_size, list):  # '--input-size 1.5 a.png': the inputs after the size are inputs
        args.input_size, rest = engine_config.split_size_tokens(args.input_size)
        args.inputs += rest
    if not args.inputs:
        print("icnet-segment: error: the following arguments are required: INPUT", file=sys.stderr)
        return 2
    from icnet_ros.checkpoint import CheckpointError
    from icnet_ros.video import (VIDEO_EXTENSIONS, ImageTooLargeError, SourceError, check_fourcc, open_source,
                                 video_writer_problem)

    from .cli_checks import output_folder_problem

    try:
        config = engine_config.from_args(args)
    except engine_config.ConfigError as e:
        print(f"icnet-segment: error: {e}", file=sys.stderr)
        return 2
    listed = args.outputs.replace(",", " ").split() if isinstance(args.outputs, str) else args.outputs
    kinds = frozenset(listed)  # what to write (the label is always computed)
    if not kinds:
        print(f"icnet-segment: error: --outputs {args.outputs!r}: choose from {', '.join(KINDS)}", file=sys.stderr)
        return 2
    if not 0 <= args.batch <= MAX_BATCH:  # (--batch 120 on HD video: out of memory, a traceback, a broken MP4)
        print(f"icnet-segment: error: --batch must be in [0, {MAX_BATCH}] (0: 4 on CUDA, 1 on CPU), got {args.batch}",
              file=sys.stderr)
        return 2
    if args.stride < 1 or (args.max_frames is not None and args.max_frames < 0):
        print("icnet-segment: error: --stride must be >= 1, --max-frames >= 0", file=sys.stderr)
        return 2
    problem = max_pixels_problem(args.max_pixels)
    if problem:
        print(f"icnet-segment: error: {problem}", file=sys.stderr)
        return 2
    try:
        check_fourcc(args.fourcc)
    except ValueError as e:
        print(f"icnet-segment: error: --fourcc: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:  # (100000 crashed the process: a segmentation fault; 5000 hung it)
            print(f"icnet-segment: error: --threads must be in [1, {MAX_THREADS}], got {args.threads}",
                  file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    stop = threading.Event()
    writer: _Writer | None = None
    refused: list[Path] = []  # images and videos over --max-pixels
    skipped: list[str] = []  # inputs that could not be segmented (unreadable, too small, empty videos)
    skip_sources: set[int] = set()  # videos whose remaining frames are not segmented
    progress = _Progress()

    def say(line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def refuse(path: Path, error: SourceError) -> None:
        """An image that cannot be read, or is over --max-pixels: one line, the other inputs go on."""
        if isinstance(error, ImageTooLargeError):
            refused.append(path)
            say(f"icnet-segment: error: {error} (--max-pixels); skipped")
        else:
            skipped.append(str(path))
            say(f"icnet-segment: error: {error}; skipped")
        progress.skip()

    def report(message: str, skip: bool) -> None:
        if skip:
            skipped.append(message)
        say(f"icnet-segment: {'error' if skip else 'warning'}: {message}")

    def segment(items: list[_Item]) -> list[tuple[_Item, Any]]:
        """Segment ``items``; a frame that the network cannot take (too small, ...) is skipped with one line (a
        video: the rest of it), the others are segmented. Out of memory: :class:`_OutOfMemory` (one line)."""
        try:
            return list(zip(items, seg.segment([it.bgr for it in items], channel_order="BGR")))
        except engine_config.FrameError as e:
            it, reason = items[e.index], _cli_hint(e.reason)
            if it.is_video:
                skip_sources.add(it.source_index)
                report(f"{it.origin}: {reason}; the rest of the video is skipped", True)
            else:
                report(f"{it.origin}: {reason}; skipped", True)
            rest = [other for other in items if other is not it and other.source_index not in skip_sources]
            return segment(rest) if rest else []
        except Exception as e:  # noqa: BLE001 - out of memory is one line; any other error goes on up
            from ..frame_pipeline import device_failure

            if device_failure(e) != "oom":  # the node's test: MemoryError, CUDA's, the CPU and ORT allocators'
                raise
            h, w = items[0].bgr.shape[:2]
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise _OutOfMemory(f"out of memory segmenting {len(items)} frame(s) of {w}x{h} at once ({reason}); "
                               "try a smaller --batch (or --input-size)") from None

    out = Path(args.output)
    frames = 0
    try:
        # a recursive walk of a folder that holds the output folder leaves the outputs out (a rerun would segment
        # them as inputs)
        own = [out / kind for kind in KINDS]
        sources = []
        for p in args.inputs:
            try:
                sources.append(open_source(p, recursive=args.recursive, stride=args.stride,
                                           max_frames=args.max_frames, max_pixels=args.max_pixels, exclude=own))
            except SourceError as e:
                path = Path(p).expanduser()
                if isinstance(e, ImageTooLargeError):  # an image file or a video over --max-pixels
                    refused.append(path)
                    say(f"icnet-segment: error: {e} (--max-pixels); skipped")
                    continue
                if not (path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS):
                    raise  # no such input, not an image or video: the command line is wrong
                report(f"{e}; skipped", True)  # a video that cannot be opened (empty, damaged): as an empty one
        names = _output_names(sources)
        overwritten = _inputs_written_over(sources, names, out, kinds, args.overlay_frames)
        if overwritten:  # before: the input was replaced by its own overlay (a video truncated to 8 frames), exit 0
            (victim, output), more = overwritten[0], len(overwritten) - 1
            raise ValueError(f"input {victim} would be overwritten by the output {output}"
                             + (f" (and {more} other input(s) by theirs)" if more else "")
                             + "; choose another --output (or move the input out of it)")
        # created and written to now, not after the model is loaded (/proc/x, a read-only folder, a file)
        problem = output_folder_problem(args.output, "--output", create=True)
        if problem:
            raise ValueError(problem)
        video_fps = {i: (s.fps or 10.0) / (args.stride if s.is_video else 1) for i, s in enumerate(sources)}
        if "overlay" in kinds:  # the overlay videos' codec and rates: refused now, not after the frames before them
            for fps in sorted({video_fps[i] for i, s in enumerate(sources) if s.is_video}):
                problem = video_writer_problem(out / "overlay.mp4", fps, args.fourcc)
                if problem:
                    raise ValueError(f"overlay video ({args.fourcc!r}, {fps:g} fps): {problem}")
        for src in sources:
            if not src.is_video:
                src.on_error = refuse
            if getattr(src, "excluded", 0):
                print(f"icnet-segment: note: {src.excluded} image(s) under the output folder {out} left out of "
                      f"{src.folder}", file=sys.stderr)
        from icnet_ros.engine import Segmenter

        with warnings.catch_warnings():  # fallbacks are printed below, once
            warnings.simplefilter("ignore", RuntimeWarning)
            seg = Segmenter(args.model, config, warmup=False)
        for note in seg.notes:
            print(f"icnet-segment: warning: {note}", file=sys.stderr)
        batch = args.batch or (4 if seg.device.type == "cuda" else 1)
        counts = [s.frame_count for s in sources]  # None: a video that declares no frame count
        total = None if None in counts else sum(counts)
        q: queue.Queue = queue.Queue(maxsize=max(4, 2 * batch))
        reader = threading.Thread(target=_reader, args=(sources, names, q, stop, skip_sources, report, progress),
                                  name="icnet-segment-reader", daemon=True)
        writer = _Writer(out, kinds, args.overlay_frames, args.fourcc, video_fps)
        from tqdm import tqdm

        t0 = time.perf_counter()
        busy = 0.0
        reader.start()
        with tqdm(total=total or None, unit="frame", disable=args.quiet, dynamic_ncols=True,
                  desc="icnet-segment") as bar:
            for taken in _batches(q, batch):
                items = [it for it in taken if it.source_index not in skip_sources]
                t1 = time.perf_counter()
                done = segment(items) if items else []
                busy += time.perf_counter() - t1
                for it, r in done:
                    writer.put(it, r)
                frames += len(done)
                bar.update(len(taken))  # segmented or skipped: handled
                progress.apply(bar)
            progress.apply(bar)  # the inputs skipped after the last frame segmented
        writer.close()
        elapsed = time.perf_counter() - t0
    except (CheckpointError, SourceError, ValueError, OSError, _OutOfMemory, MemoryError,
            engine_config.MissingRuntimeError) as e:  # (a missing runtime was a traceback)
        # (out of memory: the frames segmented before are written and the videos finished, as on Ctrl-C; before, a
        # traceback and an MP4 without its index)
        stop.set()
        if writer is not None:
            try:
                writer.close()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
        print(f"icnet-segment: error: {e if str(e) else 'out of memory'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # stop reading; write what was segmented and finish the videos, so that they play (a second Ctrl-C ends
        # at once, in main)
        stop.set()
        problem = ""
        if writer is not None:
            try:
                writer.close()
            except (OSError, ValueError) as e:
                problem = f"; error: {e}"
        done_frames = writer.written if writer is not None else frames
        print(f"icnet-segment: interrupted after {done_frames} frame(s); their outputs are in {out}{problem}",
              file=sys.stderr)
        return stop_signals.exit_code
    finally:
        # any other way out (an unexpected error, a second Ctrl-C while the videos were finished): no video is left
        # unfinished, nor its temporary file (before, a broken MP4 at its name)
        stop.set()
        if writer is not None:
            writer.abandon()
    # rates only when frames were segmented (before: '0.00 fps overall, inf fps segmentation' with none)
    rates = (f": {frames / elapsed:.2f} fps overall, {frames / busy:.2f} fps segmentation"
             if frames and elapsed > 0 and busy > 0 else "")
    print(f"icnet-segment: {frames} frames from {len(sources)} input(s) in {elapsed:.1f} s{rates} "
          f"({seg.describe()}); outputs in {out}"
          + (f"; {len(refused)} input(s) refused (over --max-pixels {args.max_pixels})" if refused else "")
          + (f"; {len(skipped)} input(s) skipped (unreadable, empty or too small: see the errors above)"
             if skipped else ""))
    return 2 if refused or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
