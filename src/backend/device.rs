//! Choosing where the work runs: `--device auto|cpu|cuda`.

use super::CpuBackend;

/// Where the work runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when this binary has the `cuda` feature and a device opens, else the CPU.
    Auto,
    /// The CPU reference backend.
    #[default]
    Cpu,
    /// The CUDA backend (an error when the binary lacks the feature or no device opens).
    Cuda,
}

/// An opened backend.
pub enum Selected {
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(Box<super::CudaBackend>),
}

impl Selected {
    /// A short description for logs ("cpu", "cuda (NVIDIA H100 ...)").
    pub fn describe(&self) -> String {
        match self {
            Selected::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Selected::Cuda(b) => format!("cuda ({})", b.gpu().device_name()),
        }
    }
}

/// Opens the backend for `device`. `note` receives one line saying which was chosen and, for
/// `auto` falling back to the CPU, why. `cuda` without the feature or a usable device is an
/// error saying what is missing.
pub fn select(device: Device, note: &mut dyn FnMut(&str)) -> anyhow::Result<Selected> {
    match device {
        Device::Cpu => Ok(Selected::Cpu(CpuBackend::new())),
        Device::Cuda => {
            let s = open_cuda()?;
            note(&format!("device: {}", s.describe()));
            Ok(s)
        }
        Device::Auto => match open_cuda() {
            Ok(s) => {
                note(&format!("device: {} (auto)", s.describe()));
                Ok(s)
            }
            Err(e) => {
                note(&format!("device: cpu (auto: {e:#})"));
                Ok(Selected::Cpu(CpuBackend::new()))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> anyhow::Result<Selected> {
    let be = super::CudaBackend::new(0).map_err(|e| anyhow::anyhow!("CUDA device unavailable: {e}"))?;
    Ok(Selected::Cuda(Box::new(be)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> anyhow::Result<Selected> {
    anyhow::bail!("this mlvpt was built without CUDA support (rebuild with `cargo build --release --features cuda`)")
}
