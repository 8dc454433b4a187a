"""The ``icnet_node`` process: arguments, signals, start and a clean, bounded exit.

- A bad ``--ros-args`` (a ``--params-file`` that does not exist or does not parse, an unknown ROS argument), an
  argument outside ``--ros-args`` (rclpy ignores those: ``icnet_node -p model:=...`` ran the default model) or a
  bad parameter prints one line ``icnet_node: error: ...`` and exits with status 2; so does a model that cannot be
  loaded when the node starts itself (``autostart``).
- SIGINT (Ctrl-C; under ``ros2 launch`` it arrives twice: from the terminal and from launch) and SIGTERM only
  request the stop, in any phase (start-up, model load, warm-up, a forward pass, shutdown): no KeyboardInterrupt
  can surface as a traceback. The main thread never runs ROS callbacks or inference; it waits for a stop request,
  then stops the worker, the executor and the node, each with a deadline, so the process exits with status 0
  within :data:`EXIT_BUDGET_S` seconds (launch escalates to SIGTERM after 5 s). A thread still busy after its
  deadline (a forward pass or a model load cannot be interrupted) is not waited for: the process ends without it
  (``os._exit`` after the cleanup, which also skips seconds of interpreter finalisation).
- The node runs in a MultiThreadedExecutor: the frames (subscriptions, timers) in one callback group, parameter and
  lifecycle services in another, so a model load or a hot swap never stops the frames.
- Exit status: 0 (stopped), 1 (an unrecoverable device error, or the executor stopped on an exception no callback
  handled: launch's ``respawn`` restarts the node), 2 (could not start).

The heavy modules (rclpy, the node, torch) are imported after the signal handlers are installed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

NODE_NAME = "icnet_node"
EXIT_BUDGET_S = 4.0  # from the stop request to the exit, everything included (launch waits 5 s)
WORKER_WAIT_S = 2.0  # of which for the batch in flight
EXECUTOR_WAIT_S = 1.0  # and for the callbacks in flight


class StopRequest:
    """SIGINT/SIGTERM handlers that only record the request (any number of times, in any phase)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signals: list[int] = []
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _error(message: str) -> int:
    print(f"{NODE_NAME}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _tolerant_loader() -> Any:
    """yaml.SafeLoader that reads any tag (launch_ros writes tuples as ``!!python/tuple``) as plain data."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def plain(loader: Any, _suffix: str, node: Any) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("", plain)
    return Loader


def check_ros_args(argv: list[str]) -> str | None:
    """A problem with the ``--params-file`` arguments that rcl would report with a traceback, as one line."""
    import yaml

    if "--ros-args" not in argv:
        return None
    loader = _tolerant_loader()
    args = argv[argv.index("--ros-args") + 1:]
    for i, arg in enumerate(args):
        if arg != "--params-file":
            continue
        if i + 1 >= len(args):
            return "--params-file needs a file name"
        path = args[i + 1]
        if not os.path.isfile(path):
            return f"--params-file {path!r}: no such file"
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=loader)  # noqa: S506 - a SafeLoader that ignores tags
        except (OSError, yaml.YAMLError) as e:
            where = getattr(e, "problem_mark", None)
            return (f"--params-file {path!r}: not valid YAML"
                    + (f" (line {where.line + 1}: {getattr(e, 'problem', e)})" if where else f" ({e})"))
        if not _node_sections(doc):
            return (f"--params-file {path!r}: expected '<node name or /**>: ros__parameters: {{...}}', the node "
                    f"optionally nested under its namespaces (see config/icnet.yaml)")
    return None


def _node_sections(doc: Any, depth: int = 0) -> bool:
    """Whether ``doc`` is a params file's mapping: each key a node name (``ros__parameters`` inside) or a namespace
    holding more of them (``robot1: icnet_node: ros__parameters: ...``), as rcl's parser reads it."""
    if not isinstance(doc, dict) or not doc or depth > 32:
        return False
    return all(isinstance(v, dict) and ("ros__parameters" in v or _node_sections(v, depth + 1)) for v in doc.values())


def _rcl_message(e: BaseException) -> str:
    """rcl's error text without the C source locations."""
    text = str(e).split(", at /")[0].replace("\n", " ").strip()
    return text.removeprefix("failed to initialize rcl: ")


#: the ROS arguments a node takes after --ros-args (rcl has no --help of its own)
ROS_ARGUMENTS = ("-p/--param NAME:=VALUE", "--params-file FILE", "-r/--remap FROM:=TO", "--log-level LEVEL",
                 "-e/--enclave ENCLAVE")
ROS_ARGUMENTS_DOCS = "https://docs.ros.org/en/rolling/How-To-Guides/Node-arguments.html"
ROS_ARGUMENTS_HELP = f"{', '.join(ROS_ARGUMENTS)} (more: {ROS_ARGUMENTS_DOCS})"

USAGE = f"""\
usage: icnet_node [-h] [--ros-args [-r FROM:=TO] [-p NAME:=VALUE] [--params-file FILE] ...]
       ros2 run icnet_ros icnet_node --ros-args ...   |   ros2 launch icnet_ros icnet.launch.py [NAME:=VALUE ...]

ICNet semantic segmentation, a ROS 2 lifecycle node: subscribes to the image_topics (sensor_msgs/Image, or
CompressedImage for a topic ending in /compressed) and publishes <camera>/semantic/{{label,color,overlay,confidence,
camera_info}}, ~/classes and /diagnostics.
ROS arguments, after --ros-args ({ROS_ARGUMENTS_DOCS}):
  {', '.join(ROS_ARGUMENTS)}
Its parameters (this is config/icnet.yaml, a params file with every default):

"""


def non_ros_args(args: list[str]) -> list[str]:
    """The arguments outside ``--ros-args ... [--]`` (as rcl splits them; ``args`` without the program name)."""
    own, in_ros = [], False
    for arg in args:
        if arg == "--ros-args":
            in_ros = True
        elif arg == "--" and in_ros:
            in_ros = False
        elif not in_ros:
            own.append(arg)
    return own


def main(args: list[str] | None = None) -> int:
    """Run icnet_node until a signal, a lifecycle shutdown or a fatal device error; returns the exit status."""
    stop = StopRequest()
    argv = list(sys.argv if args is None else args)
    own = non_ros_args(argv[1:])
    if "-h" in own or "--help" in own:  # (rclpy ignores arguments outside --ros-args: this started the node)
        from .node_params import render_params_file

        print(USAGE + render_params_file(), end="")
        return 0
    if own:  # `icnet_node -p model:=...` ran the default model
        return _error(f"unexpected argument(s) {own}: ROS arguments go after --ros-args (icnet_node --ros-args -p "
                      f"NAME:=VALUE)")
    problem = check_ros_args(argv)
    if problem:
        return _error(problem)
    from .ros_spin import rclpy_missing

    missing = rclpy_missing(NODE_NAME, own)  # one line, not a ModuleNotFoundError traceback
    if missing is not None:
        return missing

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as e:  # noqa: BLE001 - rclpy's RCLError / UnknownROSArgsError are not importable by name
        if type(e).__name__ == "UnknownROSArgsError":
            return _error(f"unknown ROS argument(s) {e}; the ROS arguments: {ROS_ARGUMENTS_HELP}")
        return _error(_rcl_message(e))
    try:
        return _run(stop)  # ends the process itself once the node ran (see _shutdown)
    finally:
        rclpy.try_shutdown()


def _run(stop: StopRequest) -> int:
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.executors import MultiThreadedExecutor

    from .node import SegmentationNode, StartupError
    from .ros_spin import spin

    try:
        node = SegmentationNode(start=False)
    except StartupError as e:
        return _error(str(e))
    # three threads: one for a long change (a configure, a hot swap), one for the frames and the node's timers (one
    # group), one for the services and /clock (which the node serves beside a change: its default_callback_group)
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    autostart_failed: list[str] = []  # why the start at launch failed (not a later configure by a manager)
    if node.config.autostart:  # configure (model load, warm-up) and activate from the executor, not this thread
        def autostart() -> None:
            starter.cancel()
            try:
                node.start()
            except StartupError as e:
                node.startup_error = str(e)
                autostart_failed.append(str(e))
                node.finished.set()
        # a group of its own: in the node's reentrant default group a second thread could start it again before
        # the first cancelled it
        starter = node.create_timer(0.0, autostart, callback_group=MutuallyExclusiveCallbackGroup())
    died: list[BaseException] = []

    def spin_and_report() -> None:
        try:
            spin(executor)
        except BaseException as e:  # noqa: BLE001 - a callback's exception ends rclpy's spin: reported below
            died.append(e)

    spinner = threading.Thread(target=spin_and_report, name="icnet_executor", daemon=True)
    spinner.start()
    while not stop.event.is_set() and not node.finished.is_set() and spinner.is_alive():
        stop.event.wait(0.1)

    status = 0
    if node.fatal_error:
        status = 1
    elif died and not stop.event.is_set() and not node.finished.is_set():  # the node no longer serves anything
        e = died[0]
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        print(f"{NODE_NAME}: error: the executor stopped on {type(e).__name__}: {e}{at}; exiting with status 1 "
              f"(respawn restarts the node)", file=sys.stderr, flush=True)
        status = 1
    elif autostart_failed and not stop.event.is_set():
        print(f"{NODE_NAME}: error: {autostart_failed[0]}", file=sys.stderr, flush=True)
        status = 2
    return _shutdown(node, executor, spinner, status)


def _shutdown(node: Any, executor: Any, spinner: threading.Thread, status: int) -> int:
    """Stop the worker, the executor and the node within :data:`EXIT_BUDGET_S`, then end the process (no
    interpreter finalisation: everything that needs cleaning up is cleaned up here). A thread that cannot stop in
    time (a forward pass, a model load) is not waited for."""
    import rclpy

    deadline = time.monotonic() + EXIT_BUDGET_S
    worker_done = node.close(timeout=WORKER_WAIT_S)
    executor.shutdown(timeout_sec=0.0, wait_for_threads=False)  # rclpy would wait for a model load in progress
    wait_until = min(deadline, time.monotonic() + EXECUTOR_WAIT_S)
    while (node.busy or spinner.is_alive()) and time.monotonic() < wait_until:
        time.sleep(0.02)
    if worker_done and not node.busy and not spinner.is_alive():
        try:
            node.destroy_node()
        except Exception as e:  # noqa: BLE001 - after a fatal error the context is already shut down
            node.get_logger().debug(f"destroy_node: {type(e).__name__}: {e}")
        rclpy.try_shutdown()
    else:  # destroying the node under a running callback or forward pass could crash: leave it to the exit
        busy = [what for what, running in (("the forward pass", not worker_done), (node.busy, bool(node.busy)),
                                           ("the executor", spinner.is_alive() and not node.busy)) if running]
        node.get_logger().info(f"exiting without waiting for {' and '.join(busy)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
