//! streamcheck through the driver API, as cudarc calls it: each cross-stream hazard is caught
//! on a broken sequence and passes on the fixed one, and sequences on one stream or ordered by
//! the host never report.
//!
//! A broken sequence runs alone in a child process (this binary re-run on that test with
//! `VGPU_STREAMCHECK_CHILD=1`), which checks the return codes and prints the handles it used;
//! the parent checks that the report on the child's stderr names the check, the operations,
//! the allocation and both streams. Each test makes its own (non-primary) context on its own
//! thread.
#![allow(non_snake_case)]

use std::ffi::c_void;
use std::ptr::null_mut;
use vgpu::cublas::*;
use vgpu::driver::*;

fn ok(r: CUresult) {
    assert_eq!(r, CUDA_SUCCESS, "expected CUDA_SUCCESS");
}

const FINDING: CUresult = CUDA_ERROR_LAUNCH_FAILED;

/// `dst[i] = src[i] + 1` for i < n: reads `src`, writes `dst`.
const PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .entry plus_one(
    .param .u64 plus_one_param_0,
    .param .u64 plus_one_param_1,
    .param .u32 plus_one_param_2
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<3>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [plus_one_param_0];
    ld.param.u64 %rd5, [plus_one_param_1];
    ld.param.u32 %r2, [plus_one_param_2];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra $L__BB0_2;
    cvta.to.global.u64 %rd2, %rd1;
    cvta.to.global.u64 %rd6, %rd5;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    add.s64 %rd7, %rd6, %rd3;
    ld.global.f32 %f1, [%rd4];
    add.f32 %f2, %f1, 0f3F800000;
    st.global.f32 [%rd7], %f2;
$L__BB0_2:
    ret;
}
"#;

const N: u32 = 256;
const BYTES: usize = N as usize * 4;

/// A context current on this thread, two streams (compute `a`, copy `b`), the kernel, pinned
/// host memory holding 0..N as f32, and device buffers `src`, `dst` (cuMemAlloc: ordered).
struct Setup {
    ctx: CUcontext,
    a: CUstream,
    b: CUstream,
    f: CUfunction,
    host: *mut f32,
    src: u64,
    dst: u64,
}

impl Setup {
    fn new() -> Setup {
        // SAFETY: plain driver calls with valid out-pointers; PTX is NUL-terminated.
        unsafe {
            ok(cuInit(0));
            let mut ctx = null_mut();
            ok(cuCtxCreate_v2(&mut ctx, 0, 0));
            let (mut a, mut b) = (null_mut(), null_mut());
            ok(cuStreamCreate(&mut a, 1)); // CU_STREAM_NON_BLOCKING, as cudarc's
            ok(cuStreamCreate(&mut b, 1));
            let text = std::ffi::CString::new(PTX).unwrap();
            let mut m = null_mut();
            ok(cuModuleLoadData(&mut m, text.as_ptr() as *const c_void));
            let mut f = null_mut();
            ok(cuModuleGetFunction(&mut f, m, c"plus_one".as_ptr()));
            let mut h = null_mut();
            ok(cuMemHostAlloc(&mut h, BYTES, 0));
            let host = h as *mut f32;
            for i in 0..N as usize {
                *host.add(i) = i as f32;
            }
            let (mut src, mut dst) = (0u64, 0u64);
            ok(cuMemAlloc_v2(&mut src, BYTES));
            ok(cuMemAlloc_v2(&mut dst, BYTES));
            Setup {
                ctx,
                a,
                b,
                f,
                host,
                src,
                dst,
            }
        }
    }

    fn event(&self) -> CUevent {
        let mut e = null_mut();
        // SAFETY: valid out-pointer, context current.
        unsafe { ok(cuEventCreate(&mut e, 2)) };
        e
    }

    /// plus_one(src -> dst) on stream `s`.
    fn launch(&self, s: CUstream, src: u64, dst: u64) -> CUresult {
        let (mut src, mut dst, mut n) = (src, dst, N);
        let mut args: [*mut c_void; 3] = [
            &mut src as *mut u64 as *mut c_void,
            &mut dst as *mut u64 as *mut c_void,
            &mut n as *mut u32 as *mut c_void,
        ];
        // SAFETY: one pointer per parameter, of the declared sizes.
        unsafe { cuLaunchKernel(self.f, N / 128, 1, 1, 128, 1, 1, 0, s, args.as_mut_ptr(), null_mut()) }
    }

