"""rclpy in the command-line tools: spinning an executor while other threads create and destroy entities
(:func:`spin`, in a thread of its own: :func:`start_spinner`, joined at the end: :func:`join_spinners`), and Ctrl-C as
a KeyboardInterrupt (:func:`init_without_signal_handlers`, :func:`cleanup`).

rclpy's executors collect a node's entities, then add them to a wait set. A subscription or publisher destroyed by
another thread in between leaves its QoS event handler in that list, and adding it raises ``InvalidHandle`` ("cannot
use Destroyable because destruction was requested") in the spinning thread (ros2/rclpy#1284, #1206). With a plain
``executor.spin()`` in a background thread, that ends the thread: every later message is silently lost. The next
wait set no longer holds the destroyed entity, so spinning on is the fix. A context shut down while the executor
builds its wait set (after its ``context.ok()`` check: a signal handler, or another thread's ``rclpy.shutdown``) is
an ``RCLError`` ("failed to initialize wait set: the given context is not valid") from ``spin()``: that is the
shutdown it was racing with, and :func:`spin` returns quietly.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from time import monotonic
from typing import Any

#: InvalidHandle errors in a row (each within RETRY_WINDOW_S of the one before) after which the error is real: a
#: wait set that can never be built. Races far apart (a long-running process) never add up to it.
MAX_CONSECUTIVE_INVALID = 100
RETRY_WINDOW_S = 1.0


def rclpy_missing(prog: str, argv: list[str] | None = None) -> int | None:
    """For a tool that needs ROS 2: None when rclpy can be imported (or ``argv`` asks for ``--help``, which needs no
    ROS), else 2 after one line on stderr saying how to get it. Without it, a base install (no ``[ros]`` extra) or a
    shell where ROS 2's setup.bash was not sourced ended each ROS tool in a ModuleNotFoundError traceback."""
    import importlib.util
    import sys

    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        return None
    try:
        found = importlib.util.find_spec("rclpy") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    print(f"{prog}: error: needs ROS 2's rclpy, which cannot be imported: source your ROS 2 setup.bash, or "
          "pip install 'icnet_ros[ros]'", file=sys.stderr, flush=True)
    return 2


def spin(executor: Any) -> None:
    """``executor.spin()`` until the executor or its context shuts down, surviving the destroy race above."""
    from rclpy.executors import ExternalShutdownException
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    failures, last = 0, float("-inf")
    while True:
        try:
            executor.spin()
            return
        except ExternalShutdownException:
            return
        except _rclpy.RCLError:
            if not executor.context.ok():  # the context was shut down under the executor: that is a shutdown
                return
            raise
        except _rclpy.InvalidHandle:
            now = monotonic()
            failures = failures + 1 if now - last <= RETRY_WINDOW_S else 1
            last = now
            if failures >= MAX_CONSECUTIVE_INVALID:
                raise


_SPINNERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def start_spinner(executor: Any, name: str) -> threading.Thread:
    """A daemon thread ``name`` running :func:`spin` on ``executor``, started; :func:`join_spinners` joins it."""
    thread = threading.Thread(target=spin, args=(executor,), name=name, daemon=True)
    _SPINNERS.add(thread)
    thread.start()
    return thread


def join_spinners(timeout: float = 5.0) -> None:
    """Join the threads :func:`start_spinner` started, once their executors and contexts are shut down, so that none
    is still inside rclpy when the interpreter finalises (a C++ abort: "terminate called without an active
    exception", seen once at icnet-demo's exit)."""
    for thread in list(_SPINNERS):
        if thread is not threading.current_thread():
            thread.join(timeout)


def init_without_signal_handlers() -> None:
    """``rclpy.init()`` without rclpy's signal handlers: Ctrl-C is a KeyboardInterrupt in the main thread (also when
    the shell started this process with SIGINT ignored, as rclpy's handler did), which the tool handles. rclpy's own
    handler shuts the context down under the tool's publishers and nodes instead (a 'context is invalid' RCLError
    traceback from publish, or a KeyboardInterrupt inside destroy_node)."""
    import signal

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    signal.signal(signal.SIGINT, signal.default_int_handler)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)


def cleanup(*steps: Callable[[], Any]) -> bool:
    """Run every step, also after a (second) Ctrl-C in one of them; True when one was interrupted. A step that
    fails otherwise is one line on stderr and the others still run (seen once in CI after a SIGTERM: rclpy's
    destroy_node raising 'list.remove(x): x not in list' for a publisher's event handler, a traceback)."""
    import sys

    interrupted = False
    for step in steps:
        try:
            step()
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:  # noqa: BLE001 - shutting down: say it, go on with the other steps
            name = getattr(step, "__qualname__", "a step")
            print(f"cleanup: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return interrupted
