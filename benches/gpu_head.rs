//! Throughput of the head kernels (`kernels/head.cu`) and the four-term ASL launch at COCO
//! (K = 80) and Objects365 (K = 365) shapes: B = 256, D = 768, T = 5, E = 3 (P = 30 prompt
//! tokens, label gating), r = 5. Throughput is bytes per second of the bytes each op must move
//! at least (every input read once, every output written once; an accumulated output read and
//! written), so it compares with the device-to-device copy bandwidth (docs/PERF.md, "Head").
//! "step" times the whole head of a training step: adapters, both branches' gating and
//! classifiers, the loss, and their backward; the adapters, the MoE ops and the step run once
//! per kernel set (`HeadKernels`: tensor cores, fp32). The peer, measured in the same run: a 64 MiB
//! device-to-device copy (`cuMemcpyDtoD`, counted as read + write), the bandwidth the 70% target
//! is taken of. Prints a message and exits cleanly when there is
//! no device. Short run: `cargo bench --features cuda --bench gpu_head -- --warm-up-time 0.5
//! --measurement-time 1`.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::{bf16, CudaSlice, GpuContext, GpuError};
use mlvpt::ops::asl::{self, cuda::AslTerm};
use mlvpt::ops::head::{cuda, AdapterShape, MoeShape};

const B: usize = 256;
const D: usize = 768;
const T: usize = 5;
const E: usize = 3;
const P: usize = 2 * T * E;
const R: usize = 5;

mod gpu_common;
use gpu_common::timed;
use std::cell::RefCell;
use std::time::Duration;

/// Every criterion sample of an op, summed (name, minimum bytes, calls, time), for the plain
/// summary lines after a group: mean time per call, GiB/s and % of the copy peer's rate.
#[derive(Default)]
struct Record(RefCell<Vec<(String, u64, u64, Duration)>>);

impl Record {
    /// `timed`, remembering the calls and time under `name`; the first sample of an op (which
    /// may load its kernel module) is left out.
    fn timed(&self, gpu: &GpuContext, name: &str, bytes: u64, iters: u64, f: impl FnMut() -> Result<(), GpuError>) -> Duration {
        let d = timed(gpu, iters, f);
        let mut rows = self.0.borrow_mut();
        match rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => {
                r.2 += iters;
                r.3 += d;
            }
            None => rows.push((name.to_string(), bytes, 0, Duration::ZERO)),
        }
        d
    }

    /// Mean seconds per call of `name`.
    fn secs(&self, name: &str) -> Option<f64> {
        self.0.borrow().iter().find(|r| r.0 == name).map(|r| r.3.as_secs_f64() / r.2 as f64)
    }

    /// One line per op: "head LABEL: NAME: T us, R GiB/s, P% of the copy", and for a
    /// tensor-core op its speed-up over the fp32 one ("x the fp32 kernels").
    fn print(&self, label: &str, copy_bytes_per_s: f64) {
        for (name, bytes, _, _) in self.0.borrow().iter() {
            let t = self.secs(name).unwrap_or(f64::NAN);
            let rate = *bytes as f64 / t;
            let vs = match self.secs(&name.replace("mma", "fp32")) {
                Some(f) if name.contains("mma") => format!(", {:.2}x the fp32 kernels", f / t),
                _ => String::new(),
            };
            eprintln!(
                "head {label}: {name}: {:.1} us, {:.0} GiB/s, {:.0}% of the copy{vs}",
                t * 1e6,
                rate / (1u64 << 30) as f64,
                100.0 * rate / copy_bytes_per_s
            );
        }
    }
}

/// Deterministic values in [-1, 1) times `scale`.
fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919) % 997) as f32 / 498.5 - 1.0) * scale).collect()
}
fn up_f32(gpu: &GpuContext, n: usize, scale: f32) -> CudaSlice<f32> {
    gpu.upload(&ramp(n, scale)).unwrap()
}
fn up_bf16(gpu: &GpuContext, n: usize, scale: f32) -> CudaSlice<bf16> {
    gpu.upload(&ramp(n, scale).into_iter().map(bf16::from_f32).collect::<Vec<_>>())
        .unwrap()
}

/// Branch tables: label k in group k % T, token `offset + g*E + e`, label gating.
fn tables(k: usize, offset: usize) -> (Vec<u32>, Vec<u32>) {
    let tok = (0..E * k).map(|i| (offset + (i % k % T) * E + i / k) as u32).collect();
    let grow = (0..E * k).map(|i| i as u32).collect();
    (tok, grow)
}

