#!/usr/bin/env bash
# The real-pmem rig: runs pcache on real DAX inside a QEMU guest with an
# emulated NVDIMM, and the Linux kernel's NBD client on top of it.
#
#   bash tests/vm/run.sh
#
# On the host it
#   - fetches with `apt-get download` (never installs) QEMU, its firmware and
#     libraries, a Debian kernel with its modules, busybox-static, ndctl,
#     e2fsprogs, nbd-client and kmod, and unpacks them with `dpkg -x` into
#     tests/vm/cache/ (git ignores it; the .debs stay there, so a second run
#     needs no network);
#   - builds a statically linked `pcache` (target dir tests/vm/cache/target);
#   - builds an initramfs: busybox, pcache, ndctl, mke2fs, nbd-client with the
#     libraries they link, the kernel modules, and tests/vm/guest-init.sh as
#     /init;
#   - boots the guest twice under TCG (KVM does not work on these machines)
#     with a 2 GiB NVDIMM backed by tests/vm/cache/run/nvdimm.img, a 512 MiB
#     backing disk (/dev/vdb in the guest) and a 16 MiB state disk (/dev/vda)
#     that carries checksums across the power loss. Boot 1 (pcache.phase=1)
#     runs steps 1-4 and ends with `echo b > /proc/sysrq-trigger` while
#     `pcache attach` is serving a mounted file system with writes in flight;
#     boot 2 (pcache.phase=2) recovers on the same NVDIMM and disks and runs
#     steps 4-5 (see guest-init.sh);
#   - reads the PASS/FAIL lines from the serial console and exits 0 only if
#     every expected step printed PASS.
#
# Environment:
#   PCACHE_VM_TIMEOUT   seconds allowed per boot (default 300; a boot takes ~20-60 s)
#   PCACHE_VM_KERNEL    Debian kernel metapackage (default linux-image-6.12-amd64)
#   PCACHE_VM_REFRESH=1 download the packages again (after a Debian point release)
#   PCACHE_VM_KEEP=1    keep the run's images and initramfs for inspection
#
# Needs: Debian (bookworm) with apt package lists (`apt-get update`), dpkg,
# cargo, ldd; nothing is installed into / and nothing is left running. The
# QEMU process is killed on any exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="$here/cache"
debs="$cache/debs"
root="$cache/root"
run="$cache/run"
timeout_s=${PCACHE_VM_TIMEOUT:-300}
kernel_meta=${PCACHE_VM_KERNEL:-linux-image-6.12-amd64}
t0=$(date +%s)

# What the guest must report, boot by boot.
steps_phase1="1-fsdax-namespace 1-fsdax-format 1-fsdax-inspect 1-fsdax-check
  2-devdax-namespace 2-devdax-format 2-devdax-inspect 2-devdax-check
  3-attach 3-write 3-stop 3-reattach-verify 3-check 4-write-sync"
steps_phase2="4-check-after-power-loss 4-recover-verify 4-check
  5-detach 5-verify-backing 5-check"

# Host packages (and, through `apt-get -s install`, every library they need
# that this machine lacks). The kernel is fetched alone: its dependencies
# (kmod, initramfs-tools) are host tooling.
packages="qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu
  busybox-static ndctl e2fsprogs nbd-client kmod"

say() { printf '== vm [%3d s]: %s\n' "$(($(date +%s) - t0))" "$*"; }
die() {
  printf 'vm: FAILED: %s\n' "$*" >&2
  printf 'vm: took %d s\n' "$(($(date +%s) - t0))" >&2
  exit 1
}

qemu_pid=""
cleanup() {
  local rc=$?
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    echo "vm: QEMU $qemu_pid killed" >&2
  fi
  qemu_pid=""
  rm -f "$run"/qemu-phase*.pid
  rm -rf "$cache/initrd.d"
  if [ "${PCACHE_VM_KEEP:-0}" != 1 ]; then
    rm -f "$run/nvdimm.img" "$run/backing.img" "$run/state.img" "$cache/initrd.cpio"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "vm: interrupted (SIGINT)" >&2; exit 130' INT
trap 'echo "vm: interrupted (SIGTERM)" >&2; exit 143' TERM

# ---------------------------------------------------------------- checks ---

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is missing; $2"
}
need apt-get "this rig needs a Debian host (apt-get download)"
need apt-cache "this rig needs a Debian host"
need dpkg "this rig needs a Debian host (dpkg -x)"
need ldd "install libc-bin"
need cargo "install Rust (rustup) to build pcache"
need flock "install util-linux"
[ "$(uname -m)" = x86_64 ] || die "the rig boots an x86_64 guest with TCG and needs an x86_64 host"
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] ||
  die "a static pcache needs glibc's static library: apt-get install libc6-dev"
