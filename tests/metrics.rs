//! Metrics (docs/MODEL.md#metrics) against hand-computed cases (derivations in the comments) and
//! against scikit-learn's average_precision_score / the VOC devkit's voc_ap on a fixed data set.
#![cfg(feature = "train")]

use mlvpt::metrics::{average_precision, default_class_names, evaluate, Metrics};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

macro_rules! assert_close {
    ($a:expr, $b:expr) => {
        assert!(close($a, $b), "{} = {} but expected {}", stringify!($a), $a, $b)
    };
}

/// 4 images x 3 classes (cat, dog, bird). bird has no positives and is never predicted; image 3
/// has no labels.
fn small() -> Metrics {
    #[rustfmt::skip]
    let s = [0.9, 0.9, 0.1,
             0.8, 0.4, 0.2,
             0.3, 0.7, 0.3,
             0.2, 0.1, 0.4f32];
    #[rustfmt::skip]
    let t = [1., 0., 0.,
             0., 1., 0.,
             1., 1., 0.,
             0., 0., 0.0f32];
    evaluate(&s, &t, 4, 3, 0.5)
}

#[test]
fn small_case_by_hand() {
    let m = small();
    // cat: ranked .9(+) .8(-) .3(+) .2(-): precision at the positives 1, 2/3 -> AP 5/6 both ways
    // (precision never rises, so the monotone envelope changes nothing).
    assert_close!(m.ap[0].unwrap(), 100.0 * 5.0 / 6.0);
    assert_close!(m.ap_noninterp[0].unwrap(), 100.0 * 5.0 / 6.0);
    // dog: ranked .9(-) .7(+) .4(+) .1(-): points (r, p) = (0, 0), (1/2, 1/2), (1, 2/3), (1, 1/2).
    // Non-interpolated: 1/2 * 1/2 + 1/2 * 2/3 = 7/12. VOC: the envelope lifts 1/2 to 2/3: 2/3.
    assert_close!(m.ap[1].unwrap(), 100.0 * 2.0 / 3.0);
    assert_close!(m.ap_noninterp[1].unwrap(), 100.0 * 7.0 / 12.0);
    assert_eq!(m.ap[2], None);
    // mAP over cat and dog only.
    assert_close!(m.map, 100.0 * (5.0 / 6.0 + 2.0 / 3.0) / 2.0);
    assert_close!(m.map_noninterp, 100.0 * (5.0 / 6.0 + 7.0 / 12.0) / 2.0);
    // Threshold 0.5: cat Ng 2 Np 2 (img 0, 1) Nc 1; dog Ng 2 Np 2 (img 0, 2) Nc 1; bird 0 0 0.
    // CP = (1/2 + 1/2 + 0) / 3 = 1/3 (bird, never predicted, counts 0); CR = (1/2 + 1/2) / 2
    // (bird left out); CF1 = 2 (1/3)(1/2) / (5/6) = 2/5. OP = 2/4, OR = 2/4, OF1 = 1/2.
    assert_close!(m.class.precision, 100.0 / 3.0);
    assert_close!(m.class.recall, 50.0);
    assert_close!(m.class.f1, 40.0);
    assert_close!(m.overall.precision, 50.0);
    assert_close!(m.overall.recall, 50.0);
    assert_close!(m.overall.f1, 50.0);
    // With 3 classes every class is in the top 3: the top-3 variants equal the plain ones.
    assert_eq!(m.top3_class, m.class);
    assert_eq!(m.top3_overall, m.overall);
    assert_eq!(m.images_without_labels, vec![3]);
    assert_eq!(m.classes_never_predicted, vec![2]);
    assert_eq!(m.classes_without_positives(), vec![2]);
}

