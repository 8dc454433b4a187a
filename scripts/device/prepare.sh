#!/usr/bin/env bash
# Stage, on this machine, what a run on a lent GPU machine needs beyond the working tree (which travels; the data
# beside the repo does not). Both folders are git-ignored; name them in the device tool's `carry`:
#   .carry/data/camvid       CamVid train + val from ../shared/data (28 MB)
#   .carry/init.safetensors  the checkpoint the GPU training starts from (default: the shipped model; or $1)
#   .whl/                    wheels for the MMSegmentation reference of icnet-bench (pure Python, ~3 MB)
# Then, on the GPU machine: bash scripts/device/run.sh check bench (carry [".whl"]: no test or benchmark there reads
# .carry); a call of its own: ... run.sh train (carry [".carry", ".whl"]; see that script). A call carries at most
# 64 MiB (the working tree included): checked at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
init=${1:-icnet_ros/weights/icnet_camvid.safetensors}
data=${ICNET_ROS_DATA:-../shared/data}
mkdir -p .carry/data
rm -rf .carry/data/camvid
cp -r "$data/camvid" .carry/data/camvid
chmod -R u+w .carry/data/camvid  # (the shared copy is read-only: a second run could not remove this one)
cp "$init" .carry/init.safetensors
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
rm -rf .whl && mkdir -p .whl
# the GPU image (Python 3.12) has torch, numpy, opencv, matplotlib, scipy, rich, pyyaml, pillow, packaging
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy==6.3.1 prettytable==3.19.0 wcwidth==0.9.5 \
    addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0
du -sh .carry .whl
# (a tracked file deleted in the working tree makes du fail: the others are still counted)
tree_kb=$(git ls-files -z --cached --others --exclude-standard | { du -ck --files0-from=- 2>/dev/null || true; } \
    | tail -1 | cut -f1)
carry_kb=$(du -sk .carry | cut -f1) whl_kb=$(du -sk .whl | cut -f1)
for set in "check bench:.whl:$((tree_kb + whl_kb))" "train:.carry .whl:$((tree_kb + carry_kb + whl_kb))"; do
    IFS=: read -r steps folders kb <<< "$set"
    echo "$steps: carry $folders, with the working tree $((kb / 1024)) MiB of the 64 MiB a call takes"
    if [ "$kb" -gt $((64 * 1024)) ]; then
        echo "error: over the 64 MiB a device call carries" >&2
        exit 1
    fi
done
