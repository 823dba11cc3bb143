//! Exponential moving average of the trainable weights (docs/MODEL.md#ema-of-the-weights,
//! optional): evaluated beside the raw weights at every evaluation.

use anyhow::ensure;

use crate::model::Params;

#[derive(Clone, Debug, PartialEq)]
pub struct Ema {
    /// The target decay, e.g. 0.999.
    pub decay: f64,
    /// Updates applied so far (drives the warm-up below; stored in checkpoints for resume).
    pub updates: u64,
    pub shadow: Params,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(decay: f64, params: &Params) -> anyhow::Result<Self> {
        ensure!(
            decay.is_finite() && (0.0..1.0).contains(&decay),
            "EMA decay must be in [0, 1), got {decay}"
        );
        Ok(Self {
            decay,
            updates: 0,
            shadow: params.clone(),
        })
    }

    /// The decay used for update number `updates + 1`: min(decay, (1 + n) / (10 + n)), the
    /// usual warm-up (TensorFlow's num_updates rule), so a short run's average is not stuck at
    /// the initial weights.
    pub fn effective_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// shadow = d * shadow + (1 - d) * params.
    pub fn update(&mut self, params: &Params) -> anyhow::Result<()> {
        ensure!(params.tensors.len() == self.shadow.tensors.len(), "EMA: parameter count changed");
        let d = self.effective_decay() as f32;
        for (s, p) in self.shadow.tensors.iter_mut().zip(&params.tensors) {
            ensure!(
                s.name == p.name && s.data.len() == p.data.len(),
                "EMA: tensor {} changed shape",
                p.name
            );
            for (a, &b) in s.data.iter_mut().zip(&p.data) {
                *a = d * *a + (1.0 - d) * b;
            }
        }
        self.updates += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NamedTensor;

    fn params(v: f32) -> Params {
        Params {
            tensors: vec![NamedTensor {
                name: "w".into(),
                shape: vec![2],
                data: vec![v, -v],
            }],
        }
    }

    #[test]
    fn follows_the_formula_with_warm_up() {
        let mut e = Ema::new(0.9, &params(0.0)).unwrap();
        // First update: d = min(0.9, 1/10) = 0.1.
        e.update(&params(1.0)).unwrap();
        assert!((e.shadow.tensors[0].data[0] - 0.9).abs() < 1e-6);
        assert!((e.shadow.tensors[0].data[1] + 0.9).abs() < 1e-6);
        // After many updates the decay is the target one.
        e.updates = 1000;
        let before = e.shadow.tensors[0].data[0];
        e.update(&params(2.0)).unwrap();
        let want = 0.9 * before + 0.1 * 2.0;
        assert!((e.shadow.tensors[0].data[0] - want).abs() < 1e-6);
        assert_eq!(e.updates, 1001);
    }

    #[test]
    fn converges_to_a_constant_and_rejects_bad_input() {
        let mut e = Ema::new(0.99, &params(5.0)).unwrap();
        for _ in 0..3000 {
            e.update(&params(1.0)).unwrap();
        }
        assert!((e.shadow.tensors[0].data[0] - 1.0).abs() < 1e-4);
        assert!(Ema::new(1.0, &params(0.0)).is_err());
        assert!(Ema::new(f64::NAN, &params(0.0)).is_err());
        let other = Params {
            tensors: vec![NamedTensor {
                name: "w".into(),
                shape: vec![3],
                data: vec![0.0; 3],
            }],
        };
        assert!(e.update(&other).is_err());
    }
}
