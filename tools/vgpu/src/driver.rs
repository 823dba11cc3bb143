//! The CUDA driver API, as the `cu*` symbols cudarc 0.19 loads (dynamic loading) from
//! `libcuda.so`.
//!
//! Model: every stream operation runs synchronously at call time, in call order;
//! `cuEventElapsedTime` reports host-clock time between the two records, which means nothing
//! for performance. Since that hides a program's missing cross-stream ordering, every stream
//! operation, event and synchronisation also goes through [`crate::streamcheck`], which models
//! the order a GPU guarantees and reports device or pinned memory used by two operations it
//! does not order (`========= vgpu streamcheck: ...`; the call fails with
//! `CUDA_ERROR_LAUNCH_FAILED` and the context's error becomes sticky, as for racecheck).
//! Device pointers are host addresses handed out by [`crate::mem`]. Handles (contexts,
//! streams, events, modules, functions) are pointers to small boxed tags that this module owns;
//! they are only ever looked up by address in the global state table, never dereferenced, so a
//! stale or foreign handle is detected and answered with `CUDA_ERROR_INVALID_HANDLE` /
//! `CUDA_ERROR_INVALID_CONTEXT`.
//!
//! All state lives in one `Mutex<State>`; the lock is never held while a kernel or a host
//! function runs. A launch fault that the interpreter reports as sticky breaks its context:
//! every later call that uses the context returns that error until the context is destroyed
//! or the primary context reset (`cuDevicePrimaryCtxReset`), as on a real GPU.
#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::exec::{Kernel, LaunchConfig, Program};
use crate::streamcheck::{At, Finding, Kind, Use};

pub type CUresult = i32;
pub type CUdevice = i32;
pub type CUdeviceptr = u64;

/// The opaque objects behind the handles. Only their addresses matter.
#[repr(C)]
pub struct CUctx_st {
    _tag: u64,
}
#[repr(C)]
pub struct CUstream_st {
    _tag: u64,
}
#[repr(C)]
pub struct CUevent_st {
    _tag: u64,
}
#[repr(C)]
pub struct CUmod_st {
    _tag: u64,
}
#[repr(C)]
pub struct CUfunc_st {
    _tag: u64,
}
pub type CUcontext = *mut CUctx_st;
pub type CUstream = *mut CUstream_st;
pub type CUevent = *mut CUevent_st;
pub type CUmodule = *mut CUmod_st;
pub type CUfunction = *mut CUfunc_st;
pub type CUhostFn = Option<unsafe extern "C" fn(*mut c_void)>;
pub type CUoccupancyB2DSize = Option<unsafe extern "C" fn(c_int) -> usize>;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_NO_BINARY_FOR_GPU: CUresult = 209;
pub const CUDA_ERROR_INVALID_PTX: CUresult = 218;
pub const CUDA_ERROR_FILE_NOT_FOUND: CUresult = 301;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
pub const CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
pub const CUDA_ERROR_ILLEGAL_INSTRUCTION: CUresult = 715;
pub const CUDA_ERROR_MISALIGNED_ADDRESS: CUresult = 716;
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// `CU_EVENT_DISABLE_TIMING`.
const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;

// Function attributes (CUfunction_attribute).
pub const CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: i32 = 0;
pub const CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: i32 = 1;
pub const CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES: i32 = 2;
pub const CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: i32 = 3;
pub const CU_FUNC_ATTRIBUTE_NUM_REGS: i32 = 4;
pub const CU_FUNC_ATTRIBUTE_PTX_VERSION: i32 = 5;
pub const CU_FUNC_ATTRIBUTE_BINARY_VERSION: i32 = 6;
pub const CU_FUNC_ATTRIBUTE_CACHE_MODE_CA: i32 = 7;
pub const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: i32 = 8;
pub const CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: i32 = 9;

