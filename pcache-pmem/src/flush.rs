//! CPU cache-line write-back, fences and non-temporal copies.
//!
//! On x86-64 the best available write-back instruction is chosen at run
//! time: `clwb` (writes the line back and keeps it cached), else
//! `clflushopt`, else `clflush`; `sfence` drains them. Blocks of 256 bytes
//! and more are copied with non-temporal stores, which bypass the cache and
//! are durable after the next `sfence` without any flush.
//!
//! Environment variables force the slower paths, for testing and for tools
//! that cannot run the newer instructions (valgrind 3.19 stops on `clwb` and
//! `clflushopt`), in the manner of PMDK's `PMEM_NO_*`:
//!
//! | variable | effect |
//! |---|---|
//! | `PCACHE_NO_CLWB=1` | do not use `clwb` |
//! | `PCACHE_NO_CLFLUSHOPT=1` | do not use `clflushopt` |
//! | `PCACHE_NO_MOVNT=1` | no non-temporal stores: copy, then flush |
//! | `PCACHE_NO_FLUSH=1` / `=0` | skip flushes (as on eADR platforms) / flush even on eADR |
//!
//! Other architectures build, have no flush instructions here, and persist
//! through `msync` (see [`crate::DaxMapping`]).

use std::fmt;

/// The instruction used to write back cache lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushInstr {
    /// `clwb`: write back, keep the line cached.
    Clwb,
    /// `clflushopt`: write back and invalidate, weakly ordered.
    Clflushopt,
    /// `clflush`: write back and invalidate, strongly ordered.
    Clflush,
    /// No write-back: the platform's persistence domain includes the CPU
    /// caches (eADR), or persistence comes from `msync`.
    None,
}

impl fmt::Display for FlushInstr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlushInstr::Clwb => "clwb",
            FlushInstr::Clflushopt => "clflushopt",
            FlushInstr::Clflush => "clflush",
            FlushInstr::None => "none",
        })
    }
}

/// What the CPU offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `clwb` is available.
    pub clwb: bool,
    /// `clflushopt` is available.
    pub clflushopt: bool,
    /// `clflush` is available.
    pub clflush: bool,
}

/// Detects the CPU's flush instructions.
pub fn cpu_features() -> CpuFeatures {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // Leaf 1 EDX bit 19: CLFSH. Leaf 7 sub-leaf 0 EBX bit 23: CLFLUSHOPT, bit 24: CLWB.
        let leaf1 = __cpuid(1);
        let max = __cpuid(0).eax;
        let leaf7 = if max >= 7 { __cpuid_count(7, 0).ebx } else { 0 };
        CpuFeatures {
            clwb: leaf7 & (1 << 24) != 0,
            clflushopt: leaf7 & (1 << 23) != 0,
            clflush: leaf1.edx & (1 << 19) != 0,
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        CpuFeatures { clwb: false, clflushopt: false, clflush: false }
    }
}

pub(crate) fn env_flag(name: &str) -> Option<bool> {
    match std::env::var(name).ok()?.trim() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// How cache lines are made durable: the instruction, and whether copies
/// use non-temporal stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushConfig {
    /// The write-back instruction.
    pub instr: FlushInstr,
    /// Copies of 256 bytes and more use non-temporal stores.
    pub movnt: bool,
}

impl FlushConfig {
    /// The best the CPU offers, with the `PCACHE_NO_*` overrides applied.
    /// `eadr` says whether the platform flushes CPU caches on power loss.
    pub fn detect(eadr: bool) -> Self {
        let cpu = cpu_features();
        let no_clwb = env_flag("PCACHE_NO_CLWB").unwrap_or(false);
        let no_clflushopt = env_flag("PCACHE_NO_CLFLUSHOPT").unwrap_or(false);
        let instr = if cpu.clwb && !no_clwb {
            FlushInstr::Clwb
        } else if cpu.clflushopt && !no_clflushopt {
            FlushInstr::Clflushopt
        } else if cpu.clflush {
            FlushInstr::Clflush
        } else {
            FlushInstr::None
        };
        let skip = env_flag("PCACHE_NO_FLUSH").unwrap_or(eadr);
        let movnt = cfg!(all(target_arch = "x86_64", not(miri))) && !env_flag("PCACHE_NO_MOVNT").unwrap_or(false);
        Self { instr: if skip { FlushInstr::None } else { instr }, movnt }
    }

