"""ROS-free frame sources and a video writer, on OpenCV.

A frame source is an iterable of :class:`Frame` ``(index, name, bgr, timestamp_s)``:

- ``index``: 0-based position in the source;
- ``name``: a stem usable in output file names (the image's file stem, or ``<video stem>_<index:06d>``);
- ``bgr``: the frame, uint8 H x W x 3 in OpenCV's BGR order (grey images are expanded to 3 channels);
- ``timestamp_s``: seconds from the start of the source: ``index / fps`` with the video's nominal frame rate (the
  decoder's position when the container has none), and a synthetic ``index / fps`` for images (``fps`` is a
  constructor argument of the image sources).

:func:`open_source` picks the right source for a path (image file, folder of images, video file), and
:func:`iter_frames` chains several. Sources are context managers; videos release their decoder on ``close()``.
Reading never goes through ``cv2.imread`` (which fails silently on non-ASCII paths on some systems): files are
read as bytes and decoded with ``cv2.imdecode``, as stored (a JPEG's EXIF orientation is not applied: the node,
icnet-eval and training see the stored pixels too). JPEG and PNG files first pass the node's bounded header walk
(:func:`icnet_ros.ros_image.compressed_header`: markers, scans and metadata of a JPEG, chunks and CRCs of a PNG), so
a file the node refuses in a millisecond (a JPEG of thousands of scans takes seconds to decode) is refused here too,
before OpenCV's decoders see it (libpng and libjpeg print to stderr on damaged data). With ``max_pixels``, a file
larger than any image of that many pixels can be (:func:`max_file_size`) is refused before it is read, an image's
size is read from its header (JPEG/PNG as above, other formats with Pillow; nothing decoded) and a larger image
raises :class:`ImageTooLargeError` before the decoder allocates it (a small PNG can declare 12000 x 12000 pixels),
and a video whose frames are larger is refused when it is opened. An image source's ``on_error`` callback, when set,
is called with ``(path, error)`` for an image that cannot be read, and the frame is skipped (the callback may raise
instead).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from .ros_image import ImageFormatError, compressed_header, sniff_codec
from .sizes import declared_image_size

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                                              ".pgm", ".pnm"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg",
                                              ".wmv", ".flv"})
DEFAULT_IMAGE_FPS = 10.0
#: bytes per pixel of the largest raw image an image file can hold: 4 channels of 32-bit samples (a float RGBA
#: TIFF); a 16-bit RGBA PNG or PPM takes 8 (stored uncompressed), compressed formats take less
MAX_FILE_BYTES_PER_PIXEL = 16
#: bytes an image file may hold besides its pixels (Exif, ICC profiles, XMP, thumbnails)
MAX_FILE_EXTRA_BYTES = 64 << 20


class Frame(NamedTuple):
    """One decoded frame: see the module docstring."""

    index: int
    name: str
    bgr: np.ndarray
    timestamp_s: float


class SourceError(ValueError):
    """An input that cannot be read: missing, not an image or video, or undecodable."""


class ImageTooLargeError(SourceError):
    """An image whose header (or file size), or a video whose frame size, exceeds the reader's ``max_pixels``
    (refused before decoding)."""


def max_file_size(max_pixels: int) -> int:
    """The largest image file (bytes) that :func:`read_image` reads with ``max_pixels``: the raw pixels of an image
    that large (:data:`MAX_FILE_BYTES_PER_PIXEL` each) plus :data:`MAX_FILE_EXTRA_BYTES` of metadata. A larger file
    cannot be an image within the limit (a mislabelled video, a disk image): reading it whole would cost its size in
    memory just to refuse it. 3840 x 2160 pixels: about 200 MB."""
    return max_pixels * MAX_FILE_BYTES_PER_PIXEL + MAX_FILE_EXTRA_BYTES


def _check_pixels(what: str, height: int, width: int, max_pixels: int | None, per: str = "") -> None:
    """:class:`ImageTooLargeError` ``<what>: <W>x<H> = <N> pixels<per> exceeds the limit of <max_pixels> pixels``
    (as the node's max_pixels check says it) when ``height`` x ``width`` exceeds ``max_pixels``."""
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(f"{what}: {width}x{height} = {height * width} pixels{per} exceeds the limit of "
                                 f"{max_pixels} pixels")


def check_image_size(data: np.ndarray, p: Path, max_pixels: int | None) -> None:
    """Check the header of the encoded image ``data`` (from file ``p``) before it is decoded: raise
    :class:`ImageTooLargeError` when it declares more than ``max_pixels`` pixels, :class:`SourceError` when its
    header cannot be read. JPEG and PNG (by their signature, whatever the file's suffix) go through the node's
    bounded header walk (:func:`~icnet_ros.ros_image.compressed_header`), also without ``max_pixels``; other
    formats through Pillow (:func:`~icnet_ros.sizes.declared_image_size`), only with ``max_pixels``."""
    codec = sniff_codec(data)
    if codec:
        try:
            _, height, width = compressed_header(_Encoded(codec, data))
        except ImageFormatError as e:
            raise SourceError(f"cannot decode image {p}: {e}") from None
        _check_pixels(f"image {p}", height, width, max_pixels)
        return
    if max_pixels is None:
        return
    try:
        size = declared_image_size(io.BytesIO(data))
    except OverflowError:  # beyond Pillow's own limit
        from PIL import Image

        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if limit and max_pixels < limit:
            raise ImageTooLargeError(f"image {p}: more than {limit} pixels exceeds the limit of {max_pixels} pixels") \
                from None
        return  # larger than Pillow reads, within the caller's limit: the decoder decides
    if size is None:
        raise SourceError(f"cannot decode image {p} (not an image, or corrupt)")
    _check_pixels(f"image {p}", *size, max_pixels)


class _Encoded(NamedTuple):
    """The fields of a ``sensor_msgs/CompressedImage`` that :func:`~icnet_ros.ros_image.compressed_header` reads."""

    format: str
    data: np.ndarray


def read_image_bytes(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """An image file's bytes (uint8 array); with ``max_pixels``, a file larger than :func:`max_file_size` is refused
    (:class:`ImageTooLargeError`) before it is read. Read failures (also out of memory) are :class:`SourceError`."""
    p = Path(path)
    size = None
    try:
        # opened without blocking and refused unless a regular file: a FIFO named like an image blocked open() (and
        # the tool) for good, a device such as /dev/zero reads without end
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"cannot read image {p}: not a regular file")
            size = st.st_size
            if max_pixels is not None and size > max_file_size(max_pixels):
                raise ImageTooLargeError(f"image {p}: a file of {size} bytes is larger than any image within the "
                                         f"limit of {max_pixels} pixels can be ({max_file_size(max_pixels)} bytes)")
            return np.fromfile(f, dtype=np.uint8, count=size)
    except OSError as e:
        raise SourceError(f"cannot read image {p}: {e.strerror or e}") from e
    except MemoryError:
        raise SourceError(f"cannot read image {p}: its {size} bytes do not fit in memory") from None


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to uint8 BGR H x W x 3 (grey and 16-bit images are converted; alpha is dropped; EXIF
    orientation is not applied). Every failure is a :class:`SourceError` naming the file and the reason (no
    traceback for one bad file: a caller skips it and goes on).

    ``max_pixels``: refuse (:class:`ImageTooLargeError`) a file larger than :func:`max_file_size` before reading it,
    and an image whose header declares more pixels before decoding it."""
    p = Path(path)
    data = read_image_bytes(p, max_pixels)
    if data.size:
        check_image_size(data, p, max_pixels)
    # IGNORE_ORIENTATION: the stored pixels, as the node (Pillow), icnet-eval and training decode them
    return decode_image(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, f"image {p}")


def decode_image(data: np.ndarray, flags: int, name: str) -> np.ndarray:
    """``cv2.imdecode`` of an image file's bytes; every failure a one-line :class:`SourceError` ``cannot decode
    NAME...`` (``name``: e.g. ``image PATH``): a header OpenCV refuses (beyond its own pixel limit, ...), out of
    memory, not an image."""
    try:
        img = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as e:
        reason = str(e).strip().split(" error: ", 1)[-1]  # without OpenCV's source file and line
        raise SourceError(f"cannot decode {name}: {reason}") from None
    except MemoryError:
        raise SourceError(f"cannot decode {name}: out of memory") from None
    if img is None:
        raise SourceError(f"cannot decode {name} (not an image, or corrupt)")
    return img


_TMP_COUNTER = itertools.count()


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode ``image`` (uint8 H x W, or H x W x 3 in BGR) to ``path``; the format follows the extension.

    The file is written whole into a hidden temporary file in the same folder (``.<name>.<pid>.<n>.tmp``), then
    renamed to ``path``: ``path`` is never a partial image. A failure (a full disk, a read-only folder) removes the
    temporary file and raises OSError ``cannot write <path>: <reason>`` (the system's reason, e.g. ``No space left on
    device``)."""
    p = Path(path)
    ok, buf = cv2.imencode(p.suffix or ".png", image)
    if not ok:
        raise OSError(f"cannot encode {p.suffix or '.png'} image for {p}")
    write_bytes_atomically(p, buf.data)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomically` for UTF-8 text (result files: JSON, Markdown)."""
    write_bytes_atomically(path, text.encode())


def temporary_file(final: Path, suffix: str = "", companion: str | None = None) -> Path:
    """A new, empty file beside ``final`` under a hidden name no other writer (thread, process) uses
    (``.<name>.<pid>.<n>.tmp`` + ``suffix``, created exclusively, with the permissions a plain write gives), to be
    renamed over ``final``: the one temporary-file scheme of every whole-or-nothing writer here (images, result
    files, videos, exported models). ``companion``: an extension whose file of the same stem is reserved too
    (OpenVINO writes the ``.bin`` beside the ``.xml`` it is given). A user's file of a similar name, or another
    writer's, is never touched. OSError when the folder cannot take a file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = final.with_name(f".{final.name[:200]}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp{suffix}")
        try:
            os.close(os.open(path, flags, 0o666))
        except FileExistsError:
            continue
        if companion is None:
            return path
        try:
            os.close(os.open(path.with_suffix(companion), flags, 0o666))
            return path
        except FileExistsError:
            path.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`write_image`): a hidden temporary file in the same
    folder (:func:`temporary_file`), renamed; OSError ``cannot write <path>: <reason>`` on failure, the temporary
    file removed. A symbolic link's target is written (a ``latest.json`` link: the file it names, the link kept);
    a path that is not a regular file (``/dev/stdout``, a pipe) is written to as it is."""
    given = p = Path(path)
    tmp: Path | None = None
    try:
        if is_stream_path(p):  # /dev/stdout, a pipe, a device: appended to (a redirected stdout was replaced)
            with open(p, "ab") as f:
                f.write(data)
            return
        if p.is_symlink():
            p = Path(os.path.realpath(p))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_file(p)
        with open(tmp, "wb") as f:  # its errors (a full disk) are the point
            f.write(data)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise OSError(f"cannot write {given}: {e.strerror or e}") from e


def is_stream_path(path: str | os.PathLike) -> bool:
    """Whether a result written to ``path`` goes to it as it is, not by replacing a file: a pipe or a device, or a
    path through a process's open files (``/dev/stdout`` -> ``/proc/self/fd/1``, ``/dev/fd/N``), whatever they
    point at: a file that stdout is redirected to must be appended to, not replaced."""
    q = Path(path).expanduser().absolute()
    for _ in range(40):  # (a link loop ends here)
        if str(q).startswith(("/proc/", "/dev/fd/")):
            return q.exists()
        if not q.is_symlink():
            break
        q = (q.parent / os.readlink(q)).absolute()
    return q.exists() and not q.is_file() and not q.is_dir()


class FrameSource:
    """Base class: an iterable of :class:`Frame` with a known or unknown length and an optional frame rate."""

    #: human-readable description (the path)
    description: str = ""
    #: frames per second (nominal for videos, synthetic for images), or None when unknown
    fps: float | None = None
    #: True for video files (outputs that are sequences become video files)
    is_video: bool = False

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Number of frames (for videos: the container's frame count, which can be an estimate; TypeError when it
        declares none: see :attr:`frame_count`)."""
        raise NotImplementedError

    @property
    def frame_count(self) -> int | None:
        """Number of frames as ``len()``, or None when unknown (a video whose container declares no count: it is
        read to its end)."""
        return len(self)

    def has_frames(self) -> bool:
        """True when the first frame can be read (for a video: opens it and decodes that frame once more): whether a
        video whose :attr:`frame_count` is unknown has any frame."""
        frames = iter(self)
        try:
            return next(frames, None) is not None
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """Release resources (decoders); iterating again reopens them."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class ImageFiles(FrameSource):
    """A list of image files, in the given order; timestamps are ``index / fps``. ``max_pixels``: images whose
    header declares more pixels are refused before decoding (:class:`ImageTooLargeError`). ``on_error(path,
    error)``: called for an image that cannot be read (:class:`SourceError`), whose frame is then skipped (its
    index is not reused); None (default): the error ends the iteration."""

    def __init__(self, paths: Sequence[str | os.PathLike], fps: float = DEFAULT_IMAGE_FPS,
                 description: str | None = None, max_pixels: int | None = None,
                 on_error: Callable[[Path, SourceError], None] | None = None) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels, self.on_error = max_pixels, on_error
        self.paths = [Path(p) for p in paths]
        #: frame names (file stems), in order
        self.names = [p.stem for p in self.paths]
        self.fps = float(fps)
        self.description = description or (str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} images")
        for p in self.paths:
            if not p.is_file():
                raise SourceError(f"image not found: {p}")

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Frame]:
        for i, (p, name) in enumerate(zip(self.paths, self.names)):
            try:
                bgr = read_image(p, self.max_pixels)
            except SourceError as e:
                if self.on_error is None:
                    raise
                self.on_error(p, e)
                continue
            yield Frame(i, name, bgr, i / self.fps)


class ImageFolder(ImageFiles):
    """Every image in a folder (by extension, sorted by name; ``recursive`` walks sub-folders, and then names are
    the relative paths with ``/`` replaced by ``__`` so that outputs do not collide). ``exclude``: folders whose
    images are left out (a tool's own output folders inside a folder it walks); :attr:`excluded` counts them."""

    def __init__(self, folder: str | os.PathLike, recursive: bool = False, fps: float = DEFAULT_IMAGE_FPS,
                 max_pixels: int | None = None, on_error: Callable[[Path, SourceError], None] | None = None,
                 exclude: Iterable[str | os.PathLike] = ()) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"not a folder: {self.folder}")
        pattern = "**/*" if recursive else "*"
        paths = sorted(p for p in self.folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        skip = [Path(os.path.abspath(d)) for d in exclude]
        kept = [p for p in paths if not any(Path(os.path.abspath(p)).is_relative_to(d) for d in skip)] if skip \
            else paths
        #: images left out because they are under an ``exclude`` folder
        self.excluded = len(paths) - len(kept)
        paths = kept
        if not paths:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {self.folder}"
                              + (f" besides {self.excluded} under the output folder" if self.excluded else ""))
        super().__init__(paths, fps=fps, description=str(self.folder), max_pixels=max_pixels, on_error=on_error)
        self.names = ["__".join(p.relative_to(self.folder).with_suffix("").parts) for p in paths]


def _ffmpeg_path(path: str | os.PathLike) -> str:
    """A file's path as FFmpeg must be given it (OpenCV passes it on as a URL): absolute, so that a relative name
    with a colon (``2024-05-01T12:30:00.mp4``, an output ``run:1/x.mp4``) is not read as a protocol
    (``2024-05-01T12:``) and the video could not be opened or written (the writer said to name it .mp4)."""
    return os.path.abspath(os.fspath(path))


class VideoFile(FrameSource):
    """Frames of a video file decoded by OpenCV; ``start``/``stride``/``max_frames`` select a sub-sequence (indices
    stay those of the video). Timestamps are ``index / fps`` (nominal rate), else the decoder's position.

    :attr:`frame_count` is the container's count for the selection, or None when the container declares none
    (Matroska/WebM from live recorders: OpenCV reports a huge negative count): such a video is read to its end, and
    ``len()`` raises TypeError. ``max_pixels``: a video whose frames are larger (the size its container declares,
    else the first frame's) is refused when it is opened (:class:`ImageTooLargeError`)."""

    is_video = True

    def __init__(self, path: str | os.PathLike, start: int = 0, stride: int = 1, max_frames: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"video not found: {self.path}")
        if start < 0 or stride < 1 or (max_frames is not None and max_frames < 0):
            raise ValueError(f"need start >= 0, stride >= 1, max_frames >= 0; got {start}, {stride}, {max_frames}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.description = str(self.path)
        self.start, self.stride, self.max_frames = start, stride, max_frames
        cap = self._open()
        try:
            fps = cap.get(cv2.CAP_PROP_FPS)
            self.fps = float(fps) if fps and fps > 0 and np.isfinite(fps) else None
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            # 0, negative (-2^63 / 100 without a duration) or absurd: unknown
            self._count = int(count) if math.isfinite(count) and 1 <= count < 2 ** 31 else None
            self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if max_pixels is not None:
                height, width = self.height, self.width
                if height <= 0 or width <= 0:  # no size declared: the first frame's
                    ok, frame = cap.read()
                    height, width = frame.shape[:2] if ok and frame is not None else (0, 0)
                _check_pixels(f"video {self.path}", height, width, max_pixels, " per frame")
        finally:
            cap.release()
        self._cap: cv2.VideoCapture | None = None

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(_ffmpeg_path(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video {self.path} (unsupported container or codec?)")
        return cap

    @property
    def frame_count(self) -> int | None:
        """The container's frame count for the selection; None when it declares none."""
        if self._count is None:
            return 0 if self.max_frames == 0 else None
        n = max(0, self._count - self.start)
        n = (n + self.stride - 1) // self.stride
        return n if self.max_frames is None else min(n, self.max_frames)

    def __len__(self) -> int:
        n = self.frame_count
        if n is None:
            raise TypeError(f"video {self.path} declares no frame count (see frame_count)")
        return n

    def __iter__(self) -> Iterator[Frame]:
        self.close()
        self._cap = cap = self._open()
        stem = self.path.stem
        index, emitted = 0, 0
        try:
            if self.start:
                # seeking is not frame-exact for every codec: decode (grab) up to the start instead
                while index < self.start and cap.grab():
                    index += 1
                if index < self.start:
                    return
            while self.max_frames is None or emitted < self.max_frames:
                ok, frame = cap.read()
                if not ok or frame is None:
                    return
                if self.fps:
                    ts = index / self.fps
                else:
                    pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                    ts = pos_ms / 1000.0 if pos_ms and pos_ms > 0 else float(index)
                if (index - self.start) % self.stride == 0:
                    if frame.ndim == 2:
                        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
                    yield Frame(index, f"{stem}_{index:06d}", frame, ts)
                    emitted += 1
                index += 1
        finally:
            self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_source(path: str | os.PathLike, *, fps: float = DEFAULT_IMAGE_FPS, recursive: bool = False,
                max_frames: int | None = None, stride: int = 1, max_pixels: int | None = None,
                exclude: Iterable[str | os.PathLike] = ()) -> FrameSource:
    """The frame source for ``path``: a folder -> :class:`ImageFolder`; an image -> :class:`ImageFiles`; a video
    (by extension) -> :class:`VideoFile`. Raises :class:`SourceError` for anything else. ``max_frames`` and
    ``stride`` apply to videos, ``max_pixels`` to images and videos, ``exclude`` (folders left out) to folders."""
    p = Path(path).expanduser()
    if p.is_dir():
        return ImageFolder(p, recursive=recursive, fps=fps, max_pixels=max_pixels, exclude=exclude)
    if not p.exists():
        raise SourceError(f"input not found: {p}")
    ext = p.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return ImageFiles([p], fps=fps, max_pixels=max_pixels)
    if ext in VIDEO_EXTENSIONS:
        return VideoFile(p, stride=stride, max_frames=max_frames, max_pixels=max_pixels)
    raise SourceError(f"unsupported input {p}: expected an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), a folder "
                      f"of images, or a video ({', '.join(sorted(VIDEO_EXTENSIONS))})")


def iter_frames(sources: Iterable[FrameSource]) -> Iterator[tuple[FrameSource, Frame]]:
    """All frames of several sources, in order, each with its source; closes every source when done."""
    for src in sources:
        with src:
            for frame in src:
                yield src, frame


def check_fourcc(fourcc: str) -> str:
    """``fourcc`` if it is a video codec code of exactly 4 printable ASCII characters (mp4v, avc1, MJPG, ...), else
    ValueError."""
    if not isinstance(fourcc, str) or len(fourcc) != 4 or not all(" " <= c <= "~" for c in fourcc):
        raise ValueError(f"fourcc must be exactly 4 ASCII characters (e.g. mp4v, avc1, MJPG), got {fourcc!r}")
    return fourcc


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Standard error (file descriptor 2) goes to /dev/null meanwhile: FFmpeg's and OpenCV's own messages (``[mpeg4
    @ 0x...] header damaged``, ``OpenCV: FFMPEG: tag ... is not supported``) while a tool probes a file, where the
    tool says in one line what it found. Process-wide: only for the checks a tool runs before it starts threads."""
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to quiet
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def has_decodable_frames(source: FrameSource) -> bool:
    """Whether ``source`` has a frame to play: its count is not 0 and, for a video, its first frame decodes (a video
    whose container declares frames that do not decode, or declares no count, is decided by decoding it; FFmpeg's
    messages meanwhile are quieted, see :func:`quiet_stderr`). An image folder's images are read when played (an
    unreadable one is skipped there)."""
    if source.frame_count == 0:
        return False
    if not source.is_video:
        return True
    with quiet_stderr():
        return source.has_frames()


def video_writer_problem(path: str | os.PathLike, fps: float, fourcc: str = "mp4v") -> str | None:
    """Why :class:`VideoWriter` cannot write a video at ``path`` at ``fps`` with ``fourcc`` (None when it can),
    found before a run rather than at its first frame or its end: a probe video of one small frame is written with
    the same container (``path``'s suffix), codec and frame rate into a hidden temporary file beside ``path``, read
    back, and removed. A suffix FFmpeg has no video container for (none, ``.webm`` with ``mp4v``, ``.gif``), an image
    suffix (``.png``: no video reads back from it) and a frame rate the encoder refuses (0.001, 1e5 fps for ``mp4v``)
    are each one line (``mp4v`` takes about 0.01 to 65535 fps: MPEG-4 time bases have at most 65535 ticks a
    second), and so is a codec this OpenCV build has no encoder for (pip's has none for ``avc1`` / ``H264``);
    FFmpeg's own messages are quieted. The folder must exist (``cli_checks.output_file_problem``
    makes it)."""
    check_fourcc(fourcc)
    p = Path(path).expanduser()
    if not (math.isfinite(fps) and fps > 0):
        return f"the frame rate must be a finite number > 0, got {fps}"
    suffix = p.suffix
    if not suffix:
        return "has no file type to pick the video container by: name it .mp4 (or .mkv, .avi)"
    if suffix.lower() in IMAGE_EXTENSIONS or suffix.lower() == ".gif":
        return f"{suffix} is an image file type, not a video: name it .mp4 (or .mkv, .avi)"
    opened, reads_back = _probe_writer(p, fps, fourcc)
    if opened and reads_back:
        return None
    problem = _folder_write_problem(p)  # a full disk, a quota, a file size limit: not the container's fault
    if problem:
        return problem
    if not opened and fps != DEFAULT_IMAGE_FPS and _probe_writer(p, DEFAULT_IMAGE_FPS, fourcc)[0]:
        return f"cannot write a {fourcc!r} video at {fps:g} fps (its encoder refuses that frame rate)"
    if not opened and fourcc != "mp4v" and _probe_writer(p, fps, "mp4v")[0]:  # the container is not the problem
        return f"this OpenCV build has no {fourcc!r} encoder for {suffix} files ('mp4v' has one)"
    if not opened:
        return f"cannot write a {fourcc!r} video to a {suffix} file: name it .mp4 (or .mkv, .avi)"
    return f"a {fourcc!r} video written to a {suffix} file does not read back: name it .mp4 (or .mkv, .avi)"


def _folder_write_problem(path: Path, nbytes: int = 1 << 16) -> str | None:
    """``cannot write FOLDER: REASON`` when ``nbytes`` cannot be written to a temporary file beside ``path``."""
    try:
        tmp = temporary_file(path)
    except OSError as e:
        return f"cannot write {path.parent}: {e.strerror or e}"
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(nbytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"cannot write {path.parent}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return None


def _probe_writer(path: Path, fps: float, fourcc: str) -> tuple[bool, bool]:
    """(opened, reads back) for a one-frame probe video at ``path``'s suffix (see :func:`video_writer_problem`);
    (False, False) when no temporary file can be made beside ``path``."""
    try:
        tmp = temporary_file(path, path.suffix)
    except OSError:
        return False, False
    try:
        with quiet_stderr():
            writer = cv2.VideoWriter(_ffmpeg_path(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps, (64, 64))
            try:
                opened = writer.isOpened() and writer.write(np.zeros((64, 64, 3), np.uint8)) is not False
            finally:
                writer.release()
            if not opened:
                return False, False
            cap = cv2.VideoCapture(_ffmpeg_path(tmp), cv2.CAP_FFMPEG)
            try:
                return True, bool(cap.isOpened() and cap.read()[0])
            finally:
                cap.release()
    except cv2.error:
        return False, False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class VideoWriter:
    """An MP4 (``mp4v``) or other OpenCV video writer that opens on the first frame (its size sets the video size).

    Frames are uint8 BGR H x W x 3; frames of another size are resized to the first frame's size. The video is
    written to a hidden temporary file in the same folder (``.<name>.<pid>.<n>.tmp<suffix>``: the suffix picks the
    container; FFmpeg's writer only, so a file type it has no container for fails at the first frame, leaving no
    file: :func:`video_writer_problem` finds that before a run) and renamed to ``path`` only by :meth:`finish`, once
    it reads back: ``path`` is never a partial or unplayable video (before, a full disk left an MP4 without its
    index at ``path``). A frame the writer could not write (OpenCV's ``write`` returns False; with an OpenCV whose
    ``write`` returns nothing, a disk with no space left) raises OSError ``cannot write <path>: <reason>`` (e.g.
    ``No space left on device``) and removes the temporary file, and so does every later frame: no video is written.
    :meth:`finish` closes the file, checks it reads back with every frame written (an MP4 whose index could not be
    written is unplayable) and renames it; :meth:`close` abandons it (the temporary file removed, ``path``
    untouched). As a context manager: ``finish()`` on success, ``close()`` on an exception.
    """

    def __init__(self, path: str | os.PathLike, fps: float, fourcc: str = "mp4v") -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        check_fourcc(fourcc)
        self.path = Path(path)
        self.fps = float(fps)
        self.fourcc = fourcc
        self.size: tuple[int, int] | None = None  # (W, H)
        self.frames = 0
        #: why the video could not be written (the OSError's message), None while it is fine
        self.error: str | None = None
        #: the file being written until :meth:`finish` renames it to ``path`` (None before the first frame and after)
        self.temp_path: Path | None = None
        self._writer: cv2.VideoWriter | None = None

    def write(self, bgr: np.ndarray) -> None:
        if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"VideoWriter expects uint8 H x W x 3 frames, got {bgr.dtype} {bgr.shape}")
        if self.error is not None:  # never reopen (and truncate) a video that failed
            raise OSError(self.error)
        if self._writer is None:
            if self.frames:  # closed (abandoned) after frames were written: they are gone
                raise OSError(f"cannot write {self.path}: the video was closed")
            self.size = (bgr.shape[1], bgr.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.temp_path = temporary_file(self.path, self.path.suffix)  # (the suffix picks the container)
            except OSError as e:
                raise OSError(f"cannot write {self.path}: {e.strerror or e}") from e
            # FFmpeg only: OpenCV's fallback for a file type FFmpeg does not write (.gif, .png) is its image sequence
            # writer, which left numbered files beside the temporary file that nothing removed
            self._writer = cv2.VideoWriter(_ffmpeg_path(self.temp_path), cv2.CAP_FFMPEG,
                                           cv2.VideoWriter_fourcc(*self.fourcc), self.fps, self.size)
            if not self._writer.isOpened():
                self._writer = None
                self._remove_temp()
                raise OSError(f"cannot open a {self.fourcc!r} video writer for {self.path}")
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_LINEAR)
        ok = self._writer.write(np.ascontiguousarray(bgr))
        if ok is False or (ok is None and _no_space_left(self.path.parent)):
            self._fail(f"frame {self.frames + 1} was not written")
        self.frames += 1

    def _fail(self, what: str) -> None:
        """Close the writer, remember why the video is broken, remove its temporary file and raise OSError: the
        system's reason when the file cannot grow (a full disk, a file size limit), else ``what``."""
        self._release()
        problem = _write_problem(self.temp_path) if self.temp_path is not None else None
        self._remove_temp()
        self.error = f"cannot write {self.path}: {problem or what}"
        raise OSError(self.error)

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def _remove_temp(self) -> None:
        if self.temp_path is not None:
            with contextlib.suppress(OSError):
                self.temp_path.unlink()
            self.temp_path = None

    def close(self) -> None:
        """Abandon the video: close the writer and remove its temporary file (nothing is written to ``path``; after
        :meth:`finish`, nothing to do)."""
        self._release()
        self._remove_temp()

    def finish(self) -> None:
        """Close the video, check that it reads back with every frame written and rename it to ``path``; OSError
        ``cannot write <path>: ...`` when not (an MP4 whose index was never written, on a full disk, cannot be
        opened at all), the temporary file removed. Without a frame written, no file is made."""
        self._release()
        if self.error is not None:
            raise OSError(self.error)
        if not self.frames or self.temp_path is None:
            return
        cap = cv2.VideoCapture(_ffmpeg_path(self.temp_path))
        try:
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else None
        finally:
            cap.release()
        if count is None:
            self._fail("the finished video cannot be read back (incomplete)")
        if 0 < count < self.frames:  # a container that records no count (0) is not second-guessed
            self._fail(f"the finished video holds {count} of the {self.frames} frames written")
        try:
            os.replace(self.temp_path, self.path)
        except OSError as e:
            self._remove_temp()
            self.error = f"cannot write {self.path}: {e.strerror or e}"
            raise OSError(self.error) from e
        self.temp_path = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


def _no_space_left(folder: Path) -> bool:
    """True when the file system of ``folder`` has no block left for this user."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _write_problem(path: Path) -> str | None:
    """Why ``path`` cannot grow, from the system (``No space left on device``, ``File too large``, ``Disk quota
    exceeded``): one byte is appended to it (only called on a file already broken); None when that works."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        return e.strerror or str(e)
    try:
        os.write(fd, b"\0")
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.close(fd)
    return None


__all__ = ["DEFAULT_IMAGE_FPS", "Frame", "FrameSource", "IMAGE_EXTENSIONS", "ImageFiles", "ImageFolder",
           "ImageTooLargeError", "SourceError", "VIDEO_EXTENSIONS", "VideoFile", "VideoWriter", "check_fourcc",
           "check_image_size", "has_decodable_frames", "iter_frames", "max_file_size", "open_source", "quiet_stderr",
           "is_stream_path", "read_image", "read_image_bytes", "video_writer_problem", "write_bytes_atomically",
           "write_image", "write_text_atomically"]
