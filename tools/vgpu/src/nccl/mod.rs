//! NCCL on the virtual device: the `nccl*` calls cudarc 0.19's `nccl` module makes (dynamic
//! loading, `libnccl.so`), for ranks that are threads of one process or processes of one
//! machine, meeting in a shared-memory segment ([`shm`], protocol in [`proto`]).
//!
//! Execution: a collective runs synchronously at enqueue, like every stream operation of
//! [`crate::driver`], so its call blocks until every rank has contributed and returns the
//! collective's own result (`ncclRemoteError` for a dead, departed or aborting peer,
//! `ncclSystemError` for a timeout, `ncclInvalidUsage` for collectives that differ across
//! ranks). A failure also becomes the communicator's async error (`ncclCommGetAsyncError`),
//! sticky: later collectives on it return it at once. Between `ncclGroupStart` and
//! `ncclGroupEnd` the calls are checked and recorded at enqueue but run at `ncclGroupEnd`, one
//! thread per communicator, so one thread can drive several ranks (`ncclCommInitAll` users)
//! without deadlocking; `ncclGroupEnd` returns the first failure. streamcheck records each
//! collective at enqueue on its stream: it reads sendbuff and writes recvbuff, as a kernel.
//!
//! Argument checks as NCCL's: types (no fp8), ops, roots, buffers inside live allocations of
//! the communicator's device (sendbuff only where it is read), the stream on that device.
//! Messages go to stderr as `vgpu nccl: ...` and to `ncclGetLastError`.
#![allow(non_snake_case, non_camel_case_types, non_upper_case_globals, clippy::missing_safety_doc)]

/// `?` for functions that return a result code.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

mod coll;
pub mod proto;
pub mod reduce;
pub mod shm;

pub use coll::*;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::{Fail, IdInfo, Op, Rank, Seq};

pub type ncclResult_t = u32;
pub const ncclSuccess: ncclResult_t = 0;
pub const ncclUnhandledCudaError: ncclResult_t = 1;
pub const ncclSystemError: ncclResult_t = 2;
pub const ncclInternalError: ncclResult_t = 3;
pub const ncclInvalidArgument: ncclResult_t = 4;
pub const ncclInvalidUsage: ncclResult_t = 5;
pub const ncclRemoteError: ncclResult_t = 6;
pub const ncclInProgress: ncclResult_t = 7;

/// `ncclDataType_t` and `ncclRedOp_t` cross the ABI as their `u32` values.
pub type ncclDataType_t = u32;
pub type ncclRedOp_t = u32;

/// The version reported: NCCL 2.28.3 (`NCCL_VERSION_CODE`, major * 10000 + minor * 100 + patch).
pub const VERSION: c_int = 22803;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    pub internal: [c_char; 128],
}

/// The opaque object behind a communicator handle; only its address matters.
#[repr(C)]
pub struct ncclComm {
    _tag: u64,
}
pub type ncclComm_t = *mut ncclComm;
pub type cudaStream_t = crate::driver::CUstream;

// ---------------------------------------------------------------------------------------------
// Communicator handles
// ---------------------------------------------------------------------------------------------

struct Handle {
    rank: Rank,
    /// Held while a collective runs on this rank.
    seq: Mutex<Seq>,
    /// The async error (sticky once set).
    error: AtomicU32,
    last: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn comms() -> MutexGuard<'static, HashMap<usize, Arc<Handle>>> {
    static C: std::sync::OnceLock<Mutex<HashMap<usize, Arc<Handle>>>> = std::sync::OnceLock::new();
    lock(C.get_or_init(Default::default))
}

/// A fresh handle value: the address of a leaked 8-byte box (never dereferenced by callers).
fn new_tag() -> usize {
    Box::into_raw(Box::new(ncclComm { _tag: 0 })) as usize
}

fn drop_tag(t: usize) {
    // SAFETY: `t` came from `new_tag` and was removed from the table, so it is freed once.
    unsafe { drop(Box::from_raw(t as *mut ncclComm)) };
}

fn register(rank: Rank, tag: usize) {
    let h = Handle {
        rank,
        seq: Mutex::new(Seq::default()),
        error: AtomicU32::new(ncclSuccess),
        last: Mutex::new(String::new()),
    };
    comms().insert(tag, Arc::new(h));
}

