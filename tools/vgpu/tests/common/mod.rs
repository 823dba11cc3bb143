//! Shared by the device's integration tests: compiling `tests/kernels/*.cu` to PTX with nvcc,
//! device buffers, launching.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use vgpu::exec::{launch, Fault, Kernel, LaunchConfig, Program};

// ---------------------------------------------------------------------------------------------
// Compiling and loading.

pub fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.toolchain/cuda/nvidia/cu13/bin/nvcc")
}

/// The PTX of `tests/kernels/<file>`, compiled once per test binary run.
pub fn ptx(file: &str) -> String {
    static CACHE: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(text) = cache.get(file) {
        return text.clone();
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kernels").join(file);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("vgpu-sanitizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the PTX temp dir");
    let out = dir.join(file.replace(".cu", ".ptx"));
    let nvcc = nvcc();
    let result = Command::new(&nvcc)
        .args(["-ptx", "-std=c++17", "-O3", "-arch=compute_90", "-o"])
        .arg(&out)
        .arg(&src)
        .output();
    let output = match result {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run nvcc at {} ({e}); set NVCC to an nvcc (CUDA 12.x/13.x) to compile tests/kernels/*.cu",
            nvcc.display()
        ),
    };
    assert!(
        output.status.success(),
        "nvcc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("read the PTX nvcc wrote");
    cache.insert(file.to_string(), text.clone());
    text
}

pub fn kernel(file: &str, name: &str) -> Arc<Kernel> {
    let program = Program::load(&ptx(file)).unwrap_or_else(|e| panic!("Program::load({file}): {e}"));
    program.kernel(name).unwrap_or_else(|| panic!("{file} has no kernel {name}"))
}

// ---------------------------------------------------------------------------------------------
// Device memory.

/// A device allocation, freed on drop.
pub struct Buf {
    pub ptr: u64,
    pub bytes: usize,
}

impl Buf {
    pub fn new(bytes: usize) -> Buf {
        let ptr = vgpu::mem::alloc(bytes as u64, 0).expect("device allocation");
        Buf { ptr, bytes }
    }
    pub fn upload<T: Copy>(data: &[T]) -> Buf {
        let b = Buf::new(std::mem::size_of_val(data));
        b.write(data);
        b
    }
    pub fn write<T: Copy>(&self, data: &[T]) {
        assert!(std::mem::size_of_val(data) <= self.bytes);
        // SAFETY: the allocation holds `bytes` writable bytes, aligned to 256.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr as *mut T, data.len()) };
    }
    pub fn read<T: Copy + Default>(&self) -> Vec<T> {
        let mut v = vec![T::default(); self.bytes / std::mem::size_of::<T>()];
        // SAFETY: as in `write`; the launch that wrote it has returned.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr as *const T, v.as_mut_ptr(), v.len()) };
        v
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        vgpu::mem::free(self.ptr);
    }
}

/// A pointer to a kernel argument's value, for `kernelParams`.
pub fn arg<T>(v: &T) -> *const c_void {
    v as *const T as *const c_void
}

pub fn run(k: &Kernel, grid: [u32; 3], block: [u32; 3], smem: u32, smem_attr: u32, args: &[*const c_void]) -> Result<(), Fault> {
    assert_eq!(args.len(), k.params.len(), "argument count of {}", k.name);
    let cfg = LaunchConfig {
        grid,
        block,
        dynamic_smem: smem,
        max_dynamic_smem_attr: smem_attr,
        device: 0,
    };
    // SAFETY: one pointer per parameter, each to a live value of the parameter's size (u64
    // pointers and i32 scalars, as the kernels declare).
    unsafe { launch(k, &cfg, args.as_ptr()) }
}
