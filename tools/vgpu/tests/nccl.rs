//! The NCCL calls of the virtual device, as cudarc's `nccl` module makes them: ranks as
//! threads of this process (each with its own device, context and stream, as a data-parallel
//! trainer has), and as two processes (this binary re-run on one test with `VGPU_NCCL_ROLE`
//! set, acting as rank 1). Results must be bit-identical across ranks and equal to a
//! sequential reduction in rank order; failures (abort, a killed peer, mismatched
//! collectives, missing ranks) must end every wait within a bound, with a message.
#![allow(non_snake_case)]

use std::ffi::{c_void, CStr};
use std::process::{Child, Command, Stdio};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use vgpu::cublas::{bf16_to_f32, f32_to_bf16};
use vgpu::driver::*;
use vgpu::nccl::*;

const F32: u32 = 7;
const BF16: u32 = 9;
const SUM: u32 = 0;
const MAX: u32 = 2;
const AVG: u32 = 4;

/// Four devices, for up to three thread ranks on distinct devices (NCCL refuses two ranks on
/// one GPU). Every test calls this first; std serialises its environment accesses.
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("VGPU_DEVICE_COUNT").is_none() {
            std::env::set_var("VGPU_DEVICE_COUNT", "4");
        }
    });
}

fn ok(r: CUresult) {
    assert_eq!(r, CUDA_SUCCESS, "CUDA call failed");
}

fn nok(r: ncclResult_t) {
    assert_eq!(r, ncclSuccess, "NCCL call failed: {}", last_error(null_mut()));
}

fn last_error(comm: ncclComm_t) -> String {
    // SAFETY: returns a NUL-terminated string valid until this thread's next call.
    unsafe { CStr::from_ptr(ncclGetLastError(comm)) }.to_string_lossy().into_owned()
}

fn unique_id() -> ncclUniqueId {
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: a local id.
    nok(unsafe { ncclGetUniqueId(&mut id) });
    id
}

/// Makes device `d`'s primary context current on this thread and returns a new stream on it.
fn bind(d: i32) -> CUstream {
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        ok(cuInit(0));
        let mut ctx = null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut ctx, d));
        ok(cuCtxSetCurrent(ctx));
        let mut s = null_mut();
        ok(cuStreamCreate(&mut s, 1));
        s
    }
}

fn upload(bytes: &[u8]) -> u64 {
    let mut p = 0u64;
    // SAFETY: a current context; the copy reads bytes.len() bytes.
    unsafe {
        ok(cuMemAlloc_v2(&mut p, bytes.len().max(1)));
        ok(cuMemcpyHtoD_v2(p, bytes.as_ptr() as *const c_void, bytes.len()));
    }
    p
}

fn alloc(len: usize) -> u64 {
    upload(&vec![0u8; len])
}

fn download(p: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `v` holds len bytes.
    unsafe { ok(cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, p, len)) };
    v
}

/// One rank on its own thread: device `rank`, a stream on it, the communicator.
struct R {
    stream: CUstream,
    comm: ncclComm_t,
}

impl R {
    fn join(rank: usize, n: usize, id: &ncclUniqueId) -> R {
        let stream = bind(rank as i32);
        let mut comm = null_mut();
        // SAFETY: valid out-pointer; the id came from ncclGetUniqueId.
        nok(unsafe { ncclCommInitRank(&mut comm, n as i32, *id, rank as i32) });
        R { stream, comm }
    }

    fn all_reduce(&self, send: u64, recv: u64, count: usize, dt: u32, op: u32) -> ncclResult_t {
        // SAFETY: the buffers are device allocations of the sizes the call reads and writes.
        unsafe { ncclAllReduce(send as *const c_void, recv as *mut c_void, count, dt, op, self.comm, self.stream) }
    }

    fn destroy(self) {
        // SAFETY: this rank's communicator.
        nok(unsafe { ncclCommDestroy(self.comm) });
    }
}

