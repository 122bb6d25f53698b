#!/bin/busybox sh
# /init of the real-pmem rig's guest (built into the initramfs by
# tests/vm/run.sh). Each step prints `PASS <step> [detail]` or
# `FAIL <step>: <reason>` on the serial console; the first failure ends the
# boot. The kernel command line says which boot this is:
#
#   pcache.phase=1  1 fsdax: ndctl -m fsdax, ext4 -o dax=always, pcache format
#                     of a file on it (must map "file DAX, MAP_SYNC"),
#                     inspect, check
#                   2 devdax: ndctl -m devdax, pcache format /dev/dax0.0 (must
#                     map "device DAX"), inspect, check
#                   3 pcache attach /dev/dax0.0 --backing /dev/vdb, the kernel
#                     NBD client on /dev/nbd0, ext4, 200 files, sync,
#                     checksums; graceful stop (SIGTERM, exit 0); attach
#                     again and verify; check
#                   4 attach again with writeback slowed to 64 KiB/s, write
#                     and sync 50 more files (dirty in pmem only), store every
#                     checksum on /dev/vda, start unsynced writes, then cut the
#                     machine off: echo b > /proc/sysrq-trigger
#   pcache.phase=2  4 same NVDIMM and disks: check, attach, verify every synced
#                     file of steps 3 and 4, stop, check
#                   5 attach, write and sync 30 more files under a slow
#                     writeback, SIGKILL attach, pcache detach (it must write
#                     dirty data back), then mount /dev/vdb without the cache and
#                     verify every file again; check
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
# busybox sh runs its own applets before PATH (and has mke2fs, e2fsck and
# nbd-client applets): the real tools go by full path.
NBD_CLIENT=/usr/local/bin/nbd-client
MKE2FS=/usr/local/bin/mke2fs
E2FSCK=/usr/local/bin/e2fsck
NDCTL=/usr/local/bin/ndctl
PCACHE=/usr/local/bin/pcache
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt/p /mnt/n /mnt/b
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 >/proc/sys/kernel/sysrq

PHASE=0
for a in $(cat /proc/cmdline); do
  case "$a" in pcache.phase=*) PHASE=${a#pcache.phase=} ;; esac
done

DEV=/dev/dax0.0
BACKING=/dev/vdb
STATE=/dev/vda
EXPORT=vdb
SOCK=/run/pcache.sock
ATTACH_PID=
STEP=boot

finish() {
  sync
  echo "DONE phase $PHASE"
  poweroff -f
  sleep 60
}

# fail REASON [LOGFILE]: prints the verdict, the log's tail, and ends the boot.
fail() {
  echo "FAIL $STEP: $1"
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    tail -n 25 "$2" | sed 's/^/    | /'
  fi
  if [ -n "$ATTACH_PID" ] && [ -f /tmp/attach.log ] && [ "${2:-}" != /tmp/attach.log ]; then
    echo "    pcache attach log:"
    tail -n 15 /tmp/attach.log | sed 's/^/    | /'
  fi
  finish
}
pass() { echo "PASS $STEP${1:+ ($1)}"; }

# run CMD...: runs CMD with its output in /tmp/out; fails the step when it
# exits non-zero.
run() {
  "$@" >/tmp/out 2>&1 || fail "'$*' exited $?" /tmp/out
}

# ------------------------------------------------------------- helpers ---

wait_for() { # wait_for SECONDS TEST...: polls every 0.2 s
  local n=$(($1 * 5))
  shift
  while ! "$@"; do
    n=$((n - 1))
    [ "$n" -gt 0 ] || return 1
    sleep 0.2
  done
}

# attach [OPTION...]: starts pcache attach in the background and connects
# the kernel's NBD client to it as /dev/nbd0.
attach() {
  rm -f "$SOCK"
  : >/tmp/attach.log # truncated here, before the wait below reads it
  $PCACHE attach "$DEV" --backing "$BACKING" --listen "unix:$SOCK" "$@" >/tmp/attach.log 2>&1 &
  ATTACH_PID=$!
  wait_for 120 grep -q '^listening on' /tmp/attach.log ||
    fail "pcache attach did not start listening within 120 s" /tmp/attach.log
  head -1 /tmp/attach.log | grep -q ': device DAX (flush: ' ||
    fail "pcache attach does not map $DEV as device DAX: $(head -1 /tmp/attach.log)" /tmp/attach.log
  nbd_size() { [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ]; }
  timeout 60 $NBD_CLIENT -unix "$SOCK" /dev/nbd0 -N "$EXPORT" >/tmp/out 2>&1 ||
    fail "nbd-client -unix $SOCK /dev/nbd0 -N $EXPORT failed" /tmp/out
  wait_for 30 nbd_size || fail "/dev/nbd0 has no size after nbd-client connected"
}

# stop: unmounts /mnt/n if mounted, disconnects /dev/nbd0 and stops attach
# with SIGTERM; it must exit 0.
stop() {
  if grep -q ' /mnt/n ' /proc/mounts; then run timeout 120 umount /mnt/n; fi
  run timeout 60 $NBD_CLIENT -d /dev/nbd0
  kill -TERM "$ATTACH_PID"
  gone() { [ ! -d "/proc/$ATTACH_PID" ] || grep -q '^[0-9]* ([^)]*) Z' "/proc/$ATTACH_PID/stat" 2>/dev/null; }
  wait_for 60 gone || fail "pcache attach did not exit within 60 s of SIGTERM" /tmp/attach.log
  local rc=0
  wait "$ATTACH_PID" || rc=$?
  ATTACH_PID=
  [ "$rc" = 0 ] || fail "pcache attach exited $rc after SIGTERM (want 0)" /tmp/attach.log
}

# dirty: the live-keys line of pcache inspect (how much only pmem holds).
dirty() {
  $PCACHE inspect "$DEV" 2>&1 | grep -m1 '^  live keys' | tr -s ' ' | sed 's/^ //'
}

# make_files DIR COUNT: COUNT files of random sizes (1 B to 1 MiB) from
# /dev/urandom, in 10 subdirectories.
make_files() {
  local i=0 n d
  while [ "$i" -lt "$2" ]; do
    d="$1/d$((i % 10))"
    mkdir -p "$d"
    case $((i % 4)) in
    0) n=$((RANDOM % 4096 + 1)) ;;
    1) n=$((RANDOM * 32 % 1048576 + 1)) ;;
    *) n=$((RANDOM % 65536 + 1)) ;;
    esac
    head -c "$n" /dev/urandom >"$d/f$i" || return 1
    i=$((i + 1))
  done
}

