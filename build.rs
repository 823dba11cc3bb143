//! Build script. Without the `cuda` feature there is nothing to build. With it, every
//! `kernels/*.cu` is compiled by nvcc into a fatbin (SASS for sm_80/86/89/90 plus compute_90 PTX
//! for newer GPUs; `MLVPT_CUDA_ARCH=89` builds for one arch only) in OUT_DIR, `kernels.rs` lists
//! them for `include_bytes!`, and ptxas's resource report goes to `OUT_DIR/ptxas.txt`
//! (`mlvpt::gpu::PTXAS_REPORT`, checked for spills by tests/gpu_ptxas.rs). See docs/GPU.md.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The host/kernel contract (constants, tile tables, parameter structs), also compiled into the
/// crate as `mlvpt::contract`; build.rs writes its C side.
#[allow(dead_code)]
#[path = "src/contract.rs"]
mod contract;

/// Real GPU architectures the fatbin carries SASS for (A100, A10/3090, L4/4090, H100).
const DEFAULT_SASS: &[u32] = &[80, 86, 89, 90];
/// The PTX the fatbin carries, which the driver JIT-compiles on newer GPUs.
const DEFAULT_PTX: u32 = 90;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/contract.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(msg) = build_kernels() {
        // A build script reports by failing; cargo prints stderr, so say it plainly.
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn build_kernels() -> Result<(), String> {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "MLVPT_CUDA_ARCH",
        "MLVPT_COMPRESS_FATBIN",
        "DOCS_RS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let kdir = manifest.join("kernels");
    // New or deleted .cu files change the directory listing.
    println!("cargo:rerun-if-changed={}", kdir.display());

    let mut sources = Vec::new();
    let entries = std::fs::read_dir(&kdir).map_err(|e| format!("cannot read {}: {e}", kdir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                println!("cargo:rerun-if-changed={}", path.display());
                sources.push(path);
            }
            Some("cuh") => println!("cargo:rerun-if-changed={}", path.display()),
            _ => {}
        }
    }
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", kdir.display()));
    }

    write(&out.join("contract.cuh"), &contract::c_header())?;
    let entries_file = manifest.join("kernels/entries.txt");
    println!("cargo:rerun-if-changed={}", entries_file.display());
    let listed = std::fs::read_to_string(&entries_file).map_err(|e| format!("cannot read {}: {e}", entries_file.display()))?;
    let nvcc = match find_nvcc(&manifest) {
        Ok(nvcc) => nvcc,
        // docs.rs builds documentation without a CUDA toolkit: the API (and every kernel's
        // handle, from the committed list) without device code.
        Err(_) if env::var_os("DOCS_RS").is_some() => return docs_only(&out, &sources, &listed),
        Err(e) => return Err(e),
    };
    let compress = env::var("MLVPT_COMPRESS_FATBIN").is_ok_and(|v| v == "1");
    let gencode = gencode_flags()?;

    // One nvcc per file, in parallel: each compiles 5 targets and CI has 2 cores.
    let results: Vec<(PathBuf, String, Result<Output, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let mut cmd = Command::new(&nvcc);
                cmd.arg("-fatbin").args(["-std=c++17", "-O3", "-Xptxas", "-v"]);
                // Keep the PTX uncompressed: the virtual device in tools/vgpu reads the fatbin's
                // PTX. MLVPT_COMPRESS_FATBIN=1 (the GPU bundle, which must stay small) compresses.
                if !compress {
                    cmd.arg("-no-compress");
                }
                cmd.arg("-I")
                    .arg(&kdir)
                    .arg("-I")
                    .arg(&out)
                    .args(&gencode)
                    .arg("-o")
                    .arg(&fatbin)
                    .arg(src);
                s.spawn(move || {
                    let res = cmd.output().map_err(|e| format!("cannot run nvcc: {e}"));
                    (src.clone(), stem, res)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("nvcc thread")).collect()
    });

    let mut report = String::new();
    let mut list = String::from("/// (module name, fatbin) for every kernels/*.cu, generated by build.rs.\n");
    list.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    let mut handles = String::new();
    let mut compiled = String::new();
    for (src, stem, res) in results {
        let output = res?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "nvcc failed on {} ({}):\n{stdout}{stderr}\nnvcc: {}",
                src.display(),
                output.status,
                nvcc.display()
            ));
        }
        for line in stderr.lines().chain(stdout.lines()) {
            if line.contains("warning") {
                println!("cargo:warning={}: {line}", src.file_name().unwrap().to_string_lossy());
            }
        }
        let _ = writeln!(report, "## {}.cu", stem);
        report.push_str(&stderr);
        report.push_str(&stdout);
        let entries = entry_functions(&format!("{stderr}{stdout}"));
        handles.push_str(&kernel_handles(&stem, &entries)?);
        for e in &entries {
            let _ = writeln!(compiled, "{stem} {e}");
        }
        let _ = writeln!(
            list,
            "    ({stem:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"))),"
        );
    }
    list.push_str("];\n");
    let _ = writeln!(
        list,
        "/// The nvcc that built them and its flags.\npub const NVCC: &str = {:?};",
        nvcc.display().to_string()
    );
    let _ = writeln!(
        list,
        "/// nvcc's `-gencode` flags: the architectures the fatbins hold.\npub const GENCODE: &str = {:?};",
        gencode.join(" ")
    );
    check_tile_kernels(&handles)?;
    check_entries_file(&out, &listed, &compiled)?;
    list.push_str(&handles);
    write(&out.join("ptxas.txt"), &report)?;
    write(&out.join("kernels.rs"), &list)?;
    Ok(())
}

