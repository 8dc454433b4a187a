"""Both install paths: every console script resolves (pip), and `colcon build` lays the package out as ROS 2 expects
(executables in lib/icnet_ros, launch/config/models in share/icnet_ros, the ament index marker)."""
import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from helpers import REPO, signal_once_loaded, signal_once_torch_loads

EXECUTABLES = ["icnet_node", "icnet-play", "icnet-record", "icnet-demo", "icnet-convert", "icnet-export",
               "icnet-segment", "icnet-bench", "icnet-train", "icnet-eval", "icnet-node-bench", "icnet-node-soak"]


def test_console_scripts_resolve():
    eps = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("icnet_ros.")}
    assert sorted(eps) == sorted(EXECUTABLES)
    for name, ep in eps.items():
        assert callable(ep.load()), name


@pytest.mark.parametrize("tool, args", [
    ("icnet-play", ["frames", "--max-frames", "1"]), ("icnet-record", ["/t_pkgsig/overlay", "--output", "rec"]),
    ("icnet-convert", ["src.safetensors", "dst.safetensors"]), ("icnet-node-bench", ["--frames", "1"]),
    ("icnet-node-soak", ["--seconds", "1"])])
def test_a_signal_while_a_tool_imports_numpy_is_one_line(tool, args, tmp_path):
    """These tools' modules import numpy / OpenCV when imported, and their console scripts named the modules'
    main: Ctrl-C in those first 0.1-0.3 s was a KeyboardInterrupt traceback, SIGTERM a silent death. Their console
    scripts now install the handlers first (tools/entry_points.py): one line 'TOOL: interrupted', 130 / 143. Each
    run loads the installed entry point, as the console script does, and is signalled once numpy's C extension
    is being loaded."""
    code = ("import sys; from importlib.metadata import entry_points; "
            f"sys.exit([e for e in entry_points(group='console_scripts') if e.name == {tool!r}][0].load()())")
    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": "77",
           "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "test" / "fastdds_loopback.xml")}
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        signal_once_loaded(proc, signum, "_multiarray_umath")
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (128 + signum, f"{tool}: interrupted\n"), (signum, proc.returncode, err)


def test_package_xml_is_format3_ament_python():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "icnet_ros"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "rcl_interfaces", "sensor_msgs", "std_msgs", "diagnostic_msgs", "python3-numpy",
            "python3-opencv", "python3-yaml"} <= deps
    # the code's license and the bundled weights' (non-commercial), each with its file
    licenses = {e.text: e.get("file") for e in root.findall("license")}
    assert licenses == {"Apache-2.0": "LICENSE", "CC-BY-NC-4.0": "icnet_ros/weights/LICENSE.md"}
    assert all((REPO / f).is_file() for f in licenses.values())
    assert root.find("export/build_type").text == "ament_python"
    assert (REPO / "resource" / "icnet_ros").is_file()


@pytest.mark.slow
def test_colcon_build_installs_ros_layout(tmp_path):
    colcon = shutil.which("colcon") or str(Path(sys.executable).with_name("colcon"))
    if not Path(colcon).exists():
        pytest.skip("colcon not installed (test extra: colcon-common-extensions)")
    src = tmp_path / "src" / "icnet_ros"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "out", "build", "install", "log",
                                                            "*.egg-info", "__pycache__", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLCON")}
    proc = subprocess.run([colcon, "build", "--base-paths", str(tmp_path / "src"), "--build-base",
                           str(tmp_path / "build"), "--install-base", str(tmp_path / "install")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = tmp_path / "install" / "icnet_ros"
    for exe in EXECUTABLES:
        path = prefix / "lib" / "icnet_ros" / exe
        assert path.is_file() and os.access(path, os.X_OK), exe
    share = prefix / "share" / "icnet_ros"
    for rel in ["package.xml", "launch/icnet.launch.py", "config/icnet.yaml", "config/icnet.rviz"]:
        assert (share / rel).is_file(), rel
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "icnet_ros").is_file()
    # the default model once, inside the package, with its license (it was also copied to share/icnet_ros/models,
    # never read from there: the wheel was twice the size); the code's license beside package.xml
    shipped = sorted(p.name for p in (REPO / "icnet_ros" / "weights").glob("*.safetensors"))
    installed = sorted(prefix.glob("lib/python*/site-packages/icnet_ros/weights/*"))
    assert sorted(p.name for p in installed) == sorted([*shipped, "LICENSE.md"])
    assert not (share / "models").exists() and (share / "LICENSE").is_file()
    assert "Apache License" in (share / "LICENSE").read_text()
    assert "unknown distribution option" not in proc.stderr.lower(), proc.stderr  # setup.py's tests_require


@pytest.mark.parametrize("tool, sig", [("icnet-eval", signal.SIGINT), ("icnet-train", signal.SIGTERM),
                                       ("icnet-bench", signal.SIGINT), ("icnet-eval", signal.SIGTERM)])
def test_installed_tools_interrupted_while_importing_torch_say_one_line(tool, sig):
    """The console scripts of icnet-eval, icnet-train and icnet-bench imported their module, and torch with it (1-3
    s), before main installed any handler: Ctrl-C then was a KeyboardInterrupt traceback, SIGTERM a silent death
    (-15). Now the handlers come first (tools/entry_points.py): one line, exit status 128 + the signal. The signal
    is sent once torch's library is being loaded, i.e. during the imports."""
    script = Path(sys.executable).parent / tool
    proc = subprocess.Popen([str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    signal_once_torch_loads(proc, sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err, out) == (128 + sig, f"{tool}: interrupted\n", ""), (proc.returncode, err[-3000:])


@pytest.mark.parametrize("module, args", [
    ("icnet_ros.node_process", ["icnet_node"]), ("icnet_ros.tools.play", ["frames"]),
    ("icnet_ros.tools.record", ["/x"]), ("icnet_ros.tools.demo", ["frames"]),
    ("icnet_ros.tools.node_bench", []), ("icnet_ros.tools.soak", [])])
def test_ros_tools_without_rclpy_say_how_to_get_it_in_one_line(module, args):
    """A base install (no [ros] extra) or a shell where ROS 2's setup.bash was not sourced: rclpy cannot be
    imported (blocked here in a fresh interpreter). Each ROS tool said so with a ModuleNotFoundError traceback,
    exit status 1; now one line naming the remedy, exit status 2 (--help still works without ROS)."""
    code = (f"import sys; sys.modules['rclpy'] = None; from {module} import main; "
            f"sys.exit(main({args!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    prog = {"node_process": "icnet_node", "play": "icnet-play", "record": "icnet-record", "demo": "icnet-demo",
            "node_bench": "icnet-node-bench", "soak": "icnet-node-soak"}[module.rsplit(".", 1)[1]]
    assert r.returncode == 2 and r.stderr == (f"{prog}: error: needs ROS 2's rclpy, which cannot be imported: source "
                                              "your ROS 2 setup.bash, or pip install 'icnet_ros[ros]'\n"), r.stderr
    help_args = ["icnet_node", "--help"] if prog == "icnet_node" else ["--help"]  # (icnet_node's main takes argv[0])
    helped = subprocess.run([sys.executable, "-c", code.replace(f"{args!r}", repr(help_args))], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
