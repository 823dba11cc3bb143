//! The step-comparison table of tools/gpu-runner.sh (its `--compare-table FILE` mode), fed with
//! JSON lines in the form `mlvpt bench-step --json` (serde, compact) and the peer's
//! tools/peer/step_bench.py (Python's `json.dumps`, `": "`) print: the figures, the ratios ours
//! over eager and over compile, and errors shown in place of a figure. The GPU run uses the
//! same function.
#![cfg(feature = "train")]

use std::io::Write;
use std::process::Command;

fn table(lines: &str) -> String {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(lines.as_bytes()).unwrap();
    let o = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/gpu-runner.sh"))
        .arg("--compare-table")
        .arg(f.path())
        .output()
        .expect("run bash");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn line_of<'a>(out: &'a str, start: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line {start:?} in\n{out}"))
}

#[test]
fn ratios_of_ours_to_both_peers() {
    let out = table(concat!(
        r#"{"impl":"mlvpt-cuda-f32+bf16","model":"vit-b16","batch":128,"images_per_s":1500.25,"ms_per_step":85.32,"tflops":118.7,"flops_per_step":10140000000000,"device":"cuda (H100)","flops":{"backbone_forward":1}}"#,
        "\n",
        "a log line that is not JSON\n",
        r#"{"impl": "torch-eager-bf16", "model": "vit_base_patch16_224", "batch": 128, "images_per_s": 1000.0, "ms_per_step": 128.0, "device": "H100", "torch": "2.9.0", "timm": "1.0.20"}"#,
        "\n",
        r#"{"impl": "torch-compile-bf16", "model": "vit_base_patch16_224", "batch": 128, "images_per_s": 1.2e3, "ms_per_step": 106.7, "device": "H100"}"#,
        "\n",
    ));
    assert!(line_of(&out, "mlvpt-cuda-f32+bf16").contains("1500.2"), "{out}");
    assert!(line_of(&out, "mlvpt-cuda-f32+bf16").contains("118.7"), "{out}");
    assert!(line_of(&out, "torch-compile-bf16").contains("1200.0"), "{out}");
    assert!(line_of(&out, "ours / torch eager").ends_with("1.50x"), "{out}");
    assert!(line_of(&out, "ours / torch.compile").ends_with("1.25x"), "{out}");
}

#[test]
fn errors_show_in_place_and_ratios_become_na() {
    let out = table(concat!(
        r#"{"impl": "mlvpt", "error": "TIMEOUT: no line"}"#,
        "\n",
        r#"{"impl": "torch-eager-bf16", "model": "vit_base_patch16_224", "batch": 128, "images_per_s": 900.0, "ms_per_step": 142.2}"#,
        "\n",
        r#"{"impl": "torch-compile-bf16", "model": "vit_base_patch16_224", "batch": 128, "images_per_s": null, "ms_per_step": null, "error": "inductor failed: \"triton\" missing"}"#,
        "\n",
    ));
    assert!(line_of(&out, "mlvpt").contains("error: TIMEOUT: no line"), "{out}");
    assert!(
        line_of(&out, "torch-compile-bf16").contains(r#"error: inductor failed: "triton" missing"#),
        "{out}"
    );
    assert!(line_of(&out, "ours / torch eager").ends_with("n/a"), "{out}");
    assert!(line_of(&out, "ours / torch.compile").ends_with("n/a"), "{out}");
}