    /// Host-to-device copy of the pinned memory on stream `s`.
    fn upload(&self, s: CUstream, dst: u64) -> CUresult {
        // SAFETY: the pinned buffer and the device buffer hold BYTES bytes.
        unsafe { cuMemcpyHtoDAsync_v2(dst, self.host as *const c_void, BYTES, s) }
    }

    fn download(&self, src: u64) -> Vec<f32> {
        let mut v = vec![0f32; N as usize];
        // SAFETY: `v` holds BYTES bytes.
        unsafe { ok(cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, src, BYTES)) };
        v
    }

    /// The handles a report must name, for the parent.
    fn announce(&self) {
        eprintln!(
            "HANDLES a={:#x} b={:#x} src={:#x} dst={:#x} host={:#x}",
            self.a as usize, self.b as usize, self.src, self.dst, self.host as usize
        );
    }

    /// After a finding the error is sticky; destroying the context clears it.
    fn sticky_then_destroy(self, code: CUresult) {
        // SAFETY: the context this setup made.
        unsafe {
            assert_eq!(cuCtxSynchronize(), code, "the finding's error is sticky");
            ok(cuCtxDestroy_v2(self.ctx));
        }
    }

    fn destroy(self) {
        // SAFETY: the context and pinned memory this setup made.
        unsafe {
            ok(cuCtxSynchronize());
            ok(cuMemFreeHost(self.host as *mut c_void));
            ok(cuCtxDestroy_v2(self.ctx));
        }
    }
}

/// In the parent: runs test `name` alone in a child and returns its stderr (the child must
/// pass). In the child: None, and the caller runs the broken sequence.
fn isolated(name: &str) -> Option<String> {
    isolated_with(name, &[])
}

/// [`isolated`], with more environment for the child.
fn isolated_with(name: &str, env: &[(&str, &str)]) -> Option<String> {
    if std::env::var_os("VGPU_STREAMCHECK_CHILD").is_some() {
        return None;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env("VGPU_STREAMCHECK_CHILD", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name} failed:\n{stdout}\n{stderr}"
    );
    Some(stderr)
}

/// The value of `key=` on the child's HANDLES line.
fn handle(stderr: &str, key: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("HANDLES "))
        .expect("the child printed its handles");
    let v = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .expect("key on the HANDLES line");
    v.to_string()
}

