#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with torch, torchdeq, torchdiffeq, the
# example and test extras, and (where apt is available) Debian's Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[examples,test]"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "note: dataset-fashion-mnist not installed; --dataset fashion-mnist will try torchvision's download"
fi