/// `kernels/entries.txt` (`<module> <kernel>` per line) must list exactly the kernels nvcc
/// compiled: builds without nvcc (docs.rs) make the kernel handles from it.
fn check_entries_file(out: &Path, listed: &str, compiled: &str) -> Result<(), String> {
    let norm = |t: &str| {
        let mut v: Vec<String> = t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let (want, have) = (norm(compiled), norm(listed));
    if want == have {
        return Ok(());
    }
    let fresh = out.join("entries.txt");
    write(&fresh, &format!("{ENTRIES_HEADER}{}\n", want.join("\n")))?;
    // The first few of each, to keep the message readable.
    let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).take(8).collect();
    let stale: Vec<&String> = have.iter().filter(|h| !want.contains(h)).take(8).collect();
    Err(format!(
        "kernels/entries.txt is out of date (compiled but not listed: {missing:?}; listed but not compiled: {stale:?}).\n       It names every kernel for builds without nvcc (docs.rs). Update it with\n       \
         cp {} kernels/entries.txt",
        fresh.display()
    ))
}

/// The first lines of `kernels/entries.txt`.
const ENTRIES_HEADER: &str = "# Every kernel of kernels/*.cu as `<module> <entry function>`, sorted. build.rs checks\n\
# this list against what nvcc compiled (and says how to refresh it); builds without nvcc, such as\n\
# docs.rs's, make the typed kernel handles (mlvpt::gpu::kernels) from it.\n";

/// A documentation-only build (docs.rs, no nvcc): empty fatbins and report, the kernel handles
/// from `kernels/entries.txt`. A `GpuContext` of such a build cannot load any module.
fn docs_only(out: &Path, sources: &[PathBuf], listed: &str) -> Result<(), String> {
    println!("cargo:warning=no nvcc: building the API for documentation only (the kernels are not compiled)");
    let mut list = String::from("/// (module name, fatbin) for every kernels/*.cu: empty in this documentation-only build.\n");
    list.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy();
        let _ = writeln!(list, "    ({stem:?}, &[]),");
    }
    list.push_str("];\n/// The nvcc that built them and its flags (none in a documentation-only build).\npub const NVCC: &str = \"\";\n/// nvcc's `-gencode` flags (none).\npub const GENCODE: &str = \"\";\n");
    let mut modules: Vec<(String, Vec<String>)> = Vec::new();
    for line in listed.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (m, k) = line
            .split_once(' ')
            .ok_or_else(|| format!("kernels/entries.txt: `{line}` is not `<module> <kernel>`"))?;
        match modules.iter_mut().find(|(name, _)| name == m) {
            Some((_, ks)) => ks.push(k.to_string()),
            None => modules.push((m.to_string(), vec![k.to_string()])),
        }
    }
    for (m, ks) in &modules {
        list.push_str(&kernel_handles(m, ks)?);
    }
    write(&out.join("ptxas.txt"), "")?;
    write(&out.join("kernels.rs"), &list)
}