/// Device attributes (CUdevice_attribute) this module answers with a profile value.
pub mod attr {
    pub const MAX_THREADS_PER_BLOCK: i32 = 1;
    pub const MAX_BLOCK_DIM_X: i32 = 2;
    pub const MAX_BLOCK_DIM_Y: i32 = 3;
    pub const MAX_BLOCK_DIM_Z: i32 = 4;
    pub const MAX_GRID_DIM_X: i32 = 5;
    pub const MAX_GRID_DIM_Y: i32 = 6;
    pub const MAX_GRID_DIM_Z: i32 = 7;
    pub const MAX_SHARED_MEMORY_PER_BLOCK: i32 = 8;
    pub const TOTAL_CONSTANT_MEMORY: i32 = 9;
    pub const WARP_SIZE: i32 = 10;
    pub const MAX_PITCH: i32 = 11;
    pub const MAX_REGISTERS_PER_BLOCK: i32 = 12;
    pub const CLOCK_RATE: i32 = 13;
    pub const TEXTURE_ALIGNMENT: i32 = 14;
    pub const GPU_OVERLAP: i32 = 15;
    pub const MULTIPROCESSOR_COUNT: i32 = 16;
    pub const KERNEL_EXEC_TIMEOUT: i32 = 17;
    pub const INTEGRATED: i32 = 18;
    pub const CAN_MAP_HOST_MEMORY: i32 = 19;
    pub const COMPUTE_MODE: i32 = 20;
    pub const CONCURRENT_KERNELS: i32 = 31;
    pub const ECC_ENABLED: i32 = 32;
    pub const PCI_BUS_ID: i32 = 33;
    pub const PCI_DEVICE_ID: i32 = 34;
    pub const MEMORY_CLOCK_RATE: i32 = 36;
    pub const GLOBAL_MEMORY_BUS_WIDTH: i32 = 37;
    pub const L2_CACHE_SIZE: i32 = 38;
    pub const MAX_THREADS_PER_MULTIPROCESSOR: i32 = 39;
    pub const ASYNC_ENGINE_COUNT: i32 = 40;
    pub const UNIFIED_ADDRESSING: i32 = 41;
    pub const PCI_DOMAIN_ID: i32 = 50;
    pub const COMPUTE_CAPABILITY_MAJOR: i32 = 75;
    pub const COMPUTE_CAPABILITY_MINOR: i32 = 76;
    pub const STREAM_PRIORITIES_SUPPORTED: i32 = 78;
    pub const GLOBAL_L1_CACHE_SUPPORTED: i32 = 79;
    pub const LOCAL_L1_CACHE_SUPPORTED: i32 = 80;
    pub const MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: i32 = 81;
    pub const MAX_REGISTERS_PER_MULTIPROCESSOR: i32 = 82;
    pub const MANAGED_MEMORY: i32 = 83;
    pub const MULTI_GPU_BOARD: i32 = 84;
    pub const COMPUTE_PREEMPTION_SUPPORTED: i32 = 90;
    pub const COOPERATIVE_LAUNCH: i32 = 95;
    pub const MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: i32 = 97;
    pub const MAX_BLOCKS_PER_MULTIPROCESSOR: i32 = 106;
    pub const RESERVED_SHARED_MEMORY_PER_BLOCK: i32 = 111;
    pub const MEMORY_POOLS_SUPPORTED: i32 = 115;
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

struct CtxState {
    device: i32,
    /// Primary context of `device` (lives for the process; `refs` counts retains).
    primary: bool,
    refs: u32,
    /// Sticky error (0 = healthy).
    broken: CUresult,
    flags: u32,
    /// Device allocations made in this context (freed on destroy / reset).
    allocs: HashSet<u64>,
}

struct StreamState {
    ctx: usize,
}

struct EventState {
    ctx: usize,
    flags: u32,
    recorded: Option<Instant>,
}

struct ModuleState {
    ctx: usize,
    program: Arc<Program>,
    functions: HashMap<String, usize>,
}

struct FuncState {
    ctx: usize,
    kernel: Arc<Kernel>,
    max_dyn_smem: u32,
}

#[derive(Default)]
struct State {
    ctxs: HashMap<usize, CtxState>,
    /// Primary context handle of each device, created on first retain.
    primary: HashMap<i32, usize>,
    streams: HashMap<usize, StreamState>,
    events: HashMap<usize, EventState>,
    modules: HashMap<usize, ModuleState>,
    funcs: HashMap<usize, FuncState>,
    /// Pinned host allocations: address -> size.
    host: HashMap<usize, usize>,
    /// streamcheck's happens-before model.
    sc: crate::streamcheck::Model,
}

static INITIALIZED: AtomicBool = AtomicBool::new(false);

fn state() -> MutexGuard<'static, State> {
    static S: std::sync::OnceLock<Mutex<State>> = std::sync::OnceLock::new();
    S.get_or_init(|| Mutex::new(State::default()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The calling thread's context stack; the last entry is the current context.
    static CURRENT: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

fn current() -> Option<usize> {
    CURRENT.with(|c| c.borrow().last().copied())
}

/// A fresh handle value: the address of a leaked 8-byte box (never dereferenced by callers).
fn new_handle() -> usize {
    Box::into_raw(Box::new(0u64)) as usize
}

fn drop_handle(h: usize) {
    // SAFETY: `h` came from `new_handle` and was removed from its table, so it is freed once.
    unsafe { drop(Box::from_raw(h as *mut u64)) };
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

fn check_init() -> Result<(), CUresult> {
    if INITIALIZED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(CUDA_ERROR_NOT_INITIALIZED)
    }
}

fn check_device(dev: CUdevice) -> Result<(), CUresult> {
    check_init()?;
    if dev < 0 || dev >= crate::device::device_count() {
        return Err(CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(())
}

fn nonnull<T>(p: *const T) -> Result<(), CUresult> {
    if p.is_null() {
        Err(CUDA_ERROR_INVALID_VALUE)
    } else {
        Ok(())
    }
}

/// The current context, healthy: INVALID_CONTEXT if none (or destroyed / released primary),
/// its sticky error if broken.
fn need_ctx(st: &State) -> Result<usize, CUresult> {
    check_init()?;
    let c = current().ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
    ctx_ok(st, c)?;
    Ok(c)
}

fn ctx_ok(st: &State, c: usize) -> Result<(), CUresult> {
    let cs = st.ctxs.get(&c).ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
    if cs.primary && cs.refs == 0 {
        return Err(CUDA_ERROR_INVALID_CONTEXT);
    }
    if cs.broken != 0 {
        return Err(cs.broken);
    }
    Ok(())
}

/// The context a stream argument runs in: the current one for the null / legacy /
/// per-thread streams, else the stream's own (INVALID_HANDLE for unknown streams).
fn stream_ctx(st: &State, s: CUstream) -> Result<usize, CUresult> {
    let cur = need_ctx(st)?;
    let h = s as usize;
    if h <= 2 {
        return Ok(cur);
    }
    let ss = st.streams.get(&h).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
    ctx_ok(st, ss.ctx)?;
    Ok(ss.ctx)
}

/// Where streamcheck places work enqueued on stream handle `s`: the null, `CU_STREAM_LEGACY`
/// (1) and `CU_STREAM_PER_THREAD` (2) handles are all taken as the legacy stream, which
/// synchronises the context (conservative for the per-thread stream, which does not).
fn at_of(s: CUstream) -> At {
    if (s as usize) <= 2 {
        At::Legacy
    } else {
        At::Stream(s as usize)
    }
}

/// Reports a streamcheck finding and breaks context `ctx` with CUDA_ERROR_LAUNCH_FAILED, as a
/// racecheck finding does: the error is sticky, so a program (or a Drop) that ignores this
/// call's result still fails at its next call or synchronisation.
fn stream_fault(st: &mut State, ctx: usize, f: Finding) -> CUresult {
    eprint!("{}", f.report());
    if let Some(cs) = st.ctxs.get_mut(&ctx) {
        if cs.broken == 0 {
            cs.broken = CUDA_ERROR_LAUNCH_FAILED;
        }
    }
    CUDA_ERROR_LAUNCH_FAILED
}

/// streamcheck for work outside this module (cuBLAS on its handle's stream `s`): Err with the
/// error to return when it finds a hazard (already reported, the context broken). Work with no
/// usable context (a foreign stream handle, cuBLAS called without the driver) is not tracked.
pub(crate) fn stream_op(s: usize, what: &str, uses: &[Use]) -> Result<(), CUresult> {
    let mut st = state();
    let Ok(ctx) = stream_ctx(&st, s as CUstream) else {
        return Ok(());
    };
    match st.sc.access(ctx, at_of(s as CUstream), what, uses) {
        Ok(_) => Ok(()),
        Err(f) => Err(stream_fault(&mut st, ctx, f)),
    }
}

/// The device of the calling thread's current context (NCCL's `cudaGetDevice`); None when
/// the thread has no usable context.
pub(crate) fn current_device() -> Option<i32> {
    let st = state();
    let c = need_ctx(&st).ok()?;
    st.ctxs.get(&c).map(|cs| cs.device)
}

/// The device that work enqueued on stream handle `s` runs on, or the error the driver would
/// return for the stream (no current context, unknown handle, a broken context's sticky error).
pub(crate) fn stream_device(s: usize) -> Result<i32, CUresult> {
    let st = state();
    let c = stream_ctx(&st, s as CUstream)?;
    st.ctxs.get(&c).map(|cs| cs.device).ok_or(CUDA_ERROR_INVALID_CONTEXT)
}

/// Destroys every object of context `c` and frees its allocations (destroy / reset).
fn teardown(st: &mut State, c: usize) {
    // VGPU_COUNTERS=summary: the per-kernel totals, once the work of a context is over.
    crate::exec::print_counter_summary();
    let streams: Vec<usize> = st.streams.iter().filter(|(_, s)| s.ctx == c).map(|(h, _)| *h).collect();
    for h in streams {
        st.streams.remove(&h);
        drop_handle(h);
    }
    let events: Vec<usize> = st.events.iter().filter(|(_, s)| s.ctx == c).map(|(h, _)| *h).collect();
    for h in events {
        st.events.remove(&h);
        st.sc.event_destroyed(h);
        drop_handle(h);
    }
    st.sc.ctx_destroyed(c);
    let mods: Vec<usize> = st.modules.iter().filter(|(_, s)| s.ctx == c).map(|(h, _)| *h).collect();
    for h in mods {
        unload(st, h);
    }
    if let Some(cs) = st.ctxs.get_mut(&c) {
        let allocs: Vec<u64> = cs.allocs.drain().collect();
        cs.broken = 0;
        for a in allocs {
            crate::mem::free(a);
            st.sc.forget(a);
        }
    }
}

fn unload(st: &mut State, m: usize) {
    if let Some(ms) = st.modules.remove(&m) {
        for f in ms.functions.values() {
            st.funcs.remove(f);
            drop_handle(*f);
        }
        drop_handle(m);
    }
}

/// `[addr, addr+len)` must lie inside one live device allocation.
fn check_dev_range(addr: u64, len: usize) -> Result<(), CUresult> {
    if len == 0 {
        return Ok(());
    }
    match crate::mem::find(addr, len as u64) {
        Some(_) => Ok(()),
        None => {
            eprintln!("vgpu: device range {addr:#x}+{len} is not inside a live allocation");
            Err(CUDA_ERROR_INVALID_VALUE)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initialization, version, errors
// ---------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if crate::device::device_count() == 0 {
        return CUDA_ERROR_NO_DEVICE;
    }
    INITIALIZED.store(true, Ordering::Release);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    tri!(nonnull(version));
    // SAFETY: checked non-null; the caller provides a writable int.
    unsafe { *version = 13000 };
    CUDA_SUCCESS
}

fn error_name_string(e: CUresult) -> Option<(&'static [u8], &'static [u8])> {
    Some(match e {
        0 => (b"CUDA_SUCCESS\0", b"no error\0"),
        1 => (b"CUDA_ERROR_INVALID_VALUE\0", b"invalid argument\0"),
        2 => (b"CUDA_ERROR_OUT_OF_MEMORY\0", b"out of memory\0"),
        3 => (b"CUDA_ERROR_NOT_INITIALIZED\0", b"initialization error\0"),
        4 => (b"CUDA_ERROR_DEINITIALIZED\0", b"driver shutting down\0"),
        100 => (b"CUDA_ERROR_NO_DEVICE\0", b"no CUDA-capable device is detected\0"),
        101 => (b"CUDA_ERROR_INVALID_DEVICE\0", b"invalid device ordinal\0"),
        200 => (b"CUDA_ERROR_INVALID_IMAGE\0", b"device kernel image is invalid\0"),
        201 => (b"CUDA_ERROR_INVALID_CONTEXT\0", b"invalid device context\0"),
        209 => (
            b"CUDA_ERROR_NO_BINARY_FOR_GPU\0",
            b"no kernel image is available for execution on the device\0",
        ),
        218 => (b"CUDA_ERROR_INVALID_PTX\0", b"a PTX JIT compilation failed\0"),
        301 => (b"CUDA_ERROR_FILE_NOT_FOUND\0", b"file not found\0"),
        400 => (b"CUDA_ERROR_INVALID_HANDLE\0", b"invalid resource handle\0"),
        500 => (b"CUDA_ERROR_NOT_FOUND\0", b"named symbol not found\0"),
        600 => (b"CUDA_ERROR_NOT_READY\0", b"device not ready\0"),
        700 => (b"CUDA_ERROR_ILLEGAL_ADDRESS\0", b"an illegal memory access was encountered\0"),
        701 => (
            b"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES\0",
            b"too many resources requested for launch\0",
        ),
        702 => (b"CUDA_ERROR_LAUNCH_TIMEOUT\0", b"the launch timed out and was terminated\0"),
        715 => (b"CUDA_ERROR_ILLEGAL_INSTRUCTION\0", b"an illegal instruction was encountered\0"),
        716 => (b"CUDA_ERROR_MISALIGNED_ADDRESS\0", b"misaligned address\0"),
        719 => (b"CUDA_ERROR_LAUNCH_FAILED\0", b"unspecified launch failure\0"),
        800 => (b"CUDA_ERROR_NOT_PERMITTED\0", b"operation not permitted\0"),
        801 => (b"CUDA_ERROR_NOT_SUPPORTED\0", b"operation not supported\0"),
        900 => (
            b"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED\0",
            b"operation not permitted when stream is capturing\0",
        ),
        999 => (b"CUDA_ERROR_UNKNOWN\0", b"unknown error\0"),
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, pstr: *mut *const c_char) -> CUresult {
    tri!(nonnull(pstr));
    let (name, _) = match error_name_string(error) {
        Some(v) => v,
        None => {
            // SAFETY: checked non-null.
            unsafe { *pstr = std::ptr::null() };
            return CUDA_ERROR_INVALID_VALUE;
        }
    };
    // SAFETY: checked non-null; the string is a static NUL-terminated literal.
    unsafe { *pstr = name.as_ptr() as *const c_char };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, pstr: *mut *const c_char) -> CUresult {
    tri!(nonnull(pstr));
    let (_, s) = match error_name_string(error) {
        Some(v) => v,
        None => {
            // SAFETY: checked non-null.
            unsafe { *pstr = std::ptr::null() };
            return CUDA_ERROR_INVALID_VALUE;
        }
    };
    // SAFETY: checked non-null; the string is a static NUL-terminated literal.
    unsafe { *pstr = s.as_ptr() as *const c_char };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuProfilerStart() -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuProfilerStop() -> CUresult {
    CUDA_SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    tri!(check_init());
    tri!(nonnull(count));
    // SAFETY: checked non-null.
    unsafe { *count = crate::device::device_count() };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    tri!(check_init());
    tri!(nonnull(device));
    tri!(check_device(ordinal));
    // SAFETY: checked non-null.
    unsafe { *device = ordinal };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(name));
    if len <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let s = crate::device::profile().name.as_bytes();
    let n = s.len().min(len as usize - 1);
    // SAFETY: `name` holds `len` bytes; we write n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), name as *mut u8, n);
        *name.add(n) = 0;
    }
    CUDA_SUCCESS
}

fn uuid(dev: CUdevice) -> [u8; 16] {
    let mut u = *b"vgpu-virtual-\0\0\0";
    u[13..16].copy_from_slice(&(dev as u32).to_be_bytes()[1..]);
    u
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(out: *mut u8, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(out));
    // SAFETY: CUuuid is 16 bytes; checked non-null.
    unsafe { std::ptr::copy_nonoverlapping(uuid(dev).as_ptr(), out, 16) };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(out: *mut u8, dev: CUdevice) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDeviceGetUuid(out, dev) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(bytes));
    // SAFETY: checked non-null.
    unsafe { *bytes = crate::device::profile().total_mem as usize };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(major: *mut c_int, minor: *mut c_int, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(major));
    tri!(nonnull(minor));
    let cc = crate::device::profile().cc;
    // SAFETY: checked non-null.
    unsafe {
        *major = cc.0;
        *minor = cc.1;
    }
    CUDA_SUCCESS
}

/// The value of device attribute `a` for the current profile (0 for attributes not modelled).
pub fn device_attribute(a: i32, dev: CUdevice) -> i32 {
    let p = crate::device::profile();
    use attr::*;
    match a {
        MAX_THREADS_PER_BLOCK => p.max_threads_per_block as i32,
        MAX_BLOCK_DIM_X => p.max_block_dim[0] as i32,
        MAX_BLOCK_DIM_Y => p.max_block_dim[1] as i32,
        MAX_BLOCK_DIM_Z => p.max_block_dim[2] as i32,
        MAX_GRID_DIM_X => p.max_grid_dim[0] as i32,
        MAX_GRID_DIM_Y => p.max_grid_dim[1] as i32,
        MAX_GRID_DIM_Z => p.max_grid_dim[2] as i32,
        MAX_SHARED_MEMORY_PER_BLOCK => p.smem_per_block as i32,
        TOTAL_CONSTANT_MEMORY => 65536,
        WARP_SIZE => 32,
        MAX_PITCH => i32::MAX,
        MAX_REGISTERS_PER_BLOCK => p.regs_per_block as i32,
        CLOCK_RATE => p.clock_khz,
        TEXTURE_ALIGNMENT => 512,
        GPU_OVERLAP => 1,
        MULTIPROCESSOR_COUNT => p.sm_count,
        KERNEL_EXEC_TIMEOUT => 0,
        INTEGRATED => 0,
        CAN_MAP_HOST_MEMORY => 1,
        COMPUTE_MODE => 0,
        CONCURRENT_KERNELS => 1,
        ECC_ENABLED => 0,
        PCI_BUS_ID => dev + 1,
        PCI_DEVICE_ID => 0,
        PCI_DOMAIN_ID => 0,
        MEMORY_CLOCK_RATE => p.mem_clock_khz,
        GLOBAL_MEMORY_BUS_WIDTH => p.bus_width,
        L2_CACHE_SIZE => p.l2_bytes,
        MAX_THREADS_PER_MULTIPROCESSOR => p.max_threads_per_sm as i32,
        ASYNC_ENGINE_COUNT => 2,
        UNIFIED_ADDRESSING => 1,
        COMPUTE_CAPABILITY_MAJOR => p.cc.0,
        COMPUTE_CAPABILITY_MINOR => p.cc.1,
        STREAM_PRIORITIES_SUPPORTED => 1,
        GLOBAL_L1_CACHE_SUPPORTED => 1,
        LOCAL_L1_CACHE_SUPPORTED => 1,
        MAX_SHARED_MEMORY_PER_MULTIPROCESSOR => p.smem_per_sm as i32,
        MAX_REGISTERS_PER_MULTIPROCESSOR => p.regs_per_sm as i32,
        MANAGED_MEMORY => 0,
        MULTI_GPU_BOARD => 0,
        COMPUTE_PREEMPTION_SUPPORTED => 1,
        COOPERATIVE_LAUNCH => 1,
        MAX_SHARED_MEMORY_PER_BLOCK_OPTIN => p.smem_per_block_optin as i32,
        MAX_BLOCKS_PER_MULTIPROCESSOR => 32,
        RESERVED_SHARED_MEMORY_PER_BLOCK => 1024,
        // 0 by default: cudarc then uses cuMemAlloc_v2 / cuMemFree_v2. `VGPU_MEMORY_POOLS=1`
        // answers 1, as a real H100 or A100 does, so that cudarc allocates and frees in stream
        // order (cuMemAllocAsync / cuMemFreeAsync, no pools behind them) and streamcheck checks
        // that order.
        MEMORY_POOLS_SUPPORTED => memory_pools() as i32,
        _ => 0,
    }
}

/// `VGPU_MEMORY_POOLS=1`: report stream-ordered allocation support.
fn memory_pools() -> bool {
    std::env::var("VGPU_MEMORY_POOLS").is_ok_and(|v| v.trim() == "1")
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_int, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(pi));
    if !(1..200).contains(&attrib) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { *pi = device_attribute(attrib, dev) };
    CUDA_SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(pctx));
    let mut st = state();
    let h = match st.primary.get(&dev) {
        Some(h) => *h,
        None => {
            let h = new_handle();
            st.ctxs.insert(
                h,
                CtxState {
                    device: dev,
                    primary: true,
                    refs: 0,
                    broken: 0,
                    flags: 0,
                    allocs: HashSet::new(),
                },
            );
            st.primary.insert(dev, h);
            h
        }
    };
    st.ctxs.get_mut(&h).expect("primary ctx").refs += 1;
    // SAFETY: checked non-null.
    unsafe { *pctx = h as CUcontext };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    let mut st = state();
    let Some(&h) = st.primary.get(&dev) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    let cs = st.ctxs.get_mut(&h).expect("primary ctx");
    if cs.refs == 0 {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    cs.refs -= 1;
    if cs.refs == 0 {
        teardown(&mut st, h);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDevicePrimaryCtxRelease_v2(dev) }
}

/// Destroys the primary context's objects and allocations and clears its sticky error; the
/// handle stays valid for the threads that hold it.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    let mut st = state();
    if let Some(&h) = st.primary.get(&dev) {
        teardown(&mut st, h);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDevicePrimaryCtxReset_v2(dev) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(dev: CUdevice, flags: *mut c_uint, active: *mut c_int) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(flags));
    tri!(nonnull(active));
    let st = state();
    let (f, a) = match st.primary.get(&dev).and_then(|h| st.ctxs.get(h)) {
        Some(cs) => (cs.flags, (cs.refs > 0) as c_int),
        None => (0, 0),
    };
    // SAFETY: checked non-null.
    unsafe {
        *flags = f;
        *active = a;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    tri!(check_device(dev));
    let mut st = state();
    if let Some(cs) = st.primary.get(&dev).copied().and_then(|h| st.ctxs.get_mut(&h)) {
        cs.flags = flags;
    }
    CUDA_SUCCESS
}

fn create_ctx(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> CUresult {
    tri!(check_device(dev));
    tri!(nonnull(pctx));
    let h = new_handle();
    state().ctxs.insert(
        h,
        CtxState {
            device: dev,
            primary: false,
            refs: 1,
            broken: 0,
            flags,
            allocs: HashSet::new(),
        },
    );
    CURRENT.with(|c| c.borrow_mut().push(h));
    // SAFETY: checked non-null.
    unsafe { *pctx = h as CUcontext };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> CUresult {
    create_ctx(pctx, flags, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut CUcontext,
    _params: *mut c_void,
    _num_params: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    create_ctx(pctx, flags, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(pctx: *mut CUcontext, _params: *mut c_void, flags: c_uint, dev: CUdevice) -> CUresult {
    create_ctx(pctx, flags, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    tri!(check_init());
    let h = ctx as usize;
    let mut st = state();
    match st.ctxs.get(&h) {
        None => return CUDA_ERROR_INVALID_CONTEXT,
        Some(cs) if cs.primary => return CUDA_ERROR_INVALID_CONTEXT,
        Some(_) => {}
    }
    teardown(&mut st, h);
    st.ctxs.remove(&h);
    drop_handle(h);
    CURRENT.with(|c| c.borrow_mut().retain(|x| *x != h));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    tri!(check_init());
    let h = ctx as usize;
    if h != 0 && !state().ctxs.contains_key(&h) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        c.pop();
        if h != 0 {
            c.push(h);
        }
    });
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    tri!(check_init());
    tri!(nonnull(pctx));
    // SAFETY: checked non-null.
    unsafe { *pctx = current().unwrap_or(0) as CUcontext };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    tri!(check_init());
    let h = ctx as usize;
    if !state().ctxs.contains_key(&h) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|c| c.borrow_mut().push(h));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    tri!(check_init());
    let Some(h) = CURRENT.with(|c| c.borrow_mut().pop()) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    if !pctx.is_null() {
        // SAFETY: checked non-null.
        unsafe { *pctx = h as CUcontext };
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    tri!(nonnull(device));
    let st = state();
    let c = tri!(need_ctx(&st));
    // SAFETY: checked non-null.
    unsafe { *device = st.ctxs[&c].device };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    let mut st = state();
    let c = tri!(need_ctx(&st));
    st.sc.ctx_sync(c);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    tri!(nonnull(flags));
    let st = state();
    let c = tri!(need_ctx(&st));
    // SAFETY: checked non-null.
    unsafe { *flags = st.ctxs[&c].flags };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    let mut st = state();
    let c = tri!(need_ctx(&st));
    st.ctxs.get_mut(&c).expect("ctx").flags = flags;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    tri!(check_init());
    tri!(nonnull(version));
    let h = if ctx.is_null() { current().unwrap_or(0) } else { ctx as usize };
    if !state().ctxs.contains_key(&h) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    // SAFETY: checked non-null.
    unsafe { *version = 3020 };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_int) -> CUresult {
    tri!(nonnull(value));
    let st = state();
    tri!(need_ctx(&st));
    let v = match limit {
        0 => 1024,    // stack size
        1 => 1 << 20, // printf fifo
        2 => 8 << 20, // malloc heap
        3 => 2,       // dev runtime sync depth
        4 => 2048,    // pending launch count
        5 => 32,      // max L2 fetch granularity
        6 => 0,       // persisting L2 cache size
        _ => return CUDA_ERROR_INVALID_VALUE,
    };
    // SAFETY: checked non-null.
    unsafe { *value = v };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_int, _value: usize) -> CUresult {
    let st = state();
    tri!(need_ctx(&st));
    if !(0..=6).contains(&limit) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCacheConfig(config: *mut c_int) -> CUresult {
    tri!(nonnull(config));
    let st = state();
    tri!(need_ctx(&st));
    // SAFETY: checked non-null.
    unsafe { *config = 0 };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCacheConfig(_config: c_int) -> CUresult {
    let st = state();
    tri!(need_ctx(&st));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(least: *mut c_int, greatest: *mut c_int) -> CUresult {
    let st = state();
    tri!(need_ctx(&st));
    // SAFETY: each written only if non-null (both optional in the real API).
    unsafe {
        if !least.is_null() {
            *least = 0;
        }
        if !greatest.is_null() {
            *greatest = -5;
        }
    }
    CUDA_SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

fn mem_alloc(dptr: *mut CUdeviceptr, bytes: usize, stream: Option<CUstream>) -> CUresult {
    tri!(nonnull(dptr));
    let mut st = state();
    let c = match stream {
        Some(s) => tri!(stream_ctx(&st, s)),
        None => tri!(need_ctx(&st)),
    };
    if bytes == 0 && stream.is_none() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let p = crate::device::profile();
    if crate::mem::used().saturating_add(bytes as u64) > p.total_mem {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let cs = st.ctxs.get_mut(&c).expect("ctx");
    let Some(a) = crate::mem::alloc(bytes as u64, cs.device) else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    cs.allocs.insert(a);
    match stream {
        // Usable in stream order from here: an access from another stream must be ordered
        // after the allocation, as after a write.
        Some(s) => {
            let alloc = crate::mem::find(a, 0).expect("just allocated");
            if let Err(f) = st.sc.access(c, at_of(s), "cuMemAllocAsync", &[Use::of(&alloc, Kind::Alloc)]) {
                return stream_fault(&mut st, c, f);
            }
        }
        // Taken as synchronising the context (see `crate::streamcheck`).
        None => st.sc.ctx_sync(c),
    }
    // SAFETY: checked non-null.
    unsafe { *dptr = a };
    CUDA_SUCCESS
}

fn mem_free(dptr: CUdeviceptr, stream: Option<CUstream>) -> CUresult {
    let mut st = state();
    let c = match stream {
        Some(s) => tri!(stream_ctx(&st, s)),
        None => tri!(need_ctx(&st)),
    };
    if dptr == 0 {
        // cuMemFree(0) is an error; cuMemFreeAsync of a zero-byte allocation's null is fine.
        return if stream.is_some() { CUDA_SUCCESS } else { CUDA_ERROR_INVALID_VALUE };
    }
    match (stream, crate::mem::find(dptr, 0).filter(|a| a.base == dptr)) {
        // The free must come after every earlier access (refused, memory kept, if not).
        (Some(s), Some(alloc)) => {
            if let Err(f) = st.sc.access(c, at_of(s), "cuMemFreeAsync", &[Use::of(&alloc, Kind::Free)]) {
                return stream_fault(&mut st, c, f);
            }
        }
        (None, _) => st.sc.ctx_sync(c),
        (Some(_), None) => {}
    }
    st.sc.forget(dptr);
    if !crate::mem::free(dptr) {
        eprintln!("vgpu: cuMemFree of {dptr:#x}, which is not the start of a live allocation");
        return CUDA_ERROR_INVALID_VALUE;
    }
    for cs in st.ctxs.values_mut() {
        cs.allocs.remove(&dptr);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    mem_alloc(dptr, bytes, None)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytes: usize, stream: CUstream) -> CUresult {
    mem_alloc(dptr, bytes, Some(stream))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    mem_free(dptr, None)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    mem_free(dptr, Some(stream))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    tri!(nonnull(free));
    tri!(nonnull(total));
    let st = state();
    tri!(need_ctx(&st));
    let t = crate::device::profile().total_mem;
    // SAFETY: checked non-null.
    unsafe {
        *total = t as usize;
        *free = t.saturating_sub(crate::mem::used()) as usize;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(pbase: *mut CUdeviceptr, psize: *mut usize, dptr: CUdeviceptr) -> CUresult {
    let st = state();
    tri!(need_ctx(&st));
    let Some(a) = crate::mem::find(dptr, 0).or_else(|| crate::mem::find(dptr, 1)) else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: each written only if non-null (both optional).
    unsafe {
        if !pbase.is_null() {
            *pbase = a.base;
        }
        if !psize.is_null() {
            *psize = a.size as usize;
        }
    }
    CUDA_SUCCESS
}

fn host_alloc(pp: *mut *mut c_void, bytes: usize) -> CUresult {
    tri!(nonnull(pp));
    let mut st = state();
    let c = tri!(need_ctx(&st));
    // A page-locked allocation is one of the calls that synchronise the legacy streams: taken
    // as synchronising the context, as cuMemAlloc is.
    st.sc.ctx_sync(c);
    let Ok(layout) = std::alloc::Layout::from_size_align(bytes.max(1), 256) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: non-zero size layout.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    st.host.insert(p as usize, bytes.max(1));
    st.sc.pinned_alloc(p as u64, bytes.max(1) as u64);
    // SAFETY: checked non-null.
    unsafe { *pp = p as *mut c_void };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, bytes: usize, _flags: c_uint) -> CUresult {
    host_alloc(pp, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize) -> CUresult {
    host_alloc(pp, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    let mut st = state();
    let c = tri!(need_ctx(&st));
    if !st.host.contains_key(&(p as usize)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // An async copy from (or to) it that the host never waited for, whose bytes the host
    // changed: reported, and the memory freed all the same (nobody would free it later).
    let checked = st.sc.pinned_free(p as u64);
    let Some(size) = st.host.remove(&(p as usize)) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let layout = std::alloc::Layout::from_size_align(size, 256).expect("layout");
    // SAFETY: allocated by host_alloc with this layout and removed from the table once.
    unsafe { std::alloc::dealloc(p as *mut u8, layout) };
    match checked {
        Ok(()) => CUDA_SUCCESS,
        Err(f) => stream_fault(&mut st, c, f),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostGetDevicePointer_v2(pdptr: *mut CUdeviceptr, p: *mut c_void, _flags: c_uint) -> CUresult {
    tri!(nonnull(pdptr));
    let st = state();
    tri!(need_ctx(&st));
    if !st.host.contains_key(&(p as usize)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: checked non-null. (Kernels may still not touch it: it is not in the device table.)
    unsafe { *pdptr = p as u64 };
    CUDA_SUCCESS
}

/// Host-to-device / device-to-host / device-to-device copies, all validated and synchronous.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    HtoD,
    DtoH,
    DtoD,
}

/// A copy named `what` (the API call, for streamcheck's reports); `stream` None for the
/// synchronous forms.
fn memcpy(dst: u64, src: u64, bytes: usize, dir: Dir, stream: Option<CUstream>, what: &str) -> CUresult {
    let mut st = state();
    let ctx = match stream {
        Some(s) => tri!(stream_ctx(&st, s)),
        None => tri!(need_ctx(&st)),
    };
    if bytes == 0 {
        return CUDA_SUCCESS;
    }
    match dir {
        Dir::HtoD => {
            tri!(nonnull(src as *const u8));
            tri!(check_dev_range(dst, bytes));
        }
        Dir::DtoH => {
            tri!(nonnull(dst as *const u8));
            tri!(check_dev_range(src, bytes));
        }
        Dir::DtoD => {
            tri!(check_dev_range(src, bytes));
            tri!(check_dev_range(dst, bytes));
        }
    }
    // streamcheck: the device side reads its source and writes its destination; a pinned host
    // side is checked for host writes behind an unfinished copy, then remembered.
    let find = |a: u64| crate::mem::find(a, bytes as u64).expect("checked live");
    let uses: Vec<Use> = match dir {
        Dir::HtoD => vec![Use::of(&find(dst), Kind::Write)],
        Dir::DtoH => vec![Use::of(&find(src), Kind::Read)],
        Dir::DtoD => vec![Use::of(&find(src), Kind::Read), Use::of(&find(dst), Kind::Write)],
    };
    let at = stream.map_or(At::Legacy, at_of);
    let host = match dir {
        Dir::HtoD => Some(src),
        Dir::DtoH => Some(dst),
        Dir::DtoD => None,
    };
    let pinned = host.filter(|&h| stream.is_some() && st.sc.is_pinned(h));
    if let Some(h) = pinned {
        if let Err(f) = st.sc.pinned_check(h, bytes as u64, what) {
            return stream_fault(&mut st, ctx, f);
        }
    }
    let stamp = match st.sc.access(ctx, at, what, &uses) {
        Ok(stamp) => stamp,
        Err(f) => return stream_fault(&mut st, ctx, f),
    };
    // SAFETY: device ranges were checked live; host pointers are the caller's `bytes`-long
    // buffers per the CUDA contract. `copy` tolerates overlap (device-to-device in place).
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    match pinned {
        Some(h) => st.sc.pinned_record(h, bytes as u64, stamp, what, dir == Dir::DtoH),
        // A copy into pageable memory returns only once it is done (an async one from pageable
        // memory is staged at the call, so the host may reuse its source at once).
        None if dir == Dir::DtoH => st.sc.stream_sync(ctx, at),
        None => {}
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    memcpy(dst, src as u64, bytes, Dir::HtoD, None, "cuMemcpyHtoD")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult {
    memcpy(dst as u64, src, bytes, Dir::DtoH, None, "cuMemcpyDtoH")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, None, "cuMemcpyDtoD")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize, s: CUstream) -> CUresult {
    memcpy(dst, src as u64, bytes, Dir::HtoD, Some(s), "cuMemcpyHtoDAsync")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult {
    memcpy(dst as u64, src, bytes, Dir::DtoH, Some(s), "cuMemcpyDtoHAsync")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, Some(s), "cuMemcpyDtoDAsync")
}

/// Unified addressing: a copy between any two live device ranges.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, None, "cuMemcpy")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyAsync(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, Some(s), "cuMemcpyAsync")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeer(dst: CUdeviceptr, _dc: CUcontext, src: CUdeviceptr, _sc: CUcontext, bytes: usize) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, None, "cuMemcpyPeer")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: CUdeviceptr,
    _dc: CUcontext,
    src: CUdeviceptr,
    _sc: CUcontext,
    bytes: usize,
    s: CUstream,
) -> CUresult {
    memcpy(dst, src, bytes, Dir::DtoD, Some(s), "cuMemcpyPeerAsync")
}

fn memset(dst: u64, value: u32, elem: usize, n: usize, stream: Option<CUstream>, what: &str) -> CUresult {
    let mut st = state();
    let ctx = match stream {
        Some(s) => tri!(stream_ctx(&st, s)),
        None => tri!(need_ctx(&st)),
    };
    let Some(bytes) = n.checked_mul(elem) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if bytes == 0 {
        return CUDA_SUCCESS;
    }
    if !dst.is_multiple_of(elem as u64) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    tri!(check_dev_range(dst, bytes));
    let alloc = crate::mem::find(dst, bytes as u64).expect("checked live");
    if let Err(f) = st
        .sc
        .access(ctx, stream.map_or(At::Legacy, at_of), what, &[Use::of(&alloc, Kind::Write)])
    {
        return stream_fault(&mut st, ctx, f);
    }
    // SAFETY: the range is inside a live allocation, aligned to `elem`.
    unsafe {
        match elem {
            1 => std::ptr::write_bytes(dst as *mut u8, value as u8, n),
            2 => std::slice::from_raw_parts_mut(dst as *mut u16, n).fill(value as u16),
            _ => std::slice::from_raw_parts_mut(dst as *mut u32, n).fill(value),
        }
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, uc: u8, n: usize) -> CUresult {
    memset(dst, uc as u32, 1, n, None, "cuMemsetD8")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, us: u16, n: usize) -> CUresult {
    memset(dst, us as u32, 2, n, None, "cuMemsetD16")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, ui: c_uint, n: usize) -> CUresult {
    memset(dst, ui, 4, n, None, "cuMemsetD32")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, uc: u8, n: usize, s: CUstream) -> CUresult {
    memset(dst, uc as u32, 1, n, Some(s), "cuMemsetD8Async")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(dst: CUdeviceptr, us: u16, n: usize, s: CUstream) -> CUresult {
    memset(dst, us as u32, 2, n, Some(s), "cuMemsetD16Async")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(dst: CUdeviceptr, ui: c_uint, n: usize, s: CUstream) -> CUresult {
    memset(dst, ui, 4, n, Some(s), "cuMemsetD32Async")
}

// ---------------------------------------------------------------------------------------------
// Streams and events (everything already ran when the call returned; streamcheck models the
// order a GPU would guarantee)
// ---------------------------------------------------------------------------------------------

fn stream_create(ph: *mut CUstream) -> CUresult {
    tri!(nonnull(ph));
    let mut st = state();
    let c = tri!(need_ctx(&st));
    let h = new_handle();
    st.streams.insert(h, StreamState { ctx: c });
    st.sc.stream_created(h, c);
    // SAFETY: checked non-null.
    unsafe { *ph = h as CUstream };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut CUstream, _flags: c_uint) -> CUresult {
    stream_create(ph)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(ph: *mut CUstream, _flags: c_uint, _priority: c_int) -> CUresult {
    stream_create(ph)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: CUstream) -> CUresult {
    tri!(check_init());
    let mut st = state();
    let h = s as usize;
    if st.streams.remove(&h).is_none() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    st.sc.stream_destroyed(h);
    drop_handle(h);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy(s: CUstream) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuStreamDestroy_v2(s) }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(s: CUstream) -> CUresult {
    let mut st = state();
    let c = tri!(stream_ctx(&st, s));
    st.sc.stream_sync(c, at_of(s));
    CUDA_SUCCESS
}

/// Always done (CUDA_SUCCESS), so the host has seen the stream's work, as after a sync.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(s: CUstream) -> CUresult {
    let mut st = state();
    let c = tri!(stream_ctx(&st, s));
    st.sc.stream_sync(c, at_of(s));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(s: CUstream, e: CUevent, _flags: c_uint) -> CUresult {
    let mut st = state();
    let c = tri!(stream_ctx(&st, s));
    if !st.events.contains_key(&(e as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    st.sc.stream_wait(c, at_of(s), e as usize);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(s: CUstream, pctx: *mut CUcontext) -> CUresult {
    tri!(nonnull(pctx));
    let st = state();
    let c = tri!(stream_ctx(&st, s));
    // SAFETY: checked non-null.
    unsafe { *pctx = c as CUcontext };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: CUstream, status: *mut c_int) -> CUresult {
    tri!(nonnull(status));
    let st = state();
    tri!(stream_ctx(&st, s));
    // SAFETY: checked non-null. CU_STREAM_CAPTURE_STATUS_NONE.
    unsafe { *status = 0 };
    CUDA_SUCCESS
}

/// Stream capture (CUDA graphs) is not modelled.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(_s: CUstream, _mode: c_int) -> CUresult {
    CUDA_ERROR_NOT_SUPPORTED
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(_s: CUstream, _graph: *mut *mut c_void) -> CUresult {
    CUDA_ERROR_NOT_SUPPORTED
}

/// Runs `f(user_data)` at once: all earlier work on the stream has already completed.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(s: CUstream, f: CUhostFn, user_data: *mut c_void) -> CUresult {
    let Some(f) = f else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    {
        let st = state();
        tri!(stream_ctx(&st, s));
    }
    // SAFETY: the caller's callback with the caller's data, run without the state lock held.
    unsafe { f(user_data) };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut CUevent, flags: c_uint) -> CUresult {
    tri!(nonnull(ph));
    let mut st = state();
    let c = tri!(need_ctx(&st));
    let h = new_handle();
    st.events.insert(
        h,
        EventState {
            ctx: c,
            flags,
            recorded: None,
        },
    );
    // SAFETY: checked non-null.
    unsafe { *ph = h as CUevent };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    tri!(check_init());
    let mut st = state();
    let h = e as usize;
    if st.events.remove(&h).is_none() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    st.sc.event_destroyed(h);
    drop_handle(h);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy(e: CUevent) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuEventDestroy_v2(e) }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: CUevent, s: CUstream) -> CUresult {
    let mut st = state();
    let c = tri!(stream_ctx(&st, s));
    let Some(ev) = st.events.get_mut(&(e as usize)) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if ev.ctx != c {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    ev.recorded = Some(Instant::now());
    st.sc.event_record(e as usize, c, at_of(s));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(e: CUevent, s: CUstream, _flags: c_uint) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuEventRecord(e, s) }
}

/// cuEventSynchronize and cuEventQuery (always done): the host has seen what the event
/// recorded.
fn event_check(e: CUevent) -> CUresult {
    tri!(check_init());
    let mut st = state();
    let Some(ev) = st.events.get(&(e as usize)) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    tri!(ctx_ok(&st, ev.ctx));
    st.sc.event_sync(e as usize);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    event_check(e)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    event_check(e)
}

/// Host-clock milliseconds between two records: meaningless for GPU performance.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    tri!(check_init());
    tri!(nonnull(ms));
    let st = state();
    let (Some(a), Some(b)) = (st.events.get(&(start as usize)), st.events.get(&(end as usize))) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    tri!(ctx_ok(&st, a.ctx));
    if (a.flags | b.flags) & CU_EVENT_DISABLE_TIMING != 0 {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let (Some(ta), Some(tb)) = (a.recorded, b.recorded) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    let d = if tb >= ta {
        (tb - ta).as_secs_f64()
    } else {
        -(ta - tb).as_secs_f64()
    };
    // SAFETY: checked non-null.
    unsafe { *ms = (d * 1e3) as f32 };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}

// ---------------------------------------------------------------------------------------------
// Modules and functions
// ---------------------------------------------------------------------------------------------

/// Loads a module image (PTX text, or a fatbin holding PTX) in the current context.
///
/// # Safety
/// `image` must be a PTX text (NUL-terminated) or a fatbin (with its header's size).
unsafe fn load_image(module: *mut CUmodule, image: &[u8]) -> CUresult {
    {
        let st = state();
        tri!(need_ctx(&st));
    }
    let texts = match crate::fatbin::ptx_texts(image) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vgpu: cuModuleLoadData: not a PTX or fatbin image: {e}");
            return CUDA_ERROR_INVALID_IMAGE;
        }
    };
    let Some(text) = texts.last() else {
        eprintln!("vgpu: cuModuleLoadData: the image holds no PTX (vgpu runs PTX only)");
        return CUDA_ERROR_NO_BINARY_FOR_GPU;
    };
    let program = match Program::load(text) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("vgpu: cuModuleLoadData: PTX rejected: {e}");
            return CUDA_ERROR_INVALID_PTX;
        }
    };
    let mut st = state();
    let c = tri!(need_ctx(&st));
    let h = new_handle();
    st.modules.insert(
        h,
        ModuleState {
            ctx: c,
            program,
            functions: HashMap::new(),
        },
    );
    // SAFETY: checked non-null by the callers.
    unsafe { *module = h as CUmodule };
    CUDA_SUCCESS
}

/// The bytes of an image pointer: a fatbin wrapper/header gives its size, anything else is
/// taken as a NUL-terminated text.
///
/// # Safety
/// `image` must point to a fatbin or a NUL-terminated string.
unsafe fn image_bytes<'a>(image: *const c_void) -> &'a [u8] {
    let p = image as *const u8;
    // SAFETY: every valid image starts with at least 4 readable bytes, or is a string
    // (whose first byte we read before the next).
    unsafe {
        let magic = |q: *const u8| -> u32 { std::ptr::read_unaligned(q as *const u32) };
        if *p != 0 && *p.add(1) != 0 && *p.add(2) != 0 && *p.add(3) != 0 {
            let m = magic(p);
            if m == 0x466243b1 {
                // Fatbin wrapper {magic, version, data ptr, filename}: follow the data pointer.
                let data = std::ptr::read_unaligned(p.add(8) as *const *const u8);
                return image_bytes(data as *const c_void);
            }
            if m == 0xBA55ED50 {
                // Fatbin header: magic u32, version u16, header size u16, payload size u64.
                let hsize = std::ptr::read_unaligned(p.add(6) as *const u16) as usize;
                let fsize = std::ptr::read_unaligned(p.add(8) as *const u64) as usize;
                return std::slice::from_raw_parts(p, hsize + fsize);
            }
        }
        std::ffi::CStr::from_ptr(p as *const c_char).to_bytes()
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    tri!(check_init());
    tri!(nonnull(module));
    tri!(nonnull(image));
    // SAFETY: the CUDA contract for `image`.
    unsafe { load_image(module, image_bytes(image)) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _num_options: c_uint,
    _options: *mut c_int,
    _values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: same contract; JIT options are ignored.
    unsafe { cuModuleLoadData(module, image) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadFatBinary(module: *mut CUmodule, image: *const c_void) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuModuleLoadData(module, image) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) -> CUresult {
    tri!(check_init());
    tri!(nonnull(module));
    tri!(nonnull(fname));
    // SAFETY: checked non-null; a C string per the API.
    let path = unsafe { std::ffi::CStr::from_ptr(fname) }.to_string_lossy().into_owned();
    let Ok(bytes) = std::fs::read(&path) else {
        return CUDA_ERROR_FILE_NOT_FOUND;
    };
    // SAFETY: `bytes` is the whole image.
    unsafe { load_image(module, &bytes) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: CUmodule) -> CUresult {
    tri!(check_init());
    let mut st = state();
    if !st.modules.contains_key(&(m as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    unload(&mut st, m as usize);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(pf: *mut CUfunction, m: CUmodule, name: *const c_char) -> CUresult {
    tri!(check_init());
    tri!(nonnull(pf));
    tri!(nonnull(name));
    // SAFETY: checked non-null; a C string per the API.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
    let mut st = state();
    let mh = m as usize;
    let Some(ms) = st.modules.get(&mh) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    tri!(ctx_ok(&st, ms.ctx));
    let ctx = ms.ctx;
    let h = if let Some(&f) = ms.functions.get(&name) {
        f
    } else {
        let Some(kernel) = ms.program.kernel(&name) else {
            return CUDA_ERROR_NOT_FOUND;
        };
        let h = new_handle();
        st.funcs.insert(
            h,
            FuncState {
                ctx,
                kernel,
                max_dyn_smem: 0,
            },
        );
        st.modules.get_mut(&mh).expect("module").functions.insert(name, h);
        h
    };
    // SAFETY: checked non-null.
    unsafe { *pf = h as CUfunction };
    CUDA_SUCCESS
}

/// Module globals are not exposed by the interpreter's API: always NOT_FOUND.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(_dptr: *mut CUdeviceptr, _bytes: *mut usize, m: CUmodule, name: *const c_char) -> CUresult {
    tri!(check_init());
    tri!(nonnull(name));
    if !state().modules.contains_key(&(m as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUDA_ERROR_NOT_FOUND
}

fn with_func<T>(f: CUfunction, g: impl FnOnce(&mut FuncState) -> Result<T, CUresult>) -> Result<T, CUresult> {
    check_init()?;
    let mut st = state();
    let ctx = st.funcs.get(&(f as usize)).ok_or(CUDA_ERROR_INVALID_HANDLE)?.ctx;
    ctx_ok(&st, ctx)?;
    g(st.funcs.get_mut(&(f as usize)).expect("func"))
}

fn ptx_version() -> i32 {
    let cc = crate::device::profile().cc;
    cc.0 * 10 + cc.1
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(pi: *mut c_int, attrib: c_int, f: CUfunction) -> CUresult {
    tri!(nonnull(pi));
    let p = crate::device::profile();
    let v = tri!(with_func(f, |fs| {
        let k = &fs.kernel;
        Ok(match attrib {
            CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK => k.max_threads.unwrap_or(p.max_threads_per_block).min(p.max_threads_per_block) as i32,
            CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES => k.static_smem as i32,
            CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES => 0,
            CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES => k.local_bytes as i32,
            CU_FUNC_ATTRIBUTE_NUM_REGS => k.num_regs as i32,
            CU_FUNC_ATTRIBUTE_PTX_VERSION | CU_FUNC_ATTRIBUTE_BINARY_VERSION => ptx_version(),
            CU_FUNC_ATTRIBUTE_CACHE_MODE_CA => 0,
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                if fs.max_dyn_smem > 0 {
                    fs.max_dyn_smem as i32
                } else {
                    p.smem_per_block.saturating_sub(k.static_smem) as i32
                }
            }
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT => -1,
            10..=20 => 0,
            _ => return Err(CUDA_ERROR_INVALID_VALUE),
        })
    }));
    // SAFETY: checked non-null.
    unsafe { *pi = v };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: CUfunction, attrib: c_int, value: c_int) -> CUresult {
    let p = crate::device::profile();
    tri!(with_func(f, |fs| {
        match attrib {
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                if value < 0 || value as u64 + fs.kernel.static_smem as u64 > p.smem_per_block_optin as u64 {
                    return Err(CUDA_ERROR_INVALID_VALUE);
                }
                fs.max_dyn_smem = value as u32;
                Ok(())
            }
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT => {
                if !(-1..=100).contains(&value) {
                    return Err(CUDA_ERROR_INVALID_VALUE);
                }
                Ok(())
            }
            10..=20 => Ok(()),
            _ => Err(CUDA_ERROR_INVALID_VALUE),
        }
    }));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetCacheConfig(f: CUfunction, _config: c_int) -> CUresult {
    tri!(with_func(f, |_| Ok(())));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetSharedMemConfig(f: CUfunction, _config: c_int) -> CUresult {
    tri!(with_func(f, |_| Ok(())));
    CUDA_SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared_bytes: c_uint,
    s: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    tri!(check_init());
    let (kernel, cfg, ctx) = {
        let st = state();
        let Some(fs) = st.funcs.get(&(f as usize)) else {
            return CUDA_ERROR_INVALID_HANDLE;
        };
        let ctx = tri!(stream_ctx(&st, s));
        if ctx != fs.ctx {
            return CUDA_ERROR_INVALID_HANDLE;
        }
        let p = crate::device::profile();
        let grid = [gx, gy, gz];
        let block = [bx, by, bz];
        for d in 0..3 {
            if grid[d] == 0 || grid[d] > p.max_grid_dim[d] || block[d] == 0 || block[d] > p.max_block_dim[d] {
                return CUDA_ERROR_INVALID_VALUE;
            }
        }
        if bx as u64 * by as u64 * bz as u64 > p.max_threads_per_block as u64 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        if !extra.is_null() {
            if !params.is_null() {
                eprintln!("========= vgpu launch check: cuLaunchKernel got both kernelParams and extra");
                return CUDA_ERROR_INVALID_VALUE;
            }
            // SAFETY: `extra` is a CU_LAUNCH_PARAM_END-terminated list per the CUDA contract.
            return match unsafe { packed_params(&fs.kernel, extra) } {
                Ok(buf) => {
                    let ptrs: Vec<*const c_void> = fs
                        .kernel
                        .body
                        .param_offsets
                        .iter()
                        .map(|&o| buf[o as usize..].as_ptr() as *const c_void)
                        .collect();
                    let cfg = LaunchConfig {
                        grid,
                        block,
                        dynamic_smem: shared_bytes,
                        max_dynamic_smem_attr: fs.max_dyn_smem,
                        device: st.ctxs[&ctx].device,
                    };
                    let kernel = fs.kernel.clone();
                    drop(st);
                    // SAFETY: one pointer per parameter into `buf`, whose size matched the entry's.
                    finish_launch(ctx, s, &kernel, guarded_launch(&kernel, &cfg, ptrs.as_ptr()))
                }
                Err(msg) => {
                    eprintln!("========= vgpu launch check: {msg}\n=========     kernel {}", fs.kernel.name);
                    CUDA_ERROR_INVALID_VALUE
                }
            };
        }
        if params.is_null() && !fs.kernel.params.is_empty() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let cfg = LaunchConfig {
            grid,
            block,
            dynamic_smem: shared_bytes,
            max_dynamic_smem_attr: fs.max_dyn_smem,
            device: st.ctxs[&ctx].device,
        };
        (fs.kernel.clone(), cfg, ctx)
    };
    // SAFETY: `params` holds one pointer per parameter per the CUDA contract (checked non-null
    // when the kernel has parameters). The state lock is not held while the kernel runs.
    finish_launch(ctx, s, &kernel, guarded_launch(&kernel, &cfg, params as *const *const c_void))
}

/// What a launch returned, and the allocations it read and wrote.
type Launched = (Result<(), crate::exec::Fault>, Vec<crate::exec::GlobalUse>);

/// Runs a launch; a panic inside the interpreter (a bug of the device, not of the kernel) becomes
/// a failed launch with its message instead of unwinding into the caller's C frames.
fn guarded_launch(kernel: &crate::exec::Kernel, cfg: &LaunchConfig, params: *const *const c_void) -> Launched {
    // SAFETY: `params` follows the CUDA contract, checked by the callers as far as they can.
    let run = std::panic::AssertUnwindSafe(|| unsafe { crate::exec::launch_with_uses(kernel, cfg, params) });
    std::panic::catch_unwind(run).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let fault = crate::exec::Fault {
            kind: crate::exec::FaultKind::LaunchFailed,
            report: format!(
                "========= vgpu internal error: the interpreter panicked ({msg})\n=========     kernel {}\n",
                kernel.name
            ),
        };
        (Err(fault), Vec::new())
    })
}

/// The launch's result as a CUresult; a sticky fault breaks the context, as on a GPU. A launch
/// that ran is then placed on stream `s` by streamcheck with the allocations it read and wrote.
fn finish_launch(ctx: usize, s: CUstream, kernel: &Kernel, (r, used): Launched) -> CUresult {
    match r {
        Ok(()) => {
            let mut uses = Vec::with_capacity(used.len() * 2);
            for u in &used {
                if u.read {
                    uses.push(Use::of(&u.alloc, Kind::Read));
                }
                if u.write {
                    uses.push(Use::of(&u.alloc, Kind::Write));
                }
            }
            let mut st = state();
            match st.sc.access(ctx, at_of(s), &format!("kernel {}", kernel.name), &uses) {
                Ok(_) => CUDA_SUCCESS,
                Err(f) => stream_fault(&mut st, ctx, f),
            }
        }
        Err(fault) => {
            eprintln!("{}", fault.report);
            let code = fault.kind.cu_result();
            if fault.kind.sticky() {
                if let Some(cs) = state().ctxs.get_mut(&ctx) {
                    if cs.broken == 0 {
                        cs.broken = code;
                    }
                }
            }
            code
        }
    }
}

/// The parameter buffer of cuLaunchKernel's `extra` form (CU_LAUNCH_PARAM_BUFFER_POINTER and
/// CU_LAUNCH_PARAM_BUFFER_SIZE up to CU_LAUNCH_PARAM_END), copied, after checking its size
/// against the entry's `.param` list.
///
/// # Safety
/// `extra` must be a CU_LAUNCH_PARAM_END-terminated list of (key, value) pointers.
unsafe fn packed_params(k: &crate::exec::Kernel, extra: *mut *mut c_void) -> Result<Vec<u8>, String> {
    const END: usize = 0;
    const BUFFER_POINTER: usize = 1;
    const BUFFER_SIZE: usize = 2;
    let (mut ptr, mut size): (*const u8, Option<usize>) = (std::ptr::null(), None);
    for i in (0..64).step_by(2) {
        // SAFETY: per the contract, entries up to END are readable.
        let key = unsafe { *extra.add(i) } as usize;
        if key == END {
            break;
        }
        // SAFETY: every key but END has a value after it.
        let val = unsafe { *extra.add(i + 1) };
        match key {
            BUFFER_POINTER => ptr = val as *const u8,
            // SAFETY: the value of BUFFER_SIZE points to a size_t.
            BUFFER_SIZE if !val.is_null() => size = Some(unsafe { *(val as *const usize) }),
            _ => return Err(format!("cuLaunchKernel extra: unknown or null entry {key:#x}")),
        }
    }
    let want = k.body.param_bytes as usize;
    let Some(size) = size else {
        return Err("cuLaunchKernel extra: no CU_LAUNCH_PARAM_BUFFER_SIZE".into());
    };
    if size != want {
        return Err(format!(
            "the parameter buffer holds {size} bytes but the kernel's .param list takes {want}"
        ));
    }
    if ptr.is_null() && want > 0 {
        return Err("cuLaunchKernel extra: no CU_LAUNCH_PARAM_BUFFER_POINTER".into());
    }
    let mut buf = vec![0u8; want.max(1)];
    if want > 0 {
        // SAFETY: the caller's buffer holds `size` == `want` bytes.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), want) };
    }
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared_bytes: c_uint,
    s: CUstream,
    params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shared_bytes, s, params, std::ptr::null_mut()) }
}

// ---------------------------------------------------------------------------------------------
// Occupancy (a plausible answer from the profile's per-SM limits)
// ---------------------------------------------------------------------------------------------

fn blocks_per_sm(k: &Kernel, block: u32, dyn_smem: usize) -> i32 {
    let p = crate::device::profile();
    if block == 0 || block > k.max_threads.unwrap_or(p.max_threads_per_block).min(p.max_threads_per_block) {
        return 0;
    }
    let warps = block.div_ceil(32);
    let mut n = (p.max_threads_per_sm / 32) / warps;
    n = n.min(32);
    let regs = k.num_regs.max(1) * warps * 32;
    n = n.min(p.regs_per_sm / regs.max(1));
    let smem = k.static_smem as usize + dyn_smem;
    if smem > 0 {
        n = n.min((p.smem_per_sm as usize / (smem + 1024)) as u32);
    }
    n as i32
}

fn func_kernel(f: CUfunction) -> Result<Arc<Kernel>, CUresult> {
    with_func(f, |fs| Ok(fs.kernel.clone()))
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    n: *mut c_int,
    f: CUfunction,
    block: c_int,
    dyn_smem: usize,
) -> CUresult {
    tri!(nonnull(n));
    let k = tri!(func_kernel(f));
    // SAFETY: checked non-null.
    unsafe { *n = blocks_per_sm(&k, block.max(0) as u32, dyn_smem) };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    n: *mut c_int,
    f: CUfunction,
    block: c_int,
    dyn_smem: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, dyn_smem) }
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    min_grid: *mut c_int,
    block_size: *mut c_int,
    f: CUfunction,
    b2smem: CUoccupancyB2DSize,
    dyn_smem: usize,
    limit: c_int,
    _flags: c_uint,
) -> CUresult {
    tri!(nonnull(min_grid));
    tri!(nonnull(block_size));
    let k = tri!(func_kernel(f));
    let p = crate::device::profile();
    let mut max = k.max_threads.unwrap_or(p.max_threads_per_block).min(p.max_threads_per_block);
    if limit > 0 {
        max = max.min(limit as u32);
    }
    let (mut best_b, mut best_n, mut best_threads) = (0u32, 0i32, 0u64);
    let mut b = max.div_ceil(32) * 32;
    while b >= 32 {
        let bb = b.min(max);
        // SAFETY: the caller's callback, per the API.
        let smem = match b2smem {
            Some(cb) => unsafe { cb(bb as c_int) },
            None => dyn_smem,
        };
        let n = blocks_per_sm(&k, bb, smem);
        let threads = n as u64 * bb as u64;
        if threads > best_threads {
            (best_b, best_n, best_threads) = (bb, n, threads);
        }
        b -= 32;
    }
    if best_b == 0 {
        best_b = max.min(32);
    }
    // SAFETY: checked non-null.
    unsafe {
        *block_size = best_b as c_int;
        *min_grid = best_n.max(1) * p.sm_count;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    min_grid: *mut c_int,
    block_size: *mut c_int,
    f: CUfunction,
    b2smem: CUoccupancyB2DSize,
    dyn_smem: usize,
    limit: c_int,
) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuOccupancyMaxPotentialBlockSizeWithFlags(min_grid, block_size, f, b2smem, dyn_smem, limit, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    out: *mut usize,
    f: CUfunction,
    num_blocks: c_int,
    block: c_int,
) -> CUresult {
    tri!(nonnull(out));
    let k = tri!(func_kernel(f));
    if num_blocks <= 0 || block <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let p = crate::device::profile();
    let per_block = (p.smem_per_sm as usize / num_blocks as usize).saturating_sub(1024);
    let v = per_block
        .min(p.smem_per_block_optin as usize)
        .saturating_sub(k.static_smem as usize);
    // SAFETY: checked non-null.
    unsafe { *out = v };
    CUDA_SUCCESS
}
