//! Shared by the GPU benches: opening the device (or skipping cleanly without one) and timing
//! back-to-back launches.

use mlvpt::gpu::{GpuContext, GpuError};
use std::time::{Duration, Instant};

/// Device 0, announced on stderr; `None` after printing "<name> bench skipped: why" when no
/// device can be opened (the GPU runner reads that line as NO-GPU).
pub fn open(name: &str) -> Option<GpuContext> {
    match GpuContext::new(0) {
        Ok(gpu) if gpu.is_virtual() => {
            // Timings there would measure the PTX interpreter on the CPU, never a GPU.
            eprintln!(
                "{name} bench skipped: {} is the virtual CUDA device (tools/vgpu), which has no performance meaning",
                gpu.device_name()
            );
            None
        }
        Ok(gpu) => {
            let (major, minor) = gpu.compute_capability();
            eprintln!("{name} bench on {} (sm_{major}{minor}, {} SMs)", gpu.device_name(), gpu.sm_count());
            Some(gpu)
        }
        Err(e) => {
            eprintln!("{name} bench skipped: {e}");
            None
        }
    }
}

/// Times `iters` back-to-back launches of `f` and one synchronisation.
pub fn timed(gpu: &GpuContext, iters: u64, mut f: impl FnMut() -> Result<(), GpuError>) -> Duration {
    gpu.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f().unwrap();
    }
    gpu.synchronize().unwrap();
    t.elapsed()
}
