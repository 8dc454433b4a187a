"""icnet_ros.ros_spin.spin: an executor thread that survives entities destroyed by other threads (ros2/rclpy#1284).

The race itself is rare (it ended the test harness's executor thread once in a full suite run, and every later
node test then timed out); the first test drives the recovery deterministically with rclpy's own InvalidHandle,
the second stresses the real executor with create/destroy cycles and checks that messages still flow."""
from __future__ import annotations

import time

import pytest

import ros_support
from ros_support import RosHarness, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from icnet_ros.ros_spin import MAX_CONSECUTIVE_INVALID, spin  # noqa: E402

pytestmark = pytest.mark.ros


class _RacyExecutor:
    """Raises rclpy's InvalidHandle from spin() ``failures`` times (as the destroy race does), then spins once."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def spin(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise _rclpy.InvalidHandle("cannot use Destroyable because destruction was requested")


def test_spin_goes_on_after_the_destroy_race():
    ex = _RacyExecutor(failures=3)
    spin(ex)
    assert ex.calls == 4  # three races survived, then a normal return at shutdown


def test_spin_gives_up_on_a_wait_set_that_can_never_be_built():
    ex = _RacyExecutor(failures=10 * MAX_CONSECUTIVE_INVALID)
    with pytest.raises(_rclpy.InvalidHandle):
        spin(ex)
    assert ex.calls == MAX_CONSECUTIVE_INVALID


def test_races_far_apart_never_add_up(monkeypatch):
    """A long-running process meets the race now and then: only errors in quick succession count."""
    import icnet_ros.ros_spin as ros_spin

    clock = iter(range(0, 10_000, 5))  # each race 5 s after the one before
    monkeypatch.setattr(ros_spin, "monotonic", lambda: float(next(clock)))  # this module only
    ex = _RacyExecutor(failures=3 * MAX_CONSECUTIVE_INVALID)
    spin(ex)
    assert ex.calls == 3 * MAX_CONSECUTIVE_INVALID + 1


def test_messages_flow_while_entities_come_and_go(ros: RosHarness):
    pub = ros.publisher(String, "/icnet_test/spin_race")
    col = ros.collect(String, "/icnet_test/spin_race")
    ros.wait_matched(pub)
    stop = time.monotonic() + 2.0
    cycles = 0
    while time.monotonic() < stop:  # what the node tests do between tests, as fast as possible
        sub = ros.node.create_subscription(String, "/icnet_test/spin_race_other", lambda m: None, 10)
        other = ros.node.create_publisher(String, "/icnet_test/spin_race_other", 10)
        ros.node.destroy_subscription(sub)
        ros.node.destroy_publisher(other)
        cycles += 1
    assert cycles > 50
    assert ros._thread.is_alive(), "the executor thread died"  # type: ignore[attr-defined]
    pub.publish(String(data="after"))
    assert col.wait_for(lambda msgs: any(m.data == "after" for m in msgs), 10.0), "no message after the cycles"
    ros.unsubscribe(col)
    ros.node.destroy_publisher(pub)


def test_a_context_shut_down_while_the_wait_set_is_built_ends_spin_quietly():
    """rclpy's signal handler (or another thread) shuts the context down after the executor's ``context.ok()``
    check and before it builds the wait set: rcl refuses the wait set ('failed to initialize wait set: the given
    context is not valid'), an RCLError out of ``executor.spin()``. That is the shutdown, not an error: spin returns
    (before: the RCLError ended the demo's executor thread with a traceback). The shutdown is made to happen at that
    exact point by a waitable of the node that shuts the context down when the executor enters it."""
    import rclpy
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.waitable import NumberOfEntities, Waitable

    class ShutsDownOnEnter(Waitable):
        def __init__(self, context: Context) -> None:
            super().__init__(ReentrantCallbackGroup())
            self.context = context

        def __enter__(self) -> None:  # the executor enters it while it collects the wait set's entities
            self.context.try_shutdown()

        def __exit__(self, *exc: object) -> None:
            pass

        def is_ready(self, wait_set: object) -> bool:
            return False

        def take_data(self) -> None:
            return None

        async def execute(self, data: object) -> None:
            return None

        def get_num_entities(self) -> NumberOfEntities:
            return NumberOfEntities()

        def add_to_wait_set(self, wait_set: object) -> None:
            pass

    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("icnet_test_spin_shutdown", context=context)
    executor = SingleThreadedExecutor(context=context)
    try:
        node.add_waitable(ShutsDownOnEnter(context))
        executor.add_node(node)
        spin(executor)  # returns; before: RCLError
        assert not context.ok()
        # an RCLError with the context still valid is a real error: raised
        other = Context()
        rclpy.init(context=other)
        try:
            class Refuses:
                context = other

                def spin(self) -> None:
                    raise _rclpy.RCLError("failed to initialize wait set: something else")

            with pytest.raises(_rclpy.RCLError):
                spin(Refuses())
        finally:
            other.try_shutdown()
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        context.try_shutdown()


def test_cleanup_runs_every_step_when_one_fails(capsys):
    """A shutdown step that raises (once in CI, rclpy's destroy_node after a SIGTERM: 'list.remove(x): x not in
    list') ended the tool in a traceback and skipped the steps after it. Now it is one line on stderr and the
    other steps run; a Ctrl-C in a step is still reported as an interruption."""
    from icnet_ros.ros_spin import cleanup

    ran = []

    def broken():
        raise ValueError("list.remove(x): x not in list")

    def interrupted():
        raise KeyboardInterrupt

    assert cleanup(broken, lambda: ran.append(1)) is False and ran == [1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: list.remove(x): x not in list" in err, err
    assert cleanup(interrupted, lambda: ran.append(2)) is True and ran == [1, 2]
