"""Checks the command-line tools run on their arguments before any work starts, so that a bad value is one line
and exit status 2 at once, never a traceback or a failure after a long run; and :class:`StopSignals`, the signals
that stop a tool as Ctrl-C does."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _file_in_the_way(p: Path) -> Path | None:
    """The first of ``p``'s parent folders that exists as a file (no folder can be made below it)."""
    return next((d for d in reversed(p.parents) if d.exists() and not d.is_dir()), None)


def output_file_problem(path: str | None, flag: str = "--json") -> str | None:
    """Why a result file cannot be written at ``path`` at the end of a run (None when it can; ``-`` is stdout). Its
    folder is created now, and a file is created in it and removed (as the atomic write at the end creates one), so
    that a typo, a path ending in a separator or a folder that takes no new file (a virtual file system such as
    /proc, where ``os.access`` says writable for root; a read-only mount) fails before the run, not after."""
    if not path or path == "-":
        return None
    if path.endswith(tuple(s for s in (os.sep, os.altsep) if s)):  # (before folders are created for it)
        return f"{flag} {path}: ends in a path separator; name the file to write, not a folder"
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{flag} {path}: is a folder, not a file"
    from ..video import is_stream_path

    if is_stream_path(p):  # /dev/stdout, a pipe, a device: appended to as it is
        return None if os.access(p, os.W_OK) else f"{flag} {path}: not writable"
    if p.is_symlink():  # its target is written (video.write_bytes_atomically)
        p = Path(os.path.realpath(p))
    blocking = _file_in_the_way(p)
    if blocking is not None:
        return f"{flag} {path}: {blocking} is a file, not a folder"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its folder: {e.strerror or e}"
    if not os.access(p.parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {p.parent} is not writable"
    refused = _creation_refused(p.parent)
    return f"{flag} {path}: cannot create a file in {p.parent}: {refused}" if refused else None


def _creation_refused(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None when one can): one is created there and removed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".icnet-write-check-", dir=folder)
    except OSError as e:
        return str(e.strerror or e)
    os.close(fd)
    os.unlink(probe)
    return None


def write_json(path: str | None, doc: Any) -> str | None:
    """``--json``: ``doc`` on stdout for ``-``, else written to ``path`` whole or not at all (a temporary file
    renamed: a failed write leaves the previous file as it was). Returns why it could not be written (``cannot
    write FILE: REASON``), None when it was (or no ``path``)."""
    if not path:
        return None
    import json

    text = json.dumps(doc, indent=1)
    if path == "-":
        print(text, flush=True)
        return None
    from ..video import write_text_atomically

    try:
        write_text_atomically(Path(path).expanduser(), text + "\n")
    except OSError as e:
        return str(e)
    return None


