//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

pub mod attach;

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
