//! `mlvpt group` end to end: output formats, and one clear located error (never a panic) for
//! each kind of bad input.
#![cfg(feature = "train")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

fn mlvpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlvpt"))
        .arg("group")
        .args(args)
        .output()
        .expect("run mlvpt")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file in a fresh temporary directory (kept alive by the returned guard).
fn file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Runs and expects exit 1 with one `error:` line that contains every piece of `expect`.
fn fails(args: &[&str], expect: &[&str]) {
    let o = mlvpt(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "args {args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for piece in expect {
        assert!(err.contains(piece), "args {args:?}: {err:?} lacks {piece:?}");
    }
    assert!(stdout(&o).is_empty(), "nothing on stdout on failure");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn json_output_is_one_object_with_the_documented_keys() {
    let co = data("coco2014/cooccurrence.json");
    let o = mlvpt(&["--cooccurrence", p(&co), "--groups", "5", "--tau-dis", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.trim().lines().count(), 1);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["classes"].as_array().unwrap().len(), 80);
    assert_eq!(v["groups"], 5);
    assert_eq!(v["tau_co"], 2.0);
    assert_eq!(v["tau_dis"], 3.0);
    for graph in ["correlative", "discriminative"] {
        let groups = v[graph]["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 5);
        let n: usize = groups.iter().map(|g| g.as_array().unwrap().len()).sum();
        assert_eq!(n, 80);
        let ev: Vec<f64> = v[graph]["eigenvalues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(ev.len(), 6);
        assert!(ev.windows(2).all(|w| w[0] <= w[1]), "{ev:?}");
        assert!(ev[0].abs() < 1e-9, "a connected graph's smallest eigenvalue is 0: {ev:?}");
    }
    assert!(v.get("adjusted_rand_index").is_none());
}

#[test]
fn against_reports_the_adjusted_rand_index() {
    let co = data("coco2014/cooccurrence.json");
    let off = data("coco2014/official_groups.json");
    let o = mlvpt(&[
        "--cooccurrence",
        p(&co),
        "-T",
        "2",
        "--tau-dis",
        "3",
        "--against",
        p(&off),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["adjusted_rand_index"]["correlative"], 1.0);
    assert_eq!(v["adjusted_rand_index"]["discriminative"], 1.0);
    // Readable form.
    let o = mlvpt(&["--cooccurrence", p(&co), "-T", "13", "--against", p(&off)]);
    let text = stdout(&o);
    assert!(
        text.contains("Correlative groups") && text.contains("Adjusted Rand index"),
        "{text}"
    );
    fails(
        &["--cooccurrence", p(&co), "-T", "4", "--against", p(&off)],
        &["official_groups.json", "no groups for T = 4"],
    );
}

#[test]
fn tau_sets_both_graphs_and_the_per_graph_options_override_it() {
    let co = data("voc2007/cooccurrence.json");
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["--cooccurrence", p(&co), "-T", "3", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&stdout(&mlvpt(&args))).unwrap()
    };
    let v = run(&["--tau", "1.5"]);
    assert_eq!((v["tau_co"].as_f64(), v["tau_dis"].as_f64()), (Some(1.5), Some(1.5)));
    let v = run(&["--tau", "1.5", "--tau-co", "4"]);
    assert_eq!((v["tau_co"].as_f64(), v["tau_dis"].as_f64()), (Some(4.0), Some(1.5)));
}

#[test]
fn csv_labels_and_label_lists_give_the_same_groups() {
    let csv = "a,b,c,d,e,f\n1,1,1,0,0,0\n1,1,0,0,0,0\n0,1,1,0,0,0\n0,0,0,1,1,1\n0,0,0,0,1,1\n0,0,0,1,0,1\n0,0,0,0,0,0\n";
    let lists = "a, b, c\na b\nb,c\nd e f\ne f\nd,f\n\n";
    let (_d1, csv_path) = file("labels.csv", csv);
    let (_d2, list_path) = file("labels.txt", lists);
    let (_d3, classes) = file("classes.txt", "a\nb\nc\nd\ne\nf\n");
    let a = mlvpt(&["--labels", p(&csv_path), "-T", "2", "--json"]);
    let b = mlvpt(&["--labels", p(&list_path), "--classes", p(&classes), "-T", "2", "--json"]);
    assert!(a.status.success() && b.status.success(), "{} {}", stderr(&a), stderr(&b));
    assert_eq!(stdout(&a), stdout(&b));
    let v: Value = serde_json::from_str(&stdout(&a)).unwrap();
    assert_eq!(v["correlative"]["groups"], serde_json::json!([["a", "b", "c"], ["d", "e", "f"]]));
}

#[test]
fn a_label_that_never_occurs_is_named_in_a_warning() {
    let (_d, path) = file("labels.csv", "a,b,c,d,z\n1,1,0,0,0\n0,0,1,1,0\n1,1,0,0,0\n");
    let o = mlvpt(&["--labels", p(&path), "-T", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning") && stderr(&o).contains(": z"), "{}", stderr(&o));
}

#[test]
fn plot_writes_a_png() {
    let co = data("voc2007/cooccurrence.json");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("groups.png");
    let o = mlvpt(&["--cooccurrence", p(&co), "-T", "5", "--plot", p(&png)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    fails(
        &[
            "--cooccurrence",
            p(&co),
            "-T",
            "5",
            "--plot",
            p(&dir.path().join("no/such/dir/x.png")),
        ],
        &["x.png", "cannot write the plot"],
    );
}

// ---- bad input ---------------------------------------------------------------------------

#[test]
fn malformed_label_csv_errors_name_file_line_and_column() {
    let cases: &[(&str, &[&str])] = &[
        ("a,b,c\n1,0,1\n1,0\n", &[":3: ragged row"]),
        ("a,b,c\n1,0,1\n1,yes,0\n", &[":3:2: expected a number", "yes"]),
        ("1,0,1\n1,NaN,0\n", &[":2:2: ", "not finite"]),
        ("a,b\n1,0\n0,2\n", &[":3:2: ", "not 0 or 1"]),
        ("", &["holds no data rows"]),
        ("a,b,c\n", &["holds no data rows"]),
        ("a,b\n0,0\n0,0\n", &["no label occurs in any image"]),
    ];
    for (text, expect) in cases {
        let (_d, path) = file("labels.csv", text);
        let mut want = vec![p(&path)];
        want.extend_from_slice(expect);
        fails(&["--labels", p(&path), "-T", "1"], &want);
    }
}

#[test]
fn missing_files_are_named() {
    fails(
        &["--labels", "/no/such/labels.csv", "-T", "2"],
        &["/no/such/labels.csv", "cannot read file"],
    );
    fails(
        &["--cooccurrence", "/no/such/co.json", "-T", "2"],
        &["/no/such/co.json", "cannot read file"],
    );
    let (_d, labels) = file("l.txt", "a\n");
    fails(
        &["--labels", p(&labels), "--classes", "/no/such/classes.txt", "-T", "1"],
        &["/no/such/classes.txt"],
    );
}

#[test]
fn malformed_cooccurrence_json_errors_are_located() {
    let good_counts = "\"counts\": [5, 4, 3]";
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("".into(), vec!["file is empty"]),
        ("{\"classes\": [\"a\", \"b\"\n".into(), vec![":2:", "invalid JSON"]),
        (
            "{\"classes\": [\"a\", \"b\", \"c\"],\n \"counts\": [5, \"x\", 3], \"cooccurrence\": []}".into(),
            vec![":2:", "invalid JSON", "invalid type"],
        ),
        (
            "{\"classes\": [\"a\", \"b\", \"c\"],\n \"counts\": [5, NaN, 3], \"cooccurrence\": []}".into(),
            vec![":2:", "invalid JSON"],
        ),
        (
            format!("{{\"classes\": [\"a\", \"b\", \"c\"], {good_counts},\n \"cooccurrence\": [[0, 1, 1],\n [1, 0],\n [1, 1, 0]]}}"),
            vec![":3:2: ", "row 2 has 2 entries, expected 3"],
        ),
        (
            format!("{{\"classes\": [\"a\", \"b\", \"c\"], {good_counts},\n \"cooccurrence\": [[0, 1, 1], [1, 0, 1]]}}"),
            vec![":2:18: ", "2 rows, expected a 3 x 3 matrix"],
        ),
        (
            "{\"classes\": [\"a\", \"b\", \"c\"],\n \"counts\": [5, 4], \"cooccurrence\": [[0,1,1],[1,0,1],[1,1,0]]}".into(),
            vec![":2:12: ", "\"counts\" has 2 entries, expected 3"],
        ),
        (
            format!("{{\"classes\": [\"a\", \"b\", \"c\"], {good_counts},\n \"cooccurrence\": [[0, 1, 1],\n [2, 0, 1], [1, 1, 0]]}}"),
            vec![":2:", "not symmetric"],
        ),
        (
            format!("{{\"classes\": [\"a\", \"b\", \"c\"], {good_counts},\n \"cooccurrence\": [[0, 1, 4],\n [1, 0, 1],\n [4, 1, 0]]}}"),
            vec![":2:", "exceeds the counts"],
        ),
        (
            "{\"classes\": [\"a\", \"a\"], \"counts\": [1, 1], \"cooccurrence\": [[0,0],[0,0]]}".into(),
            vec![":1:19: ", "appears twice"],
        ),
        (
            "{\"classes\": [\"a\", \"b\"], \"counts\": [1, 1]}".into(),
            vec!["missing field `cooccurrence`"],
        ),
        (
            "{\"classes\": [], \"counts\": [], \"cooccurrence\": []}".into(),
            vec!["\"classes\" is empty"],
        ),
    ];
    for (text, expect) in cases {
        let (_d, path) = file("co.json", &text);
        let mut want = vec![p(&path)];
        want.extend_from_slice(&expect);
        fails(&["--cooccurrence", p(&path), "-T", "1"], &want);
    }
}

#[test]
fn bad_settings_are_errors() {
    let co = data("voc2007/cooccurrence.json");
    let c = p(&co);
    fails(
        &["--cooccurrence", c, "-T", "21"],
        &["cooccurrence.json", "21 groups asked for 20 labels"],
    );
    fails(&["--cooccurrence", c, "-T", "0"], &["T must be at least 1"]);
    fails(&["--cooccurrence", c, "-T", "2", "--tau", "0"], &["tau_co must be a positive"]);
    fails(
        &["--cooccurrence", c, "-T", "2", "--tau-dis", "-1"],
        &["tau_dis must be a positive"],
    );
    fails(&["--cooccurrence", c, "-T", "2", "--restarts", "0"], &["restarts"]);
    // Argument errors are clap's (exit 2), still no panic.
    let o = mlvpt(&["-T", "2"]);
    assert_eq!(o.status.code(), Some(2));
    let o = mlvpt(&["--cooccurrence", c, "--labels", c, "-T", "2"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn label_list_errors_are_located() {
    let (_d1, classes) = file("classes.txt", "cat\ndog\ntraffic light\n");
    let (_d2, labels) = file("labels.txt", "cat, dog\ntraffic light,cat\ncat,  horse\n");
    fails(
        &["--labels", p(&labels), "--classes", p(&classes), "-T", "2"],
        &["labels.txt:3:7: ", "unknown class \"horse\""],
    );
    let (_d3, empty) = file("empty.txt", "");
    fails(
        &["--labels", p(&empty), "--classes", p(&classes), "-T", "1"],
        &["empty.txt", "no images"],
    );
    let (_d4, blank) = file("blank.txt", "\n\n");
    fails(
        &["--labels", p(&blank), "--classes", p(&classes), "-T", "1"],
        &["blank.txt", "no label occurs"],
    );
    let (_d5, dup) = file("dup.txt", "cat\ndog\ncat\n");
    fails(
        &["--labels", p(&labels), "--classes", p(&dup), "-T", "1"],
        &["dup.txt:3", "listed twice"],
    );
    // Commas allow names with spaces; a line with no comma splits at spaces.
    let (_d6, ok) = file("ok.txt", "cat,traffic light\ndog cat\ntraffic light\n");
    let o = mlvpt(&["--labels", p(&ok), "--classes", p(&classes), "-T", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_reference_groups_are_errors() {
    let co = data("voc2007/cooccurrence.json");
    let (_d, bad) = file("ref.json", "{\"2\": {\"correlative\": [[\"cat\"],\n [\"unicorn\"]]}}");
    fails(
        &["--cooccurrence", p(&co), "-T", "2", "--against", p(&bad)],
        &["ref.json:2:3: ", "unknown class \"unicorn\""],
    );
    let (_d2, partial) = file("ref.json", "{\"2\": {\"correlative\": [[\"cat\"], [\"dog\"]]}}");
    fails(
        &["--cooccurrence", p(&co), "-T", "2", "--against", p(&partial)],
        &["ref.json", "is in no correlative group"],
    );
    let (_d3, broken) = file("ref.json", "{\"2\": ");
    fails(
        &["--cooccurrence", p(&co), "-T", "2", "--against", p(&broken)],
        &["ref.json:1:", "invalid JSON"],
    );
}
