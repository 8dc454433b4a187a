"""``icnet-demo``: run icnet_node for real, on the default model (or ``--model``).

    icnet-demo                          # the node on /camera/image_raw, waiting for frames (Ctrl-C stops)
    icnet-demo video.mp4                # play it, segment every frame, save the overlays received over the
    icnet-demo frames/ --output out/    #   overlay topic to ./out/overlays/<date>-<time>/ (or --output), then stop

With an input, one process runs three ROS nodes: the segmentation node (the same code as ``icnet_node``), a player
(as ``icnet-play``: sensor_msgs/Image + camera_info) and a recorder (as ``icnet-record``), all talking over DDS
topics. The player/recorder pair and the node's input and output use RELIABLE QoS with deep queues, so no frame the
node produced is lost. By default (``--rate 0``) the player publishes the next frame as soon as the node has taken
the previous one into a forward pass, so every frame is segmented whatever the machine's speed, and decoding,
transport and recording of one frame overlap the segmentation of the previous one (waiting for each overlay before
publishing the next frame left the network idle for the whole round trip); a frame the node did not segment (one
it rejects, e.g. smaller than the network takes, or one not taken within ``--timeout``) is then an error line and
exit status 1. ``--rate FPS`` plays in real time instead, and the node then drops the frames it cannot keep up with
(counted in the summary; ``--video`` repeats the previous overlay for their time). At any rate an overlay the node
published that the recorder did not receive is an error line and exit status 1. The demo waits at most
``--timeout`` seconds for any one frame, then stops by itself at the end of the input (or after ``--max-frames``,
for a video or an image folder alike; nothing past it is read). An image of a folder that cannot be read, or whose
header declares more than ``--max-pixels`` pixels, is skipped with a warning, as by ``icnet-play``: counted in the
summary, exit status 1; a video whose frames are larger, or from which no frame decodes, is refused, and the node
gets the same ``max_pixels``. Without ``--output`` every run saves into a new folder
``./out/overlays/<date>-<time>/``; an ``--output`` folder that already holds a recording (a file named as the
recorder names them) is refused before anything starts, as by ``icnet-record``: a second run would mix its overlays
into the first one's. So are an ``--output`` that is the input folder, a ``--video`` that is an input
file, and a ``--video`` whose file type or the input's frame rate its writer refuses (``.webm``, ``.gif``). The
output folder is created, and checked writable, before the model is loaded. Ctrl-C (SIGINT) or SIGTERM stops
playing, stops the node and saves the overlays received so far: one line ``icnet-demo: interrupted``, exit status
130 (SIGINT) or 143 (SIGTERM); while serving the camera topic (no input) they are the way to stop, exit status 0.

DDS stays on this machine unless you configure it: when unset, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and
FASTDDS_DEFAULT_PROFILES_FILE=<package>/data/fastdds_loopback.xml (UDP on 127.0.0.1 + shared memory) are used; with
an input and no ROS_DOMAIN_ID, a random domain 1-100 keeps other ROS programs' /camera/image_raw out (it is
printed: set it in another shell to watch with rviz2).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from .. import engine_config
from .cli_checks import add_max_pixels_argument, max_pixels_problem

DEMO_ENGINE_OPTIONS = ("backend", "device", "precision", "input_size")
SPINNER_THREAD = "icnet_demo_executor"  # the thread spinning the executor (joined before the process ends)

PROG = "icnet-demo"
#: without --output, each run saves into a new folder below this one, named after its start (<date>-<time>)
DEFAULT_OUTPUT = "out/overlays"


def loopback_profile() -> Path:
    """The Fast DDS profile shipped in the package (UDP bound to 127.0.0.1 + shared memory, 4 MiB buffers)."""
    return Path(__file__).resolve().parents[1] / "data" / "fastdds_loopback.xml"


def configure_dds(isolated_domain: bool) -> list[str]:
    """Default the DDS environment to loopback-only (before rclpy is imported); returns what was set."""
    notes = []
    if "ROS_AUTOMATIC_DISCOVERY_RANGE" not in os.environ and "ROS_LOCALHOST_ONLY" not in os.environ:
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        notes.append("ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST")
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ and loopback_profile().is_file():
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(loopback_profile())
        notes.append(f"FASTDDS_DEFAULT_PROFILES_FILE={loopback_profile()}")
    if isolated_domain and "ROS_DOMAIN_ID" not in os.environ:
        os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
        notes.append(f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}")
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("input", nargs="?", default=None, help="video file or image folder (none: serve the camera "
                   "topic until Ctrl-C)")
    p.add_argument("--model", default=None, help="model file: native .safetensors, exported .onnx, OpenVINO .xml "
                   "or TensorRT .engine/.plan (icnet-export); default: the package's default model")
    p.add_argument("--output", "-o", default=None, help="where overlays are saved: a folder without an earlier "
                   f"recording (default: a new folder {DEFAULT_OUTPUT}/<date>-<time> per run)")
    p.add_argument("--topic", default="/camera/image_raw", help="camera topic (default: %(default)s)")
    p.add_argument("--rate", type=float, default=0.0, help="playback fps; 0 (default) = as fast as the node "
                   "segments: each frame once the node has taken the previous one (no frame dropped)")
    p.add_argument("--max-frames", type=int, default=None, help="play at most this many frames")
    add_max_pixels_argument(p, extra="; also the node's max_pixels")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="overlay file format (default: png)")
    p.add_argument("--video", default=None, help="also write the overlays to this video file (e.g. overlay.mp4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any one overlay and for the "
                   "node to get ready (default: %(default)s)")
    # the engine options a demo user may want, defined once in engine_config (passed on as node parameters)
    engine_config.add_arguments(p, names=DEMO_ENGINE_OPTIONS)
    return p


#: the longest --timeout (s): longer ones overflowed the thread waits they are given to
MAX_TIMEOUT = 1e6


def _error(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def _resolve_model(model: str | None, backend: str = "auto") -> str:
    """The model file the node loads: ``model``, or the default model; CheckpointError when it is not loadable
    (checked as icnet-segment and icnet_node check it: a native checkpoint's metadata is read, an exported
    ``.onnx`` / OpenVINO ``.xml`` / TensorRT engine must exist, for the ``--backend`` that runs it)."""
    from ..checkpoint import CheckpointError, default_model_path
    from .cli_checks import model_problem

    if model is None:
        return str(default_model_path())  # CheckpointError when the default model is not installed
    problem = model_problem(model, backend)
    if problem:
        raise CheckpointError(problem)
    return str(model)


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_ros_tool

    # SIGINT and SIGTERM: a KeyboardInterrupt, also during the imports and start-up
    return run_ros_tool(PROG, argv, _main)


def default_output(now: float | None = None) -> Path:
    """A new folder for a run without --output: ``out/overlays/<date>-<time>`` (``-2``, ``-3``, ... after it when a
    run in the same second made that one)."""
    base = Path(DEFAULT_OUTPUT) / time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def _main(argv: list[str] | None, stop: Any) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(args.input_size, list):  # '--input-size 1.5 video.mp4': the video follows the size
        args.input_size, rest = engine_config.split_size_tokens(args.input_size)
        if rest and args.input is None and len(rest) == 1:
            args.input = rest[0]
        elif rest:
            return _error(f"unexpected arguments {' '.join(rest)!r} after --input-size")
    from .play import _rate_problem

    problem = _rate_problem(args.rate)  # icnet-play's rule (1e-300: time.sleep overflowed; nan was taken)
    if problem:
        return _error(problem)
    if not 0 < args.timeout <= MAX_TIMEOUT or (args.max_frames is not None and args.max_frames <= 0):
        # (1e10 s overflowed the thread waits it is given to: a traceback)
        return _error(f"--timeout must be > 0 and at most {MAX_TIMEOUT:g} s, and --max-frames > 0")
    problem = max_pixels_problem(args.max_pixels)
    if problem:
        return _error(problem)
    try:
        engine_config.from_args(args, names=DEMO_ENGINE_OPTIONS)
    except engine_config.ConfigError as e:
        return _error(str(e))
    notes = configure_dds(isolated_domain=args.input is not None)

    from ..checkpoint import CheckpointError

    try:
        model = _resolve_model(args.model, args.backend)
    except CheckpointError as e:
        message = str(e).removesuffix("; pass a model path")
        return _error(f"{message}; pass a checkpoint with --model PATH" if args.model is None else message)
    source = None
    if args.input is not None:
        from ..video import (ImageTooLargeError, SourceError, has_decodable_frames, open_source, quiet_stderr,
                             video_writer_problem)
        from .cli_checks import output_file_problem, output_folder_problem
        from .record import existing_recording

        explicit = args.output is not None
        args.output = args.output if explicit else str(default_output())
        problem = output_folder_problem(args.output) or output_file_problem(args.video, "--video")
        if problem:
            return _error(problem)
        try:
            with quiet_stderr():  # FFmpeg's lines about a damaged video: said below in one
                source = open_source(args.input, max_frames=args.max_frames, max_pixels=args.max_pixels)
            # a video's first frame decoded now, before the model loads: one that declares frames none of which
            # decodes, or declares no frame count, is decided by decoding it
            empty = not has_decodable_frames(source)
        except SourceError as e:
            return _error(f"{e} (--max-pixels)" if isinstance(e, ImageTooLargeError) else str(e))
        if empty:
            source.close()
            return _error(f"no frames in {args.input}")
        # the input written over (before: '--video in/drive.mp4' replaced the video played by its overlays, exit
        # status 0; '--output frames' saved the overlays among the frames, played as input by the next run), then
        # a --video its writer refuses at the input's frame rate (before: found at its first frame or its end)
        problem = _input_written_over(source, args.output, args.video)
        if not problem and args.video is not None:
            reason = video_writer_problem(args.video, _video_fps(source))
            problem = f"--video {args.video}: {reason}" if reason else None
        if problem:
            source.close()
            return _error(problem)
        earlier = existing_recording(Path(args.output).expanduser()) if explicit else None
        # created and written to now, before the model is loaded: /proc/x, a read-only folder
        problem = (f"--output {args.output}: already holds a recording ({earlier.name}); a new one would mix its "
                   "overlays into it: choose another --output, or remove its files" if earlier is not None
                   else output_folder_problem(args.output, create=True))
        if problem:
            source.close()
            return _error(problem)
    if notes:
        print(f"{PROG}: DDS kept on this machine: {', '.join(notes)}", flush=True)
    return _run(args, model, source, stop)


def _video_fps(source: Any) -> float:
    """The frame rate of the demo's ``--video``: the input video's, or the image folder's (10 fps)."""
    return source.fps or 10.0