#[test]
fn top3_needs_rank_and_threshold() {
    // img0: top 3 are classes 0, 1, 2 but only class 0 reaches 0.5. img1: all tied at 0.6, the
    // lower indices 0, 1, 2 win the top 3.
    #[rustfmt::skip]
    let s = [0.9, 0.3, 0.2, 0.1, 0.05,
             0.6, 0.6, 0.6, 0.6, 0.6f32];
    #[rustfmt::skip]
    let t = [1., 0., 0., 1., 0.,
             0., 0., 0., 1., 1.0f32];
    let m = evaluate(&s, &t, 2, 5, 0.5);
    // Threshold: predicted img0 {0}, img1 {0..4}. (Ng, Np, Nc): c0 (1,2,1) c1 (0,1,0) c2 (0,1,0)
    // c3 (2,1,1) c4 (1,1,1). CP = (1/2 + 0 + 0 + 1 + 1) / 5 = 1/2; CR = (1 + 1/2 + 1) / 3 = 5/6;
    // CF1 = 2 (1/2)(5/6) / (4/3) = 5/8. OP = 3/6, OR = 3/4, OF1 = 2 (1/2)(3/4) / (5/4) = 3/5.
    assert_close!(m.class.precision, 50.0);
    assert_close!(m.class.recall, 500.0 / 6.0);
    assert_close!(m.class.f1, 62.5);
    assert_close!(m.overall.precision, 50.0);
    assert_close!(m.overall.recall, 75.0);
    assert_close!(m.overall.f1, 60.0);
    // Top-3: img0 {0}, img1 {0, 1, 2}. c0 (1,2,1) c1 (0,1,0) c2 (0,1,0) c3 (2,0,0) c4 (1,0,0).
    // CP = (1/2) / 5 = 1/10; CR = (1 + 0 + 0) / 3 = 1/3; CF1 = 2 (1/10)(1/3) / (13/30) = 2/13.
    // OP = 1/4, OR = 1/4, OF1 = 1/4.
    assert_close!(m.top3_class.precision, 10.0);
    assert_close!(m.top3_class.recall, 100.0 / 3.0);
    assert_close!(m.top3_class.f1, 200.0 / 13.0);
    assert_close!(m.top3_overall.precision, 25.0);
    assert_close!(m.top3_overall.recall, 25.0);
    assert_close!(m.top3_overall.f1, 25.0);
}

#[test]
fn ties_form_one_step_and_match_sklearn() {
    // Ranked .9(-) {.5(+), .5(-)} .1(+): points after each distinct score (0, 0), (1/2, 1/3),
    // (1, 1/2). Non-interpolated 1/2 * 1/3 + 1/2 * 1/2 = 5/12; VOC lifts 1/3 to 1/2: 1/2.
    // sklearn 1.9.1: average_precision_score([0,1,0,1], [0.9,0.5,0.5,0.1]) = 0.41666666666666663.
    let (voc, non) = average_precision(&[0.9, 0.5, 0.5, 0.1], &[false, true, false, true]).unwrap();
    assert_close!(non, 5.0 / 12.0);
    assert_close!(non, 0.41666666666666663);
    assert_close!(voc, 0.5);
    // The order of tied items does not matter.
    let swapped = average_precision(&[0.9, 0.5, 0.5, 0.1], &[false, false, true, true]).unwrap();
    assert_eq!(swapped, (voc, non));
    // Three tied at .5 (2 positives) then .2(+): (2/3, 2/3), (1, 3/4). Non-interpolated
    // 2/3 * 2/3 + 1/3 * 3/4 = 25/36 (sklearn: 0.6944444444444444); VOC: 3/4.
    let (voc, non) = average_precision(&[0.5, 0.5, 0.5, 0.2], &[true, true, false, true]).unwrap();
    assert_close!(non, 25.0 / 36.0);
    assert_close!(voc, 0.75);
    let (voc2, non2) = average_precision(&[0.5, 0.5, 0.5, 0.2], &[false, true, true, true]).unwrap();
    assert_eq!((voc2, non2), (voc, non));
}

#[test]
fn noninterp_without_ties_is_mean_precision_at_positives() {
    // Ranked + - - + +: precision at the positives 1, 2/4, 3/5: mean 0.7. VOC lifts 2/4 to 3/5.
    let (voc, non) = average_precision(&[0.9, 0.8, 0.7, 0.6, 0.5], &[true, false, false, true, true]).unwrap();
    assert_close!(non, 0.7);
    assert_close!(voc, (1.0 + 0.6 + 0.6) / 3.0);
}

#[test]
fn matches_sklearn_and_voc_devkit_on_fixed_data() {
    // Produced by tools/peer/metrics_sklearn.py (numpy default_rng(7), 15 images x 3 classes, distinct
    // scores per column) with scikit-learn 1.9.1 average_precision_score, and voc_ap from
    // py-faster-rcnn's voc_eval.py (all-point, monotone precision) on the same ranking.
    #[rustfmt::skip]
    let s: [f32; 45] = [
        0.064,0.771,0.050, 0.526,0.729,0.302, 0.694,0.946,0.631, 0.295,0.295,0.505,
        0.365,0.512,0.680, 0.337,0.491,0.946, 0.428,0.288,0.498, 0.442,0.456,0.918,
        0.309,0.379,0.477, 0.918,0.393,0.274, 0.407,0.477,0.757, 0.421,0.316,0.869,
        0.925,0.792,0.568, 0.687,0.883,0.456, 0.589,0.190,0.897];
    #[rustfmt::skip]
    let t: [f32; 45] = [
        1.,1.,1., 0.,0.,0., 0.,1.,1., 0.,0.,1., 1.,0.,0., 0.,1.,1., 0.,0.,0., 0.,0.,0.,
        0.,1.,0., 1.,0.,0., 0.,0.,1., 0.,1.,0., 0.,1.,0., 0.,1.,0., 0.,1.,1.];
    let sklearn = [0.29393939393939394, 0.7970508658008658, 0.6322751322751323];
    let voc = [0.30000000000000004, 0.8017857142857143, 0.6322751322751323];
    let m = evaluate(&s, &t, 15, 3, 0.5);
    for j in 0..3 {
        assert!(
            (m.ap_noninterp[j].unwrap() - 100.0 * sklearn[j]).abs() < 1e-9,
            "class {j}: {:?}",
            m.ap_noninterp[j]
        );
        assert!((m.ap[j].unwrap() - 100.0 * voc[j]).abs() < 1e-9, "class {j}: {:?}", m.ap[j]);
    }
    assert_close!(m.map_noninterp, 100.0 * sklearn.iter().sum::<f64>() / 3.0);
}

