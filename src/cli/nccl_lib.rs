//! Making libnccl openable for cudarc. cudarc's `nccl` module opens the library by name:
//! `libnccl.so` and a list of other names, but not `libnccl.so.2`, the only name pip's NCCL
//! wheel (`nvidia-nccl-cu12`/`-cu13`) and Debian's `libnccl2` install. When `libnccl.so` does
//! not open, the file is looked for (`MLVPT_NCCL_LIB`, else `libnccl.so.2` in the folders of
//! `LD_LIBRARY_PATH`, then the usual system ones), a `libnccl.so` link to it is made in a folder
//! of the temporary directory, and the processes that need it run with that folder in front of
//! `LD_LIBRARY_PATH`: the ranks `--gpus` starts, or this very process, run again (once) under
//! torchrun or SLURM. The dynamic loader reads `LD_LIBRARY_PATH` when a process starts, so a
//! process cannot change its own search path otherwise.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Names the libnccl file to use.
pub const LIB_VAR: &str = "MLVPT_NCCL_LIB";
/// Set in a process run again by [`reexec_if_needed`], so that it is run again once at most.
const REEXEC_VAR: &str = "MLVPT_NCCL_REEXEC";
/// Where libnccl usually is when no `LD_LIBRARY_PATH` names it.
const SYSTEM_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/cuda/lib64",
];

/// The libnccl file to link to: `MLVPT_NCCL_LIB`, else the first `libnccl.so.2` found.
fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(LIB_VAR) {
        return Some(PathBuf::from(p));
    }
    let ld = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    std::env::split_paths(&ld)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join("libnccl.so.2"))
        .find(|f| f.is_file())
}

/// A folder holding `libnccl.so` -> `file`.
fn shim(file: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let file = std::fs::canonicalize(file).with_context(|| format!("{LIB_VAR}: {} does not exist", file.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    file.hash(&mut h);
    let make = |dir: PathBuf| -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&dir)?;
        let link = dir.join("libnccl.so");
        if std::fs::read_link(&link).ok().as_deref() != Some(file.as_path()) {
            let tmp = dir.join(format!("libnccl.so.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&file, &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
        Ok(dir)
    };
    let base = std::env::temp_dir();
    make(base.join(format!("mlvpt-nccl-{:016x}", h.finish())))
        // Another user's folder of that name: one of this process's own.
        .or_else(|_| make(base.join(format!("mlvpt-nccl-{:016x}-{}", h.finish(), std::process::id()))))
        .with_context(|| format!("making a libnccl.so link to {} in {}", file.display(), base.display()))
}

/// `LD_LIBRARY_PATH` for a process that must open libnccl: `None` when it opens as things are,
/// else the current one behind a folder with a `libnccl.so` link to the file found. An error
/// when there is none to find.
pub fn library_path() -> anyhow::Result<Option<OsString>> {
    if mlvpt::dist::sync::Nccl::available() && std::env::var_os(LIB_VAR).is_none() {
        return Ok(None);
    }
    let Some(file) = find() else {
        // The error of record: how to install NCCL.
        mlvpt::dist::sync::Nccl::require()?;
        return Ok(None);
    };
    let dir = shim(&file)?;
    let old = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&old));
    Ok(Some(std::env::join_paths(dirs).context("LD_LIBRARY_PATH")?))
}

/// Runs this process again with the `LD_LIBRARY_PATH` of [`library_path`] when libnccl does
/// not open as things are (once: a process run again that still cannot open it fails).
pub fn reexec_if_needed() -> anyhow::Result<()> {
    use mlvpt::dist::sync::Nccl;
    if std::env::var_os(REEXEC_VAR).is_some() {
        if Nccl::available() {
            return Ok(());
        }
        Nccl::require()?;
        bail!(
            "libnccl did not open even with a libnccl.so link in front of LD_LIBRARY_PATH ({})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
    }
    if Nccl::available() && std::env::var_os(LIB_VAR).is_none() {
        return Ok(());
    }
    let Some(path) = library_path()? else {
        return Nccl::require();
    };
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding this program to run it again")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC_VAR, "1")
        .exec();
    Err(err).context("running again with libnccl.so on LD_LIBRARY_PATH")
}