# sums DIR(relative to /mnt/n) OUT: sha256 of every file under DIR.
sums() {
  (cd "$3" && find "$1" -type f | sort | xargs sha256sum) >"$2" || fail "sha256sum of $1 failed"
}

# verify SUMFILE MOUNTPOINT: every checksum must match.
verify() {
  local bad
  (cd "$2" && sha256sum -c "$1") >/tmp/verify.out 2>&1
  bad=$(grep -v ': OK$' /tmp/verify.out | head -5)
  [ -z "$bad" ] || fail "checksums differ in $2 ($1): $(echo $bad)" /tmp/verify.out
  [ "$(grep -c ': OK$' /tmp/verify.out)" = "$(wc -l <"$1")" ] ||
    fail "checksums: $(grep -c ': OK$' /tmp/verify.out) of $(wc -l <"$1") files OK ($1)" /tmp/verify.out
}

check_clean() {
  $PCACHE check "$DEV" >/tmp/check.out 2>&1
  local rc=$?
  [ "$rc" = 0 ] || fail "pcache check $DEV exited $rc" /tmp/check.out
  grep ': note: ' /tmp/check.out | head -5 | sed 's/^/    /'
}

# ------------------------------------------------------------- modules ---

STEP=boot-modules
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m" 2>/tmp/insmod.err || echo "note: insmod $m: $(cat /tmp/insmod.err)"
done
echo "guest: kernel $(uname -r), phase $PHASE, $(grep -c ^processor /proc/cpuinfo) CPUs," \
  "CPU flush flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'clwb|clflushopt|clflush' | sort -u | tr '\n' ' ' | sed 's/ $//')"
have_blk() { [ -b "$1" ]; }
wait_for 20 have_blk $BACKING || fail "no $BACKING (virtio backing disk)"
wait_for 20 have_blk $STATE || fail "no $STATE (virtio state disk)"
[ -d /sys/bus/nd/devices/namespace0.0 ] || wait_for 20 test -d /sys/bus/nd/devices/namespace0.0 ||
  fail "no NVDIMM namespace0.0 in /sys/bus/nd/devices: $(ls /sys/bus/nd/devices 2>&1 | tr '\n' ' ')"

