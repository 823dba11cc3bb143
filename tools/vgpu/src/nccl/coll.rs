//! The collective calls: argument checks, streamcheck, then run now or defer to the group.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;

use super::proto::{Kind, Op};
use super::reduce::{Dt, Red};
use super::*;

/// Runs one collective now on this thread.
///
/// # Safety
/// The buffers were checked against the allocations.
pub(super) unsafe fn run_now(h: &Handle, op: &Op) -> ncclResult_t {
    let e = h.error.load(Ordering::Acquire);
    if e != ncclSuccess {
        return report(
            Some(h),
            e,
            format!("rank {}: the communicator failed earlier: {}", h.rank.rank, lock(&h.last)),
        );
    }
    let mut seq = lock(&h.seq);
    // SAFETY: per the contract.
    match unsafe { h.rank.run(&mut seq, op) } {
        Ok(()) => ncclSuccess,
        Err(f) => fail(h, f),
    }
}

/// The allocation holding `elems` elements at `ptr`, on the communicator's device.
fn buffer(h: &Handle, name: &str, what: &str, ptr: u64, elems: usize, size: usize) -> Result<crate::mem::Alloc, ncclResult_t> {
    let bad = |m: String| report(Some(h), ncclInvalidArgument, format!("{name}: {what} {m}"));
    if ptr == 0 {
        return Err(bad("is NULL".into()));
    }
    let bytes = (elems as u64)
        .checked_mul(size as u64)
        .ok_or_else(|| bad("size overflows".into()))?;
    let a =
        crate::mem::find(ptr, bytes).ok_or_else(|| bad(format!("[{ptr:#x}, +{bytes} bytes) is not inside a live device allocation")))?;
    if a.device != h.rank.device {
        return Err(bad(format!(
            "is on device {}, the communicator's device is {}",
            a.device, h.rank.device
        )));
    }
    Ok(a)
}

/// Checks a collective, records it with streamcheck, and runs or defers it.
#[allow(clippy::too_many_arguments)]
unsafe fn collective(
    name: &str,
    kind: Kind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dt: ncclDataType_t,
    red: ncclRedOp_t,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    let h = tri!(handle(comm));
    let (r, n) = (h.rank.rank, h.rank.nranks);
    let Some(dt) = Dt::from(dt) else {
        return report(Some(&h), ncclInvalidArgument, format!("{name}: data type {dt} is not supported"));
    };
    let Some(red) = Red::from(red) else {
        return report(
            Some(&h),
            ncclInvalidArgument,
            format!("{name}: reduction op {red} is not supported"),
        );
    };
    if root < 0 || root as usize >= n {
        return report(Some(&h), ncclInvalidArgument, format!("{name}: root {root} of {n} ranks"));
    }
    let op = Op {
        kind,
        send: send as u64,
        recv: recv as u64,
        count,
        dt,
        red,
        root: root as usize,
    };
    let (ne, nr) = op.extents(r, n);
    let mut uses = Vec::new();
    if ne > 0 {
        let a = tri!(buffer(&h, name, "sendbuff", op.send, ne, dt.size()));
        uses.push(crate::streamcheck::Use::of(&a, crate::streamcheck::Kind::Read));
    }
    if nr > 0 {
        let a = tri!(buffer(&h, name, "recvbuff", op.recv, nr, dt.size()));
        uses.push(crate::streamcheck::Use::of(&a, crate::streamcheck::Kind::Write));
    }
    match crate::driver::stream_device(stream as usize) {
        Ok(d) if d != h.rank.device => {
            return report(
                Some(&h),
                ncclInvalidArgument,
                format!(
                    "{name}: the stream is on device {d}, the communicator's device is {}",
                    h.rank.device
                ),
            )
        }
        Ok(_) => {}
        // No driver context on this thread: nothing to check the stream against (tests).
        Err(crate::driver::CUDA_ERROR_NOT_INITIALIZED | crate::driver::CUDA_ERROR_INVALID_CONTEXT) => {}
        Err(e) => return report(Some(&h), ncclUnhandledCudaError, format!("{name}: the stream: CUDA error {e}")),
    }
    if crate::driver::stream_op(stream as usize, name, &uses).is_err() {
        return report(
            Some(&h),
            ncclUnhandledCudaError,
            format!("{name}: streamcheck reported a hazard (above)"),
        );
    }
    if in_group() {
        defer(Deferred::Coll { h, op });
        return ncclSuccess;
    }
    // SAFETY: the buffers were checked above.
    unsafe { run_now(&h, &op) }
}

#[no_mangle]
pub unsafe extern "C" fn ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: ncclDataType_t,
    op: ncclRedOp_t,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe {
        collective(
            "ncclAllReduce",
            Kind::AllReduce,
            sendbuff,
            recvbuff,
            count,
            datatype,
            op,
            0,
            comm,
            stream,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: ncclDataType_t,
    op: ncclRedOp_t,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe {
        collective(
            "ncclReduce",
            Kind::Reduce,
            sendbuff,
            recvbuff,
            count,
            datatype,
            op,
            root,
            comm,
            stream,
        )
    }
}

/// sendbuff is read on the root only (others may pass NULL).
#[no_mangle]
pub unsafe extern "C" fn ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: ncclDataType_t,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe {
        collective(
            "ncclBroadcast",
            Kind::Broadcast,
            sendbuff,
            recvbuff,
            count,
            datatype,
            0,
            root,
            comm,
            stream,
        )
    }
}

/// The in-place broadcast of NCCL 1's API.
#[no_mangle]
pub unsafe extern "C" fn ncclBcast(
    buff: *mut c_void,
    count: usize,
    datatype: ncclDataType_t,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe { collective("ncclBcast", Kind::Broadcast, buff, buff, count, datatype, 0, root, comm, stream) }
}

/// recvbuff holds `nranks * sendcount` elements, rank q's at `q * sendcount`.
#[no_mangle]
pub unsafe extern "C" fn ncclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: ncclDataType_t,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe {
        collective(
            "ncclAllGather",
            Kind::AllGather,
            sendbuff,
            recvbuff,
            sendcount,
            datatype,
            0,
            0,
            comm,
            stream,
        )
    }
}

/// sendbuff holds `nranks * recvcount` elements; rank r receives block r of their reduction.
#[no_mangle]
pub unsafe extern "C" fn ncclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: ncclDataType_t,
    op: ncclRedOp_t,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    unsafe {
        collective(
            "ncclReduceScatter",
            Kind::ReduceScatter,
            sendbuff,
            recvbuff,
            recvcount,
            datatype,
            op,
            0,
            comm,
            stream,
        )
    }
}

/// Point-to-point calls are not implemented: they fail, saying so, rather than do nothing.
fn unsupported(name: &str) -> ncclResult_t {
    report(None, ncclInvalidUsage, format!("{name} is not implemented by the virtual device"))
}

#[no_mangle]
pub unsafe extern "C" fn ncclSend(
    _sendbuff: *const c_void,
    _count: usize,
    _datatype: ncclDataType_t,
    _peer: c_int,
    _comm: ncclComm_t,
    _stream: cudaStream_t,
) -> ncclResult_t {
    unsupported("ncclSend")
}

#[no_mangle]
pub unsafe extern "C" fn ncclRecv(
    _recvbuff: *mut c_void,
    _count: usize,
    _datatype: ncclDataType_t,
    _peer: c_int,
    _comm: ncclComm_t,
    _stream: cudaStream_t,
) -> ncclResult_t {
    unsupported("ncclRecv")
}
