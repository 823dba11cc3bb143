//! The PTX in a module image, as `cuModuleLoadData` receives it: PTX text, or a fatbin as
//! `nvcc -fatbin` writes it (the interpreter runs PTX only, so SASS entries are skipped).
//!
//! Fatbin layout (little-endian; checked against nvcc 13.0 output, see the tests):
//! ```text
//! header (16 bytes):  0 u32 magic 0xBA55ED50 | 4 u16 version (1) | 6 u16 header size (16)
//!                     8 u64 size of the entries that follow
//! entry (at header size, then each at entry + entry header size + payload size):
//!    0 u16 kind (1 PTX, 2 ELF) | 2 u16 (0x0101) | 4 u32 entry header size (64; 80 for PTX)
//!    8 u64 payload size (padded to 8) | 16 u32 compressed size (0 if not compressed)
//!   24 u16 minor, 26 u16 major (code version) | 28 u32 arch (sm_XX)
//!   40 u64 flags (0x1 64-bit, 0x10 Linux; 0x2000 or 0x8000: compressed)
//!   56 u64 uncompressed size (when compressed)
//! payload at entry + entry header size: PTX text padded with NULs, or an ELF (cubin).
//! ```
//! Several containers may follow one another; a `__fatBinC_Wrapper_t` (magic 0x466243B1)
//! holds a pointer to the fatbin, which the caller must follow (`driver` does).

const FATBIN_MAGIC: u32 = 0xBA55_ED50;
const WRAPPER_MAGIC: u32 = 0x4662_43B1;
const KIND_PTX: u16 = 1;
/// Compression flags: 0x2000 in older toolkits, 0x8000 in CUDA 13.
const FLAG_COMPRESSED: u64 = 0x2000 | 0x8000;
const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];

/// The PTX texts in `image`: the text itself, or every PTX entry of a fatbin in the order
/// they are stored, sorted by arch so that the highest `sm` arch is last.
pub fn ptx_texts(image: &[u8]) -> Result<Vec<String>, String> {
    if image.len() >= 4 {
        match u32le(image, 0) {
            FATBIN_MAGIC => return fatbin_ptx(image),
            WRAPPER_MAGIC => {
                return Err("a __fatBinC_Wrapper_t, not a fatbin: pass the fatbin it points to".into());
            }
            _ => {}
        }
    }
    let end = image.iter().position(|&b| b == 0).unwrap_or(image.len());
    let text = std::str::from_utf8(&image[..end]).map_err(|e| format!("neither a fatbin nor PTX text (not UTF-8: {e})"))?;
    if !looks_like_ptx(text) {
        let head: String = text.chars().take(40).collect();
        return Err(format!("neither a fatbin (magic 0xBA55ED50) nor PTX text (starts {head:?})"));
    }
    Ok(vec![text.to_string()])
}

