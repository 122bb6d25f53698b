#!/usr/bin/env bash
# Remote backing benchmark: fio --ioengine=nbd, 4 KiB random reads and
# writes at iodepth 1 and 16, against a remote store alone and through
# `pcache attach` in front of that same store, in one run. Prints IOPS and
# the ratio (cache / remote alone).
#
#   bash scripts/bench-remote.sh [SECONDS_PER_JOB]     (default 10)
#
# The remote store is `nbdkit file` of a file on disk behind nbdkit's delay
# filter (BENCH_REMOTE_DELAY per request, default 1ms: a network round trip
# within a data centre, plus the store's own latency), reached over TCP on
# loopback, as a store on another host would be. The cache is the README's
# demo configuration: the pmem device an ordinary file on disk (made
# durable by msync, with group commit). Reads are measured warm (every
# block written once through the cache first), writes as they come.
#
# Needs fio, nbdkit and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
secs="${1:-10}"
delay="${BENCH_REMOTE_DELAY:-1ms}"
size=256M
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet --bin pcache
pcache="$target/release/pcache"
"$pcache" format "$work/pmem.img" --size 1G >/dev/null
truncate -s "$size" "$work/remote.img"
port=$(free_port)
nbdkit --foreground --port "$port" --ipaddr 127.0.0.1 --filter=delay file "$work/remote.img" \
  rdelay="$delay" wdelay="$delay" >"$work/nbdkit.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
remote_uri="nbd://127.0.0.1:$port/"
PCACHE_LOG=error "$pcache" attach "$work/pmem.img" --backing "$remote_uri" --export vol \
  --cache-size 768M --listen "unix:$work/pcache.sock" --control "$work/control" >"$work/attach.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/pcache.sock" ] && break; sleep 0.1; done
pcache_uri="nbd+unix:///vol?socket=$work/pcache.sock"

fio --name=warm --ioengine=nbd --uri="$pcache_uri" --rw=write --bs=1M --size="$size" --iodepth=4 \
  --output-format=terse >/dev/null

iops() { # uri rw depth
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --size="$size" --iodepth="$3" \
    --time_based --runtime="$secs" --output-format=json |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))'
}

# Waits until writeback has caught up, so that the remote store is idle
# when it is measured alone.
drain() {
  for _ in $(seq 600); do
    "$pcache" status --control "$work/control" --json |
      python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if all(e["dirty_bytes"] == 0 for e in v["exports"]) else 1)' &&
      return 0
    sleep 0.1
  done
}

echo "remote: nbdkit file on disk, $delay per request, over TCP; cache: $(head -1 "$work/attach.log" | sed 's/^[^:]*: //')"
printf '%-22s %14s %14s %8s\n' "4 KiB job" "remote alone" "through pcache" "ratio"
for rw in randread randwrite; do
  for depth in 1 16; do
    drain
    a=$(iops "$remote_uri" "$rw" "$depth")
    b=$(iops "$pcache_uri" "$rw" "$depth")
    printf '%-22s %14d %14d %7.2fx\n' "$rw iodepth $depth" "$a" "$b" "$(python3 -c "print($b/max($a,1))")"
  done
done
echo "($secs s per job, $size export, $(nproc) CPUs)"
"$pcache" status --control "$work/control" | sed -n '1,5p'
