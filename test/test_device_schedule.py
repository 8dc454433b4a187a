"""scripts/device/schedule.py: the iteration count that fits a GPU training call's time budget."""
import json
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "scripts" / "device" / "schedule.py"


def _run(metrics, *args):
    return subprocess.run([sys.executable, str(SCRIPT), str(metrics), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_fills_the_budget_with_iterations_and_validations(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "iter": 30, "time_per_iter": 0.5},  # warm-up interval: ignored
               {"kind": "val", "iter": 30, "mIoU": 1.0},
               {"kind": "train", "iter": 60, "time_per_iter": 0.05}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _run(metrics, 400, 20)
    assert proc.returncode == 0, proc.stderr
    iters = int(proc.stdout)
    # 0.9 * 400 s - the final validation = 340 s for iterations at 0.05 s plus a 20 s validation every 1000
    assert iters == int(340 / (0.05 + 20 / 1000)) == 4857
    assert iters * 0.05 + (iters // 1000 + 1) * 20 <= 400
    # a shorter validation interval leaves fewer iterations
    fewer = int(_run(metrics, 400, 20, "train.eval_interval=200", "data.flip=0").stdout)
    assert fewer == int(340 / (0.05 + 20 / 200)) < iters


def test_refuses_a_spent_budget_or_a_failed_probe(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "iter": 60, "time_per_iter": 2.0}) + "\n")
    proc = _run(metrics, -30, 20)
    assert proc.returncode == 1 and proc.stdout == "" and "too small" in proc.stderr
    metrics.write_text(json.dumps({"kind": "val", "iter": 60, "mIoU": 3.0}) + "\n")
    proc = _run(metrics, 400, 20)
    assert proc.returncode == 1 and "no train records" in proc.stderr
