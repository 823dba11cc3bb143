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

/// Storage precision of the CUDA backend (`--precision`). The CPU backend computes in f32
/// whatever is asked.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// bf16 activations and frozen weight matrices (bf16 GEMMs on tensor cores), fp32
    /// accumulation, fp32 parameters, gradients, optimizer state and residual stream.
    #[default]
    Bf16,
    /// Every buffer fp32; dense projections in TF32 (for comparisons and debugging).
    F32,
}

impl Precision {
    /// "bf16" or "f32".
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// An opened backend.
pub enum Selected {
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(Box<super::CudaBackend>),
}

impl Selected {
    /// Whether this is the CUDA backend on the project's virtual device (tools/vgpu).
    pub fn is_virtual(&self) -> bool {
        match self {
            Selected::Cpu(_) => false,
            #[cfg(feature = "cuda")]
            Selected::Cuda(b) => b.gpu().is_virtual(),
        }
    }

    /// A short description for logs ("cpu", "cuda (NVIDIA H100 ...)").
    pub fn describe(&self) -> String {
        match self {
            Selected::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Selected::Cuda(b) => format!("cuda ({}, {})", b.gpu().device_name(), b.precision().as_str()),
        }
    }
}

/// Opens the backend for `device` (the CUDA backend in its default precision, bf16). `note`
/// receives one line saying which was chosen and, for `auto` falling back to the CPU, why.
/// `cuda` without the feature or a usable device is an error saying what is missing.
pub fn select(device: Device, note: &mut dyn FnMut(&str)) -> anyhow::Result<Selected> {
    select_with(device, None, note)
}

/// [`select`] with a storage precision for the CUDA backend (`None`: its default, bf16). The
/// CPU backend computes in f32 whatever is asked: an explicit precision is then noted as
/// ignored, not an error, so `--device auto` works on machines with and without a GPU.
pub fn select_with(device: Device, precision: Option<Precision>, note: &mut dyn FnMut(&str)) -> anyhow::Result<Selected> {
    select_on(device, precision, 0, note)
}

/// [`select_with`] on CUDA device `ordinal` (a rank of a data-parallel job).
pub fn select_on(device: Device, precision: Option<Precision>, ordinal: usize, note: &mut dyn FnMut(&str)) -> anyhow::Result<Selected> {
    let p = precision.unwrap_or_default();
    let cpu = |note: &mut dyn FnMut(&str)| {
        if let Some(p) = precision {
            note(&format!(
                "precision: --precision {} ignored (the CPU backend computes in f32)",
                p.as_str()
            ));
        }
        Selected::Cpu(CpuBackend::new())
    };
    match device {
        Device::Cpu => Ok(cpu(note)),
        Device::Cuda => {
            let s = open_cuda(p, ordinal)?;
            note(&format!("device: {}", s.describe()));
            Ok(s)
        }
        Device::Auto => match open_cuda(p, ordinal) {
            Ok(s) if s.is_virtual() => {
                // The virtual device (tools/vgpu) interprets PTX on the CPU: far slower than
                // the CPU backend, so `auto` only uses it when asked by name.
                note("device: cpu (auto: the CUDA device is the virtual one, which checks kernels but is slow; --device cuda runs on it)");
                Ok(cpu(note))
            }
            Ok(s) => {
                note(&format!("device: {} (auto)", s.describe()));
                Ok(s)
            }
            Err(e) => {
                note(&format!("device: cpu (auto: {e:#})"));
                Ok(cpu(note))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(precision: Precision, ordinal: usize) -> anyhow::Result<Selected> {
    let be = super::CudaBackend::with_precision(ordinal, precision).map_err(|e| anyhow::anyhow!("CUDA device unavailable: {e}"))?;
    Ok(Selected::Cuda(Box::new(be)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_precision: Precision, _ordinal: usize) -> anyhow::Result<Selected> {
    anyhow::bail!("this mlvpt was built without CUDA support (rebuild with `cargo build --release --features cuda`)")
}
