//! `mlvpt group`: split the labels into correlative and discriminative groups
//! (docs/MODEL.md#label-grouping).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Args};
use serde_json::json;

use mlvpt::grouping::input::{self, LabelStats};
use mlvpt::grouping::{self, adjusted_rand_index, graph, plot, GroupingConfig, Partition};

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["labels", "cooccurrence"])))]
pub struct GroupArgs {
    /// Training labels: a 0/1 CSV matrix (one row per image, optional header of class names),
    /// or with --classes one line per image listing its class names (comma or space separated).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Class names, one per line: makes --labels a per-image label-list file.
    #[arg(long, value_name = "FILE", requires = "labels")]
    classes: Option<PathBuf>,
    /// Co-occurrence counts: JSON {"classes": [...], "counts": [...], "cooccurrence": [[...]]}.
    #[arg(long, value_name = "FILE")]
    cooccurrence: Option<PathBuf>,
    /// T, the number of groups per graph.
    #[arg(long, short = 'T')]
    groups: usize,
    /// tau for both graphs (the root applied to the conditional co-occurrence).
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    tau: f64,
    /// tau+ for the correlative graph (overrides --tau).
    #[arg(long, allow_negative_numbers = true)]
    tau_co: Option<f64>,
    /// tau- for the discriminative graph (overrides --tau).
    #[arg(long, allow_negative_numbers = true)]
    tau_dis: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// k-means restarts (the lowest inertia wins).
    #[arg(long, default_value_t = 200)]
    restarts: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Write both affinity matrices, ordered by group, as a PNG heatmap.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Compare with a reference grouping {"T": {"correlative": [[names]], "discriminative": [[names]]}}
    /// and print the adjusted Rand index per graph.
    #[arg(long, value_name = "FILE")]
    against: Option<PathBuf>,
}

fn read_input(args: &GroupArgs) -> anyhow::Result<(LabelStats, &Path)> {
    if let Some(path) = &args.cooccurrence {
        return Ok((input::read_cooccurrence_json(path)?, path));
    }
    let path = args.labels.as_deref().ok_or_else(|| anyhow!("give --labels or --cooccurrence"))?;
    let stats = match &args.classes {
        Some(classes_path) => {
            let classes = input::read_classes(classes_path)?;
            let co = input::read_label_lists(path, &classes)?;
            LabelStats { classes, co }
        }
        None => input::read_label_matrix(path)?,
    };
    Ok((stats, path))
}

fn names(classes: &[String], p: &Partition) -> Vec<Vec<String>> {
    p.groups.iter().map(|g| g.iter().map(|&i| classes[i].clone()).collect()).collect()
}

pub fn run(args: &GroupArgs) -> anyhow::Result<()> {
    let cfg = GroupingConfig {
        groups: args.groups,
        tau_co: args.tau_co.unwrap_or(args.tau),
        tau_dis: args.tau_dis.unwrap_or(args.tau),
        seed: args.seed,
        restarts: args.restarts,
    };
    // Settings errors before a possibly large file is read.
    cfg.validate(usize::MAX)?;
    let (LabelStats { classes, co }, path) = read_input(args)?;
    let in_file = |e: grouping::GroupingError| anyhow!("{}: {e}", path.display());
    cfg.validate(co.k).map_err(in_file)?;
    let unused = co.unused_labels();
    if !unused.is_empty() && unused.len() < co.k {
        let list: Vec<&str> = unused.iter().map(|&i| classes[i].as_str()).collect();
        eprintln!(
            "warning: {}: {} label(s) occur in no image and go to the smallest group: {}",
            path.display(),
            unused.len(),
            list.join(", ")
        );
    }
    let (corr, disc) = grouping::both(&co, &cfg);
    let (corr, disc) = (corr.map_err(in_file)?, disc.map_err(in_file)?);

    let ari = match &args.against {
        Some(reference) => {
            let r = input::read_reference_groups(reference, &classes, cfg.groups)?;
            let score = |ours: &Partition, theirs: Option<Vec<usize>>| theirs.map(|t| adjusted_rand_index(&ours.label_to_group(co.k), &t));
            Some((reference.clone(), score(&corr, r.correlative), score(&disc, r.discriminative)))
        }
        None => None,
    };

    if let Some(png) = &args.plot {
        let plus = graph::correlative_affinity(&co, cfg.tau_co);
        let minus = graph::discriminative_affinity(&co, cfg.tau_dis);
        let panels = [
            plot::Panel {
                title: format!("correlative M+ (tau {}), T = {}", cfg.tau_co, cfg.groups),
                affinity: &plus,
                partition: &corr,
            },
            plot::Panel {
                title: format!("discriminative M- (tau {}), T = {}", cfg.tau_dis, cfg.groups),
                affinity: &minus,
                partition: &disc,
            },
        ];
        plot::write_png(png, &panels, &classes).map_err(|e| anyhow!(e))?;
    }

    if args.json {
        let mut out = json!({
            "classes": classes,
            "groups": cfg.groups,
            "tau_co": cfg.tau_co,
            "tau_dis": cfg.tau_dis,
            "correlative": {"groups": names(&classes, &corr), "eigenvalues": corr.eigenvalues},
            "discriminative": {"groups": names(&classes, &disc), "eigenvalues": disc.eigenvalues},
        });
        if let Some((_, c, d)) = &ari {
            out["adjusted_rand_index"] = json!({"correlative": c, "discriminative": d});
        }
        println!("{}", serde_json::to_string(&out).context("serializing the result")?);
        return Ok(());
    }

    println!(
        "{} labels, T = {} groups per graph, tau+ = {}, tau- = {}, seed {}, {} restarts",
        co.k, cfg.groups, cfg.tau_co, cfg.tau_dis, cfg.seed, cfg.restarts
    );
    for (title, p) in [
        ("Correlative groups (M+)", &corr),
        ("Discriminative groups (M- = 11^T - M+)", &disc),
    ] {
        println!("\n{title}");
        for (g, members) in names(&classes, p).iter().enumerate() {
            println!("  {:>3}  ({:>3} labels)  {}", g + 1, members.len(), members.join(", "));
        }
        let ev: Vec<String> = p.eigenvalues.iter().map(|v| format!("{v:.5}")).collect();
        println!("  smallest eigenvalues of L_sym: {}", ev.join("  "));
    }
    if let Some((reference, c, d)) = &ari {
        let show = |v: &Option<f64>| v.map_or("(not in file)".to_string(), |v| format!("{v:.4}"));
        println!(
            "\nAdjusted Rand index against {} (T = {}): correlative {}, discriminative {}",
            reference.display(),
            cfg.groups,
            show(c),
            show(d)
        );
    }
    if let Some(png) = &args.plot {
        println!("\nPlot written to {}", png.display());
    }
    Ok(())
}