mkdir -p "$debs" "$run"
# One run at a time per cache folder.
exec 9>"$cache/.lock"
flock -n 9 || die "another tests/vm/run.sh is using $cache"
# A QEMU left by a run that was killed outright (SIGKILL: no trap ran) still
# holds the images: end it, by its pid file, if it is ours.
for pidfile in "$run"/qemu-phase*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile" 2>/dev/null || true)
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  if [ -n "$pid" ] && [[ "$cmdline" == *"$run/nvdimm.img"* ]]; then
    say "ending QEMU $pid left by an earlier run"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done

# -------------------------------------------------------------- packages ---

fetch_debs() {
  local want list kpkg closure missing=() p
  want=$(printf '%s\n' $packages "meta:$kernel_meta" | sort -u | tr '\n' ' ')
  if [ "${PCACHE_VM_REFRESH:-0}" != 1 ] && [ -f "$debs/.complete" ] &&
    [ "$(head -1 "$debs/.complete")" = "$want" ]; then
    local ok=1
    while read -r f; do [ -f "$debs/$f" ] || ok=0; done < <(tail -n +2 "$debs/.complete")
    if [ "$ok" = 1 ]; then
      say "packages: cached in $debs ($(($(wc -l <"$debs/.complete") - 1)) .debs)"
      return
    fi
  fi
  say "packages: resolving with apt (nothing is installed)"
  kpkg=$(apt-cache depends "$kernel_meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
  if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
    say "packages: apt knows no '$kernel_meta'; running apt-get update"
    apt-get update -q >"$cache/apt-update.log" 2>&1 || true
    kpkg=$(apt-cache depends "$kernel_meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
  fi
  [ -n "$kpkg" ] || die "apt knows no '$kernel_meta'; run 'apt-get update' first (configured bookworm sources)"
  # The packages apt would install on this machine: exactly the libraries it
  # lacks. A simulation only; qemu-system-x86 would remove qemu-utils 10 if
  # really installed, which is why nothing is.
  if ! closure=$(apt-get -s -q install --no-install-recommends $packages 2>&1); then
    printf '%s\n' "$closure" | tail -20 >&2
    die "apt-get -s install could not resolve the packages; run 'apt-get update' first"
  fi
  list=$(
    {
      printf '%s\n' $packages "$kpkg"
      printf '%s\n' "$closure" | awk '/^Inst / {print $2}'
    } | sort -u
  )
  for p in $list; do
    compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  if [ "${PCACHE_VM_REFRESH:-0}" = 1 ]; then missing=($list); fi
  if [ "${#missing[@]}" -ne 0 ]; then
    say "packages: apt-get download ${#missing[@]} package(s) into $debs"
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >"$cache/apt-download.log" 2>&1) || {
      tail -20 "$cache/apt-download.log" >&2
      die "apt-get download failed (log: $cache/apt-download.log); is the Debian mirror reachable, and 'apt-get update' done?"
    }
  fi
  {
    echo "$want"
    for p in $list; do (cd "$debs" && ls -t "${p}"_*.deb | sed -n 1p); done
  } >"$debs/.complete.new"
  mv "$debs/.complete.new" "$debs/.complete"
  # Drop .debs that the list no longer names (older versions after a refresh).
  for f in "$debs"/*.deb; do
    grep -q -x -F "$(basename "$f")" "$debs/.complete" || rm -f "$f"
  done
}

extract_debs() {
  local stamp
  stamp=$(tail -n +2 "$debs/.complete" | tr '\n' ' ')
  if [ -f "$root/.stamp" ] && [ "$(cat "$root/.stamp")" = "$stamp" ]; then
    return
  fi
  say "packages: unpacking into $root (dpkg -x)"
  rm -rf "$root"
  mkdir -p "$root"
  for f in $stamp; do dpkg -x "$debs/$f" "$root"; done
  echo "$stamp" >"$root/.stamp"
}

fetch_debs
extract_debs

libpath="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
qemu="$root/usr/bin/qemu-system-x86_64"
busybox="$root/bin/busybox"
[ -x "$qemu" ] || die "no $qemu after unpacking; delete $cache and run again"
[ -x "$busybox" ] || die "no busybox in busybox-static; delete $cache and run again"
qemu_libs=$(LD_LIBRARY_PATH="$libpath" ldd "$qemu" 2>&1 || true)
if [[ "$qemu_libs" == *"not found"* ]]; then
  grep 'not found' <<<"$qemu_libs" >&2
  die "QEMU lacks the libraries above; PCACHE_VM_REFRESH=1 bash tests/vm/run.sh fetches them again"
fi
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu" # accel-tcg-x86_64.so

kdir=$(ls -d "$root"/lib/modules/*/kernel "$root"/usr/lib/modules/*/kernel 2>/dev/null | sed -n 1p || true)
[ -n "$kdir" ] || die "no kernel modules unpacked under $root/lib/modules"
kver=$(basename "$(dirname "$kdir")")
vmlinuz="$root/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "no $vmlinuz"
moddir="$root/lib/modules/$kver"
[ -d "$moddir" ] || moddir="$root/usr/lib/modules/$kver"
modbase=$(dirname "$(dirname "$(dirname "$moddir")")")
kmod() { # kmod picks its command from argv[0]
  local cmd=$1
  shift
  (
    export LD_LIBRARY_PATH="$libpath"
    exec -a "$cmd" "$root/bin/kmod" "$@"
  )
}
if [ ! -f "$moddir/modules.dep" ] || [ "$moddir/modules.dep" -ot "$root/.stamp" ]; then
  kmod depmod -b "$modbase" "$kver" || die "depmod failed on $moddir"
fi

# ------------------------------------------------------------------ build ---

say "build: static pcache (target dir tests/vm/cache/target)"
(
  cd "$repo"
  CARGO_TARGET_DIR="$cache/target" CARGO_PROFILE_RELEASE_DEBUG=0 \
    RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --quiet --target x86_64-unknown-linux-gnu --bin pcache
) || die "cargo build of the static pcache failed"
pcache_bin="$cache/target/x86_64-unknown-linux-gnu/release/pcache"
pcache_libs=$(ldd "$pcache_bin" 2>&1 || true)
if [[ "$pcache_libs" == *"=>"* ]]; then die "$pcache_bin is not statically linked"; fi

# -------------------------------------------------------------- initramfs ---

say "initramfs: kernel $kver"
stage="$cache/initrd.d"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,lib/x86_64-linux-gnu,lib64,lib/modules,etc,proc,sys,dev,tmp,run,mnt}
cp "$busybox" "$stage/bin/busybox"
cp "$pcache_bin" "$stage/usr/local/bin/pcache"
cp "$here/guest-init.sh" "$stage/init"
chmod 755 "$stage/init"
[ -f "$root/etc/mke2fs.conf" ] && cp "$root/etc/mke2fs.conf" "$stage/etc/"

# Dynamically linked guest tools, with the libraries ldd names (the unpacked
# ones first, then the host's: the host's glibc is the guest's).
find_bin() {
  local d
  for d in usr/sbin sbin usr/bin bin; do
    if [ -f "$root/$d/$1" ]; then
      echo "$root/$d/$1"
      return
    fi
  done
  die "no $1 among the unpacked packages"
}
for b in ndctl mke2fs e2fsck nbd-client; do
  src=$(find_bin "$b")
  cp "$src" "$stage/usr/local/bin/$b"
  out=$(LD_LIBRARY_PATH="$libpath" ldd "$src") || die "ldd $src failed"
  if grep -q 'not found' <<<"$out"; then
    grep 'not found' <<<"$out" >&2
    die "$b lacks the libraries above"
  fi
  while read -r lib; do
    case "$lib" in
    */ld-linux-x86-64.so.2) cp -L "$lib" "$stage/lib64/ld-linux-x86-64.so.2" ;;
    *) cp -L "$lib" "$stage/lib/x86_64-linux-gnu/" ;;
    esac
  done < <(awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' <<<"$out")
done

# Kernel modules in load order, decompressed (busybox insmod).
mods="nfit nd_pmem nd_btt dax_pmem device_dax ext4 crc32c_generic virtio_pci virtio_blk nbd"
: >"$stage/etc/modules.order"
for m in $mods; do
  deps=$(kmod modprobe -C /dev/null -d "$modbase" -S "$kver" --show-depends "$m" 2>&1) ||
    die "module $m: $deps"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    name=$(basename "$path")
    name=${name%.xz}
    name=${name%.zst}
    grep -qx "$name" "$stage/etc/modules.order" && continue
    case "$path" in
    *.xz) "$busybox" unxz -c "$path" >"$stage/lib/modules/$name" ;;
    *.zst) zstd -q -d -c "$path" >"$stage/lib/modules/$name" ;;
    *) cp "$path" "$stage/lib/modules/$name" ;;
    esac
    echo "$name" >>"$stage/etc/modules.order"
  done <<<"$deps"
