//! Timing training steps on a random frozen backbone, random trainable weights and random
//! inputs (no files needed): the work behind `mlvpt bench-step`.

use crate::backend::{AslConfig, Backend};
use crate::model::{Backbone, ModelConfig, Params};
use crate::train::{AdamWConfig, GradSync, Shard, Trainer};
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Label partitions of the random problem (ML-VPT's default: both graphs).
pub const BRANCHES: usize = 2;

/// Learning rate of the timed steps (the paper's peak; the value does not change the work).
pub const BENCH_LR: f32 = 5e-4;

/// Everything a timed step needs, seeded.
pub struct RandomProblem {
    pub backbone: Backbone,
    pub params: Params,
    /// `branches[s][k]`: group of label `k` in partition `s` (`k mod T`, and `(K-1-k) mod T`,
    /// so every group has labels when `K >= T`).
    pub branches: Vec<Vec<usize>>,
    /// `[batch, C, H, W]`, uniform in [-2, 2) (about the range of normalised images).
    pub images: Vec<f32>,
    /// `[batch, K]`, 0/1 with 15% positives.
    pub targets: Vec<f32>,
    pub batch: usize,
}

impl RandomProblem {
    /// A random backbone of `cfg.vit`, initial trainable weights and `batch` random images and
    /// targets, all from `seed`.
    pub fn new(cfg: &ModelConfig, batch: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = cfg.labels;
        let t = cfg.groups.max(1);
        let branches = vec![(0..k).map(|i| i % t).collect(), (0..k).map(|i| (k - 1 - i) % t).collect()];
        let images = (0..batch * cfg.vit.image_len()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let targets = (0..batch * k).map(|_| if rng.random_bool(0.15) { 1.0 } else { 0.0 }).collect();
        Self {
            backbone: Backbone::random(&cfg.vit, seed.wrapping_add(1)),
            params: Params::init(cfg, BRANCHES, seed.wrapping_add(2)),
            branches,
            images,
            targets,
            batch,
        }
    }

    /// A trainer on `backend` for this problem (default ASL and AdamW settings), with buffers
    /// for exactly `batch` images. Configuration errors come back as errors.
    pub fn trainer<B: Backend>(&self, backend: B, cfg: &ModelConfig) -> Result<Trainer<B>> {
        Trainer::new(
            backend,
            cfg.clone(),
            &self.backbone,
            self.params.clone(),
            self.branches.clone(),
            AslConfig::default(),
            AdamWConfig::default(),
            self.batch,
        )
    }
}

/// Wall time of each timed step.
#[derive(Clone, Debug)]
pub struct StepTimes {
    pub batch: usize,
    /// Seconds per timed step, in order.
    pub seconds: Vec<f64>,
    /// Loss of the last step (a sanity figure: finite on a sane setup).
    pub last_loss: f32,
}

impl StepTimes {
    /// Mean seconds per step (total time over steps: what images/s is based on).
    pub fn mean(&self) -> f64 {
        self.seconds.iter().sum::<f64>() / self.seconds.len().max(1) as f64
    }
    /// Median seconds per step.
    pub fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }
    /// Fastest step.
    pub fn min(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }
    /// Images per second over all timed steps.
    pub fn images_per_s(&self) -> f64 {
        self.batch as f64 / self.mean()
    }
}

/// Runs `warmup` untimed steps, then `steps` timed ones (each [`Trainer::step`] ends with the
/// backend's `check`, which waits for the device, so wall time per call is the step's time).
/// `progress(done, total)` is called after every step, warm-up included.
pub fn time_steps<B: Backend>(
    tr: &mut Trainer<B>,
    problem: &RandomProblem,
    warmup: usize,
    steps: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StepTimes> {
    time_steps_with(tr, problem, warmup, steps, None, progress)
}

/// [`time_steps`]; with `sync`, each step is one rank's share of a data-parallel step
/// ([`Trainer::step_shard`]: the problem's images are this rank's, the gradients exchanged with
/// the other ranks' before AdamW), so the time includes the exchange.
pub fn time_steps_with<B: Backend>(
    tr: &mut Trainer<B>,
    problem: &RandomProblem,
    warmup: usize,
    steps: usize,
    mut sync: Option<&mut dyn GradSync<B>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StepTimes> {
    anyhow::ensure!(steps >= 1, "timed steps must be at least 1, got 0");
    let total = warmup + steps;
    let mut seconds = Vec::with_capacity(steps);
    let mut last_loss = f32::NAN;
    for i in 0..total {
        let t = Instant::now();
        let stepped = match sync.as_deref_mut() {
            Some(sync) => tr
                .step_shard(Shard::Images(&problem.images), &problem.targets, BENCH_LR, sync)
                .map(|l| l.unwrap_or(f32::NAN)),
            None => tr.step(&problem.images, &problem.targets, BENCH_LR),
        };
        last_loss = stepped.with_context(|| format!("step {} of {total} ({})", i + 1, if i < warmup { "warm-up" } else { "timed" }))?;
        let dt = t.elapsed().as_secs_f64();
        if i >= warmup {
            seconds.push(dt);
        }
        progress(i + 1, total);
    }
    Ok(StepTimes {
        batch: problem.batch,
        seconds,
        last_loss,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    /// The demo head (K 6, T 3, E 2) on a one-block 16-px backbone of width 16: a step in
    /// milliseconds, for the unit tests that step a trainer (also `dist::sync`'s).
    pub(crate) fn tiny() -> ModelConfig {
        let cfg = ModelConfig {
            labels: 6,
            groups: 3,
            experts: 2,
            ..ModelConfig::demo()
        };
        ModelConfig {
            vit: crate::model::VitConfig {
                image_size: 16,
                depth: 1,
                dim: 16,
                heads: 2,
                mlp_dim: 32,
                ..cfg.vit.clone()
            },
            ..cfg
        }
    }

    #[test]
    fn random_problem_steps_on_the_cpu() {
        let cfg = tiny();
        let p = RandomProblem::new(&cfg, 3, 7);
        assert_eq!(p.images.len(), 3 * cfg.vit.image_len());
        assert_eq!(p.targets.len(), 3 * 6);
        for table in &p.branches {
            let mut used = table.clone();
            used.sort();
            used.dedup();
            assert_eq!(used, vec![0, 1, 2], "every group has a label: {table:?}");
        }
        let mut tr = p.trainer(CpuBackend::<f32>::new(), &cfg).unwrap();
        let mut calls = Vec::new();
        let t = time_steps(&mut tr, &p, 1, 2, &mut |d, n| calls.push((d, n))).unwrap();
        assert_eq!(calls, vec![(1, 3), (2, 3), (3, 3)]);
        assert_eq!(t.seconds.len(), 2);
        assert!(t.seconds.iter().all(|&s| s > 0.0) && t.last_loss.is_finite());
        assert!(t.min() <= t.median() && t.median() <= t.seconds.iter().copied().fold(0.0, f64::max));
        assert!((t.images_per_s() - 3.0 / t.mean()).abs() < 1e-9);
        assert!(time_steps(&mut tr, &p, 0, 0, &mut |_, _| {}).is_err());
    }
}
