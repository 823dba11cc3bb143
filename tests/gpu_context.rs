//! Opening a device never panics: on a machine without a driver or device the error names
//! what is missing (this runs in CI, which has no GPU); with one, the context reports it.
#![cfg(feature = "cuda")]

use mlvpt::gpu::{GpuContext, GpuError};

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
    for name in ["cast_f32_bf16", "cast_bf16_f32_v4"] {
        gpu.function("cast", name).unwrap();
    }
    assert!(matches!(gpu.function("cast", "no_such_kernel"), Err(GpuError::NoKernel { .. })));
    let x = gpu.upload(&[1.0f32; 4]).unwrap();
    let w = gpu.upload(&[1.0f32; 4]).unwrap();
    let mut y = gpu.zeros::<f32>(4).unwrap();
    gpu.linear_forward(&x, &w, None, &mut y, 2, 2, 2, false).expect("cuBLAS (libcublas in LD_LIBRARY_PATH?)");
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
