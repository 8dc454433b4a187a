#!/usr/bin/env bash
# Main job: set up (first run only), then run the icnet_ros node demo.
#   scripts/run.sh                  start the node on /camera/image_raw and wait for frames (Ctrl-C stops)
#   scripts/run.sh VIDEO|FOLDER     also play the input into the node and save the overlays it publishes
#                                   (./out/overlays/<date>-<time>/, a new folder each run), then stop by itself at
#                                   the end of the input
# Extra arguments go to icnet-demo (see `icnet-demo --help`), e.g. --model M.safetensors --device cuda.
# Paths (the input, --output, --model, --video) are relative to the folder this script is called from, as for any
# command; the set-up runs in the repository.
set -euo pipefail
repo=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
(cd "$repo" && bash scripts/bootstrap.sh ros)
# shellcheck disable=SC1091
. "$repo/.venv/bin/activate"
exec icnet-demo "$@"