/// The four ASL terms of a step (both branches' y and m) in one launch, writing their gradients.
#[allow(clippy::too_many_arguments)]
fn asl_four_terms(
    gpu: &GpuContext,
    aws: &mut asl::cuda::AslWorkspace,
    ys: &[CudaSlice<f32>; 2],
    ms: &[CudaSlice<f32>; 2],
    dys: &mut [CudaSlice<f32>; 2],
    dms: &mut [CudaSlice<f32>; 2],
    targets: &CudaSlice<f32>,
    acfg: &asl::AslConfig,
    scale: f32,
    loss: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let [dy0, dy1] = dys;
    let [dm0, dm1] = dms;
    let mut terms = [
        AslTerm {
            logits: &ys[0],
            grad: Some(dy0),
        },
        AslTerm {
            logits: &ys[1],
            grad: Some(dy1),
        },
        AslTerm {
            logits: &ms[0],
            grad: Some(dm0),
        },
        AslTerm {
            logits: &ms[1],
            grad: Some(dm1),
        },
    ];
    asl::cuda::forward_backward_terms(gpu, gpu.stream(), aws, &mut terms, targets, acfg, scale, loss, ys[0].len())
}

fn bench_labels(c: &mut Criterion, gpu: &GpuContext, k: usize, name: &str, copy_bytes_per_s: f64) {
    let rec = Record::default();
    let s = gpu.stream();
    let ash = AdapterShape {
        batch: B,
        tokens: P,
        dim: D,
        rank: R,
    };
    let msh = MoeShape {
        batch: B,
        tokens: P,
        dim: D,
        labels: k,
        experts: E,
        gate_rows: E * k,
    };
    let a = 1.0 / (D as f32).sqrt();
    let z = up_bf16(gpu, B * P * D, 1.0);
    let (w1, b1, w2, b2) = (
        up_f32(gpu, P * R * D, a),
        up_f32(gpu, P * R, 0.1),
        up_f32(gpu, P * D * R, 0.3),
        up_f32(gpu, P * D, 0.1),
    );
    let mut u = gpu.zeros::<f32>(B * P * R).unwrap();
    let mut adapted = gpu.zeros::<bf16>(B * P * D).unwrap();
    let branches: Vec<(cuda::IndexTable, cuda::IndexTable)> = [0, T * E]
        .iter()
        .map(|&off| {
            let (tok, grow) = tables(k, off);
            (
                cuda::IndexTable::new(gpu, &tok, P).unwrap(),
                cuda::IndexTable::new(gpu, &grow, E * k).unwrap(),
            )
        })
        .collect();
    let gates = [up_f32(gpu, E * k * D, a), up_f32(gpu, E * k * D, a)];
    let ws_ = [up_f32(gpu, k * D, a), up_f32(gpu, k * D, a)];
    let cs = [up_f32(gpu, k, 0.1), up_f32(gpu, k, 0.1)];
    let mut ys = [gpu.zeros::<f32>(B * k).unwrap(), gpu.zeros::<f32>(B * k).unwrap()];
    let mut ms = [gpu.zeros::<f32>(B * k).unwrap(), gpu.zeros::<f32>(B * k).unwrap()];
    let mut qs = [gpu.zeros::<f32>(B * E * k).unwrap(), gpu.zeros::<f32>(B * E * k).unwrap()];
    let mut rs = [gpu.zeros::<f32>(B * E * k).unwrap(), gpu.zeros::<f32>(B * E * k).unwrap()];
    let mut dys = [gpu.zeros::<f32>(B * k).unwrap(), gpu.zeros::<f32>(B * k).unwrap()];
    let mut dms = [gpu.zeros::<f32>(B * k).unwrap(), gpu.zeros::<f32>(B * k).unwrap()];
    let targets = gpu
        .upload(&(0..B * k).map(|i| (i % 13 == 0) as u8 as f32).collect::<Vec<_>>())
        .unwrap();
    let (mut dz, mut dad) = (gpu.zeros::<bf16>(B * P * D).unwrap(), gpu.zeros::<bf16>(B * P * D).unwrap());
    let mut dgates = [gpu.zeros::<f32>(E * k * D).unwrap(), gpu.zeros::<f32>(E * k * D).unwrap()];
    let mut dws = [gpu.zeros::<f32>(k * D).unwrap(), gpu.zeros::<f32>(k * D).unwrap()];
    let mut dcs = [gpu.zeros::<f32>(k).unwrap(), gpu.zeros::<f32>(k).unwrap()];
    let (mut dw1, mut db1, mut dw2, mut db2) = (
        gpu.zeros::<f32>(P * R * D).unwrap(),
        gpu.zeros::<f32>(P * R).unwrap(),
        gpu.zeros::<f32>(P * D * R).unwrap(),
        gpu.zeros::<f32>(P * D).unwrap(),
    );
    let (mut pred_y, mut prob) = (gpu.zeros::<f32>(B * k).unwrap(), gpu.zeros::<f32>(B * k).unwrap());
    let mut loss = gpu.zeros::<f32>(1).unwrap();
    let mut hws = cuda::HeadWorkspace::new();
    let mut aws = asl::cuda::AslWorkspace::new(gpu).unwrap();
    let acfg = asl::AslConfig::default();
    let scale = 1000.0 / (B * k) as f32;
    cuda::adapter_forward(
        gpu,
        s,
        &z,
        &w1,
        &b1,
        &w2,
        &b2,
        &mut u,
        &mut adapted,
        &ash,
        cuda::HeadKernels::default(),
    )
    .unwrap();

    // Minimum bytes per op (bf16 tokens: 2 bytes, everything else fp32).
    let tokens_all = (B * P * D * 2) as u64;
    let tokens_branch = tokens_all / 2;
    let adapter_params = (P * (2 * R * D + R + D) * 4) as u64;
    let bk = (B * k * 4) as u64;
    let bek = (B * E * k * 4) as u64;
    let head_params = ((E * k + k) * D * 4 + k * 4) as u64;

    let mut g = c.benchmark_group(format!("head {name}"));
    // Both kernel sets (tensor cores, the default; fp32 CUDA cores), same inputs.
    for kernels in cuda::HeadKernels::ALL {
        let kn = kernels.name();
        let (op, bytes) = (
            format!("adapter forward ({kn}) B{B} P{P} D{D} r{R}"),
            2 * tokens_all + (B * P * R * 4) as u64 + adapter_params,
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&op, |bch| {
            bch.iter_custom(|it| {
                rec.timed(gpu, &op, bytes, it, || {
                    cuda::adapter_forward(gpu, s, &z, &w1, &b1, &w2, &b2, &mut u, &mut adapted, &ash, kernels)
                })
            })
        });
        let (op, bytes) = (
            format!("adapter backward ({kn}) B{B} P{P} D{D} r{R}"),
            4 * tokens_all + (B * P * R * 4) as u64 + 2 * adapter_params,
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&op, |bch| {
            bch.iter_custom(|it| {
                rec.timed(gpu, &op, bytes, it, || {
                    cuda::adapter_backward(
                        gpu, s, &mut hws, &dad, &z, &u, &w1, &w2, &mut dz, &mut dw1, &mut db1, &mut dw2, &mut db2, &ash, kernels,
                    )
                })
            })
        });
        let (op, bytes) = (
            format!("moe forward (one branch, {kn}) B{B} K{k} E{E}"),
            2 * tokens_branch + head_params + 2 * bk + 2 * bek,
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&op, |bch| {
            bch.iter_custom(|it| {
                rec.timed(gpu, &op, bytes, it, || {
                    let [y0, _] = &mut ys;
                    let [m0, _] = &mut ms;
                    let [q0, _] = &mut qs;
                    let [r0, _] = &mut rs;
                    let (tok, grow) = &branches[0];
                    cuda::moe_forward(
                        gpu, s, &z, &adapted, &gates[0], &ws_[0], &cs[0], tok, grow, y0, m0, q0, r0, &msh, kernels,
                    )
                })
            })
        });
        let (op, bytes) = (
            format!("moe backward (one branch, {kn}) B{B} K{k} E{E}"),
            2 * bk + 2 * bek + 2 * tokens_branch + 4 * tokens_branch + 2 * head_params,
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&op, |bch| {
            bch.iter_custom(|it| {
                rec.timed(gpu, &op, bytes, it, || {
                    let (tok, grow) = &branches[0];
                    let [dg0, _] = &mut dgates;
                    let [dw0, _] = &mut dws;
                    let [dc0, _] = &mut dcs;
                    cuda::moe_backward(
                        gpu, s, &mut hws, &dys[0], &dms[0], &z, &adapted, &gates[0], &ws_[0], tok, grow, &qs[0], &rs[0], &mut dz, &mut dad,
                        dg0, dw0, dc0, &msh, kernels,
                    )
                })
            })
        });
    }
    g.throughput(Throughput::Bytes(4 * 2 * bk + bk));
    g.bench_function(format!("asl 4 terms fwd+bwd B{B} K{k}"), |bch| {
        bch.iter_custom(|it| {
            timed(gpu, it, || {
                asl_four_terms(gpu, &mut aws, &ys, &ms, &mut dys, &mut dms, &targets, &acfg, scale, &mut loss)
            })
        })
    });
    g.throughput(Throughput::Bytes(4 * bk));
    g.bench_function(format!("predict B{B} K{k}"), |bch| {
        bch.iter_custom(|it| timed(gpu, it, || cuda::predict(gpu, s, &ys[0], &ys[1], &mut pred_y, &mut prob, B * k)))
    });

    // The whole head of one training step, forward and backward, both branches.
    for kernels in cuda::HeadKernels::ALL {
        let bytes = (2 * tokens_all + adapter_params)
            + 2 * (2 * tokens_branch + head_params + 2 * bk + 2 * bek)
            + 9 * bk
            + 2 * (2 * bk + 2 * bek + 6 * tokens_branch + 2 * head_params)
            + (4 * tokens_all + 2 * adapter_params);
        let op = format!("step fwd+bwd ({} head kernels) B{B} K{k}", kernels.name());
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&op, |bch| {
            bch.iter_custom(|it| {
                rec.timed(gpu, &op, bytes, it, || {
                    cuda::adapter_forward(gpu, s, &z, &w1, &b1, &w2, &b2, &mut u, &mut adapted, &ash, kernels)?;
                    for i in 0..2 {
                        let (tok, grow) = &branches[i];
                        cuda::moe_forward(
                            gpu, s, &z, &adapted, &gates[i], &ws_[i], &cs[i], tok, grow, &mut ys[i], &mut ms[i], &mut qs[i], &mut rs[i],
                            &msh, kernels,
                        )?;
                    }
                    asl_four_terms(gpu, &mut aws, &ys, &ms, &mut dys, &mut dms, &targets, &acfg, scale, &mut loss)?;
                    for i in 0..2 {
                        let (tok, grow) = &branches[i];
                        cuda::moe_backward(
                            gpu,
                            s,
                            &mut hws,
                            &dys[i],
                            &dms[i],
                            &z,
                            &adapted,
                            &gates[i],
                            &ws_[i],
                            tok,
                            grow,
                            &qs[i],
                            &rs[i],
                            &mut dz,
                            &mut dad,
                            &mut dgates[i],
                            &mut dws[i],
                            &mut dcs[i],
                            &msh,
                            kernels,
                        )?;
                    }
                    cuda::adapter_backward(
                        gpu, s, &mut hws, &dad, &z, &u, &w1, &w2, &mut dz, &mut dw1, &mut db1, &mut dw2, &mut db2, &ash, kernels,
                    )
                })
            })
        });
    }
    g.finish();
    rec.print(name, copy_bytes_per_s);
}

