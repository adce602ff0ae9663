#!/usr/bin/env bash
# Interleaved A/B of `tiller bench` binaries on a shared machine: runs each binary in turn,
# ROUNDS times, and prints one line per run (1-minute load average, forward images/s, train
# steps/s), then the median per binary. Usage:
#   scripts/bench/ab.sh ROUNDS name=path/to/tiller [name=path ...]
# A name ending in "+malloc" runs its binary with glibc's mmap threshold pinned at 32 MiB and
# trimming off (see docs/design/performance.md, "Allocation").
set -euo pipefail
rounds=$1; shift
tmp=$(mktemp)
for r in $(seq "$rounds"); do
  for spec in "$@"; do
    name=${spec%%=*}; bin=${spec#*=}
    env=()
    [[ $name == *+malloc ]] && env=(GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295)
    load=$(cut -d' ' -f1 /proc/loadavg)
    read -r fwd train < <(env "${env[@]}" "$bin" bench --reps 5 --chain-steps 0 2>/dev/null \
      | awk -F'|' '/^\| forward /{f=$4} /^\| train step/{t=$4} END{print f, t}')
    echo "$name load=$load forward=$fwd train=$train" | tee -a "$tmp"
  done
done
echo "medians:"
med() { sort -g | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
for spec in "$@"; do
  name=${spec%%=*}
  f=$(grep "^$name " "$tmp" | sed 's/.*forward=\([^ ]*\).*/\1/' | med)
  t=$(grep "^$name " "$tmp" | sed 's/.*train=\([^ ]*\).*/\1/' | med)
  echo "$name forward $f images/s, train $t steps/s ($(grep -c "^$name " "$tmp") runs)"
done
rm -f "$tmp"
