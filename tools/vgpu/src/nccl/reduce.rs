//! Element types and reduction arithmetic. Every rank reduces the same slots in the same order
//! (rank 0, 1, 2, ...), so all ranks get bit-identical results whatever the timing.
//!
//! bf16 and f16 are widened to f32, reduced in f32 and rounded once per element (to nearest
//! even); f32 and f64 reduce in their own type; integers wrap. `ncclAvg` on floating types is
//! `sum over ranks of (x * (1/n))` with the scalar in the accumulation type (as NCCL's
//! pre-multiplied sum), on integers `sum / n` (truncating). max / min on floats ignore a NaN
//! operand unless both are NaN (C's fmax / fmin).

use crate::cublas::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// `ncclDataType_t` values (nccl.h, 2.24+ numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    I8 = 0,
    U8 = 1,
    I32 = 2,
    U32 = 3,
    I64 = 4,
    U64 = 5,
    F16 = 6,
    F32 = 7,
    F64 = 8,
    Bf16 = 9,
}

impl Dt {
    /// None for fp8 (10, 11) and anything else this device does not implement.
    pub fn from(v: u32) -> Option<Dt> {
        use Dt::*;
        Some(match v {
            0 => I8,
            1 => U8,
            2 => I32,
            3 => U32,
            4 => I64,
            5 => U64,
            6 => F16,
            7 => F32,
            8 => F64,
            9 => Bf16,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        use Dt::*;
        match self {
            I8 | U8 => 1,
            F16 | Bf16 => 2,
            I32 | U32 | F32 => 4,
            I64 | U64 | F64 => 8,
        }
    }
}

/// `ncclRedOp_t` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Red {
    Sum = 0,
    Prod = 1,
    Max = 2,
    Min = 3,
    Avg = 4,
}

impl Red {
    pub fn from(v: u32) -> Option<Red> {
        use Red::*;
        Some(match v {
            0 => Sum,
            1 => Prod,
            2 => Max,
            3 => Min,
            4 => Avg,
            _ => return None,
        })
    }
}

/// The accumulation arithmetic of one element type.
trait Acc: Copy {
    fn combine(self, other: Self, op: Red) -> Self;
    /// `ncclAvg`: each operand scaled before the sum (floats), or the sum divided (integers).
    fn pre(self, n: usize, op: Red) -> Self;
    fn post(self, n: usize, op: Red) -> Self;
}

macro_rules! float_acc {
    ($t:ty) => {
        impl Acc for $t {
            fn combine(self, o: Self, op: Red) -> Self {
                match op {
                    Red::Sum | Red::Avg => self + o,
                    Red::Prod => self * o,
                    Red::Max => self.max(o),
                    Red::Min => self.min(o),
                }
            }
            fn pre(self, n: usize, op: Red) -> Self {
                if op == Red::Avg {
                    self * (1.0 / n as $t)
                } else {
                    self
                }
            }
            fn post(self, _: usize, _: Red) -> Self {
                self
            }
        }
    };
}
float_acc!(f32);
float_acc!(f64);

macro_rules! int_acc {
    ($($t:ty),*) => {$(
        impl Acc for $t {
            fn combine(self, o: Self, op: Red) -> Self {
                match op {
                    Red::Sum | Red::Avg => self.wrapping_add(o),
                    Red::Prod => self.wrapping_mul(o),
                    Red::Max => self.max(o),
                    Red::Min => self.min(o),
                }
            }
            fn pre(self, _: usize, _: Red) -> Self {
                self
            }
            fn post(self, n: usize, op: Red) -> Self {
                if op == Red::Avg {
                    self / (n as $t)
                } else {
                    self
                }
            }
        }
    )*};
}
int_acc!(i8, u8, i32, u32, i64, u64);

/// `dst[i] = fold(op, srcs[0][i], srcs[1][i], ...)` for i < n, through accumulator `A`.
///
/// # Safety
/// Each `srcs[q]` holds n elements of the type `load` reads, `dst` n of the type `store`
/// writes (unaligned access is fine); `dst` may equal a source.
unsafe fn fold<A: Acc>(
    srcs: &[*const u8],
    n: usize,
    dst: *mut u8,
    op: Red,
    size: usize,
    load: impl Fn(*const u8) -> A,
    store: impl Fn(*mut u8, A),
) {
    let ranks = srcs.len();
    for i in 0..n {
        // SAFETY: in bounds per the contract.
        let mut acc = load(unsafe { srcs[0].add(i * size) }).pre(ranks, op);
        for s in &srcs[1..] {
            acc = acc.combine(load(unsafe { s.add(i * size) }).pre(ranks, op), op);
        }
        store(unsafe { dst.add(i * size) }, acc.post(ranks, op));
    }
}

/// Reduces `srcs` (one pointer per rank, in rank order, n elements each) into `dst`.
///
/// # Safety
/// As [`fold`].
pub unsafe fn reduce(dt: Dt, op: Red, srcs: &[*const u8], n: usize, dst: *mut u8) {
    macro_rules! plain {
        ($t:ty) => {
            // SAFETY: per the contract.
            unsafe {
                fold::<$t>(
                    srcs,
                    n,
                    dst,
                    op,
                    std::mem::size_of::<$t>(),
                    |p| (p as *const $t).read_unaligned(),
                    |p, v| (p as *mut $t).write_unaligned(v),
                )
            }
        };
    }
    match dt {
        Dt::I8 => plain!(i8),
        Dt::U8 => plain!(u8),
        Dt::I32 => plain!(i32),
        Dt::U32 => plain!(u32),
        Dt::I64 => plain!(i64),
        Dt::U64 => plain!(u64),
        Dt::F32 => plain!(f32),
        Dt::F64 => plain!(f64),
        // SAFETY: per the contract.
        Dt::Bf16 => unsafe {
            fold::<f32>(
                srcs,
                n,
                dst,
                op,
                2,
                |p| bf16_to_f32((p as *const u16).read_unaligned()),
                |p, v| (p as *mut u16).write_unaligned(f32_to_bf16(v)),
            )
        },
        // SAFETY: per the contract.
        Dt::F16 => unsafe {
            fold::<f32>(
                srcs,
                n,
                dst,
                op,
                2,
                |p| f16_to_f32((p as *const u16).read_unaligned()),
                |p, v| (p as *mut u16).write_unaligned(f32_to_f16(v)),
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_sum_rounds_once_in_rank_order() {
        // 1 + 2^-8 + 2^-8: in bf16 step by step 1 + 2^-8 rounds to 1 (ties to even) twice;
        // accumulated in f32 it is 1 + 2^-7, representable in bf16.
        let v = [f32_to_bf16(1.0), f32_to_bf16(1.0 / 256.0), f32_to_bf16(1.0 / 256.0)];
        let srcs: Vec<*const u8> = v.iter().map(|x| x as *const u16 as *const u8).collect();
        let mut out = 0u16;
        // SAFETY: three one-element sources, one destination.
        unsafe { reduce(Dt::Bf16, Red::Sum, &srcs, 1, &mut out as *mut u16 as *mut u8) };
        assert_eq!(bf16_to_f32(out), 1.0 + 1.0 / 128.0);
    }

    #[test]
    fn integer_avg_truncates() {
        let v = [7i32, 2, 1];
        let srcs: Vec<*const u8> = v.iter().map(|x| x as *const i32 as *const u8).collect();
        let mut out = 0i32;
        // SAFETY: three one-element sources, one destination.
        unsafe { reduce(Dt::I32, Red::Avg, &srcs, 1, &mut out as *mut i32 as *mut u8) };
        assert_eq!(out, 3);
    }
}
