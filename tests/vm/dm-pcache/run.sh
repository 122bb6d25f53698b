#!/usr/bin/env bash
# The dm-pcache rig: the real Linux dm-pcache kernel module and pcache on the
# same NVDIMM, in a QEMU guest. It proves that pcache reads, checks and
# rescues what the kernel wrote, and that the kernel loads what pcache left.
#
#   bash tests/vm/dm-pcache/run.sh
#
# No Debian kernel enables CONFIG_DM_PCACHE, so on the host it
#   - fetches with `apt-get download` (never installs), through a private apt
#     source list (bookworm, bookworm-backports, trixie, trixie-backports of
#     this machine's Debian mirror; /etc/apt is left alone): QEMU 10 from
#     bookworm-backports with its firmware and the libraries this machine
#     lacks; trixie-backports' kernel (image, modules, headers, kbuild,
#     linux-source of the same version); trixie's glibc, libelf and zlib to
#     run kbuild's objtool and modpost; bookworm's busybox-static, dmsetup,
#     ndctl, fio, nbd-client and kmod for the guest. The .debs stay in
#     tests/vm/cache-dm/ (git ignores it), so a second run needs no network;
#   - builds dm-pcache.ko out of tree from linux-source's
#     drivers/md/dm-pcache against the kernel's headers (gcc-12 with the
#     function-alignment fallback where gcc-14 is missing, objtool and
#     modpost under trixie's loader, no module BTF);
#   - builds a statically linked `pcache` (target dir tests/vm/cache-dm/target);
#   - builds an initramfs: busybox, pcache, dmsetup, ndctl, fio, nbd-client
#     with the libraries they link, the kernel modules (dm-pcache.ko is loaded
#     by the guest only when a step wants it), jsonflat.awk, and
#     guest-init.sh as /init;
#   - boots the guest twice under TCG with a 1 GiB NVDIMM backed by
#     tests/vm/cache-dm/run/nvdimm.img, a 256 MiB backing disk (/dev/vda)
#     and a 32 MiB state disk (/dev/vdb, a raw tar) that carries the
#     pattern, checksums and `dmsetup status` lines across the power cut.
#     Boot 1 (dmpc.phase=1) runs step 1 and ends with
#     `echo b > /proc/sysrq-trigger` while the cache holds dirty data; boot 2
#     (dmpc.phase=2) runs steps 2 and 3 (see guest-init.sh);
#   - step 5, in boot 2 on a second NVDIMM (/dev/pmem1): `pcache format
#     --dialect dm-pcache` and the module loads that cache as its own (not
#     formatted anew), writes through it and writes back;
#   - step 4, on the host: `pcache check` and `pcache inspect --json` of the
#     NVDIMM file as boot 1 left it and as boot 2 left it must agree with
#     what the guest's `dmsetup status` said;
#   - reads the PASS/FAIL lines from the serial console and exits 0 only if
#     every expected step printed PASS.
#
# Environment:
#   PCACHE_DM_TIMEOUT    seconds allowed per boot (default 600; a boot takes 15-30 s)
#   PCACHE_DM_MIRROR     Debian mirror URL (default: the one /etc/apt uses for bookworm)
#   PCACHE_DM_REFRESH=1  resolve and download the packages again (after a new
#                        kernel reached trixie-backports)
#   PCACHE_DM_KEEP=1     keep the run's images and initramfs for inspection
#   PCACHE_DM_FIXTURES=DIR  copy each boot's images and saved state to DIR
#
# Needs: Debian (bookworm or later) with dpkg and apt, the debian-archive-
# keyring, make and gcc-12 (or gcc-14), xz-utils, cargo, glibc's static
# library (libc6-dev), ldd, flock; nothing is installed into / and nothing is
# left running. The QEMU process is killed on any exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache="$repo/tests/vm/cache-dm"
aptd="$cache/apt"
debs="$cache/debs"
root="$cache/root"
tlibc="$cache/tlibc"
src="$cache/src"
run="$cache/run"
timeout_s=${PCACHE_DM_TIMEOUT:-600}
fixtures=${PCACHE_DM_FIXTURES:-}
t0=$(date +%s)

