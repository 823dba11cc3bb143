//! `mlvpt train / eval / predict` end to end through the built binary, on tiny configs.
#![cfg(feature = "train")]

use std::path::Path;
use std::process::{Command, Output};

use mlvpt::train::checkpoint::read_file;

/// A model and data small enough that a run takes well under a second.
const TINY: &[&str] = &[
    "--image-size",
    "16",
    "--patch",
    "4",
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--labels",
    "8",
    "--groups",
    "2",
    "--experts",
    "2",
    "--train-images",
    "48",
    "--test-images",
    "24",
    "--batch-size",
    "16",
    "--lr",
    "5e-3",
];

fn mlvpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(args).output().expect("run mlvpt")
}

fn ok(args: &[&str]) -> String {
    let o = mlvpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "mlvpt {args:?} failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with an `error:` message (never a panic) containing `want`.
fn fails(args: &[&str], want: &str) {
    let o = mlvpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mlvpt {args:?} succeeded");
    assert!(!err.contains("panicked"), "mlvpt {args:?} panicked:\n{err}");
    assert!(err.contains(want), "mlvpt {args:?}: expected {want:?} in:\n{err}");
}

fn train(out: &Path, extra: &[&str]) -> String {
    let mut a = vec!["train", "--quiet", "--device", "cpu", "--out", out.to_str().unwrap()];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    ok(&a)
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn run_writes_metrics_and_checkpoint_that_eval_and_predict_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let summary = train(&out, &["--epochs", "2", "--ema", "0.9"]);
    for row in [
        "epochs",
        "steps",
        "images/s",
        "final loss",
        "test mAP",
        "EMA test mAP",
        "constant-score mAP",
        "checkpoint",
        "waiting for data",
    ] {
        assert!(summary.contains(row), "summary lacks {row}:\n{summary}");
    }
    // "waiting for data  X s of Y s training (P%)": a share of the training time.
    let line = summary.lines().find(|l| l.contains("waiting for data")).unwrap();
    let pct: f64 = line
        .split('(')
        .nth(1)
        .and_then(|t| t.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let secs: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!((0.0..=100.0).contains(&pct) && secs.len() >= 2 && secs[0] <= secs[1], "{line}");

    let recs = records(&out);
    assert_eq!(recs.len(), 2);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["epoch"], i + 1);
        assert_eq!(r["step"], 3 * (i + 1)); // 48 images / batch 16
        for key in ["loss", "mAP", "CF1", "OF1", "ema_mAP", "ema_CF1", "ema_OF1"] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!(v.is_finite(), "{key} = {v}");
        }
    }

    // The checkpoint's metadata says what the issue lists.
    let ck = out.join("checkpoint.safetensors");
    let (tensors, meta) = read_file(&ck).unwrap();
    for key in [
        "groups",
        "class_names",
        "model_config",
        "data_config",
        "train_config",
        "epoch",
        "seed",
        "adam_step",
    ] {
        assert!(meta.contains_key(key), "metadata lacks {key}");
    }
    assert_eq!(meta["epoch"], "2");
    assert_eq!(meta["adam_step"], "6");
    for prefix in ["params/", "adam_m/", "adam_v/", "ema/"] {
        assert!(tensors.keys().any(|k| k.starts_with(prefix)), "no {prefix} tensors");
    }
    let groups: Vec<Vec<Vec<usize>>> = serde_json::from_str(&meta["groups"]).unwrap();
    assert_eq!(groups.len(), 2);
    assert!(groups.iter().all(|g| g.len() == 2));

    // eval reproduces the run's last evaluation exactly.
    let e: serde_json::Value = serde_json::from_str(&ok(&["eval", "--checkpoint", ck.to_str().unwrap(), "--json"])).unwrap();
    let last = recs.last().unwrap();
    assert_eq!(e["metrics"]["mAP"], last["mAP"]);
    assert_eq!(e["metrics"]["OF1"], last["OF1"]);
    assert_eq!(e["ema"]["mAP"], last["ema_mAP"]);
    assert_eq!(e["images"], 24);
    let table = ok(&["eval", "--checkpoint", out.to_str().unwrap(), "--device", "cpu"]);
    assert!(table.contains("mAP") && table.contains("EMA weights"), "{table}");

    // predict: one row per asked image, K probabilities, class names.
    let p: serde_json::Value = serde_json::from_str(&ok(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--index",
        "0",
        "5",
        "--json",
    ]))
    .unwrap();
    let rows = p.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["index"], 5);
    let probs = rows[0]["probabilities"].as_object().unwrap();
    assert_eq!(probs.len(), 8);
    assert!(probs.values().all(|v| (0.0..=1.0).contains(&v.as_f64().unwrap())));
    assert!(probs.contains_key("red-solid-square"));
    let csv = ok(&["predict", "--checkpoint", ck.to_str().unwrap(), "--ema"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("index,red-solid-square,"));
    assert_eq!(lines.len(), 1 + 24);
    assert_eq!(lines[1].split(',').count(), 1 + 8);
    fails(&["predict", "--checkpoint", ck.to_str().unwrap(), "--index", "24"], "out of range");
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    train(&full, &["--epochs", "2", "--ema", "0.9", "--seed", "3"]);
    train(&split, &["--epochs", "2", "--ema", "0.9", "--seed", "3", "--stop-after", "1"]);
    assert_eq!(records(&split).len(), 1);
    let (_, meta) = read_file(&split.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta["epoch"], "1");
    ok(&["train", "--quiet", "--resume", split.to_str().unwrap()]);

    let (a, ma) = read_file(&full.join("checkpoint.safetensors")).unwrap();
    let (b, mb) = read_file(&split.join("checkpoint.safetensors")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        let (x, y): (Vec<u32>, Vec<u32>) = (
            t.data.iter().map(|v| v.to_bits()).collect(),
            b[name].data.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(x, y, "tensor {name} differs after resume");
    }
    assert_eq!(ma, mb);
    assert_eq!(
        std::fs::read_to_string(full.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(split.join("metrics.jsonl")).unwrap()
    );
    // Resuming a finished run trains nothing and changes nothing.
    let before = std::fs::read(full.join("checkpoint.safetensors")).unwrap();
    let summary = ok(&[
        "train",
        "--quiet",
        "--resume",
        full.join("checkpoint.safetensors").to_str().unwrap(),
    ]);
    assert!(summary.contains("test mAP"), "{summary}");
    assert_eq!(before, std::fs::read(full.join("checkpoint.safetensors")).unwrap());
    assert_eq!(records(&full).len(), 2);

    // A different seed is a different run (the comparison above can fail).
    let other = dir.path().join("other");
    train(&other, &["--epochs", "1", "--seed", "4"]);
    let (c, _) = read_file(&other.join("checkpoint.safetensors")).unwrap();
    assert_ne!(a["params/prompts"], c["params/prompts"]);
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = vec![
        "train",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--debug-nan-at-step",
        "4",
    ];
    a.extend_from_slice(TINY);
    fails(&a, "training stopped at step 4 (epoch 2, batch 2)");
    fails(&a, "NaN");
    let (_, meta) = read_file(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta["epoch"], "1");
    assert_eq!(records(&out).len(), 1);
    // The kept checkpoint is usable.
    ok(&["eval", "--checkpoint", out.to_str().unwrap()]);

    // A NaN in the very first step still leaves the initial (epoch 0) checkpoint.
    let first = dir.path().join("first");
    let mut a = vec![
        "train",
        "--quiet",
        "--out",
        first.to_str().unwrap(),
        "--epochs",
        "1",
        "--debug-nan-at-step",
        "0",
    ];
    a.extend_from_slice(TINY);
    fails(&a, "step 0");
    let (_, meta) = read_file(&first.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta["epoch"], "0");
}

#[test]
fn nonsense_configurations_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--heads", "5"], "5 heads do not divide the width 96"),
        (vec!["--groups", "21"], "T = 21 exceeds the number of labels K = 20"),
        (vec!["--batch-size", "0"], "batch size must be at least 1"),
        (vec!["--image-size", "30"], "image size 30 is not divisible by the patch size 4"),
        (vec!["--epochs", "0"], "epochs must be at least 1"),
        (vec!["--lr", "0"], "learning rate must be a finite number > 0"),
        (vec!["--lr=-1e-3"], "learning rate must be a finite number > 0"),
        (vec!["--lr", "nan"], "learning rate must be a finite number > 0"),
        (vec!["--ema", "1.5"], "EMA decay must be in [0, 1)"),
        (vec!["--experts", "0"], "experts (E) must be at least 1"),
        (vec!["--labels", "1"], "labels must be in 2..="),
        (vec!["--train-images", "0"], "at least 1 image"),
        (vec!["--stop-after", "0"], "--stop-after must be at least 1"),
        (vec!["--resume", o, "--lr", "1e-3"], "cannot be used with"),
    ] {
        let mut a = vec!["train", "--quiet", "--out", o];
        a.extend_from_slice(&args);
        fails(&a, want);
        assert!(!out.exists(), "{args:?} did work before failing");
    }
    fails(
        &["train", "--resume", dir.path().join("missing").to_str().unwrap()],
        "cannot read checkpoint",
    );
}