/// Whether `text` starts, after whitespace and comments, with a directive (`.version`, ...).
fn looks_like_ptx(text: &str) -> bool {
    let mut t = text.trim_start();
    loop {
        if let Some(rest) = t.strip_prefix("//") {
            t = rest.split_once('\n').map_or("", |x| x.1).trim_start();
        } else if let Some(rest) = t.strip_prefix("/*") {
            t = rest.split_once("*/").map_or("", |x| x.1).trim_start();
        } else {
            return t.starts_with('.');
        }
    }
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn fatbin_ptx(image: &[u8]) -> Result<Vec<String>, String> {
    let mut ptx: Vec<(u32, String)> = Vec::new();
    // (kind, arch) of every entry, for the report when there is no PTX.
    let mut seen: Vec<(u16, u32)> = Vec::new();
    let mut pos = 0usize;
    // Containers, one after another.
    while pos + 16 <= image.len() && u32le(image, pos) == FATBIN_MAGIC {
        let hsize = u16le(image, pos + 6) as usize;
        let fsize = u64le(image, pos + 8);
        let end = (pos as u64).saturating_add(hsize as u64).saturating_add(fsize);
        if hsize < 16 || end > image.len() as u64 {
            return Err(format!(
                "truncated fatbin: its header at byte {pos} says {} bytes, the image has {}",
                end,
                image.len()
            ));
        }
        let end = end as usize;
        let mut e = pos + hsize;
        while e + 64 <= end {
            let kind = u16le(image, e);
            let ehsize = u32le(image, e + 4) as usize;
            let psize = u64le(image, e + 8);
            let arch = u32le(image, e + 28);
            let flags = u64le(image, e + 40);
            if ehsize < 64 || psize > (end - e - ehsize) as u64 {
                return Err(format!(
                    "bad fatbin entry at byte {e} (header {ehsize} bytes, payload {psize} bytes)"
                ));
            }
            let payload = &image[e + ehsize..e + ehsize + psize as usize];
            seen.push((kind, arch));
            if kind == KIND_PTX {
                let compressed = flags & FLAG_COMPRESSED != 0 || u32le(image, e + 16) != 0 || payload.starts_with(ZSTD_MAGIC);
                let text = payload.split(|&b| b == 0).next().unwrap_or(&[]);
                match std::str::from_utf8(text) {
                    Ok(t) if !compressed && looks_like_ptx(t) => ptx.push((arch, t.to_string())),
                    _ => {
                        return Err(format!(
                            "the fatbin's PTX is compressed (sm_{arch} entry, flags {flags:#x}): build with \
                             nvcc -no-compress (mlvpt's build.rs does)"
                        ))
                    }
                }
            }
            e += ehsize + psize as usize;
        }
        pos = end;
    }
    if ptx.is_empty() {
        let list: Vec<String> = seen
            .iter()
            .map(|&(k, a)| match k {
                1 => format!("PTX sm_{a}"),
                2 => format!("ELF sm_{a}"),
                _ => format!("kind {k} sm_{a}"),
            })
            .collect();
        return Err(format!(
            "the fatbin holds no PTX (entries: {}); vgpu runs PTX only",
            list.join(", ")
        ));
    }
    ptx.sort_by_key(|p| p.0); // stable: equal arches keep their order
    Ok(ptx.into_iter().map(|p| p.1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "//\n// comment\n.version 9.0\n.target sm_90\n.address_size 64\n";

    /// An entry as nvcc 13 writes it: header size 64 (ELF) or 80 (PTX), payload padded to 8.
    fn entry(kind: u16, arch: u32, flags: u64, payload: &[u8]) -> Vec<u8> {
        let hs = if kind == 1 { 80 } else { 64 };
        let padded = payload.len().div_ceil(8) * 8;
        let mut v = vec![0u8; hs];
        v[0..2].copy_from_slice(&kind.to_le_bytes());
        v[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        v[4..8].copy_from_slice(&(hs as u32).to_le_bytes());
        v[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
        v[28..32].copy_from_slice(&arch.to_le_bytes());
        v[40..48].copy_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(payload);
        v.resize(hs + padded, 0);
        v
    }

    fn fatbin(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut v = Vec::new();
        v.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&16u16.to_le_bytes());
        v.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn fatbin_plain_ptx_text() {
        let mut img = PTX.as_bytes().to_vec();
        img.extend_from_slice(b"\0garbage");
        assert_eq!(ptx_texts(&img).unwrap(), [PTX]);
        assert_eq!(ptx_texts(b"  .version 8.0\n").unwrap().len(), 1);
        assert_eq!(ptx_texts(b"/* x */ .version 8.0").unwrap().len(), 1);
        assert!(ptx_texts(b"\x7fELF\x02\x01").is_err());
        assert!(ptx_texts(b"hello").unwrap_err().contains("neither"));
    }

    #[test]
    fn fatbin_synthetic_entries() {
        let ptx80 = PTX.replace("sm_90", "sm_80");
        let img = fatbin(&[
            entry(2, 80, 0x11, b"\x7fELF...."),
            entry(1, 90, 0x11, PTX.as_bytes()),
            entry(1, 80, 0x11, ptx80.as_bytes()),
            entry(2, 90, 0x11, b"\x7fELF"),
        ]);
        assert_eq!(ptx_texts(&img).unwrap(), [ptx80.as_str(), PTX]);
        // Two containers back to back.
        let mut two = fatbin(&[entry(2, 80, 0x11, b"\x7fELF")]);
        two.extend(fatbin(&[entry(1, 90, 0x11, PTX.as_bytes())]));
        assert_eq!(ptx_texts(&two).unwrap(), [PTX]);
    }

    #[test]
    fn fatbin_errors() {
        let img = fatbin(&[entry(2, 80, 0x11, b"\x7fELF"), entry(2, 90, 0x11, b"\x7fELF")]);
        let e = ptx_texts(&img).unwrap_err();
        assert!(e.contains("no PTX") && e.contains("ELF sm_80, ELF sm_90"), "{e}");
        let img = fatbin(&[entry(1, 90, 0x8011, b"\x28\xb5\x2f\xfd\x60\x55")]);
        let e = ptx_texts(&img).unwrap_err();
        assert!(e.contains("compressed") && e.contains("-no-compress"), "{e}");
        let mut img = fatbin(&[entry(1, 90, 0x11, PTX.as_bytes())]);
        img.truncate(img.len() - 8);
        assert!(ptx_texts(&img).unwrap_err().contains("truncated"));
        assert!(ptx_texts(&0x4662_43B1u32.to_le_bytes()).unwrap_err().contains("Wrapper"));
    }

    /// A fatbin made the way build.rs makes one (with and without `-no-compress`).
    #[test]
    fn fatbin_from_nvcc() {
        let nvcc = match std::env::var_os("NVCC") {
            Some(p) => std::path::PathBuf::from(p),
            None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.toolchain/cuda/nvidia/cu13/bin/nvcc"),
        };
        if !nvcc.is_file() {
            eprintln!("skipped: no nvcc (set NVCC or run tools/install-cuda-toolchain.sh)");
            return;
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("vgpu-fatbin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The kernels include the header build.rs generates from the project's contract.
        std::fs::write(dir.join("contract.cuh"), mlvpt::contract::c_header()).unwrap();
        let build = |extra: &[&str], name: &str| -> Vec<u8> {
            let out = dir.join(name);
            let st = std::process::Command::new(&nvcc)
                .args(["-fatbin", "-std=c++17", "-O3", "-I"])
                .arg(root.join("kernels"))
                .arg("-I")
                .arg(&dir)
                .args(["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90"])
                .args(extra)
                .arg("-o")
                .arg(&out)
                .arg(root.join("kernels/linear.cu"))
                .status()
                .expect("run nvcc");
            assert!(st.success());
            std::fs::read(out).unwrap()
        };
        let plain = build(&["-no-compress"], "plain.fatbin");
        let packed = build(&[], "packed.fatbin");
        let _ = std::fs::remove_dir_all(&dir);
        let texts = ptx_texts(&plain).unwrap();
        assert_eq!(texts.len(), 1);
        assert!(texts[0].contains(".target sm_90") && texts[0].contains(".entry bias_rows_bf16"));
        crate::ptx::parse::parse(&texts[0]).unwrap();
        // nvcc compresses PTX by default.
        let e = ptx_texts(&packed).unwrap_err();
        assert!(e.contains("compressed"), "{e}");
    }
}
