#!/usr/bin/env bash
# Stage, on this machine, what a run on a lent GPU machine needs beyond the working tree (which travels; the data
# beside the repo does not). Both folders are git-ignored; name them in the device tool's `carry`:
#   .carry/data/camvid       CamVid train + val from ../shared/data (28 MB)
#   .carry/init.safetensors  the checkpoint the GPU training starts from (default: the shipped model; or $1)
#   .whl/                    wheels for the MMSegmentation reference of icnet-bench (pure Python, ~3 MB)
# Then, on the GPU machine: bash scripts/device/run.sh check bench; a second call: ... run.sh train (see that script)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
init=${1:-icnet_ros/weights/icnet_camvid.safetensors}
data=${ICNET_ROS_DATA:-../shared/data}
mkdir -p .carry/data
rm -rf .carry/data/camvid
cp -r "$data/camvid" .carry/data/camvid
cp "$init" .carry/init.safetensors
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
rm -rf .whl && mkdir -p .whl
# the GPU image (Python 3.12) has torch, numpy, opencv, matplotlib, scipy, rich, pyyaml, pillow, packaging
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy prettytable wcwidth addict yapf platformdirs termcolor
du -sh .carry .whl
echo "carry: [\".carry\", \".whl\"]"
