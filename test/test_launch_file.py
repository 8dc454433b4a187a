"""launch/icnet.launch.py, config/icnet.rviz and the installed data, checked statically (no launch needed).

The launch file is parsed (ast): it must be a standard LaunchDescription starting the package's icnet_node, and
every launch argument must either be a launch-level option or map to a parameter the node declares. test_launch.py
runs it with the real launch stack (`ros2 launch` on a colcon build).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml

from icnet_ros import node_params

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "icnet.launch.py"
LAUNCH_ONLY = {"params_file", "namespace", "rviz"}  # arguments that are not node parameters
RCLPY_PARAMETERS = {"use_sim_time"}  # arguments for a parameter rclpy declares on every node (not node_params')
REQUIRED = {"params_file", "model", "image_topics", "device", "namespace"}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            ((isinstance(n.func, ast.Name) and n.func.id == name) or
             (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level NAME = <literal> assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _value(node: ast.AST, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return ast.literal_eval(node)


def _kwargs(call: ast.Call, constants: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = _value(kw.value, constants)
        except ValueError:
            out[kw.arg] = kw.value  # a substitution or expression: keep the node
    return out


def test_launch_file_is_standard(tree: ast.Module):
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("launch", "LaunchDescription") in imports
    assert ("launch.actions", "DeclareLaunchArgument") in imports
    assert ("launch_ros.actions", "Node") in imports
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    compile(tree, str(LAUNCH), "exec")


def test_launch_starts_icnet_node_of_this_package(tree: ast.Module):
    constants = _constants(tree)
    nodes = [_kwargs(c, constants) for c in _calls(tree, "Node")]
    ours = [n for n in nodes if n.get("executable") == "icnet_node"]
    assert len(ours) == 1, nodes
    assert ours[0]["package"] == "icnet_ros" and ours[0]["name"] == "icnet_node"
    assert "namespace" in ours[0] and "parameters" in ours[0]
    setup = (REPO / "setup.py").read_text()
    assert "icnet_node = icnet_ros.node_process:main" in setup  # the executable exists


def test_launch_arguments_map_to_node_parameters(tree: ast.Module):
    constants = _constants(tree)
    declared = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        name = _value(call.args[0], constants)
        kw = _kwargs(call, constants)
        assert isinstance(kw.get("description"), str) and kw["description"], f"{name}: no description"
        assert "default_value" in kw, f"{name}: no default"
        declared[name] = kw
    assert REQUIRED <= set(declared), f"missing launch arguments: {REQUIRED - set(declared)}"
    overrides = constants["OVERRIDES"]
    for arg in declared:
        reaches = arg in LAUNCH_ONLY | RCLPY_PARAMETERS or arg in overrides
        assert reaches, f"launch argument {arg!r} reaches no node parameter"
    for arg, param in overrides.items():
        assert arg in declared, f"OVERRIDES names an undeclared argument {arg!r}"
        assert param in node_params.SPECS, f"launch argument {arg!r} maps to unknown parameter {param!r}"
        # an empty override means "keep the params file's value", so the defaults must be empty
        assert declared[arg]["default_value"] == "", arg


def test_image_topics_argument_parsing(tree: ast.Module):
    """The launch file's own _topics() (extracted, run without launch): YAML list or comma-separated; text that is
    no list of names stays a string for the node's validation to refuse."""
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_topics")
    namespace: dict[str, Any] = {"yaml": yaml}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LAUNCH), "exec"), namespace)  # noqa: S102
    topics = namespace["_topics"]
    expected = ["/front/image_raw", "/rear/image_raw/compressed"]
    assert topics("[/front/image_raw, /rear/image_raw/compressed]") == expected
    assert topics("['/front/image_raw','/rear/image_raw/compressed']") == expected
    assert topics("/front/image_raw, /rear/image_raw/compressed") == expected
    assert topics("/camera/image_raw") == ["/camera/image_raw"]
    assert topics("[]") == []
    assert topics("[/a, ") == "[/a,"
    assert topics("[{a: 1}]") == "[{a: 1}]"
    node_params.check_value("image_topics", topics("[/a/image_raw, /b/image_raw]"))
    for bad in ("[]", "[/a, ", "[{a: 1}]"):
        with pytest.raises(node_params.ParameterError):
            node_params.check_value("image_topics", topics(bad))


