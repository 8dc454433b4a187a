"""Every parameter of ``icnet_node`` in one place: name, default, description, constraints and validation.

The inference engine's parameters (``backend``, ``device``, ``precision``, ``input_size``, ``overlay_alpha``,
``confidence_threshold``, ...) are derived from :mod:`icnet_ros.engine_config` (each is defined there once: default,
allowed values, description, whether it can change at run time); the node's own parameters (topics, scheduling,
threads, lifecycle) are defined here. ``config/icnet.yaml`` carries the same defaults (a test keeps them equal).
:func:`parse` turns raw values into a checked :class:`NodeConfig` or raises :class:`ParameterError` naming the
parameter, the bad value and what is allowed. Validation is ROS-free; :func:`declare` (rclpy imported lazily)
declares the parameters on a node with descriptions, so ``ros2 param describe`` shows them. Each parameter's
description ends with how it may change while the node runs: **live** (applied to the next batch), **hot swap** (the
engine options that need a new Segmenter, and ``model``: a new one is built and warmed up while the current one
serves, then swapped in between two batches; a new one that cannot start is refused and the current one keeps
serving) or **read-only** (set at start-up). QoS is not a parameter of its own: the node takes ROS 2's standard
``qos_overrides`` (see the node's module docstring).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from . import engine_config
from .engine_config import SegmenterConfig
from .ros_image import DEFAULT_MAX_PIXELS, MAX_MAX_PIXELS
from .sizes import MAX_BATCH, MAX_THREADS

NODE_NAME = "icnet_node"
OUTPUT_KINDS = engine_config.OUTPUTS
LIVE = " Live: changes at run time."
HOT_SWAP = (" Hot swap: a change loads and warms up a new model while the current one serves, then swaps it in "
            "between two batches (refused, with the current one still serving, if the new one cannot start).")
READ_ONLY = " Read-only: set at start-up."


class ParameterError(ValueError):
    """A parameter with a bad value; the message names the parameter, the value and what is allowed."""


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter. ``check`` returns an error message (or None) for a value of the right type."""

    name: str
    default: Any
    description: str
    constraints: str = ""
    check: Callable[[Any], str | None] | None = None
    read_only: bool = True  # False: may be changed while the node runs
    hot_swap: bool = False  # a change needs a new Segmenter (built beside the running one)

    @property
    def full_description(self) -> str:
        """The description with how the parameter may change at run time (what ``ros2 param describe`` shows)."""
        return self.description + (READ_ONLY if self.read_only else HOT_SWAP if self.hot_swap else LIVE)

    @property
    def type_name(self) -> str:
        return _type_name(self.default)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        inner = {_type_name(v) for v in value}
        return (inner.pop() if len(inner) == 1 else "mixed") + "_array"
    return type(value).__name__


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and v <= hi and not (isinstance(v, float) and math.isnan(v))
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}]"
    return check


#: a ROS topic name as rcl validates it: tokens of letters, digits, '_' and {substitutions}, none starting with a
#: digit, joined by single '/'; absolute, relative, or private ('~/' only: '~cam' and '/a/1b' are not names)
_TOPIC = re.compile(r"^(?:~/|/)?[A-Za-z_{][A-Za-z0-9_{}]*(?:/[A-Za-z_{][A-Za-z0-9_{}]*)*$")
#: the substitutions rcl expands in a name: any other '{...}', or a brace left over, fails when the node resolves it
_SUBSTITUTION = re.compile(r"\{(?:node|ns|namespace)\}")


def _topic_name_problem(topic: str) -> str | None:
    """Why rcl would refuse ``topic`` as a topic name (None when it would not)."""
    if not _TOPIC.match(topic):
        return "is not a valid ROS topic name"
    if re.search(r"[{}]", _SUBSTITUTION.sub("", topic)):
        return "is not a valid ROS topic name (the substitutions are {node}, {ns} and {namespace})"
    return None


def _check_topics(topics: Any) -> str | None:
    if not topics:
        return "must list at least one image topic"
    for t in topics:
        problem = _topic_name_problem(t)
        if problem:
            return f"{t!r} {problem}"
    if len(set(topics)) != len(topics):
        return "lists a topic twice"
    bases = [base_topic(t)[0] for t in topics]
    if len(set(bases)) != len(bases):
        return "lists the raw and the compressed topic of the same camera"
    return None


def _check_outputs(outputs: Any) -> str | None:
    bad = [o for o in outputs if o not in OUTPUT_KINDS]
    if bad:
        return f"unknown output(s) {bad}; choose from {', '.join(OUTPUT_KINDS)}"
    if not outputs:
        return "must name at least one output"
    return None


