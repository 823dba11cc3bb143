//! The shared-memory segment that the ranks of one communicator meet in: a file in `/dev/shm`
//! (else the temp directory) named by the unique id, mapped by every rank, whether the ranks
//! are threads of one process or separate processes of one machine.
//!
//! Layout: a [`Header`] (the per-rank records the protocol synchronises on, all atomics), then
//! one data slot of [`SLOT_BYTES`] per rank. The file is sized for [`MAX_RANKS`] up front, so
//! every rank maps the same length whatever it believes the rank count is (a mismatch is then
//! an error message, not a SIGBUS); tmpfs allocates only the pages that are written. A fresh
//! file reads as zeros, which is the protocol's initial state, so nobody has to initialise it.

use std::ffi::{c_int, c_void};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Ranks one communicator can have.
pub const MAX_RANKS: usize = 64;
/// Bytes one rank contributes per protocol step; larger collectives run in several steps.
pub const SLOT_BYTES: usize = 1 << 20;
/// Words of a collective's descriptor (see `proto::Op::desc`).
pub const DESC_WORDS: usize = 6;

/// One rank's record. 128 bytes, so ranks do not share cache lines.
#[repr(C)]
pub struct RankRec {
    /// 0 until the rank claims its place (1, by compare-and-swap: a second claim is an
    /// error), 2 once `pid` and `device` are written.
    pub joined: AtomicU32,
    /// The rank's process, for liveness checks.
    pub pid: AtomicU32,
    /// Set when the rank destroys or aborts its communicator.
    pub departed: AtomicU32,
    /// The CUDA device the rank uses (duplicates within one process are an error, as in NCCL).
    pub device: AtomicU32,
    /// The last step whose contribution and descriptor this rank has published.
    pub posted: AtomicU64,
    /// The last step this rank has finished reading the others' slots for.
    pub done: AtomicU64,
    /// The collective of step `posted`.
    pub desc: [AtomicU64; DESC_WORDS],
    _pad: [u64; 6],
}

#[repr(C)]
pub struct Header {
    /// The rank count, set by the first rank to join (0 before).
    pub nranks: AtomicU32,
    /// 0, or 1 + the rank that called ncclCommAbort.
    pub abort: AtomicU32,
    _pad: [u64; 15],
    pub ranks: [RankRec; MAX_RANKS],
}

// The layout `sweep_stale` reads without mapping.
const _: () = assert!(std::mem::size_of::<RankRec>() == 128);
const _: () = assert!(std::mem::offset_of!(Header, ranks) == 128);
const _: () = assert!(std::mem::offset_of!(RankRec, pid) == 4);

/// Bytes before the first slot (page-aligned).
const DATA_OFFSET: usize = std::mem::size_of::<Header>().div_ceil(4096) * 4096;
/// The file's length.
pub const SEGMENT_BYTES: usize = DATA_OFFSET + MAX_RANKS * SLOT_BYTES;

extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn posix_fallocate(fd: c_int, offset: i64, len: i64) -> c_int;
}
const PROT_READ: c_int = 1;
const PROT_WRITE: c_int = 2;
const MAP_SHARED: c_int = 1;
const EPERM: i32 = 1;

/// One rank's mapping of a segment.
pub struct Segment {
    base: *mut u8,
    pub path: PathBuf,
}

// SAFETY: the mapping is shared memory accessed through atomics (header) or under the
// protocol's ordering (slots); the pointer itself may move between threads.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Segment {
    /// Opens the segment at `path`, creating it (exclusively) if this rank comes first, and
    /// reserves the pages `rank` writes (the header and its slot), so that a full `/dev/shm`
    /// is an error here rather than a SIGBUS in a collective.
    pub fn open(path: &Path, rank: usize) -> std::io::Result<Segment> {
        let file = match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new().read(true).write(true).open(path)?,
            Err(e) => return Err(e),
        };
        // Every rank sets the same length, so it does not matter who comes first.
        file.set_len(SEGMENT_BYTES as u64)?;
        for (off, len) in [(0, DATA_OFFSET), (DATA_OFFSET + rank * SLOT_BYTES, SLOT_BYTES)] {
            // SAFETY: a plain call on an open fd, inside the file's length.
            let e = unsafe { posix_fallocate(file.as_raw_fd(), off as i64, len as i64) };
            if e != 0 {
                return Err(std::io::Error::from_raw_os_error(e));
            }
        }
        // SAFETY: a fresh shared mapping of the whole file; the fd may close afterwards.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                SEGMENT_BYTES,
                PROT_READ | PROT_WRITE,
                MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p as isize == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Segment {
            base: p as *mut u8,
            path: path.to_path_buf(),
        })
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, at least size_of::<Header>() long, and all of
        // Header is atomics or padding, valid for any bytes.
        unsafe { &*(self.base as *const Header) }
    }

    pub fn rank(&self, r: usize) -> &RankRec {
        &self.header().ranks[r]
    }

    /// Rank `r`'s data slot.
    pub fn slot(&self, r: usize) -> *mut u8 {
        assert!(r < MAX_RANKS);
        // SAFETY: inside the mapping.
        unsafe { self.base.add(DATA_OFFSET + r * SLOT_BYTES) }
    }

    /// Removes the file (the mappings stay valid); a missing file is fine (a peer won the race).
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { munmap(self.base as *mut c_void, SEGMENT_BYTES) };
    }
}

/// Whether process `pid` still runs. `kill(pid, 0)` answers for a zombie too (a child its
/// parent has not reaped yet), so on Linux a zombie's `/proc/<pid>/stat` state counts as gone.
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if pid == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { kill(pid as c_int, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() != Some(EPERM) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(s) => !matches!(s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z' | 'X')),
        Err(_) => true,
    }
}

/// Where new segments go: `/dev/shm` when it is a writable directory, else the temp directory.
pub fn segment_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    match std::fs::metadata(shm) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => shm.to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

/// Removes segments that no process can use any more, left by ranks that were all killed
/// (nobody left to remove them): named by a creator that is gone, and every rank that joined
/// is gone too. Read through the file, without mapping it.
pub fn sweep_stale() {
    let dir = segment_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vgpu-nccl-")) else {
            continue;
        };
        let Some(creator) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if alive(creator) {
            continue;
        }
        // A file shorter than the header (not one of ours, or cut short) reads as zeros.
        let mut head = Vec::new();
        let read = std::fs::File::open(e.path())
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, DATA_OFFSET as u64), &mut head));
        if read.is_err() {
            continue;
        }
        let word = |at: usize| head.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let nranks = word(0).unwrap_or(0) as usize;
        // RankRec q starts at 128 * (q + 1); its pid is its second word.
        let live = (0..nranks.min(MAX_RANKS)).any(|q| word(128 * (q + 1) + 4).is_some_and(|pid| pid != 0 && alive(pid)));
        if !live {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
