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
        let stack = if STACK_ALLOWED.contains(&k.function.as_str()) {
            0
        } else {
            k.stack_frame_bytes
        };
        if spills > 0 || stack > 0 {
            bad.push(format!(
                "{} {} ({}): {} bytes stack frame, {} bytes spill stores, {} bytes spill loads, {} registers",
                k.file, k.function, k.arch, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes, k.registers
            ));
        }
    }
    assert!(bad.is_empty(), "kernels using local memory:\n{}", bad.join("\n"));
}

/// Launchers name kernels only through the typed handles build.rs generates
/// (`mlvpt::gpu::kernels::<module>::<NAME>`, so a misspelt one does not compile) or the
/// contract's tile tables (src/contract.rs, from which attention.cu's kernels are generated):
/// no launcher file's code (comments aside) holds a kernel's name as a string literal.
#[test]
fn launchers_name_no_kernel_by_string() {
    let entries: std::collections::HashSet<String> = ptxas::parse(PTXAS_REPORT).into_iter().map(|k| k.function).collect();
    assert!(entries.len() >= 80, "only {} kernels in the report", entries.len());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src/ops", "src/gpu", "src/backend"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                files.push(p.join("cuda.rs"));
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }
    let mut bad = Vec::new();
    for f in files.iter().filter(|f| f.exists()) {
        // Code only: the docs' examples may show a handle's name.
        let code: String = std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for lit in code.split('"').skip(1).step_by(2) {
            if entries.contains(lit) {
                bad.push(format!("{} names kernel `{lit}` by string", f.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "use the handles of mlvpt::gpu::kernels instead:\n{}",
        bad.join("\n")
    );
}

/// The fused attention's tile tables (`ops::attention::FWD_TILES`, `BWD_TILES`, which hold
/// the kernel names the launcher asks for) name entry functions of kernels/attention.cu.
#[test]
fn attention_tile_tables_name_compiled_kernels() {
    use mlvpt::ops::attention::{BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};
    let report = ptxas::parse(PTXAS_REPORT);
    let names: Vec<&str> = FWD_TILES
        .iter()
        .map(|t| t.kernel)
        .chain(BWD_TILES.iter().map(|t| t.kernel))
        .chain(BWD_TILES.iter().filter_map(|t| t.dq_kernel))
        .collect();
    for name in &names {
        assert!(
            report.iter().any(|k| k.function == *name && k.file == "attention.cu"),
            "`{name}` is not a kernel of attention.cu"
        );
    }
    assert!(names.len() >= 2 * FUSED_HEAD_DIMS.len(), "a forward and a backward per head dim");
}