/// The copy peer: 64 MiB device to device; returns its rate, bytes read + written per second.
fn bench_copy(c: &mut Criterion, gpu: &GpuContext) -> f64 {
    let rec = Record::default();
    const N: usize = 16 << 20;
    let src = gpu.zeros::<f32>(N).unwrap();
    let mut dst = gpu.zeros::<f32>(N).unwrap();
    let mut g = c.benchmark_group("copy");
    let (op, bytes) = ("device-to-device 64 MiB", 2 * 4 * N as u64);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(op, |bch| {
        bch.iter_custom(|it| {
            rec.timed(gpu, op, bytes, it, || {
                gpu.stream().memcpy_dtod(&src, &mut dst).map_err(GpuError::driver("copying"))
            })
        })
    });
    g.finish();
    let rate = bytes as f64 / rec.secs(op).unwrap_or(f64::NAN);
    eprintln!(
        "head copy peer: {op}: {:.0} GiB/s (read + write); 70% of it is {:.0} GiB/s",
        rate / (1u64 << 30) as f64,
        0.7 * rate / (1u64 << 30) as f64
    );
    rate
}

fn main() {
    let Some(gpu) = gpu_common::open("gpu_head") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    let copy = bench_copy(&mut c, &gpu);
    bench_labels(&mut c, &gpu, 80, "COCO K80", copy);
    bench_labels(&mut c, &gpu, 365, "Objects365 K365", copy);
    c.final_summary();
}
