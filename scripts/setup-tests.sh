#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine (run as root or
# with sudo available): headless OpenGL + Xvfb for the viewer tests, the CPU build of torch,
# and citygen with its dev, ray and mesh (open3d) extras.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri libgles2 libgl1 libglx-mesa0 xvfb fonts-dejavu-core libusb-1.0-0 >/dev/null
pip install -q torch==2.13.0
pip install -q -e ".[dev,ray,mesh]"
