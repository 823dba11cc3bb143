//! The counters (`VGPU_COUNTERS=1`, or `vgpu::exec::set_counters`) count what the kernel did:
//! bank conflicts of a known access pattern, requests, barriers; an instruction the device does
//! not implement fails the launch naming it; the watchdog ends an endless kernel. (Own test
//! binary: counters and watchdog are process-wide settings.)

mod common;

use common::*;
use vgpu::exec::{set_counters, set_timeout, take_last_counters, FaultKind};

#[test]
fn counters_see_a_32_way_bank_conflict_and_a_conflict_free_read() {
    let k = kernel("counters_unknown.cu", "bank_conflicts");
    let out = Buf::new(64 * 4);
    set_counters(true);
    run(&k, [1, 1, 1], [32, 1, 1], 0, 0, &[arg(&out.ptr)]).expect("launch");
    let c = take_last_counters().expect("counters of the launch");
    set_counters(false);
    let v: Vec<f32> = out.read();
    for t in 0..32 {
        assert_eq!(v[t], (t * 32) as f32);
        assert_eq!(v[32 + t], t as f32);
    }
    // Stores: 32 requests of s[i], i = t + 32 j (conflict-free); loads: s[32 t] (32 words in
    // bank 0: 32 wavefronts) and s[t] (1 wavefront).
    assert_eq!(c.s_requests, 32 + 2, "shared requests");
    assert_eq!(c.s_ideal, 34, "one phase per 4-byte request");
    assert_eq!(
        c.s_wavefronts,
        32 + 32 + 1,
        "wavefronts: 32 stores, a 32-way conflict, a clean read"
    );
    assert_eq!(c.barriers, 1, "one __syncthreads");
    // The two global stores: 32 lanes x 4 bytes, contiguous: 4 sectors each.
    assert_eq!(c.gst_bytes, 64 * 4);
    assert_eq!((c.g_requests, c.g_sectors), (2, 8));
    assert!(c.table("bank_conflicts", [1, 1, 1], [32, 1, 1]).contains("not GPU performance"));
}

#[test]
fn an_instruction_the_device_does_not_know_stops_the_launch_with_its_name() {
    let k = kernel("counters_unknown.cu", "unknown_instruction");
    let out = Buf::upload(&[1u32, 2, 3]);
    let f = run(&k, [1, 1, 1], [1, 1, 1], 0, 0, &[arg(&out.ptr)]).expect_err("prmt is not implemented");
    assert_eq!(f.kind, FaultKind::LaunchFailed);
    assert!(f.report.starts_with("========= vgpu unsupported instruction:"), "{}", f.report);
    assert!(
        f.report.contains("prmt.b32") && f.report.contains("kernel unknown_instruction"),
        "{}",
        f.report
    );
    assert_eq!(out.read::<u32>(), [1, 2, 3], "nothing ran");
}

#[test]
fn the_watchdog_ends_a_kernel_that_never_finishes() {
    let k = kernel("counters_unknown.cu", "spin_forever");
    let flag = Buf::upload(&[0i32]);
    set_timeout(Some(std::time::Duration::from_millis(300)));
    let r = run(&k, [2, 1, 1], [64, 1, 1], 0, 0, &[arg(&flag.ptr)]);
    set_timeout(None);
    let f = r.expect_err("an endless loop");
    assert_eq!(f.kind, FaultKind::Timeout);
    assert_eq!(f.kind.cu_result(), 702, "CUDA_ERROR_LAUNCH_TIMEOUT");
    assert!(
        f.report.starts_with("========= vgpu watchdog:") && f.report.contains("kernel spin_forever"),
        "{}",
        f.report
    );
}
