#!/usr/bin/env bash
# Runs every fuzz target (pcache-format's decoders, the NBD server, the engine) for a while; exits non-zero if any
# finds a crash (a panic, a failed invariant, a timeout, an out-of-memory).
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]      (default 20; from any cwd)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler
# (libfuzzer-sys builds libFuzzer). Works on stable Rust: cargo-fuzz's
# nightly flags are let through with RUSTC_BOOTSTRAP=1.
#
# Environment:
#   FUZZ_TARGETS     targets to run, space-separated (default: all eight)
#   FUZZ_SANITIZER   cargo fuzz --sanitizer (default: none). pcache-format
#                    forbids unsafe code, so AddressSanitizer finds little
#                    there and costs 3-8x in executions; set
#                    FUZZ_SANITIZER=address for a run with it.
#
# Seeds are generated first (fuzz/corpus/ is git-ignored); whatever the
# fuzzer adds to fuzz/corpus/<target>/ is kept for the next run. A crash
# input is saved under fuzz/artifacts/<target>/ and its path printed; replay
# it with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <path>` from the repo.
set -euo pipefail

seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: bash fuzz/run.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(dirname "$fuzz_dir")"
read -r -a targets <<<"${FUZZ_TARGETS:-superblock copy_selection kset backing_table image nbd nbd_client engine}"
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

echo "== seeds"
(cd "$fuzz_dir" && cargo run --release --quiet --features make-seeds --bin make-seeds -- "$fuzz_dir/corpus")

export RUSTC_BOOTSTRAP=1
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
cd "$repo_dir"
for t in "${targets[@]}"; do
    echo "== $t (${seconds}s, sanitizer $sanitizer)"
    log="$logs/$t.log"
    mkdir -p "$fuzz_dir/corpus/$t"
    status=0
    cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer" "$t" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=60 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    if [ "$status" -eq 0 ]; then
        done_line="$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1 || true)"
        cov_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
        echo "$t: ${done_line:-no 'Done N runs' line}"
        if [ -n "$cov_line" ]; then
            echo "$t: $cov_line"
        fi
    else
        failed+=("$t")
        echo "$t: FAILED (exit $status); its log, without backtraces, cut to 400 columns:"
        # The panic message (or build error), then libFuzzer's and cargo
        # fuzz's report; the crash input itself is in the artifact file.
        grep -vE '^[[:space:]]+(#?[0-9]+: |#[0-9]+ 0x|at )' "$log" | grep -vE '^[[:space:]]*\[[0-9, ]+\]$' |
            tail -n 60 | cut -c1-400 || true
        grep -E 'Test unit written to' "$log" | sed "s/^/$t: /" || true
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "== FAILED: ${failed[*]} (inputs under $fuzz_dir/artifacts/)"
    exit 1
fi
echo "== all ${#targets[@]} targets ran ${seconds}s each without a crash"