def _check_name(v: Any) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*", v) else \
        "must be a relative topic namespace such as 'semantic'"


def _check_classes_topic(v: Any) -> str | None:
    return _topic_name_problem(v)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("image_topics", ["/camera/image_raw"],
              "Camera image topics (sensor_msgs/Image). A topic ending in '/compressed' is subscribed as "
              "sensor_msgs/CompressedImage (jpeg or png). Outputs are published next to each input: "
              "/cam/image_raw -> /cam/semantic/{label,color,overlay,confidence,camera_info}.",
              "at least one valid topic name; each camera once, in a namespace of its own", _check_topics),
    ParamSpec("model", "", "Model file: a native .safetensors checkpoint, or an exported .onnx, OpenVINO .xml or "
              "TensorRT .engine / .plan (icnet-export); empty = the package's default model.",
              "an existing icnet_ros model file or empty",
              read_only=False, hot_swap=True),
    ParamSpec("outputs", list(OUTPUT_KINDS),
              "Outputs to advertise per camera. Each is computed only while someone subscribes to it.",
              "subset of label, color, overlay, confidence", _check_outputs, read_only=False),
    ParamSpec("output_namespace", "semantic", "Namespace of the outputs next to each input topic.",
              "relative name", _check_name),
    ParamSpec("publish_camera_info", True,
              "Republish the camera's camera_info at the label's resolution as <ns>/<output_namespace>/"
              "camera_info (only for cameras that publish <ns>/camera_info)."),
    ParamSpec("max_age", 0.5, "Drop frames older than this many seconds when they reach the network (0 = "
              "never): measured from when the node received them, or from their header stamp (see max_age_from).",
              "[0, 3600] s", _range(0.0, 3600.0), read_only=False),
    ParamSpec("max_age_from", "receipt", "What max_age measures from: 'receipt' (the node's reception of the "
              "frame; works whatever clock stamped it) or 'stamp' (the header stamp on the node's clock: needs "
              "synchronised clocks or use_sim_time for replayed bags; zero stamps are never too old). Stamps far "
              "from the node's clock are reported once either way.", "receipt | stamp",
              _one_of(("receipt", "stamp")), read_only=False),
    ParamSpec("max_pixels", DEFAULT_MAX_PIXELS, "Largest frame in pixels (height x width), checked from the "
              "Image's declared size or the JPEG/PNG header before decoding; larger frames are dropped as 'size' "
              "(bounds the memory and time one frame can take). Default: 3840 x 2160.", f"[1, {MAX_MAX_PIXELS}]",
              _range(1, MAX_MAX_PIXELS), read_only=False),
    ParamSpec("max_batch", 4, "Most cameras batched into one forward pass.", f"[1, {MAX_BATCH}]",
              _range(1, MAX_BATCH), read_only=False),
    ParamSpec("batch_timeout", 0.0, "After the first frame is ready, wait up to this many seconds for the other "
              "cameras' frames so they share one forward pass (0 = take the frames that are there).", "[0, 1] s",
              _range(0.0, 1.0), read_only=False),
    ParamSpec("classes_topic", "~/classes", "Topic of the class metadata (std_msgs/String with JSON; transient "
              "local, published once).", "topic name", _check_classes_topic),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages (a topic the whole robot shares: "
              "diagnostic_updater publishes about once a second).", "[0.1, 60]", _range(0.1, 60.0)),
    ParamSpec("num_threads", 0, "PyTorch CPU threads. 0 = auto: on the CPU all cores but one (at least 1), so "
              "that OpenMP workers, which spin between parallel regions, leave a core to the executor, DDS and "
              "camera drivers; on CUDA PyTorch's default.", f"[0, {MAX_THREADS}]", _range(0, MAX_THREADS)),
    ParamSpec("autostart", True, "Configure (load and warm up the model) and activate by itself at start-up (true), "
              "or stay unconfigured until a lifecycle manager drives it (false; `ros2 lifecycle set`).",
              "true | false"),
)


def _engine_check(name: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        try:
            engine_config.check(name, v)
        except engine_config.ConfigError as e:
            return str(e).split(": ", 1)[-1]
        return None
    return check


#: the engine's options as node parameters (derived: defined once in engine_config)
ENGINE_PARAMS: tuple[ParamSpec, ...] = tuple(
    ParamSpec(o.name, o.text_default(), o.description, o.allowed, _engine_check(o.name), read_only=False,
              hot_swap=not o.live)
    for o in engine_config.OPTIONS.values() if o.node)
PARAMS = PARAMS[:2] + ENGINE_PARAMS + PARAMS[2:]  # after image_topics and model
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}

