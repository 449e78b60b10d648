#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST package (IDX files under /usr/share/datasets/fashion-mnist).
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "qtoolkit: Fashion-MNIST is missing and installing it needs root: run 'apt-get install dataset-fashion-mnist' as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
