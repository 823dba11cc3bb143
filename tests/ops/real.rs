//! The ops' shared f32 functions (`src/ops/real.rs`: the erf of GELU, the exp of softmax and
//! ASL) against libm in f64.

#[test]
fn f32_erf_and_exp_are_accurate() {
    use mlvpt::ops::real::{erf_f32, exp_f32};
    let mut worst_erf = 0.0f64;
    let mut worst_exp = 0.0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 5e-5; // [-10, 10]
        worst_erf = worst_erf.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
        let y = i as f32 * 4.3e-4; // [-86, 86]
        let want = (y as f64).exp();
        worst_exp = worst_exp.max(((exp_f32(y) as f64 - want) / want).abs());
    }
    assert!(worst_erf < 5e-7, "erf_f32 absolute error {worst_erf:e}");
    assert!(worst_exp < 5e-7, "exp_f32 relative error {worst_exp:e}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
}
