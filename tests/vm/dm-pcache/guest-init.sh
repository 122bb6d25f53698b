#!/bin/busybox sh
# shellcheck shell=dash
# /init of the dm-pcache rig's guest (built into the initramfs by
# tests/vm/dm-pcache/run.sh). Each step prints `PASS <step> [detail]` or
# `FAIL <step>: <reason>` on the serial console. A failed step does not end
# the boot: the steps after it run where they still mean something (the
# module's own checks in particular), so one missing pcache feature does not
# hide the rest. Disks: /dev/pmem0 (the NVDIMM's fsdax namespace), /dev/vda
# the backing disk, /dev/vdb the state disk (a raw tar carried across boots).
#
#   dmpc.phase=1  1 the kernel writes, then the power is cut: fsdax
#                   namespace; dm-pcache over /dev/vda (through a dm-linear
#                   "wb" of all of it); pattern P1 (8 MiB at 16 MiB) written
#                   and written back; "wb" suspended so that writeback
#                   cannot finish; P2 (2 MiB at 18 MiB, over P1) and fio set
#                   V (random 4 KiB writes in 8 MiB at 64 MiB) written; read
#                   back; after 3 s (every kset closed) `dmsetup status` and
#                   all of the above saved on /dev/vdb; echo b > sysrq-trigger
#   dmpc.phase=2  2 rescue without the module: pcache check, pcache inspect
#                   --json against the saved status, pcache detach, the disk
#                   alone verified; then dm-pcache loads the cache again (not
#                   reformatted) and reads the same data
#                 3 round trip: the kernel writes fio set A and is removed;
#                   pcache attach serves the cache to the kernel's NBD
#                   client, which reads A and writes set B; dm-pcache loads
#                   it again, reads A and B, writes everything back and is
#                   removed clean; the disk alone holds A and B
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
# busybox sh runs its own applets before PATH (nbd-client is one): the real
# tools go by full path.
NBD_CLIENT=/usr/local/bin/nbd-client
NDCTL=/usr/local/bin/ndctl
PCACHE=/usr/local/bin/pcache
DMSETUP=/usr/local/bin/dmsetup
FIO=/usr/local/bin/fio
JSONFLAT=/usr/local/share/jsonflat.awk
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 >/proc/sys/kernel/sysrq
# No udev here: libdevmapper makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

