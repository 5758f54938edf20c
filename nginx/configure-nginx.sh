#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Runs nginx's configure as Debian built nginx (its conf_flags: --with-compat and
# the rest, so that the module's signature is the one Debian's nginx checks), in a
# copy of nginx-dev's sources (configure writes a Makefile where it runs), and
# copies out what the module's compilation needs: the generated headers and the
# module list.
#   configure-nginx.sh NGINX_SRC MODULE_DIR OUTDIR
set -euo pipefail
src=$1
module=$(cd "$2" && pwd)
out=$3
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/nginx-src
rm -rf "$work"
cp -r "$src" "$work"
cd "$work"
# shellcheck disable=SC1091
. ./conf_flags
./configure "${NGX_CONF_FLAGS[@]}" --add-dynamic-module="$module" --builddir="$work/objs" >"$out/configure.log" 2>&1 ||
        { cat "$out/configure.log" >&2; exit 1; }
for f in ngx_auto_config.h ngx_auto_headers.h ngx_http_shmzone_module_modules.c; do
        cp "objs/$f" "$out/$f"
done
