//! Opening a device never panics: on a machine without a driver or device the error names
//! what is missing (this runs in CI, which has no GPU); with one, the context reports it.
#![cfg(feature = "cuda")]

use mlvpt::gpu::{GpuContext, GpuError};
use mlvpt::ops::linear::LinearShape;

#[test]
fn opening_a_device_is_an_error_or_a_context_never_a_panic() {
    match GpuContext::new(0) {
        Ok(gpu) => {
            assert!(!gpu.device_name().is_empty());
            assert!(gpu.compute_capability().0 >= 7 && gpu.sm_count() > 0, "{gpu:?}");
        }
        Err(GpuError::NoDriver) => {
            assert!(!GpuContext::driver_present());
            assert!(GpuError::NoDriver.to_string().contains("libcuda"));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("device") || msg.contains("CUDA"), "unhelpful error: {msg}");
        }
    }
}

#[test]
fn a_device_ordinal_past_the_last_is_an_error() {
    match GpuContext::new(4096) {
        Ok(_) => panic!("device 4096 should not exist"),
        Err(GpuError::NoDevice { ordinal, count }) => assert!(ordinal == 4096 && count < 4096),
        Err(GpuError::NoDriver) => assert!(!GpuContext::driver_present()),
        Err(e) => panic!("expected NoDevice or NoDriver, got: {e}"),
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn every_embedded_module_loads_and_cublas_is_found() {
    let gpu = GpuContext::new(0).unwrap_or_else(|e| panic!("this test requires a CUDA device: {e}"));
    eprintln!("{gpu:?}");
    gpu.load_all().unwrap();
    for k in [
        mlvpt::gpu::kernels::cast::CAST_F32_BF16,
        mlvpt::gpu::kernels::attention::ATTN_BWD_DQ_CONVERT,
    ] {
        gpu.kernel(k).unwrap();
    }
    let x = gpu.upload(&[1.0f32; 4]).unwrap();
    let w = gpu.upload(&[1.0f32; 4]).unwrap();
    let mut y = gpu.zeros::<f32>(4).unwrap();
    mlvpt::ops::linear::cuda::forward(
        &gpu,
        &x,
        &w,
        None,
        &mut y,
        &LinearShape {
            rows: 2,
            d_in: 2,
            d_out: 2,
        },
    )
    .expect("cuBLAS (libcublas in LD_LIBRARY_PATH?)");
    assert_eq!(gpu.download(&y).unwrap(), vec![2.0; 4]);
}

/// A context can be shared between threads (compile-time check).
#[test]
fn gpu_context_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GpuContext>();
}

/// CUDA cannot allocate 0 bytes (cuMemAlloc returns CUDA_ERROR_INVALID_VALUE); an empty upload
/// or a 0-element buffer is a clear error naming the operation, not a driver error.
#[test]
#[ignore = "requires a CUDA device"]
fn empty_uploads_and_zero_length_buffers_are_clear_errors() {
    let gpu = mlvpt::gpu::GpuContext::new(0).expect("a device");
    let e = gpu.upload::<f32>(&[]).unwrap_err().to_string();
    assert!(e.contains("upload") && e.contains("0 bytes"), "{e}");
    let e = gpu.zeros::<f32>(0).unwrap_err().to_string();
    assert!(e.contains("zeros") && e.contains("0 bytes"), "{e}");
    assert_eq!(gpu.download(&gpu.upload(&[1.5f32]).unwrap()).unwrap(), [1.5]);
}

/// A context loads a kernel module the first time one of its kernels runs and makes its cuBLAS
/// handle on the first GEMM; one adopted from a caller's cudarc stream runs on that stream,
/// on the caller's buffers.
#[test]
#[ignore = "requires a CUDA device"]
fn modules_and_cublas_load_on_first_use_and_a_caller_stream_is_adopted() {
    use mlvpt::gpu::{bf16, cudarc::driver::CudaContext};
    let ctx = CudaContext::new(0).expect("a device");
    let stream = ctx.new_stream().unwrap();
    let gpu = GpuContext::from_stream(stream.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(gpu.stream(), &stream) && std::sync::Arc::ptr_eq(gpu.context(), &ctx));
    assert!(gpu.loaded_modules().is_empty() && !gpu.cublas_ready(), "{gpu:?}");
    let x = stream.clone_htod(&[1.5f32, -2.0, 3.25]).unwrap();
    let mut y = stream.alloc_zeros::<bf16>(3).unwrap();
    mlvpt::ops::cast::cuda::f32_to_bf16(&gpu, gpu.stream(), &x, &mut y, 3).unwrap();
    assert_eq!(
        stream.clone_dtoh(&y).unwrap().iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        [1.5, -2.0, 3.25]
    );
    assert_eq!(gpu.loaded_modules(), ["cast"]);
    assert!(!gpu.cublas_ready());
    let w = stream.clone_htod(&[1.0f32; 4]).unwrap();
    let a = stream.clone_htod(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let mut out = stream.alloc_zeros::<f32>(4).unwrap();
    mlvpt::ops::linear::cuda::forward(
        &gpu,
        &a,
        &w,
        None,
        &mut out,
        &LinearShape {
            rows: 2,
            d_in: 2,
            d_out: 2,
        },
    )
    .unwrap();
    assert!(gpu.cublas_ready());
    assert_eq!(stream.clone_dtoh(&out).unwrap(), [3.0, 3.0, 7.0, 7.0]);
}