# ============================================================== phase 1 ===
if [ "$PHASE" = 1 ]; then
  # ---- 1 fsdax
  STEP=1-fsdax-namespace
  run $NDCTL create-namespace -f -e namespace0.0 -m fsdax
  wait_for 20 have_blk /dev/pmem0 || fail "no /dev/pmem0 after ndctl create-namespace -m fsdax"
  [ "$(cat /sys/block/pmem0/queue/dax)" = 1 ] || fail "/sys/block/pmem0/queue/dax is not 1"
  run $MKE2FS -q -F -t ext4 -b 4096 /dev/pmem0
  run mount -t ext4 -o dax=always /dev/pmem0 /mnt/p
  grep -q '^/dev/pmem0 /mnt/p ext4 .*dax=always' /proc/mounts || fail "/mnt/p is not mounted dax=always: $(grep /mnt/p /proc/mounts)"
  pass "fsdax, $(($(cat /sys/block/pmem0/size) / 2048)) MiB, ext4 dax=always"

  STEP=1-fsdax-format
  run $PCACHE format /mnt/p/pmem.img --size 600M
  line=$(grep '^  mapping ' /tmp/out)
  echo "$line" | grep -q 'mapping   file DAX, MAP_SYNC (flush: ' || fail "want 'file DAX, MAP_SYNC', got: $line" /tmp/out
  pass "$(echo $line)"

  STEP=1-fsdax-inspect
  run $PCACHE inspect /mnt/p/pmem.img
  grep -q '^superblock  ok' /tmp/out || fail "inspect does not say 'superblock  ok'" /tmp/out
  cp /tmp/out /tmp/out.text
  run $PCACHE inspect --json /mnt/p/pmem.img
  grep -q '"crc_ok": *true' /tmp/out || fail "inspect --json lacks crc_ok true" /tmp/out
  pass "$(grep '^mapping' /tmp/out.text | tr -s ' ')"

  STEP=1-fsdax-check
  $PCACHE check /mnt/p/pmem.img >/tmp/out 2>&1 || fail "pcache check exited $?" /tmp/out
  pass "$(tail -1 /tmp/out)"
  run umount /mnt/p

  # ---- 2 devdax
  STEP=2-devdax-namespace
  run $NDCTL create-namespace -f -e namespace0.0 -m devdax
  have_chr() { [ -c "$1" ]; }
  wait_for 20 have_chr $DEV || fail "no $DEV after ndctl create-namespace -m devdax"
  pass "$DEV, $(($(cat /sys/bus/dax/devices/dax0.0/size) / 1048576)) MiB"

  STEP=2-devdax-format
  # The region held step 1's ext4: format may recognise it and refuse
  # without --force (it must not format over a filesystem silently).
  if ! $PCACHE format "$DEV" >/tmp/out 2>&1; then
    grep -q 'add --force' /tmp/out || fail "pcache format exited non-zero" /tmp/out
    cp /tmp/out /tmp/refused
    run $PCACHE format --force "$DEV"
  fi
  line=$(grep '^  mapping ' /tmp/out)
  echo "$line" | grep -q 'mapping   device DAX (flush: ' || fail "want 'device DAX', got: $line" /tmp/out
  pass "$(echo $line)"

  STEP=2-devdax-inspect
  run $PCACHE inspect "$DEV"
  grep -q '^superblock  ok' /tmp/out || fail "inspect does not say 'superblock  ok'" /tmp/out
  pass "$(grep '^mapping' /tmp/out | tr -s ' ')"

  STEP=2-devdax-check
  $PCACHE check "$DEV" >/tmp/out 2>&1 || fail "pcache check exited $?" /tmp/out
  pass "$(tail -1 /tmp/out)"

  # ---- 3 attach + the kernel's NBD client, graceful restart
  STEP=3-attach
  attach
  pass "$(head -1 /tmp/attach.log); /dev/nbd0 $(($(cat /sys/block/nbd0/size) / 2048)) MiB"

  STEP=3-write
  run $MKE2FS -q -F -t ext4 /dev/nbd0
  run mount -t ext4 /dev/nbd0 /mnt/n
  make_files /mnt/n/s3 200 || fail "writing files failed"
  sync
  sums s3 /tmp/sums3 /mnt/n
  pass "200 files, $(du -sk /mnt/n/s3 | cut -f1) KiB, synced"

  STEP=3-stop
  stop
  pass "umount, nbd-client -d, SIGTERM: attach exited 0"

  STEP=3-reattach-verify
  attach
  run mount -t ext4 /dev/nbd0 /mnt/n
  verify /tmp/sums3 /mnt/n
  pass "$(grep -o '[0-9]* keys replayed' /tmp/attach.log); 200 checksums match"

  STEP=3-check
  stop
  check_clean
  pass "$(tail -1 /tmp/check.out)"

  # ---- 4 power loss
  # Writeback slowed to 64 KiB/s: the synced files are still dirty in pmem,
  # not yet on /dev/vdb, when the power goes, so the next boot reads them
  # from pmem after replaying the log.
  STEP=4-write-sync
  attach --writeback-rate 64K
  run mount -t ext4 /dev/nbd0 /mnt/n
  make_files /mnt/n/s4 50 || fail "writing files failed"
  sync
  sums s4 /tmp/sums4 /mnt/n
  (cd /tmp && tar -cf - sums3 sums4) >/tmp/state.tar
  run dd if=/tmp/state.tar of=$STATE bs=4096 conv=fsync
  sync
  pass "50 more files synced; $(($(wc -l </tmp/sums3) + $(wc -l </tmp/sums4))) checksums on $STATE"

  # Writes in flight when the power goes: never synced, not verified.
  mkdir -p /mnt/n/unsynced
  (i=0; while :; do head -c 65536 /dev/urandom >/mnt/n/unsynced/u$i; i=$((i + 1)); done) 2>/dev/null &
  sleep 8
  echo "POWER-LOSS phase 1: echo b > /proc/sysrq-trigger with attach running and writes in flight"
  sleep 1 # let the serial console drain: the reset drops what it still holds
  echo b >/proc/sysrq-trigger
  sleep 30
  echo "FAIL 4-write-sync: sysrq b did not reset the machine"
  finish