/// The entry functions ptxas compiled, in first-seen order (each appears once per arch).
fn entry_functions(report: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(name) = rest.split('\'').next() {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// `pub mod <module> { pub const <NAME>: Kernel = ...; }` for every kernel of one module.
fn kernel_handles(module: &str, entries: &[String]) -> Result<String, String> {
    if entries.is_empty() {
        return Err(format!("ptxas reported no entry function for kernels/{module}.cu"));
    }
    let mut s = format!("/// The kernels of `kernels/{module}.cu`.\npub mod {module} {{\n    use crate::gpu::Kernel;\n");
    for e in entries {
        if !e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("kernel `{e}` of kernels/{module}.cu is not extern \"C\" (a plain name)"));
        }
        let _ = writeln!(
            s,
            "    /// `{e}` (kernels/{module}.cu).\n    pub const {}: Kernel = Kernel::new({module:?}, {e:?});",
            e.to_uppercase()
        );
    }
    s.push_str("}\n");
    Ok(s)
}

/// Every kernel the contract's tile tables name was compiled (they are generated from those
/// tables, so a miss means attention.cu no longer instantiates its X-macros).
fn check_tile_kernels(handles: &str) -> Result<(), String> {
    use contract::attention::{BWD_TILES, FWD_TILES};
    let names = FWD_TILES
        .iter()
        .map(|t| t.kernel)
        .chain(BWD_TILES.iter().flat_map(|t| std::iter::once(t.kernel).chain(t.dq_kernel)));
    for name in names {
        if !handles.contains(&format!("{name:?}")) {
            return Err(format!(
                "src/contract.rs names kernel `{name}`, which kernels/attention.cu did not compile"
            ));
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `-gencode` pairs: SASS for each default arch and compute_90 PTX, or SASS and PTX of the one
/// arch `MLVPT_CUDA_ARCH` names (`89`, `sm_89` or `compute_89`).
fn gencode_flags() -> Result<Vec<String>, String> {
    let one = match env::var("MLVPT_CUDA_ARCH") {
        Ok(v) if !v.trim().is_empty() => {
            let digits = v.trim().trim_start_matches("sm_").trim_start_matches("compute_");
            let arch: u32 = digits
                .parse()
                .map_err(|_| format!("MLVPT_CUDA_ARCH={v:?} is not an arch like 89, sm_89 or compute_89"))?;
            if arch < 70 {
                return Err(format!("MLVPT_CUDA_ARCH={v:?}: the kernels need sm_70 or newer (bf16 math)"));
            }
            Some(arch)
        }
        _ => None,
    };
    let mut flags = Vec::new();
    match one {
        Some(a) => flags.push(format!("-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]")),
        None => {
            for a in DEFAULT_SASS {
                flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
            }
            flags.push(format!("-gencode=arch=compute_{DEFAULT_PTX},code=compute_{DEFAULT_PTX}"));
        }
    }
    Ok(flags)
}

/// nvcc from `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, /usr/local/cuda, or the project's
/// `.toolchain/` (tools/install-cuda-toolchain.sh), in that order.
fn find_nvcc(manifest: &Path) -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return if runs(&p) {
            Ok(p)
        } else {
            Err(format!("NVCC={} does not run (`nvcc --version` failed)", p.display()))
        };
    }
    let mut candidates = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(manifest.join(".toolchain/cuda/nvidia/cu13/bin/nvcc"));
    for c in &candidates {
        if c.is_file() && runs(c) {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "the `cuda` feature needs nvcc (CUDA 12.x or 13.0) and none was found in NVCC, CUDA_HOME, \
         CUDA_PATH, PATH, /usr/local/cuda/bin or {}.\n       Install the pinned compiler with \
         `bash tools/install-cuda-toolchain.sh` (no GPU needed), or set NVCC=/path/to/nvcc.",
        manifest.join(".toolchain/cuda").display()
    ))
}

fn runs(nvcc: &Path) -> bool {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
