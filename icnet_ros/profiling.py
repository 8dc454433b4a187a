"""Named ranges around ICNet's stages and the Segmenter's pre/post-processing, for profilers.

``with stage("low branch"):`` is free unless ranges are on; then it is a ``torch.profiler.record_function``
range named ``icnet/<stage>``, which ``torch.profiler`` records (``icnet-bench --stages`` reads them) and Nsight
Systems shows as NVTX ranges under ``torch.autograd.profiler.emit_nvtx()``. Turn them on for a block with
:func:`ranges`, or for a whole process with ``ICNET_ROS_RANGES=1``. Off by default: exporters and
``torch.compile`` then see plain code.

Stages (:data:`STAGES`, in pipeline order): preprocess (upload, resize, normalise), the three ICNet branches
(high: full-resolution convolutions; medium: the encoder's first stages at 1/2 input plus its projection; low:
the encoder's last stages), pyramid pooling, CFF (the two cascade feature fusions), head, upsample+argmax,
color/overlay and host transfer.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

PREFIX = "icnet/"
STAGES: tuple[str, ...] = ("preprocess", "high branch (sub1)", "medium branch (sub2)", "low branch (sub4)",
                           "pyramid pooling", "CFF", "head", "upsample+argmax", "color/overlay", "host transfer")
_enabled = os.environ.get("ICNET_ROS_RANGES", "") not in ("", "0")


def stage(name: str) -> contextlib.AbstractContextManager:
    """A profiler range named ``icnet/<name>`` while ranges are on, else a no-op."""
    if not _enabled or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(PREFIX + name)


@contextlib.contextmanager
def ranges(on: bool = True) -> Iterator[None]:
    """Turn the stage ranges on (or off) inside the block."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


__all__ = ["PREFIX", "STAGES", "ranges", "stage"]