fi

# ============================================================== phase 2 ===
if [ "$PHASE" = 2 ]; then
  STEP=4-check-after-power-loss
  have_chr() { [ -c "$1" ]; }
  wait_for 20 have_chr $DEV ||
    fail "no $DEV after the power loss (namespace mode: $(cat /sys/bus/nd/devices/namespace0.0/mode 2>&1))"
  (cd /tmp && tar -xf $STATE) 2>/tmp/out || fail "no checksums on $STATE" /tmp/out
  [ -s /tmp/sums3 ] && [ -s /tmp/sums4 ] || fail "the checksum lists on $STATE are empty"
  check_clean
  pass "$(tail -1 /tmp/check.out); $(dirty)"

  STEP=4-recover-verify
  attach
  run mount -t ext4 /dev/nbd0 /mnt/n
  verify /tmp/sums3 /mnt/n
  verify /tmp/sums4 /mnt/n
  pass "$(grep -o '[0-9]* keys replayed' /tmp/attach.log); $(($(wc -l </tmp/sums3) + $(wc -l </tmp/sums4))) checksums match, $(ls /mnt/n/unsynced 2>/dev/null | wc -l) unsynced files survived"

  STEP=4-check
  stop
  check_clean
  pass "$(tail -1 /tmp/check.out)"

  # Dirty data for detach to write back: more files written and synced
  # under a 64 KiB/s writeback, then attach is killed (SIGKILL: a graceful
  # stop would wait for the throttled writeback).
  STEP=5-detach
  attach --writeback-rate 64K
  run mount -t ext4 /dev/nbd0 /mnt/n
  make_files /mnt/n/s5 30 || fail "writing files failed"
  sync
  sums s5 /tmp/sums5 /mnt/n
  run timeout 120 umount /mnt/n
  run timeout 60 $NBD_CLIENT -d /dev/nbd0
  kill -KILL "$ATTACH_PID"
  wait "$ATTACH_PID"
  ATTACH_PID=
  before=$(dirty)
  run $PCACHE detach "$DEV" --backing "$BACKING"
  grep -q ': 0 B written back' /tmp/out && fail "detach wrote nothing back, though inspect said: $before" /tmp/out
  pass "before: $before; $(head -1 /tmp/out)"

  STEP=5-verify-backing
  run mount -t ext4 "$BACKING" /mnt/b
  verify /tmp/sums3 /mnt/b
  verify /tmp/sums4 /mnt/b
  verify /tmp/sums5 /mnt/b
  run umount /mnt/b
  run $E2FSCK -f -n "$BACKING"
  pass "$(cat /tmp/sums3 /tmp/sums4 /tmp/sums5 | wc -l) checksums match on $BACKING without the cache; e2fsck clean"

  STEP=5-check
  check_clean
  run $PCACHE inspect "$DEV"
  grep -q '^backings  *0 in use' /tmp/out || fail "inspect still shows a backing in use: $(grep '^backings' /tmp/out)" /tmp/out
  pass "$(tail -1 /tmp/check.out); $(grep '^backings' /tmp/out | tr -s ' ')"
  finish
fi

STEP=boot
fail "no pcache.phase=1|2 on the kernel command line: $(cat /proc/cmdline)"