/// The report's first line (`========= vgpu streamcheck: ...`), checked to contain `parts`
/// (with `{a}`, `{b}`, `{src}`, `{dst}`, `{host}` replaced by the child's handles).
fn expect_report(stderr: &str, parts: &[&str]) {
    let reports: Vec<&str> = stderr.lines().filter(|l| l.starts_with("========= vgpu streamcheck: ")).collect();
    assert_eq!(reports.len(), 1, "one streamcheck report expected:\n{stderr}");
    let first = reports[0];
    for p in parts {
        let mut want = p.to_string();
        for key in ["a", "b", "src", "dst", "host"] {
            want = want.replace(&format!("{{{key}}}"), &handle(stderr, key));
        }
        assert!(first.contains(&want), "the report does not say `{want}`:\n{stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// (a) A copy on stream b, then a kernel on stream a reading its destination.

#[test]
fn a_kernel_reads_a_copy_it_did_not_wait_for() {
    if let Some(err) = isolated("a_kernel_reads_a_copy_it_did_not_wait_for") {
        expect_report(
            &err,
            &[
                "read-after-write",
                "kernel plus_one on stream {a} reads allocation {src}",
                "cuMemcpyHtoDAsync on stream {b} may still write it",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    ok(s.upload(s.b, s.src));
    assert_eq!(s.launch(s.a, s.src, s.dst), FINDING);
    s.sticky_then_destroy(FINDING);
}

#[test]
fn a_fixed_the_kernel_waits_for_the_copy() {
    let s = Setup::new();
    let copied = s.event();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(s.upload(s.b, s.src));
        ok(cuEventRecord(copied, s.b));
        ok(cuStreamWaitEvent(s.a, copied, 0));
    }
    ok(s.launch(s.a, s.src, s.dst));
    let v = s.download(s.dst);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32 + 1.0));
    s.destroy();
}

// ---------------------------------------------------------------------------------------------
// (b) A kernel on stream a reads a buffer; the next copy on stream b overwrites it.

#[test]
fn b_copy_overwrites_what_a_kernel_may_still_read() {
    if let Some(err) = isolated("b_copy_overwrites_what_a_kernel_may_still_read") {
        expect_report(
            &err,
            &[
                "write-after-read",
                "cuMemcpyHtoDAsync on stream {b} writes allocation {src}",
                "kernel plus_one on stream {a} may still read it",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    let copied = s.event();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(s.upload(s.b, s.src));
        ok(cuEventRecord(copied, s.b));
        ok(cuStreamWaitEvent(s.a, copied, 0));
        ok(s.launch(s.a, s.src, s.dst));
        // The host waited for the copy (so the pinned memory may be rewritten), not the kernel.
        ok(cuEventSynchronize(copied));
        assert_eq!(s.upload(s.b, s.src), FINDING);
    }
    s.sticky_then_destroy(FINDING);
}

#[test]
fn b_fixed_the_copy_waits_for_consumed() {
    let s = Setup::new();
    let (copied, consumed) = (s.event(), s.event());
    // SAFETY: handles made by the setup.
    unsafe {
        for round in 0..3 {
            // As mlvpt's staging: the host waits for the last copy before rewriting the pinned
            // memory, the copy stream for the last kernel before overwriting its input.
            ok(cuEventSynchronize(copied));
            for i in 0..N as usize {
                *s.host.add(i) = (i + round) as f32;
            }
            ok(cuStreamWaitEvent(s.b, consumed, 0));
            ok(s.upload(s.b, s.src));
            ok(cuEventRecord(copied, s.b));
            ok(cuStreamWaitEvent(s.a, copied, 0));
            ok(s.launch(s.a, s.src, s.dst));
            ok(cuEventRecord(consumed, s.a));
        }
    }
    let v = s.download(s.dst);
    assert!(v.iter().enumerate().all(|(i, &x)| x == (i + 2) as f32 + 1.0));
    s.destroy();
}

// ---------------------------------------------------------------------------------------------
// (c) The host rewrites pinned memory while the copy from it may still run.

#[test]
fn c_host_rewrites_pinned_memory_before_the_copy_is_done() {
    if let Some(err) = isolated("c_host_rewrites_pinned_memory_before_the_copy_is_done") {
        expect_report(
            &err,
            &[
                "host wrote pinned memory while an async copy from it may still run",
                "cuMemcpyHtoDAsync on stream {b} from pinned bytes [{host}, +1024)",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    let (copied, consumed) = (s.event(), s.event());
    // SAFETY: handles made by the setup.
    unsafe {
        ok(s.upload(s.b, s.src));
        ok(cuEventRecord(copied, s.b));
        ok(cuStreamWaitEvent(s.a, copied, 0));
        ok(s.launch(s.a, s.src, s.dst));
        ok(cuEventRecord(consumed, s.a));
        // Missing: cuEventSynchronize(copied).
        *s.host.add(7) = -1.0;
        ok(cuStreamWaitEvent(s.b, consumed, 0));
        assert_eq!(s.upload(s.b, s.src), FINDING);
    }
    s.sticky_then_destroy(FINDING);
}

#[test]
fn c_host_rewrites_pinned_memory_then_frees_it() {
    if let Some(err) = isolated("c_host_rewrites_pinned_memory_then_frees_it") {
        expect_report(
            &err,
            &[
                "host wrote pinned memory while an async copy from it may still run",
                "changed before cuMemFreeHost",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(s.upload(s.b, s.src));
        *s.host = 42.0;
        assert_eq!(cuMemFreeHost(s.host as *mut c_void), FINDING);
    }
    s.sticky_then_destroy(FINDING);
}

#[test]
fn c_fixed_the_host_waits_for_the_copy() {
    let s = Setup::new();
    let copied = s.event();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(s.upload(s.b, s.src));
        ok(cuEventRecord(copied, s.b));
        ok(cuEventSynchronize(copied));
        *s.host.add(7) = -1.0;
        ok(s.upload(s.b, s.src));
        // Or a stream synchronisation; unchanged bytes need none.
        ok(cuStreamSynchronize(s.b));
        *s.host.add(8) = -1.0;
        ok(s.upload(s.b, s.src));
        ok(s.upload(s.b, s.src));
        ok(cuStreamSynchronize(s.b));
        *s.host = 3.0;
    }
    s.destroy();
}

// ---------------------------------------------------------------------------------------------
// (d) Stream-ordered allocation and free across streams.

#[test]
fn d_free_async_on_another_stream_while_a_kernel_reads() {
    if let Some(err) = isolated("d_free_async_on_another_stream_while_a_kernel_reads") {
        expect_report(
            &err,
            &[
                "write-after-read",
                "cuMemFreeAsync on stream {b} frees allocation {src}",
                "kernel plus_one on stream {a} may still read it",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(cuMemcpyHtoD_v2(s.src, s.host as *const c_void, BYTES));
        ok(s.launch(s.a, s.src, s.dst));
        assert_eq!(cuMemFreeAsync(s.src, s.b), FINDING);
    }
    s.sticky_then_destroy(FINDING);
}

#[test]
fn d_kernel_uses_memory_allocated_on_another_stream() {
    if let Some(err) = isolated("d_kernel_uses_memory_allocated_on_another_stream") {
        expect_report(
            &err,
            &[
                "use-before-allocation",
                "kernel plus_one on stream {a} writes allocation",
                "cuMemAllocAsync on stream {b} may still be making it",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    // SAFETY: handles made by the setup.
    unsafe {
        ok(cuMemcpyHtoD_v2(s.src, s.host as *const c_void, BYTES));
        let mut fresh = 0u64;
        ok(cuMemAllocAsync(&mut fresh, BYTES, s.b));
        assert_eq!(s.launch(s.a, s.src, fresh), FINDING);
    }
    s.sticky_then_destroy(FINDING);
}

#[test]
fn d_fixed_free_and_alloc_in_stream_order() {
    let s = Setup::new();
    let (used, made) = (s.event(), s.event());
    // SAFETY: handles made by the setup.
    unsafe {
        ok(cuMemcpyHtoD_v2(s.src, s.host as *const c_void, BYTES));
        let mut fresh = 0u64;
        ok(cuMemAllocAsync(&mut fresh, BYTES, s.b));
        ok(cuEventRecord(made, s.b));
        ok(cuStreamWaitEvent(s.a, made, 0));
        ok(s.launch(s.a, s.src, fresh));
        ok(cuEventRecord(used, s.a));
        ok(cuStreamWaitEvent(s.b, used, 0));
        ok(cuMemFreeAsync(fresh, s.b));
        ok(cuMemFreeAsync(s.src, s.b));
        // The same stream needs no event: free after use on a.
        let mut other = 0u64;
        ok(cuMemAllocAsync(&mut other, BYTES, s.a));
        ok(s.launch(s.a, s.dst, other));
        ok(cuMemFreeAsync(other, s.a));
    }
    s.destroy();
}

/// `VGPU_MEMORY_POOLS=1` reports stream-ordered allocation, so that cudarc takes its
/// cuMemAllocAsync / cuMemFreeAsync path (a real H100's) and streamcheck checks it.
#[test]
fn memory_pools_env_reports_stream_ordered_allocation() {
    if isolated_with("memory_pools_env_reports_stream_ordered_allocation", &[("VGPU_MEMORY_POOLS", "1")]).is_some() {
        return;
    }
    // SAFETY: valid out-pointer.
    unsafe {
        ok(cuInit(0));
        let mut v = -1;
        ok(cuDeviceGetAttribute(&mut v, attr::MEMORY_POOLS_SUPPORTED, 0));
        assert_eq!(v, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// (e) One stream, or the host in between: never a finding.

#[test]
fn e_one_stream_never_reports() {
    let s = Setup::new();
    // SAFETY: handles made by the setup; host buffers sized as passed.
    unsafe {
        for _ in 0..3 {
            ok(s.upload(s.a, s.src));
            ok(s.launch(s.a, s.src, s.dst));
            ok(s.launch(s.a, s.dst, s.src));
            ok(cuMemsetD32Async(s.dst, 0, N as usize, s.a));
            ok(cuMemcpyDtoDAsync_v2(s.dst, s.src, BYTES, s.a));
        }
        let mut back = vec![0f32; N as usize];
        ok(cuMemcpyDtoHAsync_v2(back.as_mut_ptr() as *mut c_void, s.dst, BYTES, s.a));
        ok(cuMemFreeAsync(s.src, s.a));
    }
    s.destroy();
}

#[test]
fn e_host_synchronisation_orders_streams() {
    let s = Setup::new();
    let e = s.event();
    // SAFETY: handles made by the setup; host buffers sized as passed.
    unsafe {
        // Stream sync.
        ok(s.upload(s.b, s.src));
        ok(cuStreamSynchronize(s.b));
        ok(s.launch(s.a, s.src, s.dst));
        // Context sync.
        ok(cuCtxSynchronize());
        ok(s.upload(s.b, s.src));
        // Event query (done).
        ok(cuEventRecord(e, s.b));
        ok(cuEventQuery(e));
        ok(s.launch(s.a, s.src, s.dst));
        // A copy into pageable memory returns when done.
        let mut back = vec![0f32; N as usize];
        ok(cuMemcpyDtoHAsync_v2(back.as_mut_ptr() as *mut c_void, s.dst, BYTES, s.a));
        ok(s.upload(s.b, s.dst));
        // Synchronous calls and the legacy stream synchronise the context.
        ok(cuMemcpyDtoD_v2(s.src, s.dst, BYTES));
        ok(s.launch(s.a, s.src, s.dst));
        ok(cuMemsetD8_v2(s.dst, 0, BYTES));
        ok(s.launch(s.b, s.src, s.dst));
        ok(s.launch(null_mut(), s.dst, s.src));
        ok(s.launch(s.a, s.src, s.dst));
        ok(cuStreamSynchronize(null_mut()));
        ok(cuMemFree_v2(s.src));
    }
    s.destroy();
}

// ---------------------------------------------------------------------------------------------
// cuBLAS runs on its handle's stream.

/// C (2x2) = A (2x2) B (2x2), f32, column-major, on stream `s`.
fn gemm(h: cublasHandle_t, s: CUstream, a: u64, b: u64, c: u64) -> cublasStatus_t {
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: a live handle; each operand holds 4 f32s; scalars in host pointer mode.
    unsafe {
        assert_eq!(cublasSetStream_v2(h, s as *mut c_void), CUBLAS_STATUS_SUCCESS);
        cublasSgemm_v2(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            2,
            2,
            2,
            &alpha,
            a as *const f32,
            2,
            b as *const f32,
            2,
            &beta,
            c as *mut f32,
            2,
        )
    }
}

#[test]
fn gemm_reads_a_copy_it_did_not_wait_for() {
    if let Some(err) = isolated("gemm_reads_a_copy_it_did_not_wait_for") {
        expect_report(
            &err,
            &[
                "read-after-write",
                "cuBLAS GEMM on stream {a} reads allocation {src}",
                "cuMemcpyHtoDAsync on stream {b} may still write it",
            ],
        );
        return;
    }
    let s = Setup::new();
    s.announce();
    let mut h = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(cublasCreate_v2(&mut h), CUBLAS_STATUS_SUCCESS) };
    ok(s.upload(s.b, s.src));
    assert_eq!(gemm(h, s.a, s.src, s.src, s.dst), CUBLAS_STATUS_EXECUTION_FAILED);
    s.sticky_then_destroy(FINDING);
}

#[test]
fn gemm_fixed_waits_for_the_copy() {
    let s = Setup::new();
    let copied = s.event();
    let mut h = null_mut();
    // SAFETY: valid out-pointer; handles made here.
    unsafe {
        assert_eq!(cublasCreate_v2(&mut h), CUBLAS_STATUS_SUCCESS);
        ok(s.upload(s.b, s.src));
        ok(cuEventRecord(copied, s.b));
        ok(cuStreamWaitEvent(s.a, copied, 0));
    }
    assert_eq!(gemm(h, s.a, s.src, s.src, s.dst), CUBLAS_STATUS_SUCCESS);
    let v = s.download(s.dst);
    // [0 2; 1 3] squared = [2 6; 3 11] (column-major 2, 3, 6, 11).
    assert_eq!(&v[..4], &[2.0, 3.0, 6.0, 11.0]);
    // SAFETY: the handle made here.
    unsafe { assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS) };
    s.destroy();
}
