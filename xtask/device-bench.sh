#!/usr/bin/env bash
# Runs the bench on a machine with no cargo, HAProxy, nginx or iproute2, from a
# directory made by xtask/device-carry.sh. Run as root from the workspace root:
#   bash xtask/device-bench.sh target/device-carry [extra `xtask bench` flags]
# Without extra flags it runs every scenario at the `--short` sizes. The JSON, the
# log, the table and (when every path worked) BENCHMARKS.md land in $OUT, or in
# target/device-out without it.
set -euo pipefail

carry=$(realpath "${1:?usage: device-bench.sh CARRY_DIR [xtask bench flags]}")
shift
out=${OUT:-$PWD/target/device-out}
mkdir -p "$out"
flags=("$@")
((${#flags[@]})) || flags=(--short)

export PATH="$carry/bin:$PATH"
# For the version lines below; the bench sets it for its children itself.
peers_env=(env LD_LIBRARY_PATH="$carry/lib")
{
    echo "device-bench: $(nproc) CPUs, kernel $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
    "${peers_env[@]}" haproxy -v | awk 'NR == 1'
    "${peers_env[@]}" nginx -v 2>&1
    "${peers_env[@]}" ip -V
} | tee "$out/host.txt"

# The carried xtask was built elsewhere: its workspace is this directory.
export XTASK_WORKSPACE_ROOT=$PWD
cp BENCHMARKS.md "$out/BENCHMARKS.before.md"
status=0
"$carry/bin/xtask" bench --bin-dir "$carry/bin" --peers-dir "$carry" \
    --json "$out/bench.json" "${flags[@]}" 2>&1 | tee "$out/bench.log" || status=$?
# The table is the log from its title line on.
sed -n '/^interceptor bench (/,$p' "$out/bench.log" >"$out/table.txt" || true
if ! cmp -s BENCHMARKS.md "$out/BENCHMARKS.before.md"; then
    cp BENCHMARKS.md "$out/BENCHMARKS.md"
fi
rm -f "$out/BENCHMARKS.before.md"
exit "$status"