# What the guest must report, boot by boot (the host adds step 4).
steps_phase1="1-namespace 1-create 1-write 1-readback 1-status"
steps_phase2="2-after-cut 2-check 2-inspect 2-detach 2-disk-pattern 2-disk-fio
  2-reload 2-reload-read
  3-write-a 3-remove 3-attach 3-nbd-read-a 3-nbd-write-b 3-stop
  3-reload-read 3-writeback 3-remove-clean 3-disk-read
  5-format 5-load"
steps_host="4-host-cut-check 4-host-cut-inspect 4-host-clean-check 4-host-clean-inspect"

# The guest's tools, from bookworm (and the libraries this machine lacks,
# through `apt-get -s install`); QEMU from bookworm-backports.
guest_packages="busybox-static dmsetup ndctl fio nbd-client kmod"
qemu_packages="qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
  qemu-system-data/bookworm-backports seabios/bookworm-backports ipxe-qemu"
# trixie's loader and the libraries kbuild's objtool and modpost link.
trixie_libs="libc6 libelf1t64 zlib1g libzstd1"

say() { printf '== dm [%3d s]: %s\n' "$(($(date +%s) - t0))" "$*"; }
die() {
  printf 'dm: FAILED: %s\n' "$*" >&2
  printf 'dm: took %d s\n' "$(($(date +%s) - t0))" >&2
  exit 1
}
# phase NAME: the wall time of the phase that just ended, for the summary.
phase_t=$t0
times=""
phase() {
  local now
  now=$(date +%s)
  times="$times $1=$((now - phase_t))s"
  phase_t=$now
}

qemu_pid=""
cleanup() {
  local rc=$?
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    echo "dm: QEMU $qemu_pid killed" >&2
  fi
  qemu_pid=""
  rm -f "$run"/qemu-phase*.pid
  rm -rf "$cache/initrd.d"
  if [ "${PCACHE_DM_KEEP:-0}" != 1 ]; then
    rm -f "$run/nvdimm.img" "$run/nvdimm-cut.img" "$run/nvdimm2.img" "$run/backing.img" "$run/state.img" \
      "$cache/initrd.cpio"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "dm: interrupted (SIGINT)" >&2; exit 130' INT
trap 'echo "dm: interrupted (SIGTERM)" >&2; exit 143' TERM

# ---------------------------------------------------------------- checks ---

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is missing; $2"
}
need apt-get "this rig needs a Debian host (apt-get download)"
need apt-cache "this rig needs a Debian host"
need dpkg "this rig needs a Debian host (dpkg -x)"
need dpkg-deb "this rig needs a Debian host"
need ldd "install libc-bin"
need cargo "install Rust (rustup) to build pcache"
need flock "install util-linux"
need make "the module build needs it: apt-get install make"
need xz "linux-source is a .tar.xz: apt-get install xz-utils"
need tar "apt-get install tar"
[ "$(uname -m)" = x86_64 ] || die "the rig boots an x86_64 guest with TCG and needs an x86_64 host"
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] ||
  die "a static pcache needs glibc's static library: apt-get install libc6-dev"
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] ||
  die "no /usr/share/keyrings/debian-archive-keyring.gpg: apt-get install debian-archive-keyring"
# The kernel was built with gcc 14. gcc 12 does too, with one flag it lacks
# turned into its older form (see build_module).
kcc=""
for c in x86_64-linux-gnu-gcc-14 x86_64-linux-gnu-gcc-12; do
  if command -v "$c" >/dev/null 2>&1; then
    kcc=$c
    break
  fi
done
[ -n "$kcc" ] || die "the module build needs gcc-12 or gcc-14: apt-get install gcc-12"

mkdir -p "$debs" "$run" "$aptd"
# One run at a time per cache folder.
exec 9>"$cache/.lock"
flock -n 9 || die "another tests/vm/dm-pcache/run.sh is using $cache"
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

# The Debian mirror this machine's apt uses for bookworm (or any Debian
# suite), from one-line sources or deb822 .sources files.
find_mirror() {
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      if ($(i + 1) ~ /^(bookworm|trixie|stable|oldstable)$/) { print $i; exit } }' "$f")
    if [ -n "$uri" ]; then
      echo "$uri"
      return
    fi
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
      { u = ""; s = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
          if ($i ~ /^Suites:/ && $i ~ /[ \t](bookworm|trixie|stable|oldstable)([ \t]|$)/) s = 1
        }
        if (u != "" && s) { print u; exit } }' "$f")
    if [ -n "$uri" ]; then
      echo "$uri"
      return
    fi
  done
  echo "http://deb.debian.org/debian"
}

