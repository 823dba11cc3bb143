//! Launch execution (stub; being written).
use super::{Fault, FaultKind, Kernel, LaunchConfig};

pub unsafe fn launch(_k: &Kernel, _c: &LaunchConfig, _p: *const *const std::ffi::c_void) -> Result<(), Fault> {
    Err(Fault { kind: FaultKind::LaunchFailed, report: "not implemented".into() })
}