    /// Writes back the cache lines covering `[ptr, ptr + len)`.
    ///
    /// # Safety
    /// The range must lie inside one live mapping.
    pub unsafe fn flush(&self, ptr: *const u8, len: usize) {
        if len == 0 || self.instr == FlushInstr::None {
            return;
        }
        let start = ptr as usize & !63;
        let end = ptr as usize + len;
        let mut line = start;
        while line < end {
            // SAFETY: `line` is the start of a cache line that overlaps the
            // caller's range, which lies inside a live mapping; write-back
            // instructions do not change memory contents.
            unsafe { flush_line(self.instr, line as *const u8) };
            line += 64;
        }
    }

    /// Copies `src` to `dst` so that it is durable after the next [`fence`].
    ///
    /// # Safety
    /// `dst..dst + src.len()` must lie inside one live, writable mapping
    /// that `src` does not overlap.
    pub unsafe fn copy_nodrain(&self, dst: *mut u8, src: &[u8]) {
        if self.movnt && src.len() >= 256 {
            // SAFETY: forwarded from the caller.
            unsafe { copy_nt(self.instr, dst, src) };
            return;
        }
        // SAFETY: the caller guarantees the destination range is writable
        // and disjoint from `src`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        // SAFETY: the range was just written, so it is inside the mapping.
        unsafe { self.flush(dst, src.len()) };
    }
}

/// Orders every earlier flush and non-temporal store of this thread before
/// any later store: the drain that makes them durable.
pub fn fence() {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: `sfence` has no operands and only orders stores.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Writes back one cache line.
///
/// # Safety
/// `p` must point into a live mapping.
#[inline]
unsafe fn flush_line(instr: FlushInstr, p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    match instr {
        // SAFETY: the caller guarantees `p` points into a live mapping; the
        // instructions only write the line back; `detect` chose them only if
        // the CPU has them.
        FlushInstr::Clwb => unsafe {
            std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags));
        },
        // SAFETY: as above.
        FlushInstr::Clflushopt => unsafe {
            std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags));
        },
        // SAFETY: as above; `clflush` is part of SSE2, present on every x86-64.
        FlushInstr::Clflush => unsafe { std::arch::x86_64::_mm_clflush(p) },
        FlushInstr::None => {}
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = (instr, p);
}

/// Non-temporal copy: cached stores plus write-back for the unaligned head
/// and tail, 16-byte streaming stores for the aligned middle.
///
/// # Safety
/// As [`FlushConfig::copy_nodrain`].
unsafe fn copy_nt(instr: FlushInstr, dst: *mut u8, src: &[u8]) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let len = src.len();
        let head = (16 - (dst as usize & 15)) & 15;
        let head = head.min(len);
        let body = (len - head) & !15;
        let tail = len - head - body;
        // SAFETY: every pointer below stays inside `dst..dst + len` and
        // `src`, which the caller guarantees are valid and disjoint; the
        // streaming stores target 16-byte aligned addresses.
        unsafe {
            if head > 0 {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
                flush_line(instr, dst);
            }
            let mut i = head;
            while i < head + body {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm_stream_si128(dst.add(i) as *mut __m128i, v);
                i += 16;
            }
            if tail > 0 {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(i), dst.add(i), tail);
                flush_line(instr, dst.add(i));
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        let _ = instr;
        // SAFETY: forwarded from the caller.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction path and the non-temporal copy, on ordinary memory:
    /// the bytes arrive intact at every alignment and length.
    #[test]
    fn every_path_copies_correctly() {
        let cpu = cpu_features();
        let mut instrs = vec![FlushInstr::None];
        if cpu.clflush {
            instrs.push(FlushInstr::Clflush);
        }
        if cpu.clflushopt {
            instrs.push(FlushInstr::Clflushopt);
        }
        if cpu.clwb {
            instrs.push(FlushInstr::Clwb);
        }
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
        for instr in instrs {
            for movnt in [false, true] {
                let cfg = FlushConfig { instr, movnt };
                for (off, len) in [(0, 0), (1, 1), (3, 255), (0, 256), (5, 300), (17, 4096), (64, 4900)] {
                    let mut dst = vec![0u8; 5100];
                    // SAFETY: `dst` is a live, writable buffer of 5100 bytes
                    // and `off + len` stays inside it.
                    unsafe { cfg.copy_nodrain(dst.as_mut_ptr().add(off), &src[..len]) };
                    fence();
                    assert_eq!(&dst[off..off + len], &src[..len], "{instr} movnt={movnt} off={off} len={len}");
                    assert!(dst[..off].iter().all(|&b| b == 0));
                    assert!(dst[off + len..].iter().all(|&b| b == 0));
                }
            }
        }
    }

    #[test]
    fn display_names() {
        assert_eq!(FlushInstr::Clwb.to_string(), "clwb");
        assert_eq!(FlushInstr::None.to_string(), "none");
    }
}
