#!/usr/bin/env bash
# Main job: set up (first run only), then run the icnet_ros node demo.
#   scripts/run.sh                  start the node on /camera/image_raw and wait for frames (Ctrl-C stops)
#   scripts/run.sh VIDEO|FOLDER     also play the input into the node and save the overlays it publishes
#                                   (./out/overlays), then stop by itself at the end of the input
# Extra arguments go to icnet-demo (see `icnet-demo --help`), e.g. --model M.safetensors --device cuda.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh ros
# shellcheck disable=SC1091
. .venv/bin/activate
exec icnet-demo "$@"
