#!/usr/bin/env bash
# The main job without pmem hardware: an ordinary file stands in for pmem.
# Builds pcache (release; cargo shows its progress: the first build takes a
# few minutes), formats /tmp/pcache-demo/pmem.img (1 GiB) unless it already
# exists (an existing image is never reformatted or removed: if it is not a
# usable cache, attach says why and stops), creates a 1 GiB backing file
# beside it (sparse), and runs `pcache attach` in the foreground, serving the
# backing file over NBD until Ctrl-C (the cache stays warm for the next run).
#
#   bash scripts/demo.sh [DIR] [LISTEN]
#
# DIR     where the two files live (default /tmp/pcache-demo)
# LISTEN  where to serve: tcp:HOST:PORT, unix:PATH, or a bare PORT on
#         127.0.0.1 (default $PCACHE_DEMO_LISTEN, else tcp:127.0.0.1:10809)
#
# The arguments may come in either order: one that starts with tcp: or
# unix:, or is a number, is LISTEN. For example
#
#   bash scripts/demo.sh tcp:127.0.0.1:10810
#   PCACHE_DEMO_LISTEN=unix:/tmp/pcache-demo.sock bash scripts/demo.sh
set -euo pipefail
# Relative paths given are relative to where the script was started.
here="$PWD"
cd "$(dirname "$0")/.."

die() {
  echo "demo.sh: $*" >&2
  exit 64
}

dir=""
listen="${PCACHE_DEMO_LISTEN:-}"
for arg in "$@"; do
  case "$arg" in
    tcp:* | unix:*) listen="$arg" ;;
    /* | ./* | ../* | *[!0-9]*)
      case "$arg" in /* | ./* | ../*) ;; *:*) die "LISTEN must be tcp:HOST:PORT, unix:PATH or a port number, not '$arg'" ;; esac
      [ -z "$dir" ] || die "two directories given ('$dir', '$arg'); usage: bash scripts/demo.sh [DIR] [LISTEN]"
      dir="$arg"
      ;;
    '') ;;
    *) listen="tcp:127.0.0.1:$arg" ;;
  esac
done
dir="${dir:-/tmp/pcache-demo}"
case "$dir" in /*) ;; *) dir="$here/$dir" ;; esac
listen="${listen:-tcp:127.0.0.1:10809}"
case "$listen" in unix:/*) ;; unix:?*) listen="unix:$here/${listen#unix:}" ;; esac

# The NBD URI of the export "disk.img" for a LISTEN address, as qemu-io and
# nbdinfo take it.
case "$listen" in
  unix:?*)
    # Quoted: a shell would take the ? for a wildcard.
    uri="'nbd+unix:///disk.img?socket=${listen#unix:}'"
    ;;
  tcp:*:*)
    hostport="${listen#tcp:}"
    host="${hostport%:*}"
    port="${hostport##*:}"
    case "$port" in '' | *[!0-9]*) die "'$port' is not a TCP port in LISTEN '$listen'" ;; esac
    host="${host#[}"
    host="${host%]}"
    [ -n "$host" ] || die "LISTEN '$listen' has no host; e.g. tcp:127.0.0.1:10810"
    case "$host" in *:*) host="[$host]" ;; esac # IPv6
    uri="nbd://$host:$port/disk.img"
    case "$host" in *:*) uri="'$uri'" ;; esac # [ and ] are shell wildcards
    ;;
  *) die "LISTEN must be tcp:HOST:PORT, unix:PATH or a port number, not '$listen'" ;;
esac

# Cargo's target directory: CARGO_TARGET_DIR if set (relative to the repo,
# as cargo takes it from here), else ./target.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
mkdir -p "$dir"
echo "building pcache (release; the first build takes a few minutes)…"
cargo build --release --bin pcache
pcache="$target/release/pcache"
if [ ! -e "$dir/pmem.img" ]; then
  "$pcache" format "$dir/pmem.img" --size 1G
fi
[ -e "$dir/disk.img" ] || truncate -s 1G "$dir/disk.img"
echo
echo "in a second terminal, while this one serves:"
echo "  qemu-io -f raw -c 'write -P 0xab 0 1m' -c 'flush' -c 'read -P 0xab 0 1m' $uri"
echo
exec "$pcache" attach "$dir/pmem.img" --backing "$dir/disk.img" --listen "$listen"