def output_folder_problem(path: str, flag: str = "--output", create: bool = False) -> str | None:
    """Why ``path`` cannot be (or become) an output folder (None when it can): a file is in the way. With
    ``create``, the folder is created now and a file is created in it and removed, so that a folder that cannot be
    created or written (permissions, a read-only or virtual file system such as /proc or /sys) fails before the
    run, not on every file it writes."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{flag} {path}: is a file, not a folder"
    blocking = _file_in_the_way(p)
    if blocking is not None:
        return f"{flag} {path}: {blocking} is a file, not a folder"
    if not create:
        return None
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create the folder: {e.strerror or e}"
    refused = _creation_refused(p)
    return f"{flag} {path}: the folder is not writable: {refused}" if refused else None


def topic_problem(topic: str, flag: str = "--topic", node_name: str = "node") -> str | None:
    """Why ``topic`` cannot be a ROS topic name (None when it can), checked as rclpy checks it when a publisher or
    subscription is created (node ``node_name`` in the root namespace), without creating a node."""
    from rclpy.exceptions import NameValidationException
    from rclpy.expand_topic_name import expand_topic_name
    from rclpy.validate_full_topic_name import validate_full_topic_name
    from rclpy.validate_topic_name import validate_topic_name

    try:
        validate_topic_name(topic)
        validate_full_topic_name(expand_topic_name(topic, node_name, "/"))
    except NameValidationException as e:
        # "Invalid topic name: <reason>:\n  '<name>'\n  ^" -> "<reason>"
        reason = str(e).splitlines()[0].removeprefix("Invalid topic name: ").rstrip(":")
    except ValueError as e:  # rcl's expansion: "topic name 'x' is invalid: <reason>, at <file>:<line>"
        reason = str(e).split(" is invalid: ", 1)[-1].rsplit(", at ", 1)[0]
    else:
        return None
    return f"{flag} {topic!r}: not a valid ROS topic name ({reason})"


def model_problem(model: str, backend: str = "auto") -> str | None:
    """Why ``model`` cannot be loaded by the node (None when it looks loadable): unknown file type, missing file,
    or (native checkpoints) unreadable metadata. ``backend``: the engine's backend option (auto: by the file type).
    The full load happens later; this catches typos in a second."""
    from ..checkpoint import CheckpointError, read_metadata
    from ..engine import backend_for

    try:
        if backend_for(model, backend) == "torch":
            read_metadata(model)
        elif not Path(model).expanduser().is_file():
            raise CheckpointError(f"model file not found: {model}")
    except CheckpointError as e:
        return str(e)
    return None


def ignore_signal(_signum: int, _frame: Any) -> None:
    """A signal handler that does nothing (for SIGCHLD once a stop began: see :class:`StopSignals`)."""


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, ``timeout``, a service manager) both as a KeyboardInterrupt in the main
    thread, so that a tool stops the same way on either: its outputs finished, one line, and exit status
    :attr:`exit_code` (128 + the first signal: 130, 143). A signal within :attr:`REPEAT_S` of the first is the same
    request delivered twice (``timeout`` and ``ros2 launch`` signal the process group as well as the process): it
    does not interrupt the shutdown the first one started; a later one does (a second Ctrl-C). A context manager:
    the previous handlers come back at its end (the tools' ``main`` also runs inside test processes). Outside the
    main thread it does nothing."""

    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first: float | None = None
        self._previous: dict[int, Any] = {}
        self._held = 0
        self._pending = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: ``ros_spin.init_without_signal_handlers`` resets SIGINT's."""
        for s in (signal.SIGINT, signal.SIGTERM):
            if s in self._previous:
                signal.signal(s, self._raise)

    def _raise(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first, self.signum = now, signum
            if signal.SIGCHLD not in self._previous:
                # the same stop may end the tool's DataLoader workers (a SIGTERM to the process group: timeout,
                # Slurm, systemd): torch's SIGCHLD handler then raised "DataLoader worker (pid N) is killed by
                # signal" during the shutdown, a traceback printed before the one line. A Python handler that does
                # nothing, not SIG_DFL (a SIGCHLD already pending would raise "Signal 17 ignored due to race
                # condition")
                self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, ignore_signal)
        elif now - self._first < self.REPEAT_S:
            return  # the first signal again
        if self._held:
            self._pending = True  # raised when the held step ends
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A step and its bookkeeping done both or neither (a frame published and counted): a signal during the
        block is raised as the KeyboardInterrupt when it ends, not between the two."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """128 + the first signal received (130 without one: a KeyboardInterrupt from elsewhere is Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def run_stoppable(tool: str, main: Callable[[StopSignals], int]) -> int:
    """``main(stop)`` under :class:`StopSignals`: SIGINT and SIGTERM are a KeyboardInterrupt, which the tool answers
    where it can (outputs finished, results kept); one that escapes ``main`` (start-up, imports, a second signal) is
    one line ``TOOL: interrupted`` and exit status 128 + the signal (130 / 143), never a traceback."""
    import sys

    with StopSignals() as stop:
        try:
            return main(stop)
        except KeyboardInterrupt:
            print(f"{tool}: interrupted", file=sys.stderr, flush=True)
            return stop.exit_code


def run_ros_tool(tool: str, argv: list[str] | None, main: Callable[[list[str] | None, StopSignals], int]) -> int:
    """A ROS tool's entry point: one line and exit status 2 when rclpy cannot be imported (not a
    ModuleNotFoundError traceback), else ``main(argv, stop)`` under :func:`run_stoppable`, so that SIGINT and SIGTERM
    are a KeyboardInterrupt from the imports and start-up on (results so far kept, exit status 130 / 143)."""
    from ..ros_spin import rclpy_missing

    missing = rclpy_missing(tool, argv)
    if missing is not None:
        return missing
    return run_stoppable(tool, lambda stop: main(argv, stop))


def add_max_pixels_argument(parser: Any, extra: str = "", bounds: str | None = None) -> None:
    """``--max-pixels N`` on an argparse parser (default: the node's max_pixels), as icnet-segment, icnet-play and
    icnet-demo take it; ``extra``: what else it bounds in that tool; ``bounds``: what it does there, when not the
    image files and videos it refuses. Check it with :func:`max_pixels_problem`."""
    from ..ros_image import DEFAULT_MAX_PIXELS

    bounds = bounds or ("refuse image files whose header declares more pixels (height x width), before decoding, and "
                        "videos whose frames are larger")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"{bounds}{extra} (default: 3840x2160 = %(default)s, as the node's max_pixels)")


def max_pixels_problem(max_pixels: int) -> str | None:
    """Why ``--max-pixels`` cannot be used (None when it can): the node's max_pixels range."""
    from ..ros_image import MAX_MAX_PIXELS

    if 1 <= max_pixels <= MAX_MAX_PIXELS:
        return None
    return f"--max-pixels must be in [1, {MAX_MAX_PIXELS}] (as the node's max_pixels), got {max_pixels}"


def frame_size_problem(size: tuple[int, int], model: str | None = None, max_pixels: int | None = None,
                       flag: str = "--size") -> str | None:
    """Why frames of ``size`` (height, width), published to a node serving ``model`` (None: the default model) with
    its default input_size, cannot be served (None when they can): more pixels than the node's ``max_pixels``
    (default: the node's default), which it drops unread, or a network input the model cannot take (the same rule
    as the node's, from the file's metadata: a model that scales frames to its trained width takes 32x32 and not
    64x2944). For the tools that publish frames of a given size to a node they start (icnet-node-soak,
    icnet-node-bench), checked before anything starts."""
    from ..engine import frame_size_problem as model_size_problem
    from ..ros_image import DEFAULT_MAX_PIXELS

    h, w = size
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if h * w > limit:
        return (f"{flag} {h}x{w} = {h * w} pixels exceeds the node's max_pixels {limit} (it drops larger frames "
                "unread)")
    problem = model_size_problem(model, h, w)
    return f"{flag} {h}x{w}: {problem}" if problem else None


__all__ = ["StopSignals", "add_max_pixels_argument", "frame_size_problem", "ignore_signal", "max_pixels_problem",
           "model_problem", "output_file_problem", "output_folder_problem", "run_ros_tool", "run_stoppable",
           "topic_problem", "write_json"]