done
(cd "$stage" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) >"$cache/initrd.cpio"
say "initramfs: $(($(stat -c %s "$cache/initrd.cpio") / 1024 / 1024)) MiB, $(wc -l <"$stage/etc/modules.order") modules"

# ------------------------------------------------------------------ boots ---

rm -f "$run"/nvdimm.img "$run"/backing.img "$run"/state.img "$run"/console-phase* "$run"/qemu-phase*.log
truncate -s 2G "$run/nvdimm.img"
truncate -s 512M "$run/backing.img"
truncate -s 16M "$run/state.img"

passed=0
failed=0
# boot PHASE: boots the guest, prints its PASS/FAIL lines as they come, and
# checks that every expected step passed and the guest reached its end
# marker. Returns non-zero otherwise.
boot() {
  local phase=$1 expected=$2 marker=$3 log="$run/console-phase$1.log" qlog="$run/qemu-phase$1.log"
  local start seen=0 rc=0 s
  # Console lines shown as they come: verdicts, the guest's summary, and
  # pcache check's notes.
  local shown='^(PASS |FAIL |guest: |note: |POWER-LOSS |    /dev/dax0.0: note: )'
  start=$(date +%s)
  : >"$log"
  say "boot $phase: pcache.phase=$phase (TCG; console log $log)"
  LD_LIBRARY_PATH="$libpath" "$qemu" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" \
    -accel tcg -cpu max -smp 2 -m 1G,slots=2,maxmem=4G -machine pc,nvdimm=on \
    -object memory-backend-file,id=nv,share=on,mem-path="$run/nvdimm.img",size=2G \
    -device nvdimm,memdev=nv,id=nvdimm0 \
    -drive file="$run/state.img",format=raw,if=virtio \
    -drive file="$run/backing.img",format=raw,if=virtio \
    -kernel "$vmlinuz" -initrd "$cache/initrd.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 pcache.phase=$phase" \
    -display none -monitor none -parallel none -serial file:"$log" -net none -no-reboot \
    -pidfile "$run/qemu-phase$phase.pid" \
    </dev/null >"$qlog" 2>&1 &
  qemu_pid=$!
  while :; do
    # Print the verdict lines that arrived since the last look.
    local n
    n=$(grep -c -a -E "$shown" "$log" || true)
    if [ "$n" -gt "$seen" ]; then
      grep -a -E "$shown" "$log" | tr -d '\r' | sed -n "$((seen + 1)),${n}s/^/  /p"
      seen=$n
    fi
    kill -0 "$qemu_pid" 2>/dev/null || break
    if [ $(($(date +%s) - start)) -ge "$timeout_s" ]; then
      kill -KILL "$qemu_pid" 2>/dev/null || true
      echo "  FAIL boot-$phase: timed out after $timeout_s s (PCACHE_VM_TIMEOUT)"
      rc=1
      break
    fi
    sleep 1
  done
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
  rm -f "$run/qemu-phase$phase.pid"
  n=$(grep -c -a -E "$shown" "$log" || true)
  if [ "$n" -gt "$seen" ]; then
    grep -a -E "$shown" "$log" | tr -d '\r' | tail -n +$((seen + 1)) | sed 's/^/  /'
  fi
  tr -d '\r' <"$log" | grep -a -E '^(PASS|FAIL) ' >"$log.verdict" || true
  local notrun=""
  for s in $expected; do
    if grep -q -E "^PASS $s( |\$)" "$log.verdict"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1))
      grep -q -E "^FAIL $s:" "$log.verdict" || notrun="$notrun $s"
      rc=1
    fi
  done
  [ -z "$notrun" ] || echo "  FAIL not run (the guest stopped before them):$notrun"
  if ! grep -a -q "$marker" "$log"; then
    echo "  boot $phase: the guest did not reach '$marker'"
    rc=1
  fi
  say "boot $phase took $(($(date +%s) - start)) s"
  if [ "$rc" != 0 ]; then
    echo "---- last 60 lines of the guest console ($log):"
    tr -d '\r' <"$log" | tail -60
    if [ -s "$qlog" ]; then
      echo "---- QEMU ($qlog):"
      tail -20 "$qlog"
    fi
    echo "----"
  fi
  return "$rc"
}

count_all() { # steps that never ran because an earlier boot failed
  local s
  for s in $1; do failed=$((failed + 1)); done
}

ok=1
if boot 1 "$steps_phase1" "POWER-LOSS phase 1"; then
  boot 2 "$steps_phase2" "DONE phase 2" || ok=0
else
  ok=0
  count_all "$steps_phase2"
  echo "  (boot 2 skipped: boot 1 failed)"
fi

echo "vm: $passed passed, $failed failed"
echo "vm: took $(($(date +%s) - t0)) s"
[ "$ok" = 1 ] && [ "$failed" = 0 ] || exit 1