/// Runs `f(rank)` on n threads and returns their results in rank order.
fn threads<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let joins: Vec<_> = (0..n).map(|r| s.spawn(move || f(r))).collect();
        joins.into_iter().map(|j| j.join().expect("rank thread panicked")).collect()
    })
}

/// Rank r's i-th input: values of mixed magnitude, so the order of a float sum shows.
fn value(r: usize, i: usize) -> f32 {
    let m = [1.0f32, 1e-3, 3e2, -7.5e-2][(i + r) % 4];
    m * (((i * 7919 + r * 104_729) % 1000) as f32 / 997.0 - 0.31)
}

fn input(r: usize, count: usize, dt: u32) -> Vec<u8> {
    let v = (0..count).map(|i| value(r, i));
    match dt {
        F32 => v.flat_map(f32::to_le_bytes).collect(),
        BF16 => v.flat_map(|x| f32_to_bf16(x).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

/// The sequential reference: rank 0, 1, ... folded in f32 (bf16 widened, rounded once);
/// avg pre-multiplies each operand by 1/n.
fn reference(n: usize, count: usize, dt: u32, op: u32) -> Vec<u8> {
    let load = |r: usize, i: usize| match dt {
        F32 => value(r, i),
        _ => bf16_to_f32(f32_to_bf16(value(r, i))),
    };
    let scaled = |r: usize, i: usize| if op == AVG { load(r, i) * (1.0 / n as f32) } else { load(r, i) };
    let out = (0..count).map(|i| {
        (1..n).fold(scaled(0, i), |acc, r| match op {
            SUM | AVG => acc + scaled(r, i),
            MAX => acc.max(scaled(r, i)),
            _ => unreachable!(),
        })
    });
    match dt {
        F32 => out.flat_map(f32::to_le_bytes).collect(),
        _ => out.flat_map(|x| f32_to_bf16(x).to_le_bytes()).collect(),
    }
}

fn elem(dt: u32) -> usize {
    if dt == F32 {
        4
    } else {
        2
    }
}

#[test]
fn all_reduce_across_threads_is_bit_identical_and_matches_the_reference() {
    setup();
    for n in [2, 3] {
        let id = unique_id();
        let path = segment_path(&id).unwrap();
        // One communicator, many collectives in sequence; the last count spans two steps.
        let cases = [
            (F32, SUM, 1000),
            (F32, AVG, 1000),
            (F32, MAX, 1000),
            (BF16, SUM, 1000),
            (BF16, AVG, 1000),
            (BF16, MAX, 1000),
            (F32, SUM, 300_000),
            (BF16, AVG, 600_000),
        ];
        let results = threads(n, |r| {
            let me = R::join(r, n, &id);
            let out: Vec<Vec<u8>> = cases
                .iter()
                .map(|&(dt, op, count)| {
                    let send = upload(&input(r, count, dt));
                    let recv = alloc(count * elem(dt));
                    nok(me.all_reduce(send, recv, count, dt, op));
                    download(recv, count * elem(dt))
                })
                .collect();
            me.destroy();
            out
        });
        for (c, &(dt, op, count)) in cases.iter().enumerate() {
            let want = reference(n, count, dt, op);
            for (r, res) in results.iter().enumerate() {
                assert!(
                    res[c] == want,
                    "n={n} case {c} (type {dt} op {op}): rank {r} differs from the reference"
                );
            }
        }
        assert!(!path.exists(), "the segment file {} is left behind", path.display());
    }
}

#[test]
fn in_place_all_reduce() {
    setup();
    let id = unique_id();
    let count = 777;
    let results = threads(2, |r| {
        let me = R::join(r, 2, &id);
        let buf = upload(&input(r, count, F32));
        nok(me.all_reduce(buf, buf, count, F32, SUM));
        let out = download(buf, count * 4);
        me.destroy();
        out
    });
    assert!(results[0] == reference(2, count, F32, SUM) && results[1] == results[0]);
}

#[test]
fn broadcast_reduce_all_gather_reduce_scatter() {
    setup();
    let id = unique_id();
    let n = 3;
    let count = 500;
    let results = threads(n, |r| {
        let me = R::join(r, n, &id);
        let send = upload(&input(r, count * n, F32));
        let (c, s) = (me.comm, me.stream);
        // SAFETY: device buffers of the sizes each call reads and writes.
        unsafe {
            // Broadcast from rank 1; the others pass no sendbuff.
            let b = alloc(count * 4);
            let src = if r == 1 { send as *const c_void } else { std::ptr::null() };
            nok(ncclBroadcast(src, b as *mut c_void, count, F32, 1, c, s));
            // Reduce (sum) to rank 2: only its recvbuff is written.
            let red = upload(&vec![0xEE; count * 4]);
            nok(ncclReduce(send as *const c_void, red as *mut c_void, count, F32, SUM, 2, c, s));
            // All-gather of each rank's first `count`.
            let g = alloc(count * n * 4);
            nok(ncclAllGather(send as *const c_void, g as *mut c_void, count, F32, c, s));
            // Reduce-scatter of all count * n: rank r gets block r of the sum.
            let rs = alloc(count * 4);
            nok(ncclReduceScatter(send as *const c_void, rs as *mut c_void, count, F32, SUM, c, s));
            let out = [b, red, g, rs].map(|p| download(p, if p == g { count * n * 4 } else { count * 4 }));
            me.destroy();
            out
        }
    });
    let full_sum = reference(n, count * n, F32, SUM);
    for (r, [b, red, g, rs]) in results.iter().enumerate() {
        assert!(*b == input(1, count * n, F32)[..count * 4], "broadcast on rank {r}");
        if r == 2 {
            assert!(red[..] == full_sum[..count * 4], "reduce on the root");
        } else {
            assert!(red.iter().all(|&x| x == 0xEE), "reduce wrote a non-root's recvbuff (rank {r})");
        }
        let want: Vec<u8> = (0..n).flat_map(|q| input(q, count * n, F32)[..count * 4].to_vec()).collect();
        assert!(*g == want, "all-gather on rank {r}");
        assert!(rs[..] == full_sum[r * count * 4..(r + 1) * count * 4], "reduce-scatter on rank {r}");
    }
}

#[test]
fn init_all_then_grouped_all_reduce_from_one_thread() {
    setup();
    let n = 3;
    let streams: Vec<CUstream> = (0..n).map(|d| bind(d as i32)).collect();
    let mut comms = vec![null_mut(); n];
    let devs = [0, 1, 2];
    // SAFETY: n handles, n devices.
    nok(unsafe { ncclCommInitAll(comms.as_mut_ptr(), n as i32, devs.as_ptr()) });
    let count = 2000;
    let mut recvs = Vec::new();
    nok(ncclGroupStart());
    for (d, (&c, &s)) in comms.iter().zip(&streams).enumerate() {
        // The buffers of rank d live on device d: make its context current for them.
        let _ = bind(d as i32);
        let send = upload(&input(d, count, BF16));
        let recv = alloc(count * 2);
        // SAFETY: device buffers of count bf16 each, on the communicator's device.
        nok(unsafe { ncclAllReduce(send as *const c_void, recv as *mut c_void, count, BF16, SUM, c, s) });
        recvs.push(recv);
    }
    // Executed here, one thread per communicator: called one by one they would wait forever.
    nok(ncclGroupEnd());
    let want = reference(n, count, BF16, SUM);
    for (d, &recv) in recvs.iter().enumerate() {
        let _ = bind(d as i32);
        assert!(download(recv, count * 2) == want, "rank {d}");
        let (mut rank, mut dev, mut cnt) = (-1, -1, -1);
        // SAFETY: a live communicator, valid out-pointers.
        unsafe {
            nok(ncclCommUserRank(comms[d], &mut rank));
            nok(ncclCommCuDevice(comms[d], &mut dev));
            nok(ncclCommCount(comms[d], &mut cnt));
        }
        assert_eq!((rank, dev, cnt), (d as i32, d as i32, n as i32));
    }
    for c in comms {
        // SAFETY: live communicators.
        nok(unsafe { ncclCommDestroy(c) });
    }
}

#[test]
fn grouped_init_rank_from_one_thread() {
    setup();
    let id = unique_id();
    let mut comms = [null_mut(); 2];
    nok(ncclGroupStart());
    for (r, c) in comms.iter_mut().enumerate() {
        let _ = bind(r as i32);
        // SAFETY: valid out-pointer and id.
        nok(unsafe { ncclCommInitRank(c, 2, id, r as i32) });
    }
    nok(ncclGroupEnd());
    for c in comms {
        // SAFETY: live communicators.
        nok(unsafe { ncclCommAbort(c) });
    }
    assert!(!segment_path(&id).unwrap().exists());
}

#[test]
fn abort_by_a_peer_ends_a_waiting_collective() {
    setup();
    let id = unique_id();
    let path = segment_path(&id).unwrap();
    let out = threads(2, |r| {
        let me = R::join(r, 2, &id);
        if r == 1 {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: this rank's communicator.
            nok(unsafe { ncclCommAbort(me.comm) });
            return None;
        }
        let buf = upload(&input(r, 64, F32));
        let t = Instant::now();
        let res = me.all_reduce(buf, buf, 64, F32, SUM);
        let took = t.elapsed();
        let mut asy = ncclSuccess;
        // SAFETY: valid out-pointer.
        nok(unsafe { ncclCommGetAsyncError(me.comm, &mut asy) });
        let msg = last_error(me.comm);
        // Later collectives fail at once with the same error.
        let again = me.all_reduce(buf, buf, 64, F32, SUM);
        me.destroy();
        Some((res, took, asy, msg, again))
    });
    let (res, took, asy, msg, again) = out[0].clone().unwrap();
    assert_eq!((res, asy, again), (ncclRemoteError, ncclRemoteError, ncclRemoteError), "{msg}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(msg.contains("rank 1 aborted"), "{msg}");
    assert!(!path.exists());
}

#[test]
fn abort_from_another_thread_ends_this_ranks_wait() {
    setup();
    let id = unique_id();
    // Rank 1 joins but never calls the collective; a watchdog aborts rank 0's communicator
    // while rank 0 waits in it (NCCL's recipe for a hung peer).
    let out = threads(2, |r| {
        let me = R::join(r, 2, &id);
        if r == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            me.destroy();
            return None;
        }
        let comm = me.comm as usize;
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: rank 0's communicator, aborted once.
            unsafe { ncclCommAbort(comm as ncclComm_t) }
        });
        let buf = upload(&input(r, 64, F32));
        let t = Instant::now();
        let res = me.all_reduce(buf, buf, 64, F32, SUM);
        let took = t.elapsed();
        nok(watchdog.join().unwrap());
        Some((res, took))
    });
    let (res, took) = out[0].unwrap();
    assert_ne!(res, ncclSuccess);
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    setup();
    let id = unique_id();
    let out = threads(2, |r| {
        let me = R::join(r, 2, &id);
        let buf = upload(&input(r, 8, F32));
        let other = alloc(64);
        // Rank 0: 8 f32; rank 1: 8 bf16.
        let res = if r == 0 {
            me.all_reduce(buf, other, 8, F32, SUM)
        } else {
            me.all_reduce(buf, other, 8, BF16, SUM)
        };
        let msg = last_error(me.comm);
        let untouched = download(other, 64).iter().all(|&b| b == 0);
        me.destroy();
        (res, msg, untouched)
    });
    for (r, (res, msg, untouched)) in out.iter().enumerate() {
        assert_eq!(*res, ncclInvalidUsage, "rank {r}: {msg}");
        assert!(msg.contains("mismatched collectives"), "{msg}");
        assert!(untouched, "rank {r}: recvbuff written despite the mismatch");
    }
}

#[test]
fn argument_checks() {
    setup();
    let id = unique_id();
    let me = R::join(0, 1, &id);
    let buf = upload(&input(0, 16, F32));
    let c = me.comm;
    let s = me.stream;
    // SAFETY: each call is rejected before it touches memory, or uses the 16-float buffer.
    unsafe {
        // One rank: an all-reduce is a copy.
        let out = alloc(64);
        nok(ncclAllReduce(buf as *const c_void, out as *mut c_void, 16, F32, SUM, c, s));
        assert!(download(out, 64) == input(0, 16, F32));
        let host = [0f32; 16];
        assert_eq!(
            ncclAllReduce(host.as_ptr() as *const c_void, out as *mut c_void, 16, F32, SUM, c, s),
            ncclInvalidArgument
        );
        assert!(last_error(c).contains("not inside a live device allocation"));
        assert_eq!(
            ncclAllReduce(buf as *const c_void, out as *mut c_void, 17, F32, SUM, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(buf as *const c_void, out as *mut c_void, 16, 10, SUM, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(buf as *const c_void, out as *mut c_void, 16, F32, 9, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclBroadcast(buf as *const c_void, out as *mut c_void, 16, F32, 1, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(buf as *const c_void, out as *mut c_void, 16, F32, SUM, null_mut(), s),
            ncclInvalidArgument
        );
        // A buffer on another device than the communicator's (device 0).
        let _ = bind(1);
        let far = alloc(64);
        let _ = bind(0);
        assert_eq!(
            ncclAllReduce(buf as *const c_void, far as *mut c_void, 16, F32, SUM, c, s),
            ncclInvalidArgument
        );
        assert!(last_error(c).contains("device 1"));
        // Argument errors leave the communicator usable.
        let mut asy = 99;
        nok(ncclCommGetAsyncError(c, &mut asy));
        assert_eq!(asy, ncclSuccess);
        nok(ncclAllReduce(buf as *const c_void, out as *mut c_void, 16, F32, MAX, c, s));
        assert_eq!(ncclSend(buf as *const c_void, 16, F32, 0, c, s), ncclInvalidUsage);
        let mut v = 0;
        nok(ncclGetVersion(&mut v));
        assert!(v >= 22000);
        assert!(!CStr::from_ptr(ncclGetErrorString(ncclRemoteError)).to_bytes().is_empty());
    }
    me.destroy();
}

#[test]
fn streamcheck_sees_a_collective_read_its_stream_did_not_wait_for() {
    setup();
    // Its own context (device 3), since the finding breaks the context.
    // SAFETY: plain driver and NCCL calls on buffers of 256 bytes.
    unsafe {
        ok(cuInit(0));
        let mut ctx = null_mut();
        ok(cuCtxCreate_v2(&mut ctx, 0, 3));
        let (mut a, mut b) = (null_mut(), null_mut());
        ok(cuStreamCreate(&mut a, 1));
        ok(cuStreamCreate(&mut b, 1));
        let id = unique_id();
        let mut comm = null_mut();
        nok(ncclCommInitRank(&mut comm, 1, id, 0));
        let (buf, out) = (alloc(256), alloc(256));
        // Ordered: a memset on b, then an event wait before the all-reduce on a.
        ok(cuMemsetD8Async(buf, 1, 256, b));
        let mut e = null_mut();
        ok(cuEventCreate(&mut e, 2));
        ok(cuEventRecord(e, b));
        ok(cuStreamWaitEvent(a, e, 0));
        nok(ncclAllReduce(buf as *const c_void, out as *mut c_void, 64, F32, SUM, comm, a));
        ok(cuCtxSynchronize());
        // Unordered: the all-reduce on a reads what b may still be writing.
        ok(cuMemsetD8Async(buf, 2, 256, b));
        let r = ncclAllReduce(buf as *const c_void, out as *mut c_void, 64, F32, SUM, comm, a);
        assert_eq!(r, ncclUnhandledCudaError, "{}", last_error(comm));
        assert!(last_error(comm).contains("streamcheck"));
        nok(ncclCommDestroy(comm));
        assert_eq!(cuCtxSynchronize(), CUDA_ERROR_LAUNCH_FAILED, "the finding is sticky");
        ok(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn a_rank_claimed_twice_is_refused_and_the_first_claim_stands() {
    setup();
    let id = unique_id();
    let res = threads(2, |r| {
        if r == 0 {
            R::join(0, 2, &id).destroy();
            return ncclSuccess;
        }
        let _ = bind(1);
        std::thread::sleep(Duration::from_millis(200));
        let mut comm = null_mut();
        // SAFETY: valid out-pointer and id.
        let twice = unsafe { ncclCommInitRank(&mut comm, 2, id, 0) };
        R::join(1, 2, &id).destroy();
        twice
    });
    assert_eq!(res[1], ncclInvalidUsage);
    assert!(!segment_path(&id).unwrap().exists());
}

#[test]
fn two_ranks_on_one_device_of_one_process_are_refused() {
    setup();
    let id = unique_id();
    let res = threads(2, |r| {
        let _ = bind(0);
        let mut comm = null_mut();
        // SAFETY: valid out-pointer and id.
        unsafe { ncclCommInitRank(&mut comm, 2, id, r as i32) }
    });
    assert!(res.iter().all(|&r| r == ncclInvalidUsage), "{res:?}");
    assert!(!segment_path(&id).unwrap().exists());
}

// ---------------------------------------------------------------------------------------------
// Across processes: the child is this binary, run on one test with VGPU_NCCL_ROLE.

fn hex(id: &ncclUniqueId) -> String {
    id.internal.iter().map(|&c| format!("{:02x}", c as u8)).collect()
}

/// In a child run for `role`: the unique id the parent passed. None in the parent.
fn child_role(role: &str) -> Option<ncclUniqueId> {
    if std::env::var("VGPU_NCCL_ROLE").ok()? != role {
        return None;
    }
    let h = std::env::var("VGPU_NCCL_ID").expect("VGPU_NCCL_ID");
    let mut id = ncclUniqueId { internal: [0; 128] };
    for (i, c) in id.internal.iter_mut().enumerate() {
        *c = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap() as _;
    }
    Some(id)
}

fn spawn_child(test: &str, role: &str, id: &ncclUniqueId, timeout_s: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("VGPU_NCCL_ROLE", role)
        .env("VGPU_NCCL_ID", hex(id))
        .env("VGPU_NCCL_TIMEOUT_S", timeout_s)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits at most `secs` for the child (killed after that), returns (success, stdout+stderr).
fn finish(mut child: Child, secs: u64) -> (bool, String) {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("1 passed"), text)
}

fn digest(b: &[u8]) -> u64 {
    b.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

const BIG: usize = 400_000; // 1.6 MB of f32: two steps

#[test]
fn two_processes_all_reduce_through_shared_memory() {
    setup();
    let test = "two_processes_all_reduce_through_shared_memory";
    if let Some(id) = child_role("all-reduce") {
        let me = R::join(1, 2, &id);
        let buf = upload(&input(1, BIG, F32));
        nok(me.all_reduce(buf, buf, BIG, F32, SUM));
        let out = download(buf, BIG * 4);
        assert!(out == reference(2, BIG, F32, SUM));
        println!("DIGEST {:016x}", digest(&out));
        me.destroy();
        return;
    }
    let id = unique_id();
    let child = spawn_child(test, "all-reduce", &id, "30");
    let me = R::join(0, 2, &id);
    let buf = upload(&input(0, BIG, F32));
    nok(me.all_reduce(buf, buf, BIG, F32, SUM));
    let out = download(buf, BIG * 4);
    me.destroy();
    let (passed, text) = finish(child, 60);
    assert!(passed, "child failed:\n{text}");
    assert!(out == reference(2, BIG, F32, SUM));
    assert!(text.contains(&format!("DIGEST {:016x}", digest(&out))), "ranks differ:\n{text}");
    assert!(!segment_path(&id).unwrap().exists());
}

#[test]
fn a_killed_peer_process_fails_the_collective_in_bounded_time() {
    setup();
    let test = "a_killed_peer_process_fails_the_collective_in_bounded_time";
    if let Some(id) = child_role("killed") {
        let me = R::join(1, 2, &id);
        let buf = upload(&input(1, 64, F32));
        nok(me.all_reduce(buf, buf, 64, F32, SUM));
        // Hang here, as a stuck rank would, until the parent kills this process.
        std::thread::sleep(Duration::from_secs(60));
        panic!("not killed");
    }
    let id = unique_id();
    let mut child = spawn_child(test, "killed", &id, "30");
    let me = R::join(0, 2, &id);
    let buf = upload(&input(0, 64, F32));
    nok(me.all_reduce(buf, buf, 64, F32, SUM));
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap();
        // Reaped only after the parent's collective has noticed (a zombie counts as gone too).
        std::thread::sleep(Duration::from_millis(1000));
        child.wait().unwrap()
    });
    let t = Instant::now();
    let res = me.all_reduce(buf, buf, 64, F32, SUM);
    let took = t.elapsed();
    let msg = last_error(me.comm);
    let _ = killer.join().unwrap();
    assert_eq!(res, ncclRemoteError, "{msg}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        msg.contains("rank 1") && msg.contains(&pid.to_string()) && msg.contains("gone"),
        "{msg}"
    );
    me.destroy();
    assert!(!segment_path(&id).unwrap().exists(), "the segment outlived its last live rank");
}

#[test]
fn init_times_out_when_a_rank_never_joins() {
    setup();
    let test = "init_times_out_when_a_rank_never_joins";
    if let Some(id) = child_role("alone") {
        let _ = bind(0);
        let mut comm = null_mut();
        let t = Instant::now();
        // SAFETY: valid out-pointer and id.
        let res = unsafe { ncclCommInitRank(&mut comm, 2, id, 0) };
        let took = t.elapsed();
        let msg = last_error(null_mut());
        assert_eq!(res, ncclSystemError, "{msg}");
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(msg.contains("timed out") && msg.contains("[1]"), "{msg}");
        assert!(!segment_path(&id).unwrap().exists());
        return;
    }
    let id = unique_id();
    let (passed, text) = finish(spawn_child(test, "alone", &id, "1"), 60);
    assert!(passed, "child failed:\n{text}");
}

#[test]
fn segments_left_by_killed_ranks_are_swept() {
    setup();
    // A segment whose creator and ranks are all gone (pid of a reaped child), as two killed
    // ranks would leave it; and one of a live creator, which must stay.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let dir = segment_path(&unique_id()).unwrap().parent().unwrap().to_path_buf();
    let stale = dir.join(format!("vgpu-nccl-{dead}-00000000deadbeef"));
    let live = dir.join(format!("vgpu-nccl-{}-00000000cafef00d", std::process::id()));
    let mut head = vec![0u8; 8192];
    head[..4].copy_from_slice(&1u32.to_le_bytes()); // one rank
    head[128 + 4..128 + 8].copy_from_slice(&dead.to_le_bytes()); // its pid
    std::fs::write(&stale, &head).unwrap();
    std::fs::write(&live, &head).unwrap();
    let _ = unique_id();
    let (stale_left, live_left) = (stale.exists(), live.exists());
    let _ = std::fs::remove_file(&live);
    assert!(!stale_left, "the stale segment was not swept");
    assert!(live_left, "a segment of a live creator was swept");
}
