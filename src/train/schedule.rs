//! The one-cycle learning-rate schedule (docs/MODEL.md#learning-rate-schedule): linear warm-up
//! over the first fraction of the steps to the peak rate, then a cosine down towards zero at the
//! end of training.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneCycle {
    /// Peak learning rate, reached at the end of the warm-up.
    pub max_lr: f64,
    /// Steps in the whole run (all epochs).
    pub total_steps: u64,
    /// Fraction of the steps spent warming up (0.2 in the paper's setting).
    pub warmup_frac: f64,
}

impl OneCycle {
    pub fn new(max_lr: f64, total_steps: u64, warmup_frac: f64) -> Self {
        Self {
            max_lr,
            total_steps,
            warmup_frac,
        }
    }

    /// Steps of warm-up: at least 1 so step 0 never trains at exactly zero.
    pub fn warmup_steps(&self) -> u64 {
        ((self.total_steps as f64 * self.warmup_frac).ceil() as u64).clamp(1, self.total_steps.max(1))
    }

    /// Learning rate of 0-based step `step`. Warm-up rises linearly to `max_lr` at its last
    /// step; the cosine then falls from `max_lr` towards 0, reaching 0 only at `total_steps`
    /// (one past the last step), so every step trains.
    pub fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_steps();
        if step < w {
            return self.max_lr * (step + 1) as f64 / w as f64;
        }
        // The cosine runs from step w-1 (the peak, end of warm-up) to step total_steps.
        let span = (self.total_steps + 1).saturating_sub(w).max(1);
        let t = ((step + 1 - w) as f64 / span as f64).min(1.0);
        self.max_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = OneCycle::new(1e-3, 100, 0.2);
        assert_eq!(s.warmup_steps(), 20);
        assert!((s.lr(0) - 1e-3 / 20.0).abs() < 1e-15);
        assert!((s.lr(9) - 1e-3 * 10.0 / 20.0).abs() < 1e-15);
        assert!((s.lr(19) - 1e-3).abs() < 1e-15);
        // Halfway from the peak to the end the rate is half the peak.
        let s2 = OneCycle::new(1e-3, 99, 0.2); // peak at 19, zero at 99: half at 59
        assert!((s2.lr(59) - 0.5e-3).abs() < 1e-12);
        // Monotone up, then monotone down, positive to the end.
        for i in 1..20 {
            assert!(s.lr(i) > s.lr(i - 1));
        }
        for i in 20..100 {
            assert!(s.lr(i) < s.lr(i - 1), "step {i}");
            assert!(s.lr(i) > 0.0);
        }
        assert!(s.lr(99) < 1e-5);
    }

    #[test]
    fn tiny_runs_still_train() {
        let s = OneCycle::new(0.1, 1, 0.2);
        assert_eq!(s.lr(0), 0.1);
        let s = OneCycle::new(0.1, 3, 0.2);
        assert_eq!(s.warmup_steps(), 1);
        assert_eq!(s.lr(0), 0.1);
        assert!(s.lr(1) > 0.0 && s.lr(1) < 0.1);
        assert!(s.lr(2) > 0.0 && s.lr(2) < s.lr(1));
    }
}
