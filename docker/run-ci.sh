#!/usr/bin/env bash
# Build the image and run the test suite inside it twice: with the GPU (--gpus all) and without.
# Usage: docker/run-ci.sh            (from anywhere; REPQ_IMAGE, REPQ_DATA and REPQ_REQUIRE_GPU=1 optional)
# Without an NVIDIA container runtime the GPU run is skipped with a message (or fails with REPQ_REQUIRE_GPU=1).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${REPQ_IMAGE:-repq:latest}"
data="${REPQ_DATA:-${root}/../shared/datasets}"

command -v docker >/dev/null || { echo "run-ci: docker is not installed: install Docker Engine first" >&2; exit 2; }

docker build -f "${root}/docker/Dockerfile" -t "${image}" "${root}"

mounts=()
if [[ -d "${data}" ]]; then
    mounts=(-v "${data}:/workspace/shared/datasets:ro")
else
    echo "run-ci: no datasets at ${data}: tests that need them skip (set REPQ_DATA=PATH)" >&2
fi

echo "== test suite without GPU"
docker run --rm ${mounts[@]+"${mounts[@]}"} "${image}" python -m pytest -q

if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia || command -v nvidia-smi >/dev/null; then
    echo "== test suite with GPU"
    docker run --rm --gpus all ${mounts[@]+"${mounts[@]}"} "${image}" python -m pytest -q
elif [[ "${REPQ_REQUIRE_GPU:-0}" == "1" ]]; then
    echo "run-ci: REPQ_REQUIRE_GPU=1 but no NVIDIA container runtime: install nvidia-container-toolkit" >&2
    exit 2
else
    echo "run-ci: no NVIDIA container runtime here: skipped the --gpus all run"
fi