#[test]
fn method_switches_reach_the_model_and_the_grouping() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (extra, branches)) in [
        (vec!["--grouping", "co"], 1),
        (vec!["--grouping", "dc", "--gate", "group"], 1),
        (vec!["--grouping", "random", "--prompt-depth", "shallow"], 2),
        (vec!["--method", "vpt"], 0),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("run{i}"));
        // TINY with depth 2, so deep (2 prompt layers) and shallow (1) differ.
        let mut a = vec!["train", "--quiet", "--out", out.to_str().unwrap(), "--epochs", "1"];
        a.extend(TINY.iter().map(|&x| if x == "1" { "2" } else { x }));
        a.extend(extra.iter().copied());
        ok(&a);
        let (tensors, meta) = read_file(&out.join("checkpoint.safetensors")).unwrap();
        let groups: Vec<Vec<Vec<usize>>> = serde_json::from_str(&meta["groups"]).unwrap();
        assert_eq!(groups.len(), branches, "{extra:?}");
        let model: serde_json::Value = serde_json::from_str(&meta["model_config"]).unwrap();
        let train: serde_json::Value = serde_json::from_str(&meta["train_config"]).unwrap();
        let prompts = &tensors["params/prompts"].shape;
        match extra[1] {
            "dc" => {
                assert_eq!(model["gate"], "group");
                assert_eq!(train["grouping"], "dc");
                // One branch of T = 2 groups, E = 2 experts: 4 prompts per layer, deep: 2 layers.
                assert_eq!(prompts, &vec![2, 4, 16]);
                assert_eq!(tensors["params/head0.gate"].shape, vec![2, 2, 16]);
            }
            "random" => {
                assert_eq!(model["prompt_depth"], "shallow");
                // Shallow: 1 layer of 2 branches x T 2 x E 2 prompts.
                assert_eq!(prompts, &vec![1, 8, 16]);
                assert_ne!(groups[0], groups[1]);
            }
            "vpt" => {
                assert_eq!(model["method"], "vpt");
                assert!(tensors.contains_key("params/head.weight"));
            }
            _ => assert_eq!(train["grouping"], "co"),
        }
        ok(&["eval", "--checkpoint", out.to_str().unwrap()]);
    }
    fails(
        &["predict", "--checkpoint", dir.path().join("run0").to_str().unwrap(), "--ema"],
        "trained without --ema",
    );
}
