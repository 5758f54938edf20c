#!/usr/bin/env bash
# Installs what building, running and testing shmzone need on Debian 12, and
# any further packages named as arguments (scripts/fuzz.sh: clang, libFuzzer).
set -euo pipefail
pkgs=(
        meson ninja-build pkgconf gcc g++
        libfuse3-dev fuse3 libsystemd-dev libinih-dev libmount-dev
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
# nginx and its module sources (the nginx module and its tests), wrk (its benchmark).
# Installing nginx would start a server on port 80: a policy-rc.d that forbids
# starting services is put in place for the install, unless one is there already
# (then it is left alone), and removed after.
nginx_pkgs=(nginx nginx-dev wrk)
nginx_missing=()
for p in "${nginx_pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || nginx_missing+=("$p")
done
if [ ${#nginx_missing[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        own_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
                printf '#!/bin/sh\n# scripts/deps.sh: no service starts while nginx is installed\nexit 101\n' |
                        $sudo tee /usr/sbin/policy-rc.d >/dev/null
                $sudo chmod 0755 /usr/sbin/policy-rc.d
                own_policy=1
        fi
        nrc=0
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${nginx_missing[@]}" || nrc=$?
        [ $own_policy -eq 0 ] || $sudo rm -f /usr/sbin/policy-rc.d
        [ $nrc -eq 0 ] || exit $nrc
fi
# promtool, which the tests run on the view's metrics (unpacked into a cache, not installed).
"$(dirname "$0")/promtool.sh" >/dev/null || echo "deps.sh: no promtool: the metrics checks will fail" >&2