def _input_written_over(source: Any, output: str, video: str | None) -> str | None:
    """Why this run would write over its own input (None when it would not), as icnet-segment refuses an input its
    outputs would overwrite: ``--video`` is an input file (the video played, or an image of the folder; the same file
    by device and inode, so also through links and other spellings of its path, or the same resolved path), or
    ``--output`` is the input folder (the overlays would be saved among the images played, and played as input by a
    later run; a folder inside it is fine: the folder's images are read without its subfolders, so ``icnet-demo .``
    with the default ``out/overlays/...`` works)."""
    files = [source.path] if source.is_video else list(source.paths)
    if video is not None:
        target = Path(video).expanduser()
        inputs: dict[tuple[int, int], Path] = {}
        for path in files:
            try:
                st = os.stat(path)
            except OSError:
                continue
            inputs.setdefault((st.st_dev, st.st_ino), path)
        try:
            st = os.stat(target)
            victim = inputs.get((st.st_dev, st.st_ino))
        except OSError:  # no such file yet: none of the inputs (unless the same path)
            resolved = target.resolve()
            victim = next((f for f in files if Path(f).resolve() == resolved), None)
        if victim is not None:
            return (f"input {victim} would be overwritten by --video {video}; choose another --video (or move the "
                    "input)")
    folder = getattr(source, "folder", None)  # an image folder's
    if folder is not None:
        try:
            st = os.stat(folder)
        except OSError:
            return None
        try:
            dst = os.stat(Path(output).expanduser())
        except OSError:  # not created yet
            return None
        if (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino):
            return (f"--output {output}: is the input folder: the overlays would be saved among the images played "
                    "(and played as input by a later run); choose another --output")
    return None


