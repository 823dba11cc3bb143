//! Shared by the tests that run kernel CUDA sources on the CPU emulator (`cuda_bf16.h`: one
//! std::thread per CUDA thread, barriers for `__syncthreads` and shuffles): building a C++
//! driver from this folder, the test seed, and reading the driver's dumps.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A compiled driver in its own temporary folder (removed on drop), and the seed to run it with.
pub struct Driver {
    pub tmp: tempfile::TempDir,
    pub exe: PathBuf,
    pub seed: u32,
}

impl Driver {
    /// Runs the driver with `args` after a fresh dump folder `name` (inside the temporary
    /// folder), which it returns; fails the test, with the driver's stderr, if the driver fails.
    pub fn run(&self, name: &str, args: &[String]) -> PathBuf {
        let dir = self.tmp.path().join(name);
        let out = Command::new(&self.exe).arg(&dir).args(args).output().expect("running the emulated kernels");
        assert!(out.status.success(), "{name}: driver failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    }
}

fn compiler() -> Option<String> {
    let candidates = std::env::var("CXX").ok().into_iter().chain(["g++".to_string(), "c++".to_string()]);
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false))
}

/// Compiles `tests/cuda_emu/<driver>.cpp` (which includes a kernel file from `kernels/`).
/// `None`, with a message naming `tag`, when no C++20 compiler is available: an environment
/// limit, not a kernel bug. Any other compile error fails the test.
pub fn build(tag: &str, driver: &str) -> Option<Driver> {
    let Some(cxx) = compiler() else {
        eprintln!("{tag}: no C++ compiler (CXX, g++, c++) found; skipped");
        return None;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = tmp.path().join(driver);
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-w"])
        .arg("-I")
        .arg(root.join("tests/cuda_emu"))
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-o")
        .arg(&exe)
        .arg(root.join(format!("tests/cuda_emu/{driver}.cpp")))
        .output()
        .expect("running the C++ compiler");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("barrier") && (err.contains("No such file") || err.contains("not a member")) {
            eprintln!("{tag}: {cxx} lacks C++20 <barrier>; skipped");
            return None;
        }
        panic!("{tag}: compiling {driver}.cpp with {cxx} failed:\n{err}");
    }
    let seed: u32 = std::env::var("MLVPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(1));
    eprintln!("{tag}: MLVPT_TEST_SEED={seed}");
    Some(Driver { tmp, exe, seed })
}

fn read_words(dir: &Path, name: &str) -> Vec<[u8; 4]> {
    let b = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
    b.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// A dump of little-endian f32 values.
pub fn read_f32(dir: &Path, name: &str) -> Vec<f32> {
    read_words(dir, name).into_iter().map(f32::from_le_bytes).collect()
}

/// A dump of little-endian u32 values.
#[allow(dead_code)]
pub fn read_u32(dir: &Path, name: &str) -> Vec<u32> {
    read_words(dir, name).into_iter().map(u32::from_le_bytes).collect()
}