def test_params_file_and_rviz_are_where_the_launch_file_looks(tree: ast.Module):
    text = LAUNCH.read_text()
    assert '"config", "icnet.yaml"' in text and '"config", "icnet.rviz"' in text
    assert (REPO / "config" / "icnet.yaml").is_file()
    setup = (REPO / "setup.py").read_text()
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.yaml") + glob("config/*.rviz")' in setup


def test_rviz_shows_the_first_cameras_topics_as_the_node_resolves_them(tree: ast.Module):
    """The launch file's own _rviz_topics() (extracted, run without launch): the first camera's input, overlay and
    colour mask, relative names inside the namespace, '~' in the node's own namespace (RViz would resolve it
    against its own node), the params file's output_namespace, the default camera when none is given."""
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_rviz_topics")

    class Context:
        def __init__(self, namespace: str) -> None:
            self.launch_configurations = {"namespace": namespace}

    class LaunchConfiguration:
        def __init__(self, name: str) -> None:
            self.name = name

        def perform(self, context: Context) -> str:
            return context.launch_configurations[self.name]

    namespace: dict[str, Any] = {"LaunchConfiguration": LaunchConfiguration, "node_params": node_params,
                                 "NODE_NAME": node_params.NODE_NAME}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LAUNCH), "exec"), namespace)  # noqa: S102

    def shown(topics: Any, ns: str, output_namespace: Any = None) -> list[str]:
        context = Context(ns)
        namespace["_rviz_topics"](context, topics, output_namespace)
        return context.launch_configurations["_icnet_rviz_topics"].split("\n")

    assert shown(["~/image_raw"], "robot1") == ["/robot1/icnet_node/image_raw", "/robot1/icnet_node/semantic/overlay",
                                                "/robot1/icnet_node/semantic/color"]
    assert shown(["~/image_raw"], "") == ["/icnet_node/image_raw", "/icnet_node/semantic/overlay",
                                          "/icnet_node/semantic/color"]
    assert shown(["cam/image_raw/compressed", "/b/image_raw"], "/ns/", "seg") == [
        "/ns/cam/image_raw/compressed", "/ns/cam/seg/overlay", "/ns/cam/seg/color"]
    assert shown(None, "") == ["/camera/image_raw", "/camera/semantic/overlay", "/camera/semantic/color"]


def test_rviz_config_shows_input_overlay_and_color():
    doc = yaml.safe_load((REPO / "config" / "icnet.rviz").read_text())
    displays = doc["Visualization Manager"]["Displays"]
    images = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image" and d["Enabled"]}
    camera = node_params.defaults()["image_topics"][0]
    ns = node_params.defaults()["output_namespace"]
    assert images == {camera, node_params.sibling_topic(camera, f"{ns}/overlay"),
                      node_params.sibling_topic(camera, f"{ns}/color")}
    for d in displays:  # best effort matches any camera; the outputs are reliable (best effort loses large frames)
        want = "Best Effort" if d["Topic"]["Value"] == camera else "Reliable"
        assert d["Topic"]["Reliability Policy"] == want, d["Topic"]


def test_dds_profiles_bind_loopback_only():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "test" / "fastdds_loopback_udp.xml").getroot()  # UDP only (tests that SIGKILL a peer)
    ns = {"d": "http://www.eprosima.com"}
    types = [t.findtext("d:type", None, ns) for t in root.iterfind(".//d:transport_descriptor", ns)]
    assert types == ["UDPv4"] and [a.text for a in root.iterfind(".//d:interfaceWhiteList/d:address", ns)] == [
        "127.0.0.1"] and root.findtext(".//d:participant/d:rtps/d:useBuiltinTransports", None, ns) == "false"

    for path in (REPO / "test" / "fastdds_loopback.xml", REPO / "icnet_ros" / "data" / "fastdds_loopback.xml"):
        root = ET.parse(path).getroot()
        ns = {"d": "http://www.eprosima.com"}
        udp = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", None, ns) == "UDPv4"]
        assert udp and all([a.text for a in t.iterfind(".//d:interfaceWhiteList/d:address", ns)] == ["127.0.0.1"]
                           for t in udp), path
        assert root.findtext(".//d:participant/d:rtps/d:useBuiltinTransports", None, ns) == "false", path
        assert int(udp[0].findtext("d:receiveBufferSize", "0", ns)) >= 4 * 1024 * 1024, path
        shm = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", None, ns) == "SHM"]
        # one 1920x1080 rgb8 frame (6 MiB) must fit the shared-memory segment, or it goes over fragmented UDP
        assert shm and int(shm[0].findtext("d:segment_size", "0", ns)) >= 1920 * 1080 * 3 * 2, path


def test_node_param_helpers():
    assert node_params.sibling_topic("/cam_front/image_raw", "semantic/label") == "/cam_front/semantic/label"
    assert node_params.sibling_topic("/image_raw", "semantic/label") == "/semantic/label"
    assert node_params.sibling_topic("image_raw", "semantic/label") == "semantic/label"
    assert node_params.sibling_topic("cam/image_raw/compressed", "camera_info") == "cam/camera_info"
    assert node_params.base_topic("/c/image_raw/compressed") == ("/c/image_raw", True)
    assert node_params.check_value("input_size", "512x1024") == "512x1024"
    for bad in ("0", "5", "32x64", "abc", "nan"):
        with pytest.raises(node_params.ParameterError):
            node_params.check_value("input_size", bad)
    with pytest.raises(node_params.ParameterError, match="unknown parameter"):
        node_params.parse({"image_topic": ["/a"]})
    with pytest.raises(node_params.ParameterError, match="expected a double|expected double"):
        node_params.check_value("max_age", "soon")
    assert node_params.check_value("max_age", 2) == 2.0  # ints are fine for doubles at run time
    with pytest.raises(node_params.ParameterError, match="not a valid ROS topic"):
        node_params.check_value("image_topics", ["/bad topic"])
    # /diagnostics is the whole robot's: 0.0001 s was allowed (518 messages/s, frames lost to it)
    assert node_params.check_value("diagnostics_period", 0.1) == 0.1
    with pytest.raises(node_params.ParameterError, match=r"must be in \[0.1, 60.0\]"):
        node_params.check_value("diagnostics_period", 0.0001)


@pytest.mark.parametrize("topic", ["~cam/image", "/a/1b/image_raw", "1a", "/a//b", "/a/b/", "~", "/a/b c",
                                   "/{foo}/image_raw", "/a{b/image_raw", "/a}b/c", "/{NODE}/x", "/{}/x"])
def test_topic_names_that_ros_refuses_are_refused_with_the_parameter(topic: str):
    """Names rcl refuses ('~' not followed by '/', a token starting with a digit, a substitution other than {node},
    {ns} and {namespace}, an unbalanced brace) passed the check and ended the node with an RCLError traceback when
    it resolved them."""
    with pytest.raises(node_params.ParameterError, match="is not a valid ROS topic name"):
        node_params.check_value("image_topics", [topic])
    with pytest.raises(node_params.ParameterError, match="is not a valid ROS topic name"):
        node_params.check_value("classes_topic", topic)
    for good in ("~/image_raw", "camera/image_raw", "/cam_1/image_raw/compressed", "{node}/image", "{ns}/image_raw",
                 "/a{node}b/{namespace}_c"):
        node_params.check_value("image_topics", [good])


def test_parameter_descriptions_say_how_they_change():
    """Read-only, live and hot-swap parameters say so in their description (ros2 param describe)."""
    specs = node_params.SPECS
    for name in ("image_topics", "num_threads", "autostart", "output_namespace"):
        assert specs[name].read_only and specs[name].full_description.endswith(node_params.READ_ONLY), name
    for name in ("overlay_alpha", "confidence_threshold", "input_size", "outputs", "max_age", "max_batch",
                 "batch_timeout"):
        assert not specs[name].read_only and not specs[name].hot_swap, name
        assert specs[name].full_description.endswith(node_params.LIVE), name
    for name in ("model", "device", "precision", "backend"):
        assert not specs[name].read_only and specs[name].hot_swap, name
        assert specs[name].full_description.endswith(node_params.HOT_SWAP), name
    assert not any(n.startswith(("input_qos.", "output_qos.")) for n in specs)  # QoS: qos_overrides


def test_readme_lists_each_parameter_under_its_kind():
    """README's table of live, hot-swap and read-only parameters matches node_params."""
    import re

    text = (REPO / "README.md").read_text()
    rows = {kind: set(re.findall(r"`([a-z_]+)`", re.search(rf"^\| {kind}[^|]*\|(.*)$", text, re.M).group(1)))
            for kind in ("live", "hot swap", "read-only")}
    params = node_params.PARAMS
    assert rows["live"] == {p.name for p in params if not p.read_only and not p.hot_swap}
    assert rows["hot swap"] == {p.name for p in params if p.hot_swap}
    assert rows["read-only"] == {p.name for p in params if p.read_only}


def test_params_file_values_for_the_node_are_checked_with_its_rules():
    """What the launch file checks before starting the node: the sections of a params file that apply to
    icnet_node in its namespace, matched as rcl matches them (``/**``, ``*``, the full name, nested namespaces;
    later wins), with the node's own rules; other nodes' and other namespaces' sections, values given as launch
    arguments (``skip``) and text for a non-text parameter (rcl reads ``1e6`` as a number, PyYAML as a string) are
    left to the node."""
    import yaml

    from icnet_ros.node_params import (ParameterError, check_params_file_values, defaults,
                                       params_file_values)

    shipped = yaml.safe_load((REPO / "config" / "icnet.yaml").read_text())
    assert check_params_file_values(shipped) == defaults()
    assert check_params_file_values(shipped, namespace="robot1") == defaults()
    doc = {"/**": {"ros__parameters": {"device": "cpu", "num_threads": 2}},
           "other_node": {"ros__parameters": {"device": "anything"}},
           "/robot2/icnet_node": {"ros__parameters": {"model": "/only/on/robot2.onnx"}},
           "robot1": {"icnet_node": {"ros__parameters": {"device": "gpu", "unknown_name": 1}}},
           "/**/icnet_node": {"ros__parameters": {"max_pixels": "1e6"}},
           "/*/icnet_node": {"ros__parameters": {"autostart": "y"}}}
    assert params_file_values(doc) == {"device": "cpu", "num_threads": 2, "max_pixels": "1e6"}
    assert params_file_values(doc, namespace="robot1") == {"device": "gpu", "num_threads": 2, "unknown_name": 1,
                                                           "max_pixels": "1e6", "autostart": "y"}
    assert check_params_file_values(doc) == {"device": "cpu", "num_threads": 2}
    with pytest.raises(ParameterError, match="parameter 'device' = 'gpu': must be auto, cpu"):
        check_params_file_values(doc, namespace="/robot1")
    assert check_params_file_values(doc, namespace="robot1", skip={"device": "cpu"}) == {"num_threads": 2}
    assert params_file_values("not a mapping") == {} and params_file_values(None) == {}