# Read-only parameters the node declares after loading the model (class metadata, readable with `ros2 param get`).
CLASS_PARAMS: dict[str, str] = {
    "classes.names": "Class names, index = class id (read-only, from the model).",
    "classes.colors": "Class colors as '#rrggbb', index = class id (read-only, from the model).",
    "classes.ignore_index": "Label value of unclassified pixels (read-only).",
}  # (the whole class metadata is JSON on classes_topic: a JSON string parameter broke `ros2 param load` of a dump,
#    whose reader parses string values as YAML, ros2/rclpy#1507)


def defaults() -> dict[str, Any]:
    """Every parameter's default value (what config/icnet.yaml carries)."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in PARAMS}


def base_topic(topic: str) -> tuple[str, bool]:
    """(the camera's raw image topic, whether ``topic`` is its CompressedImage topic)."""
    if topic.endswith("/compressed"):
        return topic[: -len("/compressed")], True
    return topic, False


def camera_namespace(topic: str) -> str:
    """The namespace that holds a camera's topics: '/cam/image_raw' -> '/cam'; 'image_raw' -> ''; '/img' -> '/'."""
    base, _ = base_topic(topic)
    head, sep, _tail = base.rpartition("/")
    if not sep:
        return ""
    return head if head not in ("", "~") else head + "/"


def topic_collision(topics: list[str], resolved: list[str], output_namespace: str) -> str | None:
    """Why these cameras cannot share one node (None when they can): ``resolved`` are ``topics`` as the node
    resolves them (its namespace, remappings). Two entries naming one camera would serve each frame twice; two
    cameras in one namespace would publish to the same output topics."""
    seen: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for topic, full in zip(topics, resolved):
        base = base_topic(full)[0]
        if base in seen:
            return (f"image_topics: {seen[base]!r} and {topic!r} are the same camera ({base}); list each camera "
                    f"once")
        seen[base] = topic
        out = sibling_topic(base, output_namespace)
        if out in outputs:
            return (f"image_topics: {outputs[out]!r} and {topic!r} would both publish to {out}/*; give each "
                    f"camera its own namespace (/cam1/image_raw, /cam2/image_raw) or remap them")
        outputs[out] = topic
    return None


def sibling_topic(topic: str, name: str) -> str:
    """A topic next to ``topic``: sibling_topic('/cam/image_raw', 'semantic/label') == '/cam/semantic/label'."""
    ns = camera_namespace(topic)
    if ns == "":
        return name
    return ns + name if ns.endswith("/") else f"{ns}/{name}"


@dataclass(frozen=True)
class NodeConfig:
    """Checked parameter values."""

    image_topics: tuple[str, ...]
    model: str
    engine: SegmenterConfig  # the engine parameters, checked
    outputs: tuple[str, ...]
    output_namespace: str
    publish_camera_info: bool
    max_age: float
    max_age_from: str
    max_pixels: int
    max_batch: int
    batch_timeout: float
    classes_topic: str
    diagnostics_period: float
    num_threads: int
    autostart: bool


def as_declared_type(name: str, value: Any) -> Any:
    """``value`` in its parameter's declared type where that loses nothing: a bool or number given for a string
    parameter as its text (``-p input_size:=1.5``, ``-p warmup:=false`` and ``ros2 param set ... input_size 1.5``
    type them as double / bool), a whole number for a double (``ros2 param set ... max_age 0``) as a float and a
    whole float for an integer (``max_batch 2.0``) as an int; anything else unchanged."""
    spec = SPECS.get(name)
    if spec is None or not isinstance(value, (bool, int, float)):
        return value
    if spec.type_name == "string":
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
    if isinstance(value, bool):
        return value
    if spec.type_name == "double" and isinstance(value, int):
        return float(value)
    if spec.type_name == "integer" and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)  # (1e30 stays a double, refused as one: no 64-bit integer parameter holds it)
    return value


