#!/usr/bin/env bash
# Runs ON a lent GPU machine (the device tool), from the repository root, after scripts/device/prepare.sh here:
#   bash scripts/device/run.sh check bench      (one call, timeout_s 600, carry [".whl"]: 8 files come back; the
#                                                steps' shares add up to 455 s, 525 s if every one needed its 10 s
#                                                kill grace, plus ~20 s of set-up)
#   bash scripts/device/run.sh train            (a call of its own, in a session that has not spent its device
#   ITERS=N bash scripts/device/run.sh trainval  time on check bench: each fills most of one 10-minute call;
#                                                carry [".carry", ".whl"])
# Every step runs under `timeout` (its share of the call, below; STEP_SCALE=0.5 halves those of check and bench;
# train's is TRAIN_SECONDS, its own time limit, plus 60 s), so a hang or a
# slow step costs its share, not the call; bench results are rewritten after every configuration, so a step cut
# off keeps what it measured. Without a working CUDA the script stops at once (exit 3): nothing would be tested.
# - check (100 s, then 50 s for the slow torch.compile test, so that it cannot starve the others): the CUDA tests
#          only (-m cuda: test/test_engine_cuda.py: CUDA graphs past every cache, no
#          hidden synchronisation; the backends' CUDA tests: ONNX Runtime CUDA/TensorRT providers and native
#          TensorRT against torch, each skipped with its reason where the runtime is missing) -> pytest_gpu.log.
#          The CPU tests run in CI. TensorRT and onnxruntime-gpu wheels are larger than the 64 MiB a call may
#          carry: they run only where the GPU image has them (the cuda image of 2026-11 has neither).
# - bench: icnet-bench, the issue's GPU target first -> b_*.json (+ bench.log):
#          r50 (75 s): R50 w1 fp16 at 1024x2048, batch 1 and 4, with the mmseg reference, stage table;
#          graphs (50 s): the same with CUDA graphs, and the exported runtimes side by side (skipped, before any
#          export, where the image lacks them);
#          default (60 s): the default model at 360x480, 720x960 and 1024x2048, fp32/fp16, CUDA graphs;
#          compile (60 s): R50 fp16 batch 1 with torch.compile (default mode: max-autotune's autotuning of every
#          shape, twice with batch 4, would not end inside a share; bench results come per configuration);
#          grid (60 s): R18/R50 at widths 1.0/0.5, 1024x2048, fp16, batch 1.
# - train: the GPU recipe (config/train/camvid_effnet_lite0.yaml, from .carry/init.safetensors) for at most
#          TRAIN_SECONDS (default 420; the run itself under timeout, TRAIN_SECONDS + 60 s, the probe 120 s), then
#          val -> best.safetensors, logs. The poly schedule spans ITERS
#          iterations; without ITERS a 60-iteration probe run measures the time per iteration first and ITERS is
#          chosen so that the schedule (and its validations, VAL_SECONDS each, default 20) ends inside the budget.
#          TRAIN_OVERRIDES: more key=value overrides (space-separated), given to the probe too; the scale that
#          won on the CPU: TRAIN_OVERRIDES='data.input_scale=1.5 data.crop_size=[544,736]'.
# - trainval: the standard protocol's last step: the same recipe (same TRAIN_OVERRIDES) and the schedule chosen on
#          train -> val (ITERS, required: the iteration count the train step printed), on train+val without
#          validation or selection -> last.safetensors; its val mIoU (eval_val.json) then measures fit only.
# Each step's log goes to $OUT; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ICNET_ROS_TEST_DATA="$PWD/.carry/data"
# one torch import (a cold one on a fresh machine takes seconds): the device, and whether CUDA works
{ nvidia-smi -L; python3 -c "import sys, torch; cuda = torch.cuda.is_available(); print('torch', torch.__version__,
    'CUDA', torch.version.cuda, torch.cuda.get_device_name() if cuda else 'no GPU'); sys.exit(0 if cuda else 3)"; } \
    > "$OUT/device.txt" 2>&1
