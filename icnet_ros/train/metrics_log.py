"""The run's metrics log: ``metrics.jsonl`` or ``{kind}_log.csv``, mirrored to TensorBoard when installed, and cut
back to the resumed iteration on resume."""
from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from .config import ConfigError


def write_error(path: str | Path, error: OSError, state_file: Path | None) -> CheckpointError:
    """The one-line error for a run's file that could not be written (a full disk), saying whether the run's
    training state (``state_file``) is there to continue from."""
    kept = ("; the training state saved last is kept (train.resume=auto continues from it)"
            if state_file is not None and state_file.is_file() else "; no training state was saved yet")
    return CheckpointError(f"cannot write {path}: {error.strerror or error}{kept}")


class MetricsLog:
    """Append records to ``metrics.jsonl`` (one JSON object per line, with ``kind``) or to ``{kind}_log.csv``;
    mirror scalars to TensorBoard when available. Only rank 0 writes."""

    def __init__(self, out_dir: Path, fmt: str = "jsonl", tensorboard: bool | str = "auto",
                 enabled: bool = True, state_file: Path | None = None) -> None:
        self.out_dir, self.fmt, self.enabled = out_dir, fmt, enabled
        self.state_file = state_file  # the run's training state: a failed write says whether one is kept
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                if tensorboard is True:
                    raise ConfigError("train.tensorboard=true but TensorBoard is not installed "
                                      "(pip install tensorboard)") from None

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """Append one record; a failed write (a full disk) is one line (:func:`write_error`; a partial last line is
        dropped on resume, see :meth:`truncate`)."""
        if not self.enabled:
            return
        try:
            self._append(kind, record)
        except OSError as e:
            where = e.filename or self.out_dir / ("metrics.jsonl" if self.fmt == "jsonl" else f"{kind}_log.csv")
            raise write_error(where, e, self.state_file) from None
        if self.tb is not None:
            step = int(record.get("iter", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iter":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def _append(self, kind: str, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": kind, **record}) + "\n")
            return
        path = self.out_dir / f"{kind}_log.csv"
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in record.items()}
        header = _csv_header(path)
        if header is None or set(flat) - set(header):  # a new file, or new columns (a loss term turned on)
            rows = list(csv.DictReader(path.open(newline="", encoding="utf-8"))) if header else []
            header = (header or []) + [k for k in flat if k not in (header or [])]
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=header, restval="")
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, path)
        with open(path, "a", newline="", encoding="utf-8") as f:  # every row under its own column names
            csv.DictWriter(f, fieldnames=header, restval="").writerow(flat)

    def truncate(self, after_iter: int, warn: Callable[[str], None] | None = None) -> None:
        """Drop records logged after iteration ``after_iter`` (a resumed run repeats those iterations).

        A run killed while appending (or stopped by a full disk) leaves a partial last line: a last line that does not
        parse as JSON, or a last CSV row without its line end, is dropped with a warning (``warn``, default
        :func:`warnings.warn`). Records are only ever appended, so such a line is after the saved state and is logged
        again by the resumed run. A line that does not parse anywhere else was not written by an interrupted append:
        the file was damaged or edited, and which iteration it held is unknown, so resuming is refused
        (:class:`~icnet_ros.checkpoint.CheckpointError` naming the line) before anything is written; repair or delete
        that line and resume again."""
        if not self.enabled:
            return
        warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        paths = [self.out_dir / "metrics.jsonl"] if self.fmt == "jsonl" else sorted(self.out_dir.glob("*_log.csv"))
        for path in paths:
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            while lines and not lines[-1].strip():
                lines.pop()
            if self.fmt == "jsonl":
                records = []
                for n, ln in enumerate(lines, 1):
                    if not ln.strip():
                        continue
                    try:
                        record = json.loads(ln.strip())
                        if not isinstance(record, dict):
                            raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    except ValueError as e:
                        if n < len(lines):
                            raise CheckpointError(f"{path}, line {n}: not a JSON record ({e}); the log is damaged "
                                                  "before its last line: repair or delete that line to resume") \
                                from None
                        warn(f"warning: {path}: dropped a partial last line (the run was interrupted while "
                             f"logging): {ln.strip()[:80]!r}")
                        continue
                    records.append((ln, record))
                keep = [ln for ln, record in records if _record_iter(record) <= after_iter]
            else:
                if len(lines) > 1 and not lines[-1].endswith(("\n", "\r")):
                    warn(f"warning: {path}: dropped a partial last row (the run was interrupted while logging): "
                         f"{lines[-1].strip()[:80]!r}")
                    lines.pop()
                rows = list(csv.DictReader(lines))
                keep = lines[:1] + [ln for ln, row in zip(lines[1:], rows) if _record_iter(row) <= after_iter]
            keep = [ln if ln.endswith(("\n", "\r")) else ln + "\n" for ln in keep]  # appends start on a new line
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _csv_header(path: Path) -> list[str] | None:
    """A CSV log's column names, None when there is no such file (or it is empty)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None)
    except FileNotFoundError:
        return None


def _record_iter(record: dict[str, Any]) -> int:
    try:
        return int(record.get("iter", 0))
    except (TypeError, ValueError):
        return 0
