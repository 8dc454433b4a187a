"""Run launch/icnet.launch.py without `launch` / `launch_ros` (not installable from PyPI): minimal stand-ins for
the classes it uses record their arguments, so the file's own code runs (argument defaults, the OpaqueFunction
that builds the node's parameters, the params-file check), and :func:`node_command` turns the resulting Node
action into the command line launch_ros would run."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "icnet.launch.py"


class Action:
    """Records the arguments it was built with (stand-in for launch / launch_ros classes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Action):
    def perform(self, context: Any) -> str:
        return context.launch_configurations[self.args[0]]


def stand_in_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.conditions", "launch.substitutions", "launch_ros", "launch_ros.actions",
        "launch_ros.substitutions")}
    mods["launch"].LaunchDescription = type("LaunchDescription", (Action,), {})
    for name in ("DeclareLaunchArgument", "OpaqueFunction"):
        setattr(mods["launch.actions"], name, type(name, (Action,), {}))
    mods["launch.conditions"].IfCondition = type("IfCondition", (Action,), {})
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    mods["launch.substitutions"].PathJoinSubstitution = type("PathJoinSubstitution", (Action,), {})
    mods["launch_ros.actions"].Node = type("Node", (Action,), {})
    mods["launch_ros.substitutions"].FindPackageShare = type("FindPackageShare", (Action,), {})
    return mods


def load_launch_file(monkeypatch: Any) -> types.ModuleType:
    """Import the launch file with the stand-ins in sys.modules (undone by ``monkeypatch``)."""
    for name, mod in stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("icnet_launch_under_test", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(module: types.ModuleType, **arguments: str) -> tuple[dict[str, Any], list[Any]]:
    """generate_launch_description(), then its OpaqueFunction with the declared defaults overridden by
    ``arguments`` (as `ros2 launch icnet_ros icnet.launch.py name:=value` does). Returns (declared defaults, the
    actions the function returns)."""
    description = module.generate_launch_description()
    actions = description.args[0]
    declared = {a.args[0]: a.kwargs["default_value"] for a in actions if type(a).__name__ == "DeclareLaunchArgument"}
    configs = {k: v for k, v in declared.items() if isinstance(v, str)}
    configs["params_file"] = str(REPO / "config" / "icnet.yaml")  # the installed share path, resolved
    configs.update(arguments)
    context = type("Context", (), {"launch_configurations": configs})()
    (opaque,) = [a for a in actions if type(a).__name__ == "OpaqueFunction"]
    return declared, opaque.kwargs["function"](context)


def node_command(node: Action, namespace: str, tmp_dir: Path) -> list[str]:
    """The ``--ros-args`` launch_ros passes for this Node action: node name and namespace remaps, each entry of
    ``parameters`` as a params file (a dict is written to a temporary YAML file under ``/**``, as launch_ros
    does)."""
    args = ["--ros-args", "-r", f"__node:={node.kwargs['name']}"]
    if namespace:
        args += ["-r", f"__ns:=/{namespace.strip('/')}"]
    for i, entry in enumerate(node.kwargs["parameters"]):
        if isinstance(entry, dict):
            path = tmp_dir / f"launch_params_{i}.yaml"
            path.write_text(yaml.safe_dump({"/**": {"ros__parameters": entry}}), encoding="utf-8")
            entry = str(path)
        args += ["--params-file", str(entry)]
    return args