# The private apt configuration: its own source list, lists and cache under
# $aptd; the host's dpkg status (for what this machine already has).
# bookworm stays the default release, so the extra suites only give what is
# asked of them by name.
A=(-o "Dir::Etc::SourceList=$aptd/sources.list" -o "Dir::Etc::SourceParts=$aptd/empty"
  -o "Dir::State::Lists=$aptd/lists" -o "Dir::Cache=$aptd/cache"
  -o "APT::Default-Release=bookworm" -o "APT::Sandbox::User=root" -q)

apt_setup() {
  local mirror=${PCACHE_DM_MIRROR:-$(find_mirror)} s
  mkdir -p "$aptd/empty" "$aptd/lists/partial" "$aptd/cache/archives/partial"
  : >"$aptd/sources.list.new"
  for s in bookworm bookworm-updates bookworm-backports trixie trixie-backports; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $s main" >>"$aptd/sources.list.new"
  done
  mv "$aptd/sources.list.new" "$aptd/sources.list"
  say "packages: apt-get update of the private list ($mirror: bookworm, -updates, -backports, trixie, trixie-backports)"
  apt-get "${A[@]}" update >"$cache/apt-update.log" 2>&1 || {
    tail -20 "$cache/apt-update.log" >&2
    die "apt-get update of the private list failed (log: $cache/apt-update.log); is $mirror reachable? (PCACHE_DM_MIRROR sets another)"
  }
}

