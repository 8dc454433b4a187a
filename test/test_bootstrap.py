"""scripts/bootstrap.sh (what both README commands run first) on the .venv states a user's machine really has: one
left by a first run stopped early, one made for another folder (a moved or renamed checkout), a complete one while
PYTHON names another interpreter. Each case runs the real script in a copy under tmp_path, with real venvs; pip is
kept off every index (nothing is downloaded), so a case that starts installing ends there, quickly."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)  # the interpreter this test venv was made from


def _checkout(root: Path) -> Path:
    """The files bootstrap.sh reads: itself and setup.py."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bootstrap.sh", root / "scripts")
    shutil.copy(REPO / "setup.py", root)
    return root


def _venv(root: Path, stamp_extras: str | None = "ros") -> None:
    """A real venv (with pip) in root/.venv and, with ``stamp_extras``, the stamp bootstrap.sh writes after a
    complete install of those extras with the default TORCH_SPEC."""
    subprocess.run([BASE_PYTHON, "-m", "venv", str(root / ".venv")], check=True, timeout=120)
    if stamp_extras is not None:
        key = hashlib.sha256((root / "setup.py").read_bytes()).hexdigest()[:16] + "-torch__2.13.0"
        (root / ".venv" / f".icnet_ros-{key}").write_text(stamp_extras.replace(",", "\n") + "\n")


def _bootstrap(root: Path, extras: str = "ros", **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "TORCH_SPEC"))}
    clean["PATH"] = os.pathsep.join(p for p in clean["PATH"].split(os.pathsep) if ".venv" not in p)
    full = {**clean, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
            "PYTHON": BASE_PYTHON, **env}
    full = {k: v for k, v in full.items() if v != ""}  # "": the machine's own pip setting
    return subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh"), extras], capture_output=True, text=True,
                          env=full, timeout=300)


def test_a_complete_venv_is_kept_and_nothing_installed(tmp_path):
    root = _checkout(tmp_path / "repo")
    _venv(root)
    r = _bootstrap(root)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


def test_a_venv_from_a_first_run_stopped_early_is_made_again(tmp_path):
    """python -m venv writes bin/python first and the activate scripts and pip last: Ctrl-C in between left a venv
    that every later run failed on (`.venv/bin/activate: No such file or directory`, exit 1) until the user removed
    it by hand. Now it is made again, and the install goes on (here it stops at pip: no index)."""
    root = _checkout(tmp_path / "repo")
    _venv(root, stamp_extras=None)
    (root / ".venv" / "bin" / "activate").unlink()
    r = _bootstrap(root)
    assert "making .venv again" in r.stderr and "activate: No such file" not in r.stderr, r.stderr
    assert (root / ".venv" / "bin" / "activate").is_file()
    assert subprocess.run([str(root / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


def test_a_venv_made_for_another_folder_is_made_again(tmp_path):
    """A moved or renamed checkout: its venv's activate put the old, missing bin/ on PATH, so `python -m pip`
    installed torch, the ROS wheels and the package into whatever python came next on PATH, and the stamp said all
    was installed (exit 0; the demo then 'icnet-demo: not found'). Now the venv is made again for this folder."""
    old = _checkout(tmp_path / "old place")
    _venv(old)
    root = tmp_path / "new place"
    old.rename(root)
    r = _bootstrap(root)
    assert "making .venv again" in r.stderr, r.stderr
    activate = (root / ".venv" / "bin" / "activate").read_text()
    assert str(root / ".venv") in activate and str(old) not in activate


def test_python_only_chooses_the_interpreter_of_a_new_venv(tmp_path):
    """The version check read $PYTHON even when a complete .venv existed: after one run with PYTHON=python3.12 on a
    system whose python3 is 3.13, every later run without PYTHON failed (exit 2) although .venv was fine."""
    root = _checkout(tmp_path / "repo")
    _venv(root)
    fake = tmp_path / "python3.13"
    fake.write_text("#!/bin/sh\necho 3.13\n")
    fake.chmod(0o755)
    r = _bootstrap(root, PYTHON=str(fake))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    shutil.rmtree(root / ".venv")  # no venv: PYTHON is checked, one line, exit 2
    r = _bootstrap(root, PYTHON=str(fake))
    assert r.returncode == 2 and r.stderr.startswith("icnet_ros needs Python 3.10-3.12") \
        and len(r.stderr.splitlines()) == 1, r.stderr


def test_torch_spec_takes_pip_options(tmp_path):
    """TORCH_SPEC was passed to pip as one argument, so the documented form with an index
    ('torch==2.13.0 --index-url URL', to choose PyTorch's CPU or CUDA build) was an 'Invalid requirement'. Now its
    words are pip's arguments. (This case uses the machine's pip configuration for pip and setuptools, as a real
    run does; the torch version asked for exists nowhere, so nothing large is installed.)"""
    root = _checkout(tmp_path / "repo")
    _venv(root, stamp_extras=None)
    index = tmp_path / "index"
    index.mkdir()
    r = _bootstrap(root, TORCH_SPEC=f"torch==0.0.1 --index-url {index.as_uri()}", PIP_CONFIG_FILE="",
                   PIP_NO_INDEX="", PIP_FIND_LINKS="")
    assert r.returncode != 0 and "Invalid requirement" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR:")]
    # pip parsed the requirement and looked for it ('No matching distribution', or a constraint in the machine's
    # pip configuration that pins torch: 'Cannot install torch==0.0.1')
    assert errors and "torch==0.0.1" in errors[0] and "--index-url" not in errors[0], errors
