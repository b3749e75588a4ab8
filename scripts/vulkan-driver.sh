#!/usr/bin/env bash
# A Vulkan device for the webgpu tests: Mesa's lavapipe (a Vulkan driver on the CPU) where no Vulkan
# driver is installed. Debian/Ubuntu only; elsewhere install your GPU's Vulkan driver yourself.
set -euo pipefail
if ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "error: no Vulkan driver found; install your GPU's Vulkan driver (or Mesa's lavapipe) and run again" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq && $sudo apt-get install -y -qq mesa-vulkan-drivers
