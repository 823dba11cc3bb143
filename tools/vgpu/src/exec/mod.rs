//! The PTX interpreter: decodes a parsed module into kernels and runs launches on a small
//! worker pool, with the sanitizer-style checks and the optional counters.
//!
//! API used by the driver (`crate::driver`): [`Program::load`], [`Program::kernel`],
//! [`Kernel`]'s attributes, [`launch`] returning a [`Fault`] on any check failure, and
//! [`launch_with_uses`], which also returns the allocations the launch read and wrote (the
//! kernel's side of streamcheck, `crate::streamcheck`).

use std::sync::Arc;

/// Why a launch failed: the CUDA error code a real driver would return (sticky for the
/// context where a real GPU's would be) and the report printed on stderr.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub report: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Launch refused before running (bad config, too much shared memory, params size):
    /// CUDA_ERROR_INVALID_VALUE (1) or CUDA_ERROR_INVALID_HANDLE.
    InvalidValue,
    /// Block too large for `.maxntid` / resources: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (701).
    OutOfResources,
    /// memcheck: out-of-bounds / freed global or shared access: CUDA_ERROR_ILLEGAL_ADDRESS (700).
    IllegalAddress,
    /// Misaligned access: CUDA_ERROR_MISALIGNED_ADDRESS (716).
    MisalignedAddress,
    /// racecheck / initcheck / synccheck findings, and instructions the interpreter does not
    /// know: CUDA_ERROR_LAUNCH_FAILED (719).
    LaunchFailed,
    /// Illegal instruction semantics (e.g. `.aligned` warp op by part of a warp):
    /// CUDA_ERROR_ILLEGAL_INSTRUCTION (715).
    IllegalInstruction,
    /// The watchdog (`VGPU_TIMEOUT_S`): CUDA_ERROR_LAUNCH_TIMEOUT (702).
    Timeout,
}

impl FaultKind {
    /// The CUresult value.
    pub fn cu_result(self) -> i32 {
        match self {
            FaultKind::InvalidValue => 1,
            FaultKind::OutOfResources => 701,
            FaultKind::IllegalAddress => 700,
            FaultKind::MisalignedAddress => 716,
            FaultKind::LaunchFailed => 719,
            FaultKind::IllegalInstruction => 715,
            FaultKind::Timeout => 702,
        }
    }
    /// Whether the error is sticky (the context is unusable afterwards, as on a GPU).
    pub fn sticky(self) -> bool {
        !matches!(self, FaultKind::InvalidValue | FaultKind::OutOfResources)
    }
}

/// A loaded module: every entry decoded.
pub struct Program {
    kernels: Vec<Arc<Kernel>>,
}

/// One kernel ready to launch.
pub struct Kernel {
    pub name: String,
    /// Size and alignment of each `.param`, in order (kernelParams holds one pointer each).
    pub params: Vec<(u32, u32)>,
    /// Bytes of static `.shared` the entry uses.
    pub static_smem: u32,
    /// `.maxntid` / `.reqntid` product, if declared (the block may not exceed it).
    pub max_threads: Option<u32>,
    /// An estimate of registers per thread (the declared virtual registers, capped at 255).
    pub num_regs: u32,
    /// Local memory per thread (bytes).
    pub local_bytes: u32,
    pub(crate) body: crate::exec::decode::Decoded,
}

pub mod decode;

impl Program {
    /// Parses and decodes a PTX text. Syntax errors fail here; an instruction the interpreter
    /// does not know fails the launch of its kernel (with the instruction's name and line).
    pub fn load(ptx: &str) -> Result<Program, String> {
        let module = crate::ptx::parse::parse(ptx)?;
        let mut kernels = Vec::new();
        for e in &module.entries {
            kernels.push(Arc::new(decode::decode_entry(&module, e)?));
        }
        Ok(Program { kernels })
    }
    /// The kernel named `name` (the entry's mangled or `extern "C"` name).
    pub fn kernel(&self, name: &str) -> Option<Arc<Kernel>> {
        self.kernels.iter().find(|k| k.name == name).cloned()
    }
    pub fn kernels(&self) -> &[Arc<Kernel>] {
        &self.kernels
    }
}

/// A launch as cuLaunchKernel gives it.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem: u32,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` set on the function (0 if never set).
    pub max_dynamic_smem_attr: u32,
    /// Device ordinal the launch runs on (its allocations only are valid).
    pub device: i32,
}

pub mod check;
pub mod counters;
pub mod run;
pub mod tensor;

pub use counters::Counters;
pub use run::{print_counter_summary, set_counters, set_timeout, take_last_counters};

/// Runs one launch to completion. `params` is cuLaunchKernel's `kernelParams`: one pointer
/// per `.param` of the entry, each to a value of that parameter's size.
///
/// # Safety
/// `params` must point to `kernel.params.len()` valid pointers, each to at least that
/// parameter's size in bytes.
pub unsafe fn launch(kernel: &Kernel, cfg: &LaunchConfig, params: *const *const std::ffi::c_void) -> Result<(), Fault> {
    // SAFETY: the caller's contract.
    unsafe { run::launch(kernel, cfg, params, None) }
}

/// An allocation a launch accessed in global memory, and how: the kernel's read and write sets
/// at allocation granularity, for the driver's streamcheck (`crate::streamcheck`). Atomics count
/// as writes.
#[derive(Debug, Clone, Copy)]
pub struct GlobalUse {
    pub alloc: crate::mem::Alloc,
    pub read: bool,
    pub write: bool,
}

/// [`launch`], also returning the allocations the launch read and wrote (collected where
/// memcheck resolves each global address; those of a failed launch are partial).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_with_uses(
    kernel: &Kernel,
    cfg: &LaunchConfig,
    params: *const *const std::ffi::c_void,
) -> (Result<(), Fault>, Vec<GlobalUse>) {
    let mut uses = Vec::new();
    // SAFETY: the caller's contract.
    let r = unsafe { run::launch(kernel, cfg, params, Some(&mut uses)) };
    (r, uses)
}
