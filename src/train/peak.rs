//! The machine's own FMA peak, measured: a tight loop of independent fused multiply-adds on
//! every thread, for the vector widths the CPU has (AVX2 + FMA: 8 f32 lanes; AVX-512F: 16).
//! A virtual machine may not show the real clock, so `mlvpt bench-step --device cpu` reports
//! the CPU backend's FLOP rate against this figure, measured in the same run, rather than
//! against a nominal one.

use std::time::{Duration, Instant};

/// A SIMD instruction set whose FMA peak can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 256-bit AVX2 with FMA3.
    Avx2Fma,
    /// 512-bit AVX-512F.
    Avx512,
}

impl Isa {
    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx2Fma => 8,
            Isa::Avx512 => 16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2Fma => "AVX2+FMA",
            Isa::Avx512 => "AVX-512",
        }
    }
    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx2Fma => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The instruction set the CPU backend's matrix products run on: the `gemm` crate takes its
/// AVX-512 kernels where the CPU has AVX-512F and the `avx512` feature is on (the default),
/// else AVX2 + FMA. `None`: neither (its scalar kernels).
pub fn gemm_isa() -> Option<Isa> {
    if cfg!(feature = "avx512") && Isa::Avx512.available() {
        Some(Isa::Avx512)
    } else if Isa::Avx2Fma.available() {
        Some(Isa::Avx2Fma)
    } else {
        None
    }
}

/// Independent accumulators per thread: more than FMA latency (4 cycles) x FMA ports (2), so
/// the loop is throughput-bound.
const CHAINS: usize = 12;
/// Iterations between clock reads.
const CHUNK: u64 = 1 << 16;
/// Windows the measuring time is cut into (5 ms each for bench-step's 300 ms); each thread
/// keeps its fastest.
const WINDOWS: u32 = 60;

/// FLOP/s of `threads` threads each running FMAs of `isa` for about `time` (`None` when the CPU
/// lacks it). Two FLOPs per lane per FMA. Each thread's rate is its fastest of 60
/// windows: a shared or virtual machine may take a core away for part of the time (another
/// process, the hypervisor), and an average would then report a peak below what the step
/// itself reaches.
pub fn fma_peak(isa: Isa, threads: usize, time: Duration) -> Option<f64> {
    if !isa.available() {
        return None;
    }
    let threads = threads.max(1);
    let window = time / WINDOWS;
    let flops_per_chunk = (CHUNK * CHAINS as u64 * isa.lanes() as u64 * 2) as f64;
    let barrier = std::sync::Barrier::new(threads);
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let mut best = 0f64;
                    let mut sink = 0f32;
                    for _ in 0..WINDOWS {
                        let start = Instant::now();
                        let mut chunks = 0u64;
                        // At least one chunk, however short the window.
                        loop {
                            sink += run(isa, CHUNK);
                            chunks += 1;
                            if start.elapsed() >= window {
                                break;
                            }
                        }
                        best = best.max(chunks as f64 * flops_per_chunk / start.elapsed().as_secs_f64());
                    }
                    std::hint::black_box(sink);
                    best
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("FMA loop thread")).collect()
    });
    Some(per_thread.iter().sum())
}

fn run(isa: Isa, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `fma_peak` checked the CPU has the instruction set.
        unsafe {
            match isa {
                Isa::Avx2Fma => x86::avx2(iters),
                Isa::Avx512 => x86::avx512(iters),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, iters);
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// `x = x * a + b` on `CHAINS` independent vectors, `iters` times; returns a lane of their
    /// sum so nothing is optimised away (x converges to b / (1 - a) = 1: no denormals).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999));
        let b = _mm256_set1_ps(std::hint::black_box(0.001));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        _mm256_cvtss_f32(s)
    }

    /// [`avx2`] on 512-bit vectors.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999));
        let b = _mm512_set1_ps(std::hint::black_box(0.001));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(s) / 16.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_positive_where_the_isa_exists_and_absent_elsewhere() {
        for isa in [Isa::Avx2Fma, Isa::Avx512] {
            match fma_peak(isa, 1, Duration::from_millis(20)) {
                Some(f) => assert!(isa.available() && f > 0.0 && f.is_finite(), "{isa:?}: {f}"),
                None => assert!(!isa.available(), "{isa:?}"),
            }
        }
        if let Some(isa) = gemm_isa() {
            assert!(isa.available());
        }
    }
}