def check_value(name: str, value: Any) -> Any:
    """Type-check and validate one value; returns it (ints accepted for doubles, bools and numbers for strings as
    their text). Raises :class:`ParameterError`."""
    spec = SPECS.get(name)
    if spec is None:
        raise ParameterError(f"unknown parameter {name!r}")
    value = as_declared_type(name, value)
    expected = spec.type_name
    if isinstance(value, tuple):
        value = list(value)
    if value is None and expected.endswith("_array"):  # rclpy reports an empty YAML list as None
        value = []
    got = _type_name(value)
    if got != expected and not (expected.endswith("_array") and value == []):
        raise ParameterError(f"parameter {name!r}: expected {expected}, got {got} {engine_config.shown(value)}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ParameterError(f"parameter {name!r} = {engine_config.shown(value)}: {problem}")
    return value


def parse(values: dict[str, Any]) -> NodeConfig:
    """Validate raw parameter values (missing ones take their defaults) into a :class:`NodeConfig`."""
    v = defaults()
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown}; known: {', '.join(SPECS)}")
    for name, value in values.items():
        v[name] = check_value(name, value)
    engine = SegmenterConfig().replace(**{p.name: v[p.name] for p in ENGINE_PARAMS})
    problem = warmup_problem(engine, v["max_pixels"])
    if problem:
        raise ParameterError(f"parameter 'warmup' = {v['warmup']!r}: {problem}")
    return NodeConfig(
        image_topics=tuple(v["image_topics"]), model=v["model"], engine=engine, outputs=tuple(v["outputs"]),
        output_namespace=v["output_namespace"], publish_camera_info=v["publish_camera_info"],
        max_age=v["max_age"], max_age_from=v["max_age_from"], max_pixels=v["max_pixels"], max_batch=v["max_batch"],
        batch_timeout=v["batch_timeout"], classes_topic=v["classes_topic"],
        diagnostics_period=v["diagnostics_period"], num_threads=v["num_threads"], autostart=v["autostart"])


def _name_matches(pattern: list[str], name: list[str]) -> bool:
    """rcl's params-file node-name match, token by token: ``*`` one token, ``**`` any number (also none)."""
    if not pattern:
        return not name
    if pattern[0] == "**":
        return any(_name_matches(pattern[1:], name[i:]) for i in range(len(name) + 1))
    return bool(name) and pattern[0] in ("*", name[0]) and _name_matches(pattern[1:], name[1:])


def params_file_values(doc: Any, node_name: str = "icnet_node", namespace: str = "") -> dict[str, Any]:
    """The parameters a params file (parsed YAML, ``doc``) gives the node ``namespace``/``node_name``, as rcl
    applies them: each section's key path (``/robot1/icnet_node``, or nested ``robot1: icnet_node:``; a bare name
    is in the root namespace) is matched against the node's full name, ``*`` for one token and ``**`` for any
    (``/**``: every node); matching sections in file order, later wins."""
    full = [t for t in f"{namespace}/{node_name}".split("/") if t]
    found: dict[str, Any] = {}

    def walk(section: Any, path: list[str], depth: int) -> None:
        if not isinstance(section, dict) or depth > 32:
            return
        for key, value in section.items():
            if not isinstance(value, dict) or key == "ros__parameters":
                continue
            here = path + [t for t in str(key).split("/") if t]
            params = value.get("ros__parameters")
            if isinstance(params, dict) and _name_matches(here, full):
                found.update(params)
            walk(value, here, depth + 1)

    walk(doc, [], 0)
    return found


def check_params_file_values(doc: Any, node_name: str = "icnet_node", namespace: str = "",
                             skip: Any = ()) -> dict[str, Any]:
    """:func:`check_value` for every known parameter :func:`params_file_values` finds, except those in ``skip``
    (given another value elsewhere) and text where the parameter is not text (rcl reads ``1e6`` as a number and
    ``y`` as true, PyYAML as strings: the node judges those); unknown names are left to the node. Returns the
    checked values. Raises :class:`ParameterError`."""
    checked = {}
    for k, v in params_file_values(doc, node_name, namespace).items():
        if k not in SPECS or k in skip or (isinstance(v, str) and not SPECS[k].type_name.startswith("string")):
            continue
        checked[k] = check_value(k, v)
    return checked


def warmup_problem(engine: SegmenterConfig, max_pixels: int) -> str | None:
    """Why the engine's warm-up sizes do not suit a node with this ``max_pixels`` (None when they do): a warm-up
    frame is bounded like the frames themselves."""
    for h, w in engine.warmup if isinstance(engine.warmup, tuple) else ():
        if h * w > max_pixels:
            return f"warmup size {h}x{w} is larger than max_pixels ({max_pixels}): the node drops frames that large"
    return None


def class_metadata(class_set: Any, model: str = "") -> dict[str, Any]:
    """The class metadata document (ids, names, '#rrggbb' colors, ignore index) published as JSON."""
    return {"dataset": class_set.name, "model": model, "ignore_index": int(class_set.ignore_index),
            "classes": [{"id": i, "name": n, "color": "#%02x%02x%02x" % tuple(int(c) for c in col)}
                        for i, (n, col) in enumerate(zip(class_set.classes, class_set.palette))]}