#[test]
fn zero_denominators_give_zero_not_nan() {
    // No positives anywhere and nothing predicted: every metric 0, AP null.
    let m = evaluate(&[0.1, 0.2, 0.3, 0.4], &[0.0; 4], 2, 2, 0.5);
    for v in [
        m.map,
        m.map_noninterp,
        m.class.precision,
        m.class.recall,
        m.class.f1,
        m.overall.precision,
        m.overall.recall,
        m.overall.f1,
        m.top3_class.f1,
        m.top3_overall.f1,
    ] {
        assert_eq!(v, 0.0);
    }
    assert_eq!(m.ap, vec![None, None]);
    let j = m.to_json(&default_class_names(2));
    assert!(j["AP"]["class_0"].is_null());
    assert_eq!(j["mAP"], 0.0);
    // Everything predicted but no positives: precision 0, recall 0, F1 0.
    let m = evaluate(&[0.9, 0.8], &[0.0, 0.0], 1, 2, 0.5);
    assert_eq!((m.class.precision, m.overall.precision, m.overall.f1), (0.0, 0.0, 0.0));
    // Positives but nothing predicted.
    let m = evaluate(&[0.1, 0.2], &[1.0, 1.0], 1, 2, 0.5);
    assert_eq!((m.class.precision, m.class.recall, m.class.f1), (0.0, 0.0, 0.0));
    assert_eq!(m.map, 100.0);
}

#[test]
fn perfect_ranking_scores_100() {
    let s = [0.9, 0.1, 0.2, 0.8f32];
    let t = [1., 0., 0., 1.0f32];
    let m = evaluate(&s, &t, 2, 2, 0.5);
    for v in [m.map, m.map_noninterp, m.class.f1, m.overall.f1, m.top3_overall.f1] {
        assert_close!(v, 100.0);
    }
}

#[test]
fn json_has_the_documented_keys_and_names() {
    let m = small();
    let names: Vec<String> = ["cat", "dog", "bird"].iter().map(|s| s.to_string()).collect();
    let j = m.to_json(&names);
    for key in [
        "mAP",
        "mAP_noninterp",
        "CP",
        "CR",
        "CF1",
        "OP",
        "OR",
        "OF1",
        "CP_top3",
        "OF1_top3",
        "n_images",
        "n_classes",
    ] {
        assert!(j.get(key).is_some(), "missing {key}");
    }
    assert_close!(j["AP"]["cat"].as_f64().unwrap(), 100.0 * 5.0 / 6.0);
    assert!(j["AP"]["bird"].is_null());
    assert_eq!(j["classes_without_positives"], serde_json::json!(["bird"]));
    assert_eq!(j["n_images"], 4);
    let w = m.warnings(&names);
    assert!(
        w.iter().any(|w| w.contains("1 class has no positives") && w.contains("bird")),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.contains("1 image has no positive labels")), "{w:?}");
    let table = m.to_table(&names);
    assert!(
        table.contains("bird") && table.contains("(no positives)") && table.contains("83.33"),
        "{table}"
    );
}

#[test]
fn nan_scores_do_not_panic() {
    let m = evaluate(&[f32::NAN, 0.9, 0.2, f32::NAN], &[1., 0., 0., 1.], 2, 2, 0.5);
    assert!(m.map.is_finite() && m.class.f1.is_finite());
    // NaN ranks last and is never predicted: class 0 ranks .2(-) NaN(+) -> AP 1/2.
    assert_close!(m.ap[0].unwrap(), 50.0);
}

#[test]
fn score_equal_to_threshold_is_predicted() {
    // score >= threshold predicts (ML-GCN's logit >= 0): class 0 at exactly 0.5 is a hit, class
    // 1 at 0.4 is not predicted. OP = 1/1, OR = 1/1; CP = (1 + 0) / 2 (class 1 never predicted).
    let m = evaluate(&[0.5, 0.4], &[1.0, 0.0], 1, 2, 0.5);
    assert_close!(m.overall.precision, 100.0);
    assert_close!(m.overall.recall, 100.0);
    assert_close!(m.class.precision, 50.0);
    assert_eq!(m.classes_never_predicted, vec![1]);
}
