#!/usr/bin/env bash
# Collects what `xtask/device-bench.sh` needs on a machine without cargo, HAProxy,
# nginx or iproute2 into one directory (default target/device-carry):
#   bin/      interceptor and xtask (release, stripped), haproxy, nginx, ip
#   lib/      the shared libraries those need, except glibc's own (the target's
#             newer glibc serves binaries built against this one)
#   modules/  nginx's ngx_stream_module.so
# Run it here, after `cargo build --release -p interceptor -p xtask`, with haproxy,
# nginx, libnginx-mod-stream and iproute2 installed (`cargo xtask setup` plus
# `apt-get install haproxy nginx libnginx-mod-stream`).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
carry=${1:-$root/target/device-carry}
release=${CARGO_TARGET_DIR:-$root/target}/release
stream_module=/usr/lib/nginx/modules/ngx_stream_module.so
# Budget for everything carried to the device, together with the working tree.
limit_bytes=$((48 << 20))

rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/lib" "$carry/modules"
for binary in interceptor xtask; do
    [[ -x $release/$binary ]] || {
        echo "device-carry: $release/$binary is missing: cargo build --release -p interceptor -p xtask" >&2
        exit 1
    }
    # Debug info is most of a release binary's size and nothing the bench reads.
    strip -o "$carry/bin/$binary" "$release/$binary"
done
for tool in haproxy nginx ip; do
    found=$(command -v "$tool") || {
        echo "device-carry: $tool is not installed here" >&2
        exit 1
    }
    cp -L "$found" "$carry/bin/$tool"
done
cp -L "$stream_module" "$carry/modules/"

# glibc's libraries come with the target's glibc and must match its loader.
glibc='^(linux-vdso|ld-linux|libc|libm|libpthread|libdl|librt|libresolv|libutil|libanl|libnss_[a-z]+|libBrokenLocale)\.so'
for object in "$carry"/bin/* "$carry"/modules/*; do
    ldd "$object" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }'
done | sort -u | while read -r name path; do
    [[ $name =~ $glibc ]] && continue
    cp -L "$path" "$carry/lib/$name"
done

# Every library must now resolve to the carried copy (or to glibc).
for object in "$carry"/bin/* "$carry"/modules/*; do
    LD_LIBRARY_PATH=$carry/lib ldd "$object" | awk -v lib="$carry/lib/" -v glibc="$glibc" '
        $2 == "=>" && $1 !~ glibc && index($3, lib) != 1 { print FILENAME ": " $0; bad = 1 }
        /not found/ { print; bad = 1 }
        END { exit bad }' || {
        echo "device-carry: $object needs a library that is not carried" >&2
        exit 1
    }
done

bytes=$(du -sb "$carry" | cut -f1)
echo "device-carry: $carry holds $((bytes >> 20)) MiB:"
ls -l "$carry/bin" "$carry/lib" "$carry/modules" | sed 's/^/  /'
if ((bytes > limit_bytes)); then
    echo "device-carry: more than $((limit_bytes >> 20)) MiB: the device carry is limited to 64 MiB with the working tree" >&2
    exit 1
fi