# ver PACKAGE/SUITE: the version apt would download.
ver() {
  apt-cache "${A[@]}" show "$1" 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

# fetch_debs: downloads what the rig needs into $debs, once. $debs/.complete
# lists the files of the last complete download; the kernel's name is in
# $debs/.kver.
fetch_debs() {
  local kver abi mm kv closure list p
  if [ "${PCACHE_DM_REFRESH:-0}" != 1 ] && [ -f "$debs/.complete" ] && [ -f "$debs/.kver" ]; then
    local ok=1
    while read -r f; do [ -f "$debs/$f" ] || ok=0; done <"$debs/.complete"
    if [ "$ok" = 1 ]; then
      say "packages: cached in $debs ($(wc -l <"$debs/.complete") .debs, kernel $(cat "$debs/.kver"))"
      return
    fi
  fi
  apt_setup
  # The newest kernel of trixie-backports, and the source, headers and
  # kbuild of exactly its version: the module must match the kernel's ABI.
  kver=$(apt-cache "${A[@]}" depends linux-image-amd64/trixie-backports 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {sub(/.*linux-image-/, ""); print; exit}')
  [ -n "$kver" ] || die "trixie-backports has no linux-image-amd64 (see $cache/apt-update.log)"
  abi=${kver%-amd64}
  mm=$(echo "$kver" | cut -d. -f1-2)
  kv=$(ver "linux-binary-$kver/trixie-backports")
  [ -n "$kv" ] || die "trixie-backports lacks linux-binary-$kver"
  for p in "linux-modules-$kver" "linux-base-$kver" "linux-headers-$kver" "linux-headers-$abi-common" \
    "linux-kbuild-$abi" "linux-source-$mm"; do
    [ "$(ver "$p/trixie-backports")" = "$kv" ] ||
      die "trixie-backports has $p at '$(ver "$p/trixie-backports")', not $kv like the kernel; try again later (a new kernel is being published)"
  done
  say "packages: kernel $kver ($kv), QEMU $(ver qemu-system-x86/bookworm-backports)"
  # What apt would install on this machine for QEMU and the guest's tools:
  # exactly the libraries it lacks. A simulation only.
  # shellcheck disable=SC2086 # word lists
  if ! closure=$(apt-get "${A[@]}" -s install --no-install-recommends $guest_packages $qemu_packages 2>&1); then
    printf '%s\n' "$closure" | tail -20 >&2
    die "apt-get -s install could not resolve QEMU and the guest's tools from the private list"
  fi
  # The closure names QEMU's own packages without their suite: those are
  # fetched from bookworm-backports by name below, never bookworm's.
  local qemu_names
  # shellcheck disable=SC2086 # a word list
  qemu_names=$(printf '%s\n' $qemu_packages | sed 's|/.*||')
  list=$(
    {
      # shellcheck disable=SC2086
      printf '%s\n' $guest_packages
      printf '%s\n' "$closure" | awk '/^Inst / {print $2}'
    } | sort -u | grep -v -x -F "$qemu_names"
  )
  rm -rf "$debs/new"
  mkdir -p "$debs/new"
  say "packages: apt-get download ($(echo "$list" | wc -w) bookworm packages, the kernel's 7, trixie's libc; ~330 MB)"
  (
    cd "$debs/new"
    # shellcheck disable=SC2086
    apt-get "${A[@]}" download $list $qemu_packages \
      "linux-binary-$kver/trixie-backports" "linux-modules-$kver/trixie-backports" \
      "linux-base-$kver/trixie-backports" "linux-headers-$kver/trixie-backports" \
      "linux-headers-$abi-common/trixie-backports" "linux-kbuild-$abi/trixie-backports" \
      "linux-source-$mm/trixie-backports"
    mkdir trixie
    cd trixie
    for p in $trixie_libs; do apt-get "${A[@]}" download "$p/trixie"; done
  ) >"$cache/apt-download.log" 2>&1 || {
    tail -20 "$cache/apt-download.log" >&2
    die "apt-get download failed (log: $cache/apt-download.log); is the mirror reachable?"
  }
  # Replace the old download only now that the new one is whole.
  find "$debs" -maxdepth 2 -name '*.deb' ! -path "$debs/new/*" -delete
  mkdir -p "$debs/trixie"
  mv "$debs"/new/trixie/*.deb "$debs/trixie/"
  mv "$debs"/new/*.deb "$debs/"
  rm -rf "$debs/new"
  (cd "$debs" && find . -maxdepth 2 -name '*.deb' | sed 's|^\./||' | LC_ALL=C sort) >"$debs/.complete"
  echo "$kver" >"$debs/.kver"
}

# extract_debs: unpacks everything but the trixie libraries and
# linux-source into $root, those into $tlibc, and linux-source's dm-pcache
# (with drivers/md's headers, which it includes) into $src.
extract_debs() {
  local stamp f
  stamp=$(tr '\n' ' ' <"$debs/.complete")
  if [ -f "$root/.stamp" ] && [ "$(cat "$root/.stamp")" = "$stamp" ]; then
    return
  fi
  say "packages: unpacking into $root (dpkg -x) and linux-source's drivers/md into $src"
  rm -rf "$root" "$tlibc" "$src"
  mkdir -p "$root" "$tlibc" "$src"
  while read -r f; do
    case "$f" in
    trixie/*) dpkg -x "$debs/$f" "$tlibc" ;;
    linux-source-*)
      # Only drivers/md of the 160 MB tarball, without writing it out.
      dpkg-deb --fsys-tarfile "$debs/$f" | tar -xOf - --wildcards './usr/src/linux-source-*.tar.xz' |
        xz -dc | tar -xf - -C "$src" --wildcards '*/drivers/md/dm-pcache/*' '*/drivers/md/*.h' \
        '*/Documentation/admin-guide/device-mapper/dm-pcache.rst' ||
        die "could not unpack drivers/md/dm-pcache from $f"
      ;;
    *) dpkg -x "$debs/$f" "$root" ;;
    esac
  done <"$debs/.complete"
  echo "$stamp" >"$root/.stamp"
}

fetch_debs
phase download
extract_debs

kver=$(cat "$debs/.kver")
abi=${kver%-amd64}
libpath="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
qemu="$root/usr/bin/qemu-system-x86_64"
busybox="$root/bin/busybox"
[ -x "$qemu" ] || die "no $qemu after unpacking; PCACHE_DM_REFRESH=1 bash $0 fetches again"
[ -x "$busybox" ] || die "no busybox in busybox-static; PCACHE_DM_REFRESH=1 bash $0 fetches again"
qemu_libs=$(LD_LIBRARY_PATH="$libpath" ldd "$qemu" 2>&1 || true)
if [[ "$qemu_libs" == *"not found"* ]]; then
  grep 'not found' <<<"$qemu_libs" >&2
  die "QEMU lacks the libraries above; PCACHE_DM_REFRESH=1 bash $0 fetches them again"
fi
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
qemu_version=$(LD_LIBRARY_PATH="$libpath" "$qemu" --version | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
case "$qemu_version" in
[1-9][0-9].*) ;;
*) die "QEMU $qemu_version unpacked, not bookworm-backports' QEMU 10: PCACHE_DM_REFRESH=1 bash $0 fetches again" ;;
esac

