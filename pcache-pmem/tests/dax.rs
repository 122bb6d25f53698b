//! `DaxMapping` on ordinary files: every persistence path, bounds, locking.

use pcache_pmem::flush::cpu_features;
use pcache_pmem::format::{FormatError, existing_format, format};
use pcache_pmem::{DaxMapping, DaxOptions, FlushInstr, MapMode, Pmem, PmemError};

fn file(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Writes through every API at odd offsets and sizes, then reopens the file
/// and reads everything back.
fn exercise(opts: &DaxOptions, expect_mode: MapMode, expect_instr: Option<FlushInstr>) {
    let f = file(1 << 20);
    {
        let m = DaxMapping::open(f.path(), opts).unwrap();
        assert_eq!(m.mode(), expect_mode);
        if let Some(instr) = expect_instr {
            assert_eq!(m.flush_config().instr, instr);
        }
        m.write(3, &pattern(100, 1)).unwrap();
        m.persist(3, 100).unwrap();
        m.copy_persist(4096 + 5, &pattern(300, 2)).unwrap(); // non-temporal path
        m.copy_persist(9000, &pattern(200, 3)).unwrap(); // cached-store path
        m.copy_nodrain(20000, &pattern(70000, 4)).unwrap();
        m.zero_nodrain(20000 + 100, 50).unwrap();
        m.fence().unwrap();
        m.zero_persist(1 << 19, 1 << 18).unwrap();
    }
    let m = DaxMapping::open(f.path(), &DaxOptions { read_only: true, ..Default::default() }).unwrap();
    let mut buf = vec![0u8; 70000];
    m.read(3, &mut buf[..100]).unwrap();
    assert_eq!(&buf[..100], &pattern(100, 1)[..]);
    m.read(4096 + 5, &mut buf[..300]).unwrap();
    assert_eq!(&buf[..300], &pattern(300, 2)[..]);
    m.read(9000, &mut buf[..200]).unwrap();
    assert_eq!(&buf[..200], &pattern(200, 3)[..]);
    m.read(20000, &mut buf).unwrap();
    let mut expect = pattern(70000, 4);
    expect[100..150].fill(0);
    assert_eq!(buf, expect);
}

#[test]
fn msync_path() {
    exercise(&DaxOptions::default(), MapMode::Emulated, Some(FlushInstr::None));
}

#[test]
fn every_cpu_flush_path() {
    let cpu = cpu_features();
    let mut paths = vec![FlushInstr::None];
    if cpu.clflush {
        paths.push(FlushInstr::Clflush);
    }
    if cpu.clflushopt {
        paths.push(FlushInstr::Clflushopt);
    }
    if cpu.clwb {
        paths.push(FlushInstr::Clwb);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") && cfg!(target_arch = "x86_64") {
        // Every x86-64 CPU has clflush, and CI machines of this project have
        // all three: in CI every path must run, none may be skipped.
        assert!(cpu.clflush && cpu.clflushopt && cpu.clwb, "CI machine lacks a flush instruction: {cpu:?}");
    }
    for instr in paths {
        for movnt in [false, true] {
            let opts =
                DaxOptions { force_pmem: Some(true), flush: Some(instr), movnt: Some(movnt), ..Default::default() };
            exercise(&opts, MapMode::ForcedPmem, Some(instr));
        }
    }
}

#[test]
fn bounds_are_checked() {
    let f = file(8192);
    let m = DaxMapping::open(f.path(), &DaxOptions::default()).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(m.read(8190, &mut buf), Err(PmemError::OutOfBounds { off: 8190, len: 16, size: 8192 })));
    assert!(matches!(m.write(u64::MAX, &buf), Err(PmemError::OutOfBounds { .. })));
    assert!(matches!(m.flush(8000, 200), Err(PmemError::OutOfBounds { .. })));
    assert!(matches!(m.zero_persist(1, u64::MAX), Err(PmemError::OutOfBounds { .. })));
    assert!(matches!(m.copy_persist(8192, &[1]), Err(PmemError::OutOfBounds { .. })));
    m.read(8176, &mut buf).unwrap();
    m.write(8192, &[]).unwrap();
}

#[test]
fn read_only_mapping_refuses_writes() {
    let f = file(8192);
    let m = DaxMapping::open(f.path(), &DaxOptions { read_only: true, ..Default::default() }).unwrap();
    let err = m.write(0, &[1]).unwrap_err();
    assert!(err.to_string().contains("Read-only file system"), "{err}");
}

#[test]
fn second_writer_is_refused_and_readers_wait_for_it() {
    let f = file(8192);
    let first = DaxMapping::open(f.path(), &DaxOptions::default()).unwrap();
    first.write(0, b"owner").unwrap();
    for read_only in [false, true] {
        let err = DaxMapping::open(f.path(), &DaxOptions { read_only, ..Default::default() }).unwrap_err();
        match &err {
            PmemError::Busy { holder, .. } => assert_eq!(*holder, Some(std::process::id()), "{err}"),
            other => panic!("expected Busy, got {other}"),
        }
        assert!(err.to_string().contains("is in use by another process"), "{err}");
    }
    drop(first);
    let reader = DaxMapping::open(f.path(), &DaxOptions { read_only: true, ..Default::default() }).unwrap();
    let reader2 = DaxMapping::open(f.path(), &DaxOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(matches!(DaxMapping::open(f.path(), &DaxOptions::default()), Err(PmemError::Busy { .. })));
    let mut buf = [0u8; 5];
    reader2.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"owner");
    drop((reader, reader2));
}

#[test]
fn unusable_paths_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let err = DaxMapping::open(dir.path().join("missing"), &DaxOptions::default()).unwrap_err();
    assert!(err.to_string().starts_with("open "), "{err}");
    let empty = file(0);
    let err = DaxMapping::open(empty.path(), &DaxOptions::default()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = DaxMapping::open("/dev/null", &DaxOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not device DAX"), "{err}");
    let err = DaxMapping::open(dir.path(), &DaxOptions::default()).unwrap_err();
    assert!(
        matches!(err, PmemError::Unsupported { .. })
            && err.to_string().contains("a directory, not a file, block device or device DAX"),
        "{err}"
    );
}

#[test]
fn format_refusals_and_force() {
    let small = file((512 << 20) - 4096);
    let m = DaxMapping::open(small.path(), &DaxOptions::default()).unwrap();
    assert!(matches!(format(&m, false), Err(FormatError::TooSmall { .. })));
    assert_eq!(existing_format(&m).unwrap(), None);

    let f = file(1 << 30);
    let m = DaxMapping::open(f.path(), &DaxOptions::default()).unwrap();
    let done = format(&m, false).unwrap();
    assert_eq!(done.plan.layout.seg_num(), 63);
    assert!(!done.overwrote);
    assert_eq!(existing_format(&m).unwrap(), Some(63));
    assert!(matches!(format(&m, false), Err(FormatError::AlreadyFormatted { seg_num: 63 })));
    assert!(format(&m, true).unwrap().overwrote);
}
