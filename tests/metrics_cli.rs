//! `mlvpt metrics` through the built binary: output, and one clear located error (never a
//! panic) for every kind of bad input.
#![cfg(feature = "train")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlvpt"))
        .arg("metrics")
        .args(args)
        .output()
        .unwrap()
}

fn metrics(scores: &Path, targets: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["--scores", scores.to_str().unwrap(), "--targets", targets.to_str().unwrap()];
    a.extend_from_slice(extra);
    run(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the run exited non-zero with one `error:` line that contains every `needle`.
fn assert_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {e}");
    for n in needles {
        assert!(errors[0].contains(n), "{n:?} not in {:?}", errors[0]);
    }
}

const SCORES: &str = "cat,dog,bird\n0.9,0.9,0.1\n0.8,0.4,0.2\n0.3,0.7,0.3\n0.2,0.1,0.4\n";
const TARGETS: &str = "cat,dog,bird\n1,0,0\n0,1,0\n1,1,0\n0,0,0\n";

#[test]
fn json_output_with_header_names() {
    let d = Dir::new();
    let o = metrics(&d.file("s.csv", SCORES), &d.file("t.csv", TARGETS), &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Same case as tests/metrics.rs small_case_by_hand: mAP (5/6 + 2/3) / 2 = 75, CP 1/3, CR 1/2.
    assert!((j["mAP"].as_f64().unwrap() - 75.0).abs() < 1e-9);
    assert!((j["CP"].as_f64().unwrap() - 100.0 / 3.0).abs() < 1e-9);
    assert!((j["CR"].as_f64().unwrap() - 50.0).abs() < 1e-9);
    assert!((j["AP"]["dog"].as_f64().unwrap() - 200.0 / 3.0).abs() < 1e-9);
    assert!(j["AP"]["bird"].is_null());
    assert_eq!(j["n_images"], 4);
    assert_eq!(j["n_classes"], 3);
    let e = stderr(&o);
    assert!(
        e.contains("warning: 1 class has no positives and is left out of mAP and CR: bird"),
        "{e}"
    );
    assert!(e.contains("warning: 1 image has no positive labels"), "{e}");
}

#[test]
fn table_output_and_default_names() {
    let d = Dir::new();
    let s = d.file("s.csv", "0.9,0.1\n0.2,0.8\n");
    let t = d.file("t.csv", "1,0\n0,1\n");
    let o = metrics(&s, &t, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("mAP 100.00") && out.contains("class_0") && out.contains("class_1"),
        "{out}"
    );
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // Names from whichever file has a header.
    let s2 = d.file("s2.csv", "a,b\n0.9,0.1\n0.2,0.8\n");
    let o = metrics(&s2, &t, &["--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["AP"]["b"], 100.0);
}

#[test]
fn threshold_changes_predictions() {
    let d = Dir::new();
    let (s, t) = (d.file("s.csv", SCORES), d.file("t.csv", TARGETS));
    // At 0.35 cat predicts images 0, 1 (Nc 1) and dog 0, 1, 2 (Nc 2), bird image 3 (Nc 0):
    // OP = 3/6.
    let o = metrics(&s, &t, &["--json", "--threshold", "0.35"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((j["OP"].as_f64().unwrap() - 50.0).abs() < 1e-9, "{j}");
    assert!((j["OR"].as_f64().unwrap() - 75.0).abs() < 1e-9, "{j}");
    assert_eq!(j["threshold"], 0.35);
}

#[test]
fn several_classes_without_positives_are_named() {
    let d = Dir::new();
    let s = d.file("s.csv", "a,b,c,d\n0.9,0.1,0.2,0.3\n0.2,0.8,0.1,0.1\n");
    let t = d.file("t.csv", "1,0,0,0\n0,0,0,0\n");
    let o = metrics(&s, &t, &["--json"]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("3 classes have no positives and are left out of mAP and CR: b, c, d"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malformed_files_name_file_line_column() {
    let d = Dir::new();
    let good_t = d.file("t.csv", TARGETS);
    let good_s = d.file("s.csv", SCORES);
    let cases: &[(&str, &str, bool, &[&str])] = &[
        // (file name, contents, is it the targets file, expected fragments of the error)
        (
            "ragged.csv",
            "cat,dog,bird\n1,0,0\n0,1\n1,1,0\n0,0,0\n",
            true,
            &["ragged.csv:3:", "ragged row"],
        ),
        (
            "word.csv",
            "cat,dog,bird\n1,0,0\n0,yes,0\n1,1,0\n0,0,0\n",
            true,
            &["word.csv:3:2:", "expected a number", "yes"],
        ),
        (
            "label2.csv",
            "cat,dog,bird\n1,0,0\n0,1,0\n1,1,2\n0,0,0\n",
            true,
            &["label2.csv:4:3:", "not 0 or 1"],
        ),
        (
            "nan.csv",
            "cat,dog,bird\n0.9,0.9,0.1\n0.8,NaN,0.2\n0.3,0.7,0.3\n0.2,0.1,0.4\n",
            false,
            &["nan.csv:3:2:", "not finite"],
        ),
        (
            "logit.csv",
            "cat,dog,bird\n0.9,0.9,0.1\n0.8,0.4,0.2\n0.3,2.5,0.3\n0.2,0.1,0.4\n",
            false,
            &["logit.csv:4:2:", "not a probability"],
        ),
        ("empty.csv", "", true, &["empty.csv", "no data rows"]),
        ("headonly.csv", "cat,dog,bird\n", false, &["headonly.csv", "no data rows"]),
        (
            "dup.csv",
            "cat,dog,cat\n1,0,0\n0,1,0\n1,1,0\n0,0,0\n",
            true,
            &["dup.csv:1:3:", "repeats column 1"],
        ),
    ];
    for (name, text, is_target, needles) in cases {
        let f = d.file(name, text);
        let o = if *is_target {
            metrics(&good_s, &f, &[])
        } else {
            metrics(&f, &good_t, &[])
        };
        assert_error(&o, needles);
    }
}

#[test]
fn missing_file() {
    let d = Dir::new();
    let s = d.file("s.csv", SCORES);
    let missing = d.0.path().join("missing.csv");
    assert_error(&metrics(&s, &missing, &[]), &["missing.csv", "cannot read file"]);
}

#[test]
fn shape_mismatch_names_both_files_and_shapes() {
    let d = Dir::new();
    let s = d.file("s.csv", SCORES);
    let rows = d.file("rows.csv", "cat,dog,bird\n1,0,0\n0,1,0\n");
    assert_error(
        &metrics(&s, &rows, &[]),
        &["s.csv has 4 rows x 3 columns", "rows.csv has 2 rows x 3 columns"],
    );
    let cols = d.file("cols.csv", "1,0\n0,1\n1,1\n0,0\n");
    assert_error(
        &metrics(&s, &cols, &[]),
        &["s.csv has 4 rows x 3 columns", "cols.csv has 4 rows x 2 columns"],
    );
}

#[test]
fn header_mismatch() {
    let d = Dir::new();
    let s = d.file("s.csv", SCORES);
    let t = d.file("t.csv", "cat,cow,bird\n1,0,0\n0,1,0\n1,1,0\n0,0,0\n");
    assert_error(
        &metrics(&s, &t, &[]),
        &["class names differ in column 2", "s.csv", "\"dog\"", "t.csv", "\"cow\""],
    );
}

#[test]
fn threshold_outside_open_unit_interval() {
    let d = Dir::new();
    let (s, t) = (d.file("s.csv", SCORES), d.file("t.csv", TARGETS));
    for th in ["0", "1", "-0.5", "1.5", "NaN"] {
        assert_error(&metrics(&s, &t, &["--threshold", th]), &["--threshold", "between 0 and 1"]);
    }
    // Not a number at all: clap's own error, still no panic and non-zero.
    let o = metrics(&s, &t, &["--threshold", "half"]);
    assert!(!o.status.success() && stderr(&o).contains("half") && !stderr(&o).contains("panicked"));
}