def class_metadata_json(class_set: Any, model: str = "") -> str:
    return json.dumps(class_metadata(class_set, model), separators=(",", ":"))


def close_matches(name: str) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(SPECS), n=2)


def declare(node: Any) -> dict[str, Any]:
    """Declare every parameter on an rclpy node (with description, constraints, read-only flag) and return the
    values in effect (overrides from the command line or a params file applied).

    Raises :class:`ParameterError` when an override has the wrong type."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    values: dict[str, Any] = {}
    for spec in PARAMS:
        desc = ParameterDescriptor(description=spec.full_description, additional_constraints=spec.constraints,
                                   read_only=spec.read_only)
        try:
            param = node.declare_parameter(spec.name, spec.default, desc)
        except InvalidParameterTypeException:
            given = (getattr(node, "_parameter_overrides", None) or {}).get(spec.name)
            value = getattr(given, "value", None)
            if value is None or value == []:  # an empty list in YAML carries no type
                value = []
            if value == [] and spec.type_name.endswith("_array"):
                values[spec.name] = []
                check_value(spec.name, [])  # raises the parameter's own message (e.g. "must list ...")
                node.declare_parameter(spec.name, spec.default, desc, ignore_override=True)
                continue
            coerced = as_declared_type(spec.name, value)
            if coerced is not value and _type_name(coerced) == spec.type_name:  # `-p input_size:=1.5`, `max_age:=0`
                values[spec.name] = node.declare_parameter(spec.name, coerced, desc, ignore_override=True).value
                continue
            raise ParameterError(f"parameter {spec.name!r}: expected a {spec.type_name}, got {_type_name(value)} "
                                 f"{value!r}") from None
        except InvalidParameterValueException as e:
            raise ParameterError(f"parameter {spec.name!r}: {e}") from None
        values[spec.name] = param.value
    return values


_RCLPY_TYPE_ERROR = re.compile(r"Trying to set parameter '(?P<name>[^']*)' to '(?P<value>.*)' of type '(?P<got>\w+)', "
                               r"expecting type '(?P<expected>\w+)'", re.S)


def rclpy_parameter_problem(error: Exception) -> str:
    """One line for rclpy's own parameter errors (``use_sim_time:=5`` is refused inside rclpy's Node constructor),
    worded like this module's."""
    m = _RCLPY_TYPE_ERROR.search(str(error))
    if m:
        return (f"parameter {m['name']!r}: expected a {m['expected'].lower()}, got {m['got'].lower()} "
                f"{m['value']}")
    return " ".join(str(error).split())


_PARAMS_FILE_HEADER = """\
# icnet_node parameters and their defaults, generated from icnet_ros/node_params.py (engine parameters from
# icnet_ros/engine_config.py): `python -m icnet_ros.node_params > config/icnet.yaml`; a test keeps them equal.
# Describe one: ros2 param describe /icnet_node <name>. Live and hot-swap parameters change at run time
# (ros2 param set), read-only ones are set at start-up. QoS: ROS 2's standard qos_overrides (read at start-up):
# image subscriptions follow their publisher's reliability (sensor data without one), outputs are reliable, e.g.
#     qos_overrides:
#       /camera/image_raw:
#         subscription: {reliability: reliable, depth: 1, durability: volatile, history: keep_last}
#       /camera/semantic/label:
#         publisher: {reliability: reliable, depth: 5, durability: volatile, history: keep_last}
# Use: ros2 run icnet_ros icnet_node --ros-args --params-file config/icnet.yaml
#      ros2 launch icnet_ros icnet.launch.py params_file:=<your copy>
# '/**' applies it to the node whatever its name or namespace.
/**:
  ros__parameters:
"""


def render_params_file(width: int = 116) -> str:
    """``config/icnet.yaml``: every parameter with its default, description and allowed values as comments."""
    import textwrap

    lines = [_PARAMS_FILE_HEADER.rstrip("\n")]
    group = None
    for spec in PARAMS:
        prefix, _, leaf = spec.name.rpartition(".")
        indent = "    "
        if prefix:
            if prefix != group:
                lines.append(f"    {prefix}:")
                group = prefix
            indent = "      "
        else:
            group = None
        text = spec.full_description + (f" Allowed: {spec.constraints}." if spec.constraints else "")
        lines += textwrap.wrap(text, width=width, initial_indent=indent + "# ", subsequent_indent=indent + "# ",
                               break_on_hyphens=False)
        lines.append(f"{indent}{leaf}: {json.dumps(spec.default)}")  # JSON values are YAML flow values
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_params_file(), end="")
