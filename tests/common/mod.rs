//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

pub mod attach;
pub mod raw_nbd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use attach::*;

/// Runs `pcache` with `args` and the extra environment `env`.
pub fn pcache_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pcache")
}

/// Runs `pcache` with `args`.
pub fn pcache(args: &[&str]) -> Output {
    pcache_env(args, &[])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

/// A temporary directory, removed when dropped.
pub struct Dir {
    pub dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a sparse image into a new file of the same size.
pub fn write_image(img: &pcache_format::sparse::SparseImage, path: &Path) {
    use pcache_format::ReadMedia;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(img.size()).unwrap();
    let mut page = [0u8; 4096];
    for off in img.written_pages() {
        img.read_at(off, &mut page).unwrap();
        f.write_all_at(&page, off).unwrap();
    }
}

/// Flips the low bit of the byte at `off` of the file at `path`.
pub fn flip_byte(path: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off).unwrap();
}

/// A formatted 1 GiB pmem file in a temporary directory, with backing
/// files and a socket path beside it.
pub struct Rig {
    pub d: Dir,
    pub dev: PathBuf,
}

impl Rig {
    pub fn new() -> Rig {
        let d = Dir::new();
        let dev = d.path("pmem.img");
        let o = pcache(&["format", s(&dev), "--size", "1G"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        Rig { d, dev }
    }

    /// A new backing file of `size` bytes.
    pub fn backing(&self, name: &str, size: u64) -> PathBuf {
        let p = self.d.path(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    /// A new backing file of `size` bytes, every one of them `byte`, all
    /// of it allocated.
    pub fn backing_filled(&self, name: &str, size: u64, byte: u8) -> PathBuf {
        let p = self.d.path(name);
        std::fs::write(&p, vec![byte; size as usize]).unwrap();
        p
    }

    pub fn socket(&self) -> PathBuf {
        self.d.path("nbd.sock")
    }
}
