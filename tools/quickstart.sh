#!/usr/bin/env bash
# One command from a clean clone: set up, inspect the shipped digits MLP, rewrite it two ways, and
# show the accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[cpu,plot]"
mkdir -p out
run() { echo; echo "\$ $*"; "$@"; }
run .venv/bin/onnxsvd inspect models/digits_mlp.onnx --plot out/digits_mlp_spectra.png
# Plain SVD, keeping 90% of each layer's energy Σσ².
run .venv/bin/onnxsvd rewrite models/digits_mlp.onnx -o out/digits_mlp_svd.onnx --energy 0.9 --report out/digits_mlp_svd.json
# Activation-aware: whitened SVD fitted level by level on calibration data, half the parameters of the
# hidden layers; the 10-class head stays dense (its rank 4 is under the floor, --min-rank 8).
run .venv/bin/onnxsvd rewrite models/digits_mlp.onnx -o out/digits_mlp_whiten.onnx --ratio 0.5 \
    --method whiten --data models/digits_calib.npz --sequential
run .venv/bin/python tools/digits_accuracy.py models/digits_mlp.onnx out/digits_mlp_svd.onnx \
    out/digits_mlp_whiten.onnx --data models/digits_eval.npz
run .venv/bin/onnxsvd validate models/digits_mlp.onnx out/digits_mlp_whiten.onnx --data models/digits_eval.npz
