//! The ptxas resource report of the embedded kernels (build.rs, `-Xptxas -v`): every kernel,
//! on every architecture, must keep its values in registers (no spills, no stack frame in local
//! memory). Runs without a GPU.
#![cfg(feature = "cuda")]

use mlvpt::gpu::{ptxas, FATBINS, PTXAS_REPORT};

/// Kernels allowed a stack frame (none so far); name them here with the reason.
const STACK_ALLOWED: &[&str] = &[];

#[test]
fn report_covers_every_module() {
    let kernels = ptxas::parse(PTXAS_REPORT);
    assert!(!kernels.is_empty(), "empty ptxas report:\n{PTXAS_REPORT}");
    for (module, fatbin) in FATBINS {
        assert!(!fatbin.is_empty(), "module {module} has an empty fatbin");
        let file = format!("{module}.cu");
        assert!(kernels.iter().any(|k| k.file == file), "no kernel of {file} in the ptxas report");
    }
}

#[test]
fn no_kernel_spills_or_uses_local_memory() {
    let mut bad = Vec::new();
    for k in ptxas::parse(PTXAS_REPORT) {
        let spills = k.spill_store_bytes + k.spill_load_bytes;
        let stack = if STACK_ALLOWED.contains(&k.function.as_str()) { 0 } else { k.stack_frame_bytes };
        if spills > 0 || stack > 0 {
            bad.push(format!(
                "{} {} ({}): {} bytes stack frame, {} bytes spill stores, {} bytes spill loads, {} registers",
                k.file, k.function, k.arch, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes, k.registers
            ));
        }
    }
    assert!(bad.is_empty(), "kernels using local memory:\n{}", bad.join("\n"));
}