moddir="$root/usr/lib/modules/$kver"
[ -d "$moddir" ] || moddir="$root/lib/modules/$kver"
[ -d "$moddir/kernel" ] || die "no kernel modules unpacked under $moddir"
modbase=$(dirname "$(dirname "$(dirname "$moddir")")")
vmlinuz="$moddir/vmlinuz"
[ -f "$vmlinuz" ] || vmlinuz="$root/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "no vmlinuz for $kver under $root"
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
phase unpack

# ----------------------------------------------------------- dm-pcache.ko ---

# build_module: dm-pcache.ko out of tree, against the kernel's headers.
build_module() {
  local hdr="$root/usr/src" mdir ko loader tl
  mdir=$(find "$src" -mindepth 4 -maxdepth 4 -path '*/drivers/md/dm-pcache' -type d | sed -n 1p)
  [ -n "$mdir" ] || die "no drivers/md/dm-pcache under $src; rm -rf $root and run again"
  ko="$mdir/dm-pcache.ko"
  if [ -f "$ko" ] && [ -f "$mdir/.built-for" ] && [ "$(cat "$mdir/.built-for")" = "$kver $kcc" ]; then
    say "dm-pcache.ko: built ($kver); QEMU $qemu_version"
    return
  fi
  say "dm-pcache.ko: building against $kver headers with $kcc; QEMU $qemu_version"
  # kbuild's objtool and modpost are built on trixie and need its glibc:
  # run them under trixie's loader (objtool is a dispatcher that execs
  # objtool.real-x86, so the real one is wrapped).
  tl="$tlibc/usr/lib/x86_64-linux-gnu"
  loader="$tl/ld-linux-x86-64.so.2"
  [ -x "$loader" ] || loader="$tlibc/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  [ -f "$loader" ] || die "no trixie loader under $tlibc"
  local real_objtool real_modpost
  real_objtool="$root/usr/lib/linux-kbuild-$abi/tools/objtool/objtool.real-x86"
  real_modpost="$root/usr/lib/linux-kbuild-$abi/scripts/mod/modpost.real-lsb-64"
  [ -f "$real_objtool" ] || die "no $real_objtool in linux-kbuild-$abi"
  [ -f "$real_modpost" ] || die "no $real_modpost in linux-kbuild-$abi"
  mkdir -p "$cache/wrap"
  printf '#!/bin/sh\nexec "%s" --library-path "%s:%s" "%s" "$@"\n' "$loader" "$tl" "$tlibc/lib/x86_64-linux-gnu" \
    "$real_objtool" >"$cache/wrap/objtool"
  printf '#!/bin/sh\nexec "%s" --library-path "%s:%s" "%s" "$@"\n' "$loader" "$tl" "$tlibc/lib/x86_64-linux-gnu" \
    "$real_modpost" >"$cache/wrap/modpost"
  chmod 755 "$cache/wrap/objtool" "$cache/wrap/modpost"
  local extra=()
  # gcc 12 lacks -fmin-function-alignment: without this kbuild falls back
  # to -falign-functions (the headers' compiler check is off in Debian).
  [ "$kcc" = x86_64-linux-gnu-gcc-12 ] && extra+=(CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=)
  rm -f "$mdir/.built-for"
  make -C "$hdr/linux-headers-$abi-common" O="$hdr/linux-headers-$kver" M="$mdir" \
    CONFIG_DM_PCACHE=m CC="$kcc" "${extra[@]}" objtool="$cache/wrap/objtool" MODPOST="$cache/wrap/modpost" \
    CONFIG_DEBUG_INFO_BTF_MODULES= -j2 modules >"$cache/module-build.log" 2>&1 || {
    tail -30 "$cache/module-build.log" >&2
    die "the dm-pcache.ko build failed (log: $cache/module-build.log)"
  }
  [ -f "$ko" ] || die "make succeeded but there is no $ko (log: $cache/module-build.log)"
  echo "$kver $kcc" >"$mdir/.built-for"
}
build_module
dmko=$(find "$src" -mindepth 5 -maxdepth 5 -path '*/drivers/md/dm-pcache/dm-pcache.ko' | sed -n 1p)
vermagic=$(kmod modinfo -F vermagic "$dmko" 2>/dev/null || true)
[[ "$vermagic" == "$kver "* ]] || die "dm-pcache.ko has vermagic '$vermagic', not $kver: rm -rf $src and run again"
phase module-build

