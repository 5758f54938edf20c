#!/usr/bin/env bash
# Installs what building, running and testing shmzone need on Debian 12, and
# any further packages named as arguments (scripts/fuzz.sh: clang, libFuzzer).
set -euo pipefail
pkgs=(
        meson ninja-build pkgconf gcc g++
        libfuse3-dev fuse3 libsystemd-dev libinih-dev
        libcriterion-dev attr libboost-dev scdoc clang-format
        libmicrohttpd-dev libjson-c-dev bash-completion
        python3-dev python3-pytest python3-numpy dh-python
        "$@"
)
missing=()
for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Optional: Eclipse iceoryx, an anchor of bench-ports (which prints "SKIP iceoryx" without it). Not every
# release has it (Debian 12 does): a failure here does not fail the script.
optional=(iceoryx libiceoryx-binding-c-dev)
opt_missing=()
for p in "${optional[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || opt_missing+=("$p")
done
if [ ${#opt_missing[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${opt_missing[@]}" ||
                echo "deps.sh: optional ${opt_missing[*]} not installed (bench-ports will skip iceoryx)" >&2
fi
