//! Build script. With the `cuda` feature it will compile `kernels/*.cu` with nvcc (CUDA backend
//! issue); without it there is nothing to build.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
