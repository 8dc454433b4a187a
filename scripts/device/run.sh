#!/usr/bin/env bash
# Runs ON a lent GPU machine (the device tool), from the repository root, after scripts/device/prepare.sh here:
#   bash scripts/device/run.sh check bench      (one call: about 8 files come back, 10 minutes at most)
#   bash scripts/device/run.sh train            (a call of its own: it fills TRAIN_SECONDS)
#   ITERS=N bash scripts/device/run.sh trainval
# - check: CUDA tests (test/test_engine_cuda.py: CUDA graphs past every cache, no hidden synchronisation; the
#          backends' CUDA tests: ONNX Runtime CUDA/TensorRT providers and native TensorRT against torch, each
#          skipped with its reason where the runtime is missing; and the engine/optimisation/model/bench tests)
#          -> pytest_gpu.log. TensorRT and onnxruntime-gpu wheels are larger than the 64 MiB a call may carry:
#          they run only where the GPU image has them (the cuda image of 2026-11 has neither).
# - bench: icnet-bench GPU grid (fp32/fp16/bf16, batch 1 and 4, mmseg reference, stages, ablation), the default
#          model, then CUDA graphs, torch.compile and the exported runtimes (skipped, before any export, where the
#          image lacks them) for R50 fp16 at 1024x2048, slowest last -> bench_gpu.{json,md}, bench_*.log
# - train: the GPU recipe (config/train/camvid_effnet_lite0.yaml, from .carry/init.safetensors) for at most
#          TRAIN_SECONDS (default 420), then val -> best.safetensors, logs. The poly schedule spans ITERS
#          iterations; without ITERS a 60-iteration probe run measures the time per iteration first and ITERS is
#          chosen so that the schedule (and its validations, VAL_SECONDS each, default 20) ends inside the budget.
#          TRAIN_OVERRIDES: more key=value overrides (space-separated), given to the probe too; the scale that
#          won on the CPU: TRAIN_OVERRIDES='data.input_scale=1.5 data.crop_size=[544,736]'.
# - trainval: the standard protocol's last step: the same recipe (same TRAIN_OVERRIDES) and the schedule chosen on
#          train -> val (ITERS, required: the iteration count the train step printed), on train+val without
#          validation or selection -> last.safetensors; its val mIoU (eval_val.json) then measures fit only.
# Each step's log goes to $OUT; a failing step does not stop the next. The whole call must stay under 10 minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ICNET_ROS_TEST_DATA="$PWD/.carry/data"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/icnet_site \
        .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/icnet_site"
fi
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$OUT/device.txt"
status=0
for step in "$@"; do
    start=$SECONDS
    case $step in
    check)
        python3 -m pytest -q -ra -p no:cacheprovider test/test_engine_cuda.py test/test_backend_tensorrt.py \
            test/test_backend_onnxruntime.py test/test_export.py test/test_engine_config.py test/test_optimize.py \
            test/test_engine.py test/test_model.py test/test_bench.py test/test_convert.py test/test_train.py \
            > "$OUT/pytest_gpu.log" 2>&1 || status=1
        tail -5 "$OUT/pytest_gpu.log" ;;
    bench)
        python3 -m icnet_ros.tools.bench --sweep --device cuda --precision fp32 fp16 bf16 --batch 1 4 \
            --reference mmseg --stages --ablation --detail icnet_r50:1.0@1024x2048 --iters 50 --warmup 10 \
            --max-seconds 10 --json "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" \
            > "$OUT/bench_grid.log" 2>&1 || status=1
        python3 -m icnet_ros.tools.bench --model icnet_ros/weights/icnet_camvid.safetensors --device cuda \
            --size 360x480 720x960 1024x2048 --precision fp32 fp16 --batch 1 4 --iters 100 --warmup 20 \
            --cuda-graphs --json "$OUT/bench_default.json" > "$OUT/bench_default.log" 2>&1 || status=1
        for extra in "--cuda-graphs" "--backend onnxruntime tensorrt" "--compile max-autotune-no-cudagraphs"; do
            # shellcheck disable=SC2086
            python3 -m icnet_ros.tools.bench --arch icnet_r50 --size 1024x2048 --device cuda --precision fp16 \
                --batch 1 4 --iters 100 --warmup 20 $extra >> "$OUT/bench_r50_fp16.log" 2>&1 || status=1
        done
        grep -h "ratio\|pipeline  median" "$OUT"/bench_*.log | head -40 ;;
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
            # shellcheck disable=SC2086
            python3 -m icnet_ros.train "${recipe[@]}" optim.iterations=1000000 train.stop_at=60 \
                train.log_interval=30 train.eval_interval=1000000 train.checkpoint_interval=1000000 \
                train.output_dir=/tmp/icnet_probe ${TRAIN_OVERRIDES:-} > "$OUT/train_probe.log" 2>&1 || status=1
            budget=$((budget - (SECONDS - probe_start)))
            # shellcheck disable=SC2086
            iters=$(python3 scripts/device/schedule.py /tmp/icnet_probe/metrics.jsonl "$budget" \
                "${VAL_SECONDS:-20}" ${TRAIN_OVERRIDES:-} 2>> "$OUT/train_probe.log") || iters=""
            echo "probe: $(tail -1 "$OUT/train_probe.log")"
        fi
        if [ -z "$iters" ]; then
            echo "[train] no training: the probe gave no schedule (see train_probe.log)"; status=1
        else
            # shellcheck disable=SC2086
            python3 -m icnet_ros.train "${recipe[@]}" train.output_dir=/tmp/icnet_run "optim.iterations=$iters" \
                "train.time_limit=$budget" train.checkpoint_interval=1000000 ${TRAIN_OVERRIDES:-} \
                > "$OUT/train.log" 2>&1 || status=1
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