fn handle(comm: ncclComm_t) -> Result<Arc<Handle>, ncclResult_t> {
    match comms().get(&(comm as usize)) {
        Some(h) => Ok(h.clone()),
        None => Err(report(None, ncclInvalidArgument, format!("invalid communicator {comm:p}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn last_global() -> MutexGuard<'static, String> {
    static L: Mutex<String> = Mutex::new(String::new());
    lock(&L)
}

/// Prints `msg`, keeps it for `ncclGetLastError`, returns `code`.
fn report(h: Option<&Handle>, code: ncclResult_t, msg: String) -> ncclResult_t {
    eprintln!("vgpu nccl: {msg}");
    if let Some(h) = h {
        *lock(&h.last) = msg.clone();
    }
    *last_global() = msg;
    code
}

/// A collective failed while running: the communicator's async error becomes `code`.
fn fail(h: &Handle, (code, msg): Fail) -> ncclResult_t {
    let _ = h.error.compare_exchange(ncclSuccess, code, Ordering::AcqRel, Ordering::Acquire);
    report(Some(h), code, msg)
}

fn nonnull<T>(p: *const T, what: &str) -> Result<(), ncclResult_t> {
    if p.is_null() {
        Err(report(None, ncclInvalidArgument, format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    let s: &'static std::ffi::CStr = match result {
        ncclSuccess => c"no error",
        ncclUnhandledCudaError => c"unhandled cuda error",
        ncclSystemError => c"unhandled system error (timeout, or a system call failed)",
        ncclInternalError => c"internal error",
        ncclInvalidArgument => c"invalid argument",
        ncclInvalidUsage => c"invalid usage",
        ncclRemoteError => c"remote process exited, aborted or left the communicator",
        ncclInProgress => c"NCCL operation in progress",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The last error message: the communicator's when `comm` is a live one, else the last of
/// the process. The pointer stays valid until this thread calls again.
#[no_mangle]
pub unsafe extern "C" fn ncclGetLastError(comm: ncclComm_t) -> *const c_char {
    thread_local! {
        static BUF: RefCell<CString> = RefCell::new(CString::default());
    }
    let msg = match comms().get(&(comm as usize)) {
        Some(h) => lock(&h.last).clone(),
        None => last_global().clone(),
    };
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    BUF.with(|b| {
        *b.borrow_mut() = c;
        b.borrow().as_ptr()
    })
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    tri!(nonnull(version, "ncclGetVersion: version"));
    // SAFETY: checked non-null; the caller provides a writable int.
    unsafe { *version = VERSION };
    ncclSuccess
}

// ---------------------------------------------------------------------------------------------
// Unique ids
// ---------------------------------------------------------------------------------------------

const ID_MAGIC: &[u8; 8] = b"vgpuNCL1";
const ID_PATH: usize = 16;

/// The id's bytes: magic, the creator's pid, the segment's path (NUL-terminated).
fn id_bytes(id: &ncclUniqueId) -> [u8; 128] {
    id.internal.map(|c| c as u8)
}

fn parse_id(id: &ncclUniqueId) -> Option<IdInfo> {
    let b = id_bytes(id);
    if &b[..8] != ID_MAGIC {
        return None;
    }
    let creator = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let path = &b[ID_PATH..];
    let end = path.iter().position(|&c| c == 0)?;
    let path = PathBuf::from(std::str::from_utf8(&path[..end]).ok()?);
    Some(IdInfo { path, creator })
}

/// The shared segment a unique id names (for tests that check it is removed).
pub fn segment_path(id: &ncclUniqueId) -> Option<PathBuf> {
    parse_id(id).map(|i| i.path)
}

/// A name nobody else picks: pid, time, a per-process counter, hashed with std's random keys.
fn random_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    format!("vgpu-nccl-{}-{:016x}", std::process::id(), h.finish())
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(uniqueId: *mut ncclUniqueId) -> ncclResult_t {
    tri!(nonnull(uniqueId, "ncclGetUniqueId: uniqueId"));
    shm::sweep_stale();
    let path = shm::segment_dir().join(random_name());
    let p = path.to_string_lossy();
    if p.len() >= 128 - ID_PATH {
        return report(
            None,
            ncclSystemError,
            format!("ncclGetUniqueId: segment path {p} is too long for an id"),
        );
    }
    let mut b = [0u8; 128];
    b[..8].copy_from_slice(ID_MAGIC);
    b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    b[ID_PATH..ID_PATH + p.len()].copy_from_slice(p.as_bytes());
    // SAFETY: checked non-null.
    unsafe { (*uniqueId).internal = b.map(|c| c as c_char) };
    ncclSuccess
}

// ---------------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------------

/// Work deferred to `ncclGroupEnd`.
enum Deferred {
    Init {
        tag: usize,
        info: IdInfo,
        nranks: usize,
        rank: usize,
        device: i32,
    },
    Coll {
        h: Arc<Handle>,
        op: Op,
    },
}

#[derive(Default)]
struct Group {
    depth: u32,
    work: Vec<Deferred>,
}

thread_local! {
    static GROUP: RefCell<Group> = RefCell::default();
}

fn in_group() -> bool {
    GROUP.with(|g| g.borrow().depth > 0)
}

fn defer(d: Deferred) {
    GROUP.with(|g| g.borrow_mut().work.push(d));
}

#[no_mangle]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    GROUP.with(|g| g.borrow_mut().depth += 1);
    ncclSuccess
}

#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    let work = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return None;
        }
        g.depth -= 1;
        Some(if g.depth == 0 { std::mem::take(&mut g.work) } else { Vec::new() })
    });
    let Some(work) = work else {
        return report(None, ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart".into());
    };
    // One unit per new communicator and per existing one (its collectives in enqueue order).
    let mut units: Vec<Vec<Deferred>> = Vec::new();
    for d in work {
        let same = |u: &Vec<Deferred>| match (&u[0], &d) {
            (Deferred::Coll { h: a, .. }, Deferred::Coll { h: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        };
        match units.iter_mut().find(|u| same(u)) {
            Some(u) => u.push(d),
            None => units.push(vec![d]),
        }
    }
    let run = |unit: Vec<Deferred>| -> ncclResult_t {
        for d in unit {
            let r = match d {
                Deferred::Init {
                    tag,
                    info,
                    nranks,
                    rank,
                    device,
                } => init_now(tag, &info, nranks, rank, device),
                // SAFETY: the buffers were checked at enqueue.
                Deferred::Coll { h, op } => unsafe { coll::run_now(&h, &op) },
            };
            if r != ncclSuccess {
                return r;
            }
        }
        ncclSuccess
    };
    let results: Vec<ncclResult_t> = if units.len() <= 1 {
        units.into_iter().map(run).collect()
    } else {
        std::thread::scope(|s| {
            let joins: Vec<_> = units.into_iter().map(|u| s.spawn(move || run(u))).collect();
            joins.into_iter().map(|j| j.join().unwrap_or(ncclInternalError)).collect()
        })
    };
    results.into_iter().find(|&r| r != ncclSuccess).unwrap_or(ncclSuccess)
}

// ---------------------------------------------------------------------------------------------
// Communicators
// ---------------------------------------------------------------------------------------------

/// Joins and registers the rank under `tag` (freeing the tag on failure).
fn init_now(tag: usize, info: &IdInfo, nranks: usize, rank: usize, device: i32) -> ncclResult_t {
    match Rank::join(info, nranks, rank, device) {
        Ok(r) => {
            register(r, tag);
            ncclSuccess
        }
        Err((code, msg)) => {
            drop_tag(tag);
            report(None, code, msg)
        }
    }
}

fn init_rank(comm: *mut ncclComm_t, nranks: c_int, id: &ncclUniqueId, rank: c_int, device: i32) -> ncclResult_t {
    tri!(nonnull(comm, "ncclCommInitRank: comm"));
    let Some(info) = parse_id(id) else {
        return report(
            None,
            ncclInvalidArgument,
            "ncclCommInitRank: the unique id does not come from this library's ncclGetUniqueId".into(),
        );
    };
    if nranks < 1 || rank < 0 || rank >= nranks {
        return report(
            None,
            ncclInvalidArgument,
            format!("ncclCommInitRank: rank {rank} of {nranks} ranks"),
        );
    }
    let tag = new_tag();
    // SAFETY: checked non-null.
    unsafe { *comm = tag as ncclComm_t };
    let (nranks, rank) = (nranks as usize, rank as usize);
    if in_group() {
        defer(Deferred::Init {
            tag,
            info,
            nranks,
            rank,
            device,
        });
        return ncclSuccess;
    }
    let r = init_now(tag, &info, nranks, rank, device);
    if r != ncclSuccess {
        // SAFETY: checked non-null.
        unsafe { *comm = std::ptr::null_mut() };
    }
    r
}

/// The rank's device: the calling thread's current CUDA device, as NCCL's `cudaGetDevice`
/// (0 without a current context).
fn current_device() -> i32 {
    crate::driver::current_device().unwrap_or(0)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(comm: *mut ncclComm_t, nranks: c_int, commId: ncclUniqueId, rank: c_int) -> ncclResult_t {
    init_rank(comm, nranks, &commId, rank, current_device())
}

/// As `ncclCommInitRank`; the config (blocking or not, CTA counts, ...) changes nothing here,
/// since every call completes before it returns.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    commId: ncclUniqueId,
    rank: c_int,
    _config: *mut c_void,
) -> ncclResult_t {
    init_rank(comm, nranks, &commId, rank, current_device())
}

/// `ndev` ranks of a new communicator in this process, rank i on `devlist[i]` (or device i
/// when `devlist` is NULL), joined from one thread each.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitAll(comm: *mut ncclComm_t, ndev: c_int, devlist: *const c_int) -> ncclResult_t {
    tri!(nonnull(comm, "ncclCommInitAll: comm"));
    if ndev < 1 {
        return report(None, ncclInvalidArgument, format!("ncclCommInitAll: ndev {ndev}"));
    }
    let count = crate::device::device_count();
    let devices: Vec<i32> = (0..ndev as usize)
        // SAFETY: devlist, when given, holds ndev ints.
        .map(|i| if devlist.is_null() { i as i32 } else { unsafe { *devlist.add(i) } })
        .collect();
    if let Some(d) = devices.iter().find(|&&d| d < 0 || d >= count) {
        return report(None, ncclInvalidArgument, format!("ncclCommInitAll: device {d} of {count}"));
    }
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: a local id.
    let r = unsafe { ncclGetUniqueId(&mut id) };
    if r != ncclSuccess {
        return r;
    }
    // SAFETY: comm holds ndev handles.
    let out = unsafe { std::slice::from_raw_parts_mut(comm, ndev as usize) };
    ncclGroupStart();
    for (i, (slot, &d)) in out.iter_mut().zip(&devices).enumerate() {
        init_rank(slot, ndev, &id, i as c_int, d);
    }
    let r = ncclGroupEnd();
    if r != ncclSuccess {
        // Leave the ranks that did join, so the others fail fast and the segment goes.
        for slot in out.iter_mut() {
            if comms().contains_key(&(*slot as usize)) {
                close(*slot, false);
            }
            *slot = std::ptr::null_mut();
        }
    }
    r
}

/// Takes the handle out of the table, waits for a collective running on it, leaves.
fn close(comm: ncclComm_t, abort: bool) -> ncclResult_t {
    let Some(h) = comms().remove(&(comm as usize)) else {
        return report(None, ncclInvalidArgument, format!("invalid communicator {comm:p}"));
    };
    if abort {
        // Set the flag before taking the lock, so that a collective waiting on it fails now.
        let _ = h
            .rank
            .seg
            .header()
            .abort
            .compare_exchange(0, h.rank.rank as u32 + 1, Ordering::AcqRel, Ordering::Acquire);
    }
    drop(lock(&h.seq));
    h.rank.leave(abort);
    drop_tag(comm as usize);
    ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    close(comm, false)
}

/// Frees the communicator and fails the collectives its peers wait in (`ncclRemoteError`).
#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    close(comm, true)
}

/// Nothing is ever outstanding (collectives complete in their call): only checks the handle.
#[no_mangle]
pub unsafe extern "C" fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    tri!(handle(comm));
    ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(comm: ncclComm_t, asyncError: *mut ncclResult_t) -> ncclResult_t {
    tri!(nonnull(asyncError, "ncclCommGetAsyncError: asyncError"));
    let h = tri!(handle(comm));
    // SAFETY: checked non-null.
    unsafe { *asyncError = h.error.load(Ordering::Acquire) };
    ncclSuccess
}

/// Writes one property of a communicator.
unsafe fn query(comm: ncclComm_t, out: *mut c_int, what: &str, f: impl Fn(&Rank) -> c_int) -> ncclResult_t {
    tri!(nonnull(out, what));
    let h = tri!(handle(comm));
    // SAFETY: checked non-null.
    unsafe { *out = f(&h.rank) };
    ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    unsafe { query(comm, count, "ncclCommCount: count", |r| r.nranks as c_int) }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: ncclComm_t, device: *mut c_int) -> ncclResult_t {
    unsafe { query(comm, device, "ncclCommCuDevice: device", |r| r.device) }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    unsafe { query(comm, rank, "ncclCommUserRank: rank", |r| r.rank as c_int) }
}
