//! How `executor cache prune` reports what it did: one line per item removed (or, in a dry
//! run, to be removed), refused, kept in use or failed, then a summary line per cache. Kept
//! apart from `main.rs` so the wording is tested without a registry.

use std::path::Path;
use std::time::Duration;

use kiln_cache::{PruneReport, PrunedKind};
use kiln_fs::trees::{LayerTrees, TreePruneReport};

use crate::render::{human_size, redact_credentials};

/// The report as lines for standard output: items first, the summary last.
pub fn report_lines(report: &PruneReport) -> Vec<String> {
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut lines = Vec::new();
    for item in &report.removed {
        let what = match item.kind {
            // A base image's name is its digest: say it once.
            PrunedKind::BaseImage => format!("{} {}", item.kind, item.name),
            _ => format!("{} {} ({})", item.kind, item.name, item.digest),
        };
        lines.push(format!("{verb} {what}, {} old", go_duration(item.age)));
    }
    for refused in &report.refused {
        lines.push(format!(
            "refused: {} {} stays: {} answered {} with {}",
            refused.item.kind,
            refused.item.name,
            refused.registry,
            refused.request,
            refused.message
        ));
    }
    for failure in &report.failed {
        lines.push(redact_credentials(&format!(
            "failed: {}: {}",
            failure.what, failure.error
        )));
    }
    lines.push(summary(report));
    lines
}

/// `LOCATION: removed N (a step entries, b stage records), ...`.
fn summary(report: &PruneReport) -> String {
    let count = |kind: PrunedKind| report.removed.iter().filter(|i| i.kind == kind).count();
    let kinds: Vec<String> = [
        (PrunedKind::StepEntry, "step entry", "step entries"),
        (PrunedKind::StageRecord, "stage record", "stage records"),
        (PrunedKind::BaseImage, "base image", "base images"),
    ]
    .into_iter()
    .filter_map(|(kind, one, many)| match count(kind) {
        0 => None,
        1 => Some(format!("1 {one}")),
        n => Some(format!("{n} {many}")),
    })
    .collect();
    let mut text = format!(
        "{}{}: {} {}",
        if report.dry_run {
            "dry run, nothing changed: "
        } else {
            ""
        },
        report.location,
        if report.dry_run {
            "would remove"
        } else {
            "removed"
        },
        report.removed.len()
    );
    if !kinds.is_empty() {
        text.push_str(&format!(" ({})", kinds.join(", ")));
    }
    text.push_str(&format!(", kept {}", report.kept));
    if report.other > 0 {
        text.push_str(&format!(
            ", left {} other tag{} alone",
            report.other,
            if report.other == 1 { "" } else { "s" }
        ));
    }
    text.push_str(&format!(
        ", refused {}, failed {}",
        report.refused.len(),
        report.failed.len()
    ));
    match report.bytes_freed {
        Some(bytes) => text.push_str(&format!(
            "; {} blob{} ({}) {}",
            report.blobs_removed,
            if report.blobs_removed == 1 { "" } else { "s" },
            human_size(bytes),
            if report.dry_run {
                "would be freed"
            } else {
                "freed"
            }
        )),
        None if !report.removed.is_empty() => {
            text.push_str("; the registry's garbage collection frees their blobs")
        }
        None => {}
    }
    text
}

/// Prunes the layer trees of the Kiln dir `kiln_dir` (`kiln_dir/layers`); the error names the
/// directory. A Kiln dir that does not exist is an error (a mistyped path must not look like
/// an empty store); one with no trees yet is pruned of nothing.
pub fn prune_layer_trees(
    kiln_dir: &Path,
    older_than: Duration,
    dry_run: bool,
) -> Result<TreePruneReport, String> {
    if !kiln_dir.is_dir() {
        return Err(format!(
            "--kiln-dir {}: no such directory",
            kiln_dir.display()
        ));
    }
    LayerTrees::open(kiln_dir.join("layers"))
        .and_then(|trees| trees.prune(older_than, dry_run))
        .map_err(|e| {
            format!(
                "pruning the layer trees of --kiln-dir {}: {e}",
                kiln_dir.display()
            )
        })
}

/// The layer tree report as lines for standard output: one per tree removed (or removable),
/// kept because a build holds it, or failed, then the summary.
pub fn tree_report_lines(report: &TreePruneReport) -> Vec<String> {
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut lines = Vec::new();
    for tree in &report.removed {
        lines.push(format!(
            "{verb} layer tree {} ({}), unused for {}",
            tree.diff_id,
            human_size(tree.bytes),
            go_duration(tree.unused_for)
        ));
    }
    for tree in &report.in_use {
        lines.push(format!(
            "in use: layer tree {} stays (a running build holds it), last taken {} ago",
            tree.diff_id,
            go_duration(tree.unused_for)
        ));
    }
    for failure in &report.failed {
        lines.push(format!("failed: {failure}"));
    }
    let freed: u64 = report.removed.iter().map(|t| t.bytes).sum();
    let trees = |n: usize| format!("{n} layer tree{}", if n == 1 { "" } else { "s" });
    let mut summary = format!(
        "{}{}: {} {} ({}), kept {} in use and {} used more recently",
        if report.dry_run {
            "dry run, nothing changed: "
        } else {
            ""
        },
        report.dir.display(),
        verb,
        trees(report.removed.len()),
        human_size(freed),
        report.in_use.len(),
        report.kept,
    );
    if report.leftovers > 0 {
        summary.push_str(&format!(
            ", {verb} {} left half-made or half-deleted",
            report.leftovers
        ));
    }
    summary.push_str(&format!(", failed {}", report.failed.len()));
    lines.push(summary);
    lines
}

/// A duration as Go prints one (`240h0m5s`), the form `--older-than` takes, in whole seconds.
pub fn go_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match (seconds / 3600, seconds % 3600 / 60, seconds % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}
