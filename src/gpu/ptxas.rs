//! Parses ptxas's `-v` report (`PTXAS_REPORT`) into one entry per function and architecture, so
//! a test can insist that no kernel spills registers or keeps a stack frame in local memory.
//!
//! ```
//! use mlvpt::gpu::{ptxas, PTXAS_REPORT};
//! let kernels = ptxas::parse(PTXAS_REPORT);
//! let ln = kernels.iter().find(|k| k.function == "layernorm_fwd_bf16").expect("compiled");
//! assert_eq!(ln.file, "layernorm.cu");
//! println!("{} on {}: {} registers, {} bytes spilled", ln.function, ln.arch, ln.registers, ln.spill_store_bytes);
//! ```

/// Resource use of one function compiled for one architecture.
///
/// ```
/// use mlvpt::gpu::ptxas::{parse, KernelResources};
/// let report = "## asl.cu\n\
///     ptxas info    : Compiling entry function 'asl_fwd' for 'sm_90'\n\
///     ptxas info    : Function properties for asl_fwd\n\
///     \x20   16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n\
///     ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n";
/// let k: &KernelResources = &parse(report)[0];
/// assert_eq!((k.file.as_str(), k.function.as_str(), k.arch.as_str()), ("asl.cu", "asl_fwd", "sm_90"));
/// assert_eq!((k.registers, k.shared_bytes), (40, 2048));
/// assert_eq!((k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes), (16, 8, 8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// The `.cu` file the report section came from.
    pub file: String,
    pub function: String,
    /// `sm_80`, ...
    pub arch: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let head = &line[..line.find(suffix)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rev()
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

fn quoted(line: &str, nth: usize) -> Option<String> {
    line.split('\'').nth(2 * nth + 1).map(str::to_string)
}

/// Every function the report describes. A function's properties line follows
/// `Compiling entry function 'f' for 'sm_xx'` (entries) or stands alone (device functions that
/// were not inlined, whose arch is the last entry's).
///
/// ```
/// use mlvpt::gpu::{ptxas, PTXAS_REPORT};
/// // Every kernel of every architecture the build compiled, e.g. those that spill:
/// let spilling: Vec<_> = ptxas::parse(PTXAS_REPORT)
///     .into_iter()
///     .filter(|k| k.spill_store_bytes + k.spill_load_bytes > 0)
///     .map(|k| format!("{} ({})", k.function, k.arch))
///     .collect();
/// println!("spilling kernels: {spilling:?}");
/// assert!(ptxas::parse("").is_empty());
/// ```
pub fn parse(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let (mut file, mut arch) = (String::new(), String::new());
    for line in report.lines() {
        if let Some(f) = line.strip_prefix("## ") {
            file = f.trim().to_string();
        } else if line.contains("Compiling entry function") {
            if let Some(a) = quoted(line, 1) {
                arch = a;
            }
        } else if let Some(pos) = line.find("Function properties for ") {
            let function = line[pos + "Function properties for ".len()..].trim().to_string();
            out.push(KernelResources {
                file: file.clone(),
                function,
                arch: arch.clone(),
                registers: 0,
                stack_frame_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                shared_bytes: 0,
            });
        } else if let Some(last) = out.last_mut() {
            if line.contains("bytes stack frame") {
                last.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                last.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                last.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                last.registers = number_before(line, " registers").unwrap_or(0);
                last.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_spills_and_registers() {
        let report = "## x.cu\nptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k1' for 'sm_80'\n\
            ptxas info    : Function properties for k1\n\
            \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 257 bytes smem, 372 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
            ptxas info    : Function properties for k2\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 12 registers, used 0 barriers\n";
        let k = parse(report);
        assert_eq!(k.len(), 2);
        assert_eq!(
            (k[0].function.as_str(), k[0].arch.as_str(), k[0].file.as_str()),
            ("k1", "sm_80", "x.cu")
        );
        assert_eq!((k[0].stack_frame_bytes, k[0].spill_store_bytes, k[0].spill_load_bytes), (8, 4, 12));
        assert_eq!((k[0].registers, k[0].shared_bytes), (40, 257));
        assert_eq!(
            (k[1].function.as_str(), k[1].arch.as_str(), k[1].registers, k[1].shared_bytes),
            ("k2", "sm_90", 12, 0)
        );
    }
}
