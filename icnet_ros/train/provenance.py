"""What a checkpoint records about how it was made: the source commit, the checkpoint a run started from (with its own
provenance, so staged fine-tuning keeps the whole chain) and the hardware."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .distributed import DistInfo


def git_commit() -> str | None:
    """The commit of the source tree this module runs from, if it is a git checkout, with ``-dirty`` appended when
    the package's tracked files differ from it (the code that ran is then not that commit). None when this file is
    not tracked by the repository git finds around it: a package installed into an ignored folder of another
    repository (a project's .venv, a colcon workspace's install/) would otherwise record that repository's commit."""
    here = Path(__file__).resolve().parent
    try:
        subprocess.run(["git", "ls-files", "--error-unmatch", "--", Path(__file__).name], cwd=here,
                       capture_output=True, text=True, timeout=5, check=True)  # fails unless tracked here
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
                             check=True)
        commit = out.stdout.strip()
        if not commit:
            return None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                                 cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def init_provenance(path: str | None) -> dict[str, Any] | None:
    """What model.init_from's checkpoint records of itself (file name, SHA-256 and its own provenance, nested:
    a model fine-tuned in stages keeps the whole chain), or None without model.init_from."""
    if not path:
        return None
    from ..checkpoint import file_sha256, read_metadata

    p = Path(path).expanduser()
    own = dict(read_metadata(p).get("provenance") or {})  # a clear CheckpointError for a missing or foreign file
    return {"checkpoint": str(path), "sha256": file_sha256(p), **own}


def hardware(device: torch.device, info: DistInfo) -> dict[str, Any]:
    hw: dict[str, Any] = {"device": str(device.type), "processes": info.world_size, "torch": torch.__version__,
                          "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    else:
        hw["cpu"] = platform.processor() or platform.machine()
    return hw