def _node_overrides(args: argparse.Namespace, model: str, reliable: bool) -> list[Any]:
    from rclpy.parameter import Parameter

    values: dict[str, Any] = {"image_topics": [args.topic], "model": model, "max_pixels": args.max_pixels}
    engine = engine_config.from_args(args, names=DEMO_ENGINE_OPTIONS)  # checked: one line on a bad value
    values.update({name: engine_config.format_input_size(getattr(engine, name)) for name in DEMO_ENGINE_OPTIONS})
    if reliable:  # the demo's own player and recorder: never lose a frame between them and the node
        from ..node_params import OUTPUT_KINDS, sibling_topic

        values.update({f"qos_overrides.{args.topic}.subscription.reliability": "reliable",
                       f"qos_overrides.{args.topic}.subscription.depth": 10, "max_age": 0.0})
        for kind in OUTPUT_KINDS:
            values[f"qos_overrides.{sibling_topic(args.topic, 'semantic/' + kind)}.publisher.depth"] = 100
    return [Parameter(k, value=v) for k, v in values.items()]


def _run(args: argparse.Namespace, model: str, source: Any, stop: Any) -> int:
    """Start the node and serve the camera topic (no input) or play ``source`` into it. rclpy is initialised
    without its signal handlers: they shut the context down under the player and the node (a 'context is invalid'
    RCLError from every publish, the executor thread's traceback); SIGINT and SIGTERM are a KeyboardInterrupt here
    instead, and the shutdown runs in order: playing stops, the node stops, the overlays received are saved, then
    the executor, the nodes and the context go."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from ..ros_spin import cleanup, init_without_signal_handlers, join_spinners

    node = None
    executor = None
    interrupted = False
    try:
        from ..node import SegmentationNode, StartupError

        init_without_signal_handlers()
        stop.install()  # SIGTERM as Ctrl-C (and SIGINT's handler again, which the line above reset)
        executor = MultiThreadedExecutor(num_threads=2)
        try:
            node = SegmentationNode(parameter_overrides=_node_overrides(args, model, reliable=source is not None))
        except StartupError as e:
            return _error(str(e))
        executor.add_node(node)
        if source is None:
            return _serve(args, executor)
        return _play_and_record(args, node, executor, source, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        interrupted = True
    finally:
        # each step on its own: a (second) signal during one must not skip the others or end in a traceback
        steps = [] if executor is None else [lambda: executor.shutdown(timeout_sec=2.0)]
        steps += [node.destroy_node] if node is not None else []
        steps += [source.close] if source is not None else []
        # the spinning thread returns once the executor and the context are shut down: joined, so that it is not
        # still inside rclpy when the interpreter finalises (a C++ abort, "terminate called without an active
        # exception", ended one demo with SIGABRT after everything was saved)
        interrupted = cleanup(*steps, rclpy.try_shutdown, join_spinners) or interrupted
    if interrupted:  # before the playing started (loading the model); the try block's own returns stand
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0  # reached only when the try block returned early without a value (it does not)


def _serve(args: argparse.Namespace, executor: Any) -> int:
    """Serve the camera topic until SIGINT / SIGTERM (the way to stop it: exit status 0). The executor spins in a
    thread: the main thread waits where a signal's KeyboardInterrupt arrives at once (rcl's wait would hold it)."""
    from ..node_params import sibling_topic
    from ..ros_spin import start_spinner

    print(f"{PROG}: segmenting {args.topic} -> {sibling_topic(args.topic, 'semantic')}/"
          "{label,color,overlay,confidence}; waiting for frames (Ctrl-C to stop)", flush=True)
    spinner = start_spinner(executor, SPINNER_THREAD)
    try:
        while spinner.is_alive():
            spinner.join(0.5)
    except KeyboardInterrupt:
        pass
    return 0


class DemoRun:
    """The demo's player and recorder (on a helper node in ``executor``) around a running ``SegmentationNode``.

    :meth:`play` publishes frames to the node's first camera and records the overlays it publishes; usable
    repeatedly (icnet-node-bench times it against the Segmenter alone). ``handshake`` decides when the next frame is
    published with ``rate`` 0: ``"taken"`` (default: once the node's pipeline took the previous frame, so the next
    one travels while the previous one is segmented) or ``"overlay"`` (once the previous overlay arrived: no
    overlap; kept as the reference the benchmark compares with). ``video_timing``: the overlays are placed in
    ``video`` by their stamps (:class:`~icnet_ros.tools.record.Recorder`), for frames published in real time, where
    the node drops some; without it (frames published as fast as the node takes them) one video frame per overlay."""

    def __init__(self, node: Any, executor: Any, output: str | Path, fmt: str = "png", video: str | None = None,
                 fps: float = 10.0, video_timing: bool = False) -> None:
        import rclpy

        from ..node_params import base_topic, sibling_topic
        from ..ros_spin import start_spinner
        from .play import Player
        from .record import Recorder

        self.node, self.executor = node, executor
        self.camera = node.cameras[0]
        self.topic = self.camera.topic
        self.overlay_topic = sibling_topic(self.topic, "semantic/overlay")
        self.helper = rclpy.create_node("icnet_demo")
        executor.add_node(self.helper)
        self._spinner = start_spinner(executor, SPINNER_THREAD)
        self.recorder = Recorder(self.helper, [self.overlay_topic], output, fmt, reliability="reliable", depth=1000,
                                 video=video, fps=fps, subdirs=False, video_timing=video_timing)
        # a CompressedImage camera topic (.../compressed) gets JPEG frames, as a camera's image_transport publishes
        self.player = Player(self.helper, self.topic, frame_id="camera", reliable=True, depth=10,
                             compressed="jpeg" if base_topic(self.topic)[1] else None)

    def connected(self, timeout: float) -> bool:
        """Wait until the player, the node and the recorder have matched each other."""
        deadline = time.monotonic() + timeout
        while not (self.player.image_pub.get_subscription_count() >= 1 and self.recorder.publisher_count() >= 1
                   and self.camera.publishers["overlay"].get_subscription_count() >= 1):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def play(self, source: Any, rate: float = 0.0, timeout: float = 60.0, progress: bool = False,
             handshake: str = "taken", max_frames: int | None = None) -> dict[str, Any]:
        """Publish ``source``'s frames (a FrameSource or a list of video Frames; at most ``max_frames``, videos and
        image folders alike) and wait until the node dealt with every one and its overlays arrived. Returns
        ``published``, ``overlays`` (received during this call), ``elapsed`` (s) and ``missed`` (frames not taken
        or served within ``timeout``)."""
        from .play import play

        if handshake not in ("taken", "overlay"):
            raise ValueError(f"handshake must be 'taken' or 'overlay', got {handshake!r}")
        pipeline, topic, recorder = self.node.pipeline, self.topic, self.recorder
        received0 = pipeline.snapshot()["cameras"][topic]["received"]
        overlays0 = recorder.received
        missed: list[int] = []

        def after_publish(index: int, header: Any) -> None:
            if rate != 0:
                return
            if handshake == "taken":
                ok = pipeline.wait_taken(topic, received0 + index + 1, timeout)
            else:
                ok = recorder.wait_for(overlays0 + index + 1 - len(missed), timeout)
            if not ok:
                missed.append(index)
                print(f"{PROG}: warning: frame {index} not {'taken' if handshake == 'taken' else 'served'} "
                      f"within {timeout:g} s", file=sys.stderr)

        t0 = time.monotonic()
        published = play(self.player, source, rate, max_frames=max_frames, after_publish=after_publish,
                         progress=progress)
        # end of input: wait until the node has dealt with every frame and its overlays have arrived
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = pipeline.snapshot()["cameras"][topic]
            settled = pipeline.idle() and s["processed"] + sum(s["dropped"].values()) >= s["received"]
            if (s["received"] >= received0 + published and settled
                    and recorder.received >= s["computed"].get("overlay", 0)):
                break
            time.sleep(0.005)
        return {"published": published, "overlays": recorder.received - overlays0,
                "elapsed": time.monotonic() - t0, "missed": missed}

    def close(self) -> None:
        from .record import wait_notice

        self.recorder.close(on_wait=wait_notice(PROG, "overlay"))
        self.executor.remove_node(self.helper)
        self.helper.destroy_node()


def _ms(value: float) -> str:
    """A latency for the summary: '12 ms', or '-' when there is none (no frame served: NaN)."""
    return f"{value:.0f} ms" if value == value else "-"


def _play_and_record(args: argparse.Namespace, node: Any, executor: Any, source: Any, stop: Any) -> int:
    from ..ros_spin import cleanup
    from .play import UnreadableImages

    skipped = UnreadableImages(PROG).install(source)  # a bad image in a folder: skipped, as icnet-play does
    run = None
    interrupted = False
    result: dict[str, Any] = {}
    try:
        # --rate > 0: the video keeps the playing's timing where the node dropped frames (11 overlays of 25 frames
        # made 0.44 s of video for 1 s played); at --rate 0 every frame is served: one video frame per overlay
        run = DemoRun(node, executor, args.output, args.format, video=args.video, fps=_video_fps(source),
                      video_timing=args.rate > 0)
        run.player.held = stop.held  # a Ctrl-C never falls between a frame's publish and its count (as icnet-play)
        if not run.connected(args.timeout):
            return _error(f"the node, player and recorder did not connect within {args.timeout:g} s")
        rate_text = "as fast as the node segments" if args.rate == 0 else f"{args.rate:g} fps"
        count = source.frame_count  # None: a video that declares no frame count
        count = (count if args.max_frames is None else min(count, args.max_frames)) if count is not None else (
            "all" if args.max_frames is None else f"at most {args.max_frames}")
        print(f"{PROG}: {source.description} ({count} frames, {rate_text}) -> {run.topic} -> "
              f"{run.overlay_topic} -> {Path(args.output)}/", flush=True)
        result = run.play(source, args.rate, args.timeout, progress=True, max_frames=args.max_frames)
    except KeyboardInterrupt:  # playing stopped (SIGINT / SIGTERM)
        interrupted = True
    finally:
        # the node stops (no overlay after this), then the recorder saves what it received and finishes --video
        interrupted = cleanup(node.close, *([run.close] if run is not None else [])) or interrupted
    recorder = run.recorder if run is not None else None
    if interrupted:
        saved = (f"; received {recorder.received} overlays, saved {recorder.saved}"
                 f"{f', not written {recorder.unwritten}' if recorder.unwritten else ''} to {Path(args.output)}/"
                 if recorder is not None else "")
        print(f"{PROG}: interrupted{saved}", file=sys.stderr, flush=True)
        if recorder is not None and recorder.video_error:
            print(f"{PROG}: error: {recorder.video_error}", file=sys.stderr, flush=True)
        return stop.exit_code
    assert recorder is not None
    elapsed = result["elapsed"]
    snap = node.pipeline.snapshot()["cameras"][run.topic]
    drops = {k: v for k, v in snap["dropped"].items() if v}
    print(f"{PROG}: published {result['published']} frames; node processed {snap['processed']}"
          f"{f', dropped {drops}' if drops else ''}; received {recorder.received} overlays, saved {recorder.saved} "
          f"to {Path(args.output)}/ in {elapsed:.1f} s ({recorder.received / elapsed if elapsed else 0:.2f} fps, "
          f"latency p50 {_ms(snap['latency_p50_ms'])}, p95 {_ms(snap['latency_p95_ms'])}){skipped.summary()}",
          flush=True)
    if recorder.video_error:  # --video did not read back with every frame (a full disk, ...)
        print(f"{PROG}: error: {recorder.video_error}", file=sys.stderr, flush=True)
    if recorder.unwritten:  # (close waits for every write: only a frame that came after it stopped the writer)
        print(f"{PROG}: error: {recorder.unwritten} overlay(s) received but not written", file=sys.stderr, flush=True)
    lost = frames_lost(args.rate, result, snap, recorder.received)
    if lost:  # before: a frame the node rejected (too small), or one not taken within --timeout, was exit status 0
        print(f"{PROG}: error: {lost}", file=sys.stderr, flush=True)
    if (recorder.failed or recorder.received == 0 or skipped.paths or recorder.video_error or recorder.unwritten
            or lost):
        return 1
    return 0


def frames_lost(rate: float, result: dict[str, Any], camera: dict[str, Any], received: int) -> str | None:
    """What a run of :meth:`DemoRun.play` lost, in one line (None when nothing): with ``rate`` 0 (every frame
    published once the node took the previous one: none is to be dropped), frames published that the node did not
    process (``camera``: its pipeline's snapshot of the camera; dropped, by reason) or did not take within the
    timeout (``result['missed']``); at any rate, overlays the node published that the recorder did not receive
    (``received``). With ``rate`` > 0 the node drops the frames it cannot keep up with: counted in the summary, not
    lost."""
    reasons = []
    if rate == 0:
        published, processed = result["published"], camera["processed"]
        if processed < published:
            drops = {k: v for k, v in camera["dropped"].items() if v}
            why = f" (dropped: {', '.join(f'{k} {v}' for k, v in drops.items())})" if drops else ""
            reasons.append(f"the node processed {processed} of the {published} frames published{why}")
        if result["missed"]:
            reasons.append(f"{len(result['missed'])} frame(s) not taken by the node within --timeout")
    computed = camera["computed"].get("overlay", 0)
    if received < computed:
        reasons.append(f"received {received} of the {computed} overlays the node published")
    return "; ".join(reasons) or None


if __name__ == "__main__":
    sys.exit(main())