PHASE=0
read -r cmdline </proc/cmdline
for a in $cmdline; do
  case "$a" in dmpc.phase=*) PHASE=${a#dmpc.phase=} ;; esac
done

PMEM=/dev/pmem0
BACKING=/dev/vda
STATE=/dev/vdb
SOCK=/run/pc.sock
S=/tmp/s # what goes onto the state disk
STEP=boot
mkdir -p $S

# ------------------------------------------------------------ verdicts ---

# Every step runs in a subshell: `fail` ends the step, not the boot. What a
# later step needs of an earlier one is in files (/tmp/ok.STEP, $S/...).
pass() {
  echo "PASS $STEP${1:+ ($1)}"
  : >"/tmp/ok.$STEP"
  exit 0
}
# fail REASON [LOGFILE]: prints the verdict and the log's tail; ends the step.
fail() {
  echo "FAIL $STEP: $1"
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    tail -n 8 "$2" | sed 's/^/    | /'
  fi
  : >"/tmp/failed.$STEP"
  exit 1
}
# step NAME FUNCTION: runs FUNCTION as step NAME.
step() {
  STEP=$1
  rm -f "/tmp/ok.$1" "/tmp/failed.$1"
  ("$2")
  if [ ! -f "/tmp/ok.$1" ] && [ ! -f "/tmp/failed.$1" ]; then
    echo "FAIL $1: the step ended without a verdict"
  fi
  [ -f "/tmp/ok.$1" ]
}
ok() { [ -f "/tmp/ok.$1" ]; }

# run SECONDS CMD...: runs CMD with a time limit and its output in /tmp/out;
# fails the step when it exits non-zero.
run() {
  local t=$1 rc=0
  shift
  timeout "$t" "$@" >/tmp/out 2>&1 || rc=$?
  [ "$rc" = 0 ] && return 0
  [ "$rc" = 124 ] || [ "$rc" = 143 ] && fail "'$*' did not finish within $t s" /tmp/out
  fail "'$*' exited $rc" /tmp/out
}

finish() {
  sync
  echo "DONE phase $PHASE"
  poweroff -f
  sleep 60
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
have_blk() { [ -b "$1" ]; }

# Sizes in 512-byte sectors of the backing disk, for the tables.
table() { # table BACKING: the pcache table line over BACKING
  echo "0 $(blockdev --getsz "$1") pcache $PMEM $1 4 cache_mode writeback data_crc true"
}
create_pc() { # create_pc BACKING
  insmod_pcache
  table "$1" >$S/table
  if ! timeout 60 $DMSETUP create pc --table "$(cat $S/table)" >/tmp/out 2>&1; then
    dmesg | grep -i pcache | tail -5 >>/tmp/out
    fail "dmsetup create pc --table '$(cat $S/table)' failed" /tmp/out
  fi
  wait_for 10 have_blk /dev/mapper/pc || fail "no /dev/mapper/pc after dmsetup create"
}
insmod_pcache() {
  grep -q '^dm_pcache ' /proc/modules && return 0
  insmod /lib/modules/dm-pcache.ko 2>/tmp/insmod.err || fail "insmod dm-pcache.ko: $(cat /tmp/insmod.err)"
}
status() { $DMSETUP status pc 2>/dev/null | tr -s ' '; }
# field STATUSLINE N: field N after the target name: 1 sb flags, 2 seg_num,
# 3 n_segs, 4 segments used, 5 gc_percent, 6 cache_info flags, 7 key_head,
# 8 dirty_tail, 9 key_tail (the last three as seg:off).
field() { echo "$1" | awk -v n="$2" '{ for (i = 1; i <= NF; i++) if ($i == "pcache") { print $(i + n); exit } }'; }
is_clean() { local s; s=$(status); [ -n "$s" ] && [ "$(field "$s" 7)" = "$(field "$s" 8)" ]; }
# wait_clean SECONDS: until the module has written every kset back.
wait_clean() { wait_for "$1" is_clean; }

# fio_set NAME DEVICE OFFSET SEED write|verify: a verify set of random
# 4 KiB direct writes filling 8 MiB at OFFSET; verify reads it back (fio
# --verify_only: same layout, same seed) and checks every block's crc32c
# header.
fio_set() {
  local mode
  if [ "$5" = write ]; then
    mode="--do_verify=0"
    echo "fio --name=$1 --filename=$2 --thread --ioengine=psync --direct=1 --rw=randwrite --bs=4k" \
      "--offset=$3 --size=8M --verify=crc32c --randseed=$4 --do_verify=0" >"$S/fio-$1.cmd"
  else
    mode="--verify_only"
  fi
  local rc=0
  timeout 120 $FIO "--name=$1" "--filename=$2" --thread --ioengine=psync --direct=1 --rw=randwrite --bs=4k \
    "--offset=$3" --size=8M --verify=crc32c "--randseed=$4" $mode >/tmp/out 2>&1 || rc=$?
  [ "$rc" = 0 ] && return 0
  grep -E '^(verify|fio):|err=' /tmp/out | head -4 >/tmp/fio.err
  if [ "$rc" = 124 ] || [ "$rc" = 143 ]; then
    fail "fio set $1 ($5) on $2 did not finish within 120 s" /tmp/out
  fi
  if [ "$5" = write ]; then
    fail "fio set $1 could not write it on $2 (exit $rc)" /tmp/fio.err
  fi
  fail "fio set $1 does not verify on $2 (exit $rc; fio stops at the first bad block)" /tmp/fio.err
}
# region_sum DEVICE: sha256 of the 8 MiB at 16 MiB (P1 with P2 over it).
region_sum() {
  timeout 120 dd if="$1" bs=1M skip=16 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
# json FILE: pcache inspect --json's output flattened to path=value lines.
json() {
  grep -oE '"([^"\\]|\\.)*"|[-+0-9.eE]+|true|false|null|[][{}:,]' "$1" | awk -f $JSONFLAT
}
save_state() {
  dmesg | grep -i -E 'pcache|dm[-_]' >"$S/dmesg-phase$PHASE" 2>/dev/null
  (cd $S && tar -cf - .) >/tmp/state.tar
  if [ "$(stat -c %s /tmp/state.tar)" -gt 33554432 ]; then
    echo "note: the state ($(stat -c %s /tmp/state.tar) B) does not fit $STATE"
    return
  fi
  dd if=/tmp/state.tar of=$STATE bs=4096 conv=fsync 2>/dev/null || echo "note: writing the state to $STATE failed"
}

# attach_nbd [ARGS]: pcache attach in the background (with ARGS), the
# kernel's NBD client on /dev/nbd0. The export is the backing's file name.
# Steps are subshells, so attach is not their child for long: its pid and,
# once it ends, its exit status are kept in files.
attach_nbd() {
  rm -f "$SOCK" /tmp/attach.rc /tmp/attach.pid
  : >/tmp/attach.log
  (
    sh -c 'echo $$ >/tmp/attach.pid; exec "$@"' sh \
      $PCACHE attach $PMEM --backing $BACKING --listen "unix:$SOCK" "$@" >/tmp/attach.log 2>&1
    echo $? >/tmp/attach.rc
  ) &
  wait_for 60 listening
  [ -f /tmp/attach.rc ] && fail "pcache attach $PMEM --backing $BACKING exited $(cat /tmp/attach.rc)" /tmp/attach.log
  grep -q '^listening on' /tmp/attach.log ||
    fail "pcache attach $PMEM --backing $BACKING did not start listening within 60 s" /tmp/attach.log
  run 60 $NBD_CLIENT -unix "$SOCK" /dev/nbd0 -N vda -t 60
  wait_for 30 nbd_size || fail "/dev/nbd0 has no size after nbd-client connected"
  [ "$(cat /sys/block/nbd0/size)" = "$(blockdev --getsz $BACKING)" ] ||
    fail "/dev/nbd0 has $(cat /sys/block/nbd0/size) sectors, $BACKING $(blockdev --getsz $BACKING)"
}
listening() { grep -q '^listening on' /tmp/attach.log || [ -f /tmp/attach.rc ]; }
nbd_size() { [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ]; }
# attach_running: pcache attach was started and has not exited.
attach_running() { [ -f /tmp/attach.pid ] && [ ! -f /tmp/attach.rc ]; }
# stop_attach: disconnects /dev/nbd0, SIGTERMs pcache attach; it must exit 0.
stop_attach() {
  local pid
  pid=$(cat /tmp/attach.pid)
  timeout 60 $NBD_CLIENT -d /dev/nbd0 >/tmp/out 2>&1 || echo "note: nbd-client -d /dev/nbd0 exited $?"
  kill -TERM "$pid" 2>/dev/null
  if ! wait_for 60 test -f /tmp/attach.rc; then
    kill -KILL "$pid" 2>/dev/null
    wait_for 10 test -f /tmp/attach.rc
    fail "pcache attach did not exit within 60 s of SIGTERM (killed)" /tmp/attach.log
  fi
  [ "$(cat /tmp/attach.rc)" = 0 ] || fail "pcache attach exited $(cat /tmp/attach.rc) after SIGTERM (want 0)" /tmp/attach.log
}

# ------------------------------------------------------------- modules ---

while read -r m; do
  insmod "/lib/modules/$m" 2>/tmp/insmod.err || echo "note: insmod $m: $(cat /tmp/insmod.err)"
done </etc/modules.order
echo "guest: kernel $(uname -r), phase $PHASE, $(grep -c ^processor /proc/cpuinfo) CPUs"
STEP=boot
wait_for 20 have_blk $BACKING || echo "FAIL boot: no $BACKING (virtio backing disk)"
wait_for 20 have_blk $STATE || echo "FAIL boot: no $STATE (virtio state disk)"
wait_for 20 test -d /sys/bus/nd/devices/namespace0.0 ||
  echo "FAIL boot: no NVDIMM namespace0.0 in /sys/bus/nd/devices: $(echo /sys/bus/nd/devices/*)"

# ======================================= step 5: pcache formats, the module loads

PMEM2=/dev/pmem1

s5_format() {
  run 60 $NDCTL create-namespace -f -e namespace1.0 -m fsdax
  wait_for 20 have_blk $PMEM2 || fail "no $PMEM2 after ndctl create-namespace -m fsdax"
  run 120 $PCACHE format --dialect dm-pcache --data-crc $PMEM2
  pass "$(head -1 /tmp/out); $(grep segments /tmp/out | tr -s ' ' | cut -c1-60)"
}

s5_load() {
  ok 5-format || fail "not run: $PMEM2 was not formatted"
  insmod_pcache
  local st segs
  run 60 $PCACHE inspect --json $PMEM2
  json /tmp/out >/tmp/flat
  segs=$(sed -n 's/^\.superblock\.seg_num=//p' /tmp/flat)
  [ -n "$segs" ] || fail "pcache inspect --json $PMEM2 has no superblock.seg_num" /tmp/out
  run 60 $DMSETUP create pc --table "0 $(blockdev --getsz $BACKING) pcache $PMEM2 $BACKING 4 cache_mode writeback data_crc true"
  wait_for 10 have_blk /dev/mapper/pc || fail "no /dev/mapper/pc after dmsetup create"
  st=$(status)
  [ "$(field "$st" 2)" = "$segs" ] && [ "$(field "$st" 3)" = "$segs" ] && [ "$(field "$st" 6)" = 1183 ] &&
    [ "$(field "$st" 7)" = 0:0 ] || fail "status '$st': want $segs segments, flags 1183 and an empty log"
  fio_set c /dev/mapper/pc 200M 3456 write
  fio_set c /dev/mapper/pc 200M 3456 verify
  wait_clean 120 || fail "the module did not write set c back within 120 s: $(status)"
  st=$(status)
  run 60 $DMSETUP remove pc
  fio_set c $BACKING 200M 3456 verify
  run 120 $PCACHE check $PMEM2
  # The module wrote its cache info once, after pcache's two copies (seq 1
  # and 2): seq 3 into copy 0. A cache it had formatted anew would read seq 1.
  run 60 $PCACHE inspect --json $PMEM2
  json /tmp/out >/tmp/flat
  grep -qxF '.cache_info.copies[0].seq=3' /tmp/flat && grep -qxF '.cache_info.current=0' /tmp/flat ||
    fail "cache info after the module: $(grep '^\.cache_info\.\(current\|copies\)' /tmp/flat | tr '\n' ' ') (want copy 0 seq 3: loaded, not formatted anew)"
  pass "loaded as its own (cache info seq 3 after pcache's 1 and 2); set c written, written back, on $BACKING alone; $(echo "$st" | cut -d' ' -f4-)"
}

# ============================================================== phase 1 ===

s1_namespace() {
  run 60 $NDCTL create-namespace -f -e namespace0.0 -m fsdax
  wait_for 20 have_blk $PMEM || fail "no $PMEM after ndctl create-namespace -m fsdax"
  [ "$(cat /sys/block/pmem0/queue/dax)" = 1 ] || fail "/sys/block/pmem0/queue/dax is not 1"
  cp /tmp/out $S/ndctl-namespace.json
  pass "fsdax, $PMEM $(blockdev --getsize64 $PMEM) B"
}

s1_create() {
  # The backing through a dm-linear of all of /dev/vda (same sectors), so
  # that it can be suspended later: writeback then waits, and the cut
  # finds data that only pmem holds.
  run 30 $DMSETUP create wb --table "0 $(blockdev --getsz $BACKING) linear $BACKING 0"
  wait_for 10 have_blk /dev/mapper/wb || fail "no /dev/mapper/wb after dmsetup create"
  create_pc /dev/mapper/wb
  local st
  st=$(status)
  [ -n "$st" ] || fail "dmsetup status pc printed nothing"
  echo "$st" >$S/status-created
  if ! [ "$(field "$st" 2)" -gt 0 ] 2>/dev/null || [ "$(field "$st" 3)" != "$(field "$st" 2)" ]; then
    fail "status '$st': want n_segs = seg_num > 0"
  fi
  [ "$(field "$st" 7)" = 0:0 ] || fail "status '$st': a new cache should have key_head 0:0"
  pass "$(cat $S/table | cut -d' ' -f3-); status: $(echo "$st" | cut -d' ' -f4-)"
}

s1_write() {
  head -c 8388608 /dev/urandom >$S/p1.bin
  head -c 2097152 /dev/urandom >$S/p2.bin
  cp $S/p1.bin /tmp/expected.bin
  dd if=$S/p2.bin of=/tmp/expected.bin bs=1M seek=2 conv=notrunc 2>/dev/null
  sha256sum </tmp/expected.bin | cut -d' ' -f1 >$S/region.sha256
  sha256sum $S/p1.bin $S/p2.bin | sed "s| $S/| |" >$S/patterns.sha256
  rm /tmp/expected.bin
  run 120 dd if=$S/p1.bin of=/dev/mapper/pc bs=1M seek=16 oflag=direct
  # P1 written back before the hold: the cut then finds a log that is
  # clean up to the dirty tail and dirty after it.
  sleep 2
  wait_clean 60 || fail "the module did not write P1 back within 60 s: $(status)"
  status >$S/status-p1-clean
  run 30 $DMSETUP suspend wb
  run 120 dd if=$S/p2.bin of=/dev/mapper/pc bs=1M seek=18 oflag=direct
  fio_set v /dev/mapper/pc 64M 1234 write
  pass "P1 8 MiB at 16 MiB (written back: $(field "$(cat $S/status-p1-clean)" 8)), wb suspended, P2 2 MiB at 18 MiB, fio set v 8 MiB at 64 MiB"
}

s1_readback() {
  local got
  got=$(region_sum /dev/mapper/pc)
  [ "$got" = "$(cat $S/region.sha256)" ] || fail "16-24 MiB through /dev/mapper/pc: sha256 $got, want $(cat $S/region.sha256)"
  fio_set v /dev/mapper/pc 64M 1234 verify
  pass "P1+P2 and fio set v read back through /dev/mapper/pc"
}

s1_status() {
  local st
  sleep 3 # the kset timer (1 s) closes every open kset
  st=$(status)
  $DMSETUP table pc >$S/table-shown 2>&1
  echo "$st" >$S/status-cut
  [ "$(field "$st" 7)" != "$(field "$st" 8)" ] ||
    fail "status '$st': nothing is dirty (key_head = dirty_tail) although the backing is suspended"
  echo "key_head $(field "$st" 7) dirty_tail $(field "$st" 8) key_tail $(field "$st" 9): dirty from dirty_tail to key_head" >$S/dirty
  pass "$(echo "$st" | cut -d' ' -f4-); dirty $(field "$st" 8) .. $(field "$st" 7)"
}

if [ "$PHASE" = 1 ]; then
  step 1-namespace s1_namespace
  ok 1-namespace && step 1-create s1_create
  ok 1-create && step 1-write s1_write
  ok 1-write && step 1-readback s1_readback
  ok 1-write && step 1-status s1_status
  save_state
  sync
  echo "POWER-CUT phase 1: echo b > /proc/sysrq-trigger with dirty data in pmem"
  sleep 1 # let the serial console drain: the reset drops what it still holds
  echo b >/proc/sysrq-trigger
  sleep 30
  echo "FAIL 1-status: sysrq b did not reset the machine"
  finish
fi

# ============================================================== phase 2 ===

s2_after_cut() {
  (cd $S && tar -xf $STATE) 2>/tmp/out || fail "no state on $STATE" /tmp/out
  [ -s $S/status-cut ] || fail "no status-cut on $STATE: boot 1 did not get that far"
  wait_for 20 have_blk $PMEM ||
    fail "no $PMEM after the cut (namespace mode: $(cat /sys/bus/nd/devices/namespace0.0/mode 2>&1))"
  grep -q '^dm_pcache ' /proc/modules && fail "dm_pcache is loaded"
  pass "saved: $(cut -d' ' -f4- $S/status-cut); dm-pcache not loaded"
}

s2_check() {
  run 120 $PCACHE check $PMEM
  pass "$(tail -1 /tmp/out)"
}

s2_inspect() {
  local st f bad=""
  st=$(cat $S/status-cut)
  run 60 $PCACHE inspect --json $PMEM
  cp /tmp/out $S/inspect-cut.json
  json /tmp/out >/tmp/flat
  [ -s /tmp/flat ] || fail "pcache inspect --json printed no JSON" /tmp/out
  for f in '.superblock.dialect="dm-pcache"' ".superblock.seg_num=$(field "$st" 2)" \
    ".backings[0].key_tail.seg=$(field "$st" 9 | cut -d: -f1)" \
    ".backings[0].key_tail.off=$(field "$st" 9 | cut -d: -f2)" \
    ".backings[0].dirty_tail.seg=$(field "$st" 8 | cut -d: -f1)" \
    ".backings[0].dirty_tail.off=$(field "$st" 8 | cut -d: -f2)" \
    ".backings[0].log.end.seg=$(field "$st" 7 | cut -d: -f1)" \
    ".backings[0].log.end.off=$(field "$st" 7 | cut -d: -f2)"; do
    grep -qxF "$f" /tmp/flat || bad="$bad; want $f, got '$(grep -F "${f%%=*}=" /tmp/flat | head -1)'"
  done
  [ -z "$bad" ] || fail "against the saved status '$(cut -d' ' -f4- $S/status-cut)'$bad"
  pass "dialect dm-pcache; seg_num, key_tail, dirty_tail, log end = saved seg_num, key_tail, dirty_tail, key_head"
}

s2_detach() {
  run 120 $PCACHE detach --backing $BACKING $PMEM
  pass "$(head -1 /tmp/out)"
}

s2_disk_pattern() {
  local got
  got=$(region_sum $BACKING)
  [ "$got" = "$(cat $S/region.sha256)" ] ||
    fail "$BACKING 16-24 MiB: sha256 $got, want $(cat $S/region.sha256) (P1 with P2 over it)$(ok 2-detach || echo '; pcache detach had failed')"
  pass "$BACKING alone holds P1 with P2 over it"
}

s2_disk_fio() {
  ok 2-detach || echo "note: pcache detach failed; the disk is checked anyway"
  fio_set v $BACKING 64M 1234 verify
  pass "$BACKING alone holds fio set v"
}

s2_reload() {
  local st was
  create_pc $BACKING
  st=$(status)
  was=$(cat $S/status-cut)
  echo "$st" >$S/status-reload
  if [ "$(field "$st" 2)" != "$(field "$was" 2)" ] || [ "$(field "$st" 3)" != "$(field "$was" 3)" ]; then
    fail "status '$st': seg_num/n_segs differ from before the cut ('$was')"
  fi
  [ "$(field "$st" 6)" = "$(field "$was" 6)" ] || fail "status '$st': cache_info flags differ from before the cut ('$was')"
  # A new cache starts its log at 0:0; a loaded one replays to its end.
  [ "$(field "$st" 7)" != 0:0 ] || fail "status '$st': key_head 0:0, the cache was made anew (saved: '$was')"
  pass "$(echo "$st" | cut -d' ' -f4-): same seg_num, n_segs and flags as before the cut, key_head $(field "$st" 7) (saved $(field "$was" 7))"
}

s2_reload_read() {
  local got
  got=$(region_sum /dev/mapper/pc)
  [ "$got" = "$(cat $S/region.sha256)" ] || fail "16-24 MiB through /dev/mapper/pc: sha256 $got, want $(cat $S/region.sha256)"
  fio_set v /dev/mapper/pc 64M 1234 verify
  pass "P1+P2 and fio set v through /dev/mapper/pc"
}

s3_write_a() {
  fio_set a /dev/mapper/pc 128M 5678 write
  sleep 2 # every kset closed
  pass "fio set a: 8 MiB at 128 MiB; $(status | cut -d' ' -f4-)"
}

s3_remove() {
  status >$S/status-before-attach
  run 60 $DMSETUP remove pc
  pass "status before: $(cut -d' ' -f4- $S/status-before-attach)"
}

s3_attach() {
  # Writeback held back (1 byte a second, given up at the stop): what pcache
  # writes stays dirty in pmem, for the module to write back.
  attach_nbd --writeback-rate 1
  pass "$(head -1 /tmp/attach.log); /dev/nbd0 $(($(cat /sys/block/nbd0/size) / 2048)) MiB"
}

s3_nbd_read_a() {
  ok 3-attach || fail "not run: pcache attach is not serving"
  fio_set a /dev/nbd0 128M 5678 verify
  pass "fio set a verified through /dev/nbd0"
}

s3_nbd_write_b() {
  ok 3-attach || fail "not run: pcache attach is not serving"
  fio_set b /dev/nbd0 160M 9012 write
  : >$S/b-written
  pass "fio set b: 8 MiB at 160 MiB through /dev/nbd0"
}

s3_stop() {
  [ -f /tmp/attach.pid ] || fail "not run: pcache attach never started"
  attach_running || fail "pcache attach had already exited $(cat /tmp/attach.rc)"
  stop_attach
  local stopped
  stopped=$(grep '^stopped' /tmp/attach.log | tail -1)
  case "$stopped" in
  *"(0 B dirty)"*) fail "pcache attach wrote set b back itself ($stopped): the module has nothing to write back" /tmp/attach.log ;;
  esac
  pass "nbd-client -d, SIGTERM: pcache attach exited 0; $stopped"
}

s3_reload_read() {
  create_pc $BACKING
  status >$S/status-after-attach
  fio_set a /dev/mapper/pc 128M 5678 verify
  [ -f $S/b-written ] || fail "set a verified; set b was never written (step 3-nbd-write-b failed)"
  fio_set b /dev/mapper/pc 160M 9012 verify
  pass "sets a and b verified through /dev/mapper/pc; $(status | cut -d' ' -f4-)"
}

s3_writeback() {
  [ -b /dev/mapper/pc ] || fail "not run: no /dev/mapper/pc"
  wait_clean 120 || fail "the module did not write everything back within 120 s: $(status)"
  pass "dirty_tail = key_head: $(status | cut -d' ' -f4-)"
}

s3_remove_clean() {
  [ -b /dev/mapper/pc ] || fail "not run: no /dev/mapper/pc"
  status >$S/status-clean
  $DMSETUP table pc >$S/table-clean 2>&1
  run 60 $DMSETUP remove pc
  pass "$(cut -d' ' -f4- $S/status-clean)"
}

s3_disk_read() {
  fio_set a $BACKING 128M 5678 verify
  local got
  got=$(region_sum $BACKING)
  [ "$got" = "$(cat $S/region.sha256)" ] || fail "$BACKING 16-24 MiB: sha256 $got, want $(cat $S/region.sha256)"
  [ -f $S/b-written ] || fail "set a and P1+P2 on $BACKING alone; set b was never written"
  fio_set b $BACKING 160M 9012 verify
  pass "$BACKING alone holds sets a and b, and P1+P2"
}

if [ "$PHASE" = 2 ]; then
  if step 2-after-cut s2_after_cut; then
    # ---- 2 rescue without the module
    step 2-check s2_check
    step 2-inspect s2_inspect
    step 2-detach s2_detach
    step 2-disk-pattern s2_disk_pattern
    step 2-disk-fio s2_disk_fio
    step 2-reload s2_reload
    ok 2-reload && step 2-reload-read s2_reload_read
    # ---- 3 round trip
    ok 2-reload && step 3-write-a s3_write_a
    ok 3-write-a && step 3-remove s3_remove
    if ok 3-remove; then
      step 3-attach s3_attach
      step 3-nbd-read-a s3_nbd_read_a
      step 3-nbd-write-b s3_nbd_write_b
      step 3-stop s3_stop
      step 3-reload-read s3_reload_read
      step 3-writeback s3_writeback
      step 3-remove-clean s3_remove_clean
      ok 3-remove-clean && step 3-disk-read s3_disk_read
    fi
  fi
  # ---- 5 pcache formats, the module loads
  step 5-format s5_format
  step 5-load s5_load
  save_state
  finish
fi

STEP=boot
echo "FAIL boot: no dmpc.phase=1|2 on the kernel command line: $(cat /proc/cmdline)"
finish
