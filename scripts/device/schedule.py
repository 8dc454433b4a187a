"""ITERS for scripts/device/run.sh train: how many iterations fit in a time budget, from a probe run's metrics.

    python3 scripts/device/schedule.py PROBE/metrics.jsonl BUDGET_S VAL_S [key=value overrides ...]

The last train record's ``time_per_iter`` (data loading included; the first logged interval, with cuDNN's
autotuning and the loader's start, is skipped when there are two) sets the pace; each validation (every
``train.eval_interval`` iterations, from the overrides or the recipe's 1000, plus one at the end) costs VAL_S.
10% of the budget is kept for the final checkpoint and evaluation. Prints the iteration count.
"""
import json
import sys


def main(argv: list[str]) -> int:
    metrics, budget, val_s = argv[0], float(argv[1]), float(argv[2])
    eval_interval = 1000
    for kv in argv[3:]:
        if kv.startswith("train.eval_interval="):
            eval_interval = int(kv.split("=", 1)[1])
    try:
        with open(metrics, encoding="utf-8") as f:
            train = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    except (OSError, ValueError) as e:  # no probe output: one line for train_probe.log
        print(f"{metrics}: {e} (did the probe run fail?)", file=sys.stderr)
        return 1
    if not train:
        print(f"{metrics}: no train records (did the probe run fail?)", file=sys.stderr)
        return 1
    per_iter = float(train[-1]["time_per_iter"])
    usable = 0.9 * budget - val_s  # the final validation
    iters = int(usable / (per_iter + val_s / eval_interval))
    if iters < 1:
        print(f"budget {budget:.0f} s too small at {per_iter:.3f} s/iteration", file=sys.stderr)
        return 1
    print(f"{per_iter:.4f} s/iteration, {val_s:g} s per validation every {eval_interval}: {iters} iterations "
          f"fill {budget:.0f} s", file=sys.stderr)
    print(iters)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
