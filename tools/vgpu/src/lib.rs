//! A virtual CUDA device: the CUDA driver API and the cuBLAS calls mlvpt makes, implemented on
//! the CPU. Kernels run by interpreting the PTX that nvcc emitted, under checks modelled on
//! compute-sanitizer (memcheck, racecheck, initcheck, synccheck) and launch checks. Streams run
//! synchronously, but [`streamcheck`] models what a GPU could run concurrently (vector clocks
//! over streams, events and host synchronisation) and reports device or pinned memory used
//! across streams without an ordering. It proves behaviour, never speed: nothing it runs is a
//! GPU performance figure.
//!
//! [`nccl`] adds the NCCL collectives across the ranks of threads or processes of one machine,
//! through shared memory.
//!
//! Built as `libvgpu.so`; `install.sh` links it as `libcuda.so`, `libcublas.so` and
//! `libnccl.so` so that cudarc (dynamic loading) finds it through `LD_LIBRARY_PATH`, and the
//! three share one state. See docs/GPU.md.

pub mod cublas;
pub mod device;
pub mod driver;
pub mod exec;
pub mod fatbin;
pub mod mem;
pub mod nccl;
pub mod ptx;
pub mod streamcheck;