# ----------------------------------------------------------------- pcache ---

say "build: static pcache (target dir tests/vm/cache-dm/target)"
(
  cd "$repo"
  CARGO_TARGET_DIR="$cache/target" CARGO_PROFILE_RELEASE_DEBUG=0 \
    RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --quiet -j1 --target x86_64-unknown-linux-gnu --bin pcache
) || die "cargo build of the static pcache failed"
pcache_bin="$cache/target/x86_64-unknown-linux-gnu/release/pcache"
pcache_libs=$(ldd "$pcache_bin" 2>&1 || true)
if [[ "$pcache_libs" == *"=>"* ]]; then die "$pcache_bin is not statically linked"; fi
phase pcache-build

# -------------------------------------------------------------- initramfs ---

say "initramfs: kernel $kver"
stage="$cache/initrd.d"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/local/share,lib/x86_64-linux-gnu,lib64,lib/modules,etc,proc,sys,dev,tmp,run,mnt}
cp "$busybox" "$stage/bin/busybox"
cp "$pcache_bin" "$stage/usr/local/bin/pcache"
cp "$here/guest-init.sh" "$stage/init"
cp "$here/jsonflat.awk" "$stage/usr/local/share/jsonflat.awk"
cp "$dmko" "$stage/lib/modules/dm-pcache.ko"
chmod 755 "$stage/init"

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
for b in dmsetup ndctl fio nbd-client; do
  bin=$(find_bin "$b")
  cp "$bin" "$stage/usr/local/bin/$b"
  out=$(LD_LIBRARY_PATH="$libpath" ldd "$bin") || die "ldd $bin failed"
  if grep -q 'not found' <<<"$out"; then
    grep 'not found' <<<"$out" >&2
    die "$b lacks the libraries above; PCACHE_DM_REFRESH=1 bash $0 fetches them"
  fi
  while read -r lib; do
    case "$lib" in
    */ld-linux-x86-64.so.2) cp -L "$lib" "$stage/lib64/ld-linux-x86-64.so.2" ;;
    *) [ -f "$stage/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$stage/lib/x86_64-linux-gnu/" ;;
    esac
  done < <(awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' <<<"$out")
done

# Kernel modules in load order, decompressed (busybox insmod). Those the
# kernel has built in are skipped (modprobe says "builtin").
mods="libnvdimm nfit nd_btt nd_pmem nd_e820 dax_pmem device_dax crc32c-cryptoapi virtio_pci virtio_blk nbd dm-mod"
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
say "initramfs: $(($(stat -c %s "$cache/initrd.cpio") / 1024 / 1024)) MiB, $(wc -l <"$stage/etc/modules.order") modules + dm-pcache.ko"
phase initramfs

# ------------------------------------------------------------------ boots ---

rm -rf "$run"/*.img "$run"/console-phase* "$run"/qemu-phase*.log "$run"/state-phase*
truncate -s 1G "$run/nvdimm.img"
truncate -s 1G "$run/nvdimm2.img"
truncate -s 256M "$run/backing.img"
truncate -s 32M "$run/state.img"

passed=0
failed=0
# boot PHASE EXPECTED MARKER: boots the guest, prints its PASS/FAIL lines as
# they come, and checks that every expected step passed and the guest
# reached its end marker. Returns non-zero otherwise.
boot() {
  local phase=$1 expected=$2 marker=$3 log="$run/console-phase$1.log" qlog="$run/qemu-phase$1.log"
  local start seen=0 rc=0 s n
  # Console lines shown as they come: verdicts, the log tails of failed
  # steps, the guest's notes.
  local shown='^(PASS |FAIL |guest: |note: |POWER-CUT |    \| )'
  start=$(date +%s)
  : >"$log"
  say "boot $phase: dmpc.phase=$phase (TCG; console log $log)"
  LD_LIBRARY_PATH="$libpath" "$qemu" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" \
    -accel tcg -cpu max -smp 2 -m 1G,slots=2,maxmem=4G -machine pc,nvdimm=on \
    -object memory-backend-file,id=nv,share=on,mem-path="$run/nvdimm.img",size=1G \
    -device nvdimm,memdev=nv,id=nvdimm0 \
    -object memory-backend-file,id=nv2,share=on,mem-path="$run/nvdimm2.img",size=1G \
    -device nvdimm,memdev=nv2,id=nvdimm1 \
    -drive file="$run/backing.img",format=raw,if=virtio \
    -drive file="$run/state.img",format=raw,if=virtio \
    -kernel "$vmlinuz" -initrd "$cache/initrd.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 dmpc.phase=$phase" \
    -display none -monitor none -parallel none -serial file:"$log" -net none -no-reboot \
    -pidfile "$run/qemu-phase$phase.pid" \
    </dev/null >"$qlog" 2>&1 &
  qemu_pid=$!
  while :; do
    n=$(grep -c -a -E "$shown" "$log" || true)
    if [ "$n" -gt "$seen" ]; then
      grep -a -E "$shown" "$log" | tr -d '\r' | sed -n "$((seen + 1)),${n}s/^/  /p"
      seen=$n
    fi
    kill -0 "$qemu_pid" 2>/dev/null || break
    if [ $(($(date +%s) - start)) -ge "$timeout_s" ]; then
      kill -KILL "$qemu_pid" 2>/dev/null || true
      echo "  FAIL boot-$phase: timed out after $timeout_s s (PCACHE_DM_TIMEOUT)"
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
  phase "boot$phase"
  # The console's tail only when the guest did not get through (a step's
  # own failure was shown above, with its log).
  if ! grep -a -q "$marker" "$log"; then
    echo "---- last 40 lines of the guest console ($log):"
    tr -d '\r' <"$log" | tail -40
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

# read_state DIR: unpacks the tar the guest wrote raw to the state disk.
read_state() {
  rm -rf "$1"
  mkdir -p "$1"
  tar -xf "$run/state.img" -C "$1" 2>/dev/null
}

# save_fixture NAME STATEDIR: copies the images and the guest's saved state
# to $PCACHE_DM_FIXTURES.
save_fixture() {
  [ -n "$fixtures" ] || return 0
  mkdir -p "$fixtures/$1"
  cp --sparse=always "$run/nvdimm.img" "$fixtures/$1/nvdimm.img"
  cp --sparse=always "$run/backing.img" "$fixtures/$1/backing.img"
  rm -rf "$fixtures/$1/state"
  cp -r "$2" "$fixtures/$1/state"
  say "fixture: $fixtures/$1"
}

ok=1
if boot 1 "$steps_phase1" "POWER-CUT phase 1"; then
  cp --sparse=always "$run/nvdimm.img" "$run/nvdimm-cut.img"
  read_state "$run/state-phase1" || true
  save_fixture cut "$run/state-phase1"
  boot 2 "$steps_phase2" "DONE phase 2" || ok=0
  read_state "$run/state-phase2" || true
  # The module's clean removal is a fixture even while pcache's steps fail.
  [ ! -s "$run/state-phase2/status-clean" ] || save_fixture clean "$run/state-phase2"
else
  ok=0
  count_all "$steps_phase2"
  echo "  (boot 2 skipped: boot 1 failed)"
fi

# ---------------------------------------------------------- step 4: host ---

# pcache on the host reads the NVDIMM file itself: it must find the fsdax
# namespace's data offset (the PFN info block) on its own, and see the
# superblock, cache and tails the guest's `dmsetup status` reported.
jf() { awk -f "$here/jsonflat.awk"; }
# status_field STATUSLINE N: field N of a `dmsetup status` line after the
# target name (1: sb flags, 2: seg_num, ... 7: key_head, 8: dirty_tail,
# 9: key_tail).
status_field() { echo "$1" | awk -v n="$2" '{ for (i = 1; i <= NF; i++) if ($i == "pcache") { print $(i + n); exit } }'; }
# host_checks NAME IMAGE STATUSFILE
host_checks() {
  local name=$1 img=$2 statusf=$3 st out rc got f
  echo "  (host: pcache check / inspect --json of $(basename "$img"))"
  if [ ! -s "$statusf" ]; then
    echo "  FAIL 4-host-$name-check: no saved dmsetup status ($statusf): the guest did not get that far"
    echo "  FAIL 4-host-$name-inspect: no saved dmsetup status"
    failed=$((failed + 2))
    return
  fi
  st=$(cat "$statusf")
  rc=0
  out=$(timeout 120 "$pcache_bin" check "$img" 2>&1) || rc=$?
  if [ "$rc" = 0 ]; then
    echo "  PASS 4-host-$name-check ($(echo "$out" | tail -1))"
    passed=$((passed + 1))
  else
    echo "  FAIL 4-host-$name-check: pcache check $(basename "$img") exited $rc:" \
      "$( (echo "$out" | grep -m2 ': problem: ' || echo "$out" | tail -2) | sed 's|^.*: problem: |problem: |' | tr '\n' ' ')"
    failed=$((failed + 1))
  fi
  rc=0
  out=$(timeout 120 "$pcache_bin" inspect --json "$img" 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    echo "  FAIL 4-host-$name-inspect: pcache inspect --json $(basename "$img") exited $rc:" \
      "$( (echo "$out" | jf | grep -E '^\.(problems\[0\]|superblock\.error)=' || echo "$out" | tail -2) | head -2 | tr '\n' ' ')"
    failed=$((failed + 1))
    return
  fi
  out=$(echo "$out" | jf)
  got=""
  for f in ".superblock.dialect=\"dm-pcache\"" \
    ".superblock.seg_num=$(status_field "$st" 2)" \
    ".backings[0].log.end.seg=$(status_field "$st" 7 | cut -d: -f1)" \
    ".backings[0].log.end.off=$(status_field "$st" 7 | cut -d: -f2)" \
    ".backings[0].dirty_tail.seg=$(status_field "$st" 8 | cut -d: -f1)" \
    ".backings[0].dirty_tail.off=$(status_field "$st" 8 | cut -d: -f2)" \
    ".backings[0].key_tail.seg=$(status_field "$st" 9 | cut -d: -f1)" \
    ".backings[0].key_tail.off=$(status_field "$st" 9 | cut -d: -f2)"; do
    grep -qxF "$f" <<<"$out" || got="$got; want $f, got '$(grep -F "${f%%=*}=" <<<"$out" | head -1)'"
  done
  if [ -z "$got" ]; then
    echo "  PASS 4-host-$name-inspect (seg_num, key_head, dirty_tail and key_tail as dmsetup status: $(echo "$st" | cut -d' ' -f4-))"
    passed=$((passed + 1))
  else
    echo "  FAIL 4-host-$name-inspect: against '$st'${got}"
    failed=$((failed + 1))
  fi
}
if [ -f "$run/nvdimm-cut.img" ]; then
  host_checks cut "$run/nvdimm-cut.img" "$run/state-phase1/status-cut"
  if [ -f "$run/state-phase2/status-clean" ]; then
    host_checks clean "$run/nvdimm.img" "$run/state-phase2/status-clean"
  else
    echo "  FAIL 4-host-clean-check: boot 2 saved no final dmsetup status"
    echo "  FAIL 4-host-clean-inspect: boot 2 saved no final dmsetup status"
    failed=$((failed + 2))
  fi
else
  count_all "$steps_host"
fi
phase host-checks

echo "dm: $passed passed, $failed failed"
echo "dm: phases:$times"
echo "dm: took $(($(date +%s) - t0)) s"
[ "$ok" = 1 ] && [ "$failed" = 0 ] || exit 1