cuda_rc=$?
cat "$OUT/device.txt"
if [ $cuda_rc -ne 0 ]; then
    echo "no usable CUDA GPU here (torch.cuda.is_available() is False): nothing run" | tee -a "$OUT/device.txt"
    exit 3
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/icnet_site \
        .whl/*.whl >> "$OUT/device.txt" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:/tmp/icnet_site"
    else
        echo "the carried wheels (.whl) did not install: no mmseg reference (see above)" | tee -a "$OUT/device.txt"
    fi
fi
status=0
# limited SECONDS LOG COMMAND...: the command under timeout (TERM, then KILL 10 s later), output appended to LOG
limited() {
    local seconds log rc
    seconds=$(python3 -c "print(max(10, int($1 * ${STEP_SCALE:-1})))") log=$2
    shift 2
    timeout --kill-after=10 "$seconds" "$@" >> "$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "[timeout after ${seconds} s] $*" | tee -a "$log" "$OUT/device.txt"
    fi
    [ $rc -eq 0 ] || status=1
    return $rc
}
bench() {  # bench NAME SECONDS ARGS...: icnet-bench -> $OUT/b_NAME.json, log in $OUT/bench.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name: icnet-bench $*" >> "$OUT/bench.log"
    limited "$seconds" "$OUT/bench.log" python3 -m icnet_ros.tools.bench --device cuda --json "$OUT/b_$name.json" "$@"
}
for step in "$@"; do
    start=$SECONDS
    case $step in
    check)
        for selection in "cuda and not slow:100" "cuda and slow:50"; do
            limited "${selection##*:}" "$OUT/pytest_gpu.log" python3 -m pytest -v -ra -p no:cacheprovider \
                -m "${selection%:*}" -o faulthandler_timeout=60 test/test_engine_cuda.py \
                test/test_backend_tensorrt.py test/test_backend_onnxruntime.py
        done
        grep -h "passed\|failed\|error" "$OUT/pytest_gpu.log" | tail -4 ;;
    bench)
        r50=(--arch icnet_r50 --width 1.0 --size 1024x2048 --precision fp16 --batch 1 4 --iters 100 --warmup 20
             --max-seconds 8)
        bench r50 75 "${r50[@]}" --reference mmseg --stages
        bench graphs 50 "${r50[@]}" --cuda-graphs --backend onnxruntime tensorrt
        bench default 60 --model icnet_ros/weights/icnet_camvid.safetensors --size 360x480 720x960 1024x2048 \
            --precision fp32 fp16 --batch 1 --iters 100 --warmup 20 --max-seconds 5 --cuda-graphs
        bench compile 60 "${r50[@]}" --batch 1 --compile default
        bench grid 60 --arch icnet_r18 icnet_r50 --width 1.0 0.5 --size 1024x2048 --precision fp16 --batch 1 \
            --iters 50 --warmup 10 --max-seconds 4
        grep -h "ratio\|pipeline  median\|error\|timeout" "$OUT/bench.log" | head -40 ;;
    train|trainval)
        recipe=(config/train/camvid_effnet_lite0.yaml data.root=.carry/data/camvid model.pretrained=null
                model.init_from=.carry/init.safetensors train.workers=12 train.progress=false)
        weights=best.safetensors
        rm -rf /tmp/icnet_probe /tmp/icnet_run
        budget=${TRAIN_SECONDS:-420}
        iters=${ITERS:-}
        if [ "$step" = trainval ]; then
            if [ -z "$iters" ]; then
                echo "[trainval] set ITERS to the schedule chosen on train -> val (no probe: no selection)"
                status=2
                continue
            fi
            recipe+=(data.train_split=train+val data.val_split=null)
            weights=last.safetensors
        fi
        if [ -z "$iters" ]; then  # probe: the time per iteration of this recipe on this machine
            probe_start=$SECONDS
            : > "$OUT/train_probe.log"
            # shellcheck disable=SC2086
            STEP_SCALE=1 limited 120 "$OUT/train_probe.log" python3 -m icnet_ros.train "${recipe[@]}" \
                optim.iterations=1000000 train.stop_at=60 train.log_interval=30 train.eval_interval=1000000 \
                train.checkpoint_interval=1000000 train.output_dir=/tmp/icnet_probe ${TRAIN_OVERRIDES:-}
            budget=$((budget - (SECONDS - probe_start)))
            # shellcheck disable=SC2086
            iters=$(python3 scripts/device/schedule.py /tmp/icnet_probe/metrics.jsonl "$budget" \
                "${VAL_SECONDS:-20}" ${TRAIN_OVERRIDES:-} 2>> "$OUT/train_probe.log") || iters=""
            echo "probe: $(tail -1 "$OUT/train_probe.log")"
        fi
        if [ -z "$iters" ]; then
            echo "[train] no training: the probe gave no schedule (see train_probe.log)"; status=1
        else
            : > "$OUT/train.log"
            # shellcheck disable=SC2086
            STEP_SCALE=1 limited $((budget + 60)) "$OUT/train.log" python3 -m icnet_ros.train "${recipe[@]}" \
                train.output_dir=/tmp/icnet_run "optim.iterations=$iters" "train.time_limit=$budget" \
                train.checkpoint_interval=1000000 ${TRAIN_OVERRIDES:-}
            cp "/tmp/icnet_run/$weights" /tmp/icnet_run/metrics.jsonl /tmp/icnet_run/summary.json "$OUT/" \
                || status=1
            python3 -m icnet_ros.evaluate --model "$OUT/$weights" --data .carry/data/camvid --split val \
                --json --no-progress > "$OUT/eval_val.json" 2>> "$OUT/train.log" || status=1
            grep "val mIoU\|stopped\|finished\|Error" "$OUT/train.log" | tail -8
            grep -o '"mIoU": [0-9.]*' "$OUT/eval_val.json" | sed "s/^/[$step] val /"
        fi ;;
    *) echo "unknown step $step (check | bench | train | trainval)"; status=2 ;;
    esac
    echo "[$step] $((SECONDS - start)) s" | tee -a "$OUT/device.txt"
done
exit $status
