//! Every path inside a build tree (a context, a stage rootfs, an image, a cache mount, an
//! archive being extracted) is opened through kiln-fs's `Root`, never by joining a name to the
//! tree's directory and handing the result to `std::fs`: the kernel would follow a symlink in
//! that name out of the tree, to the build host. This test reads the sources of the crates that
//! touch build trees and fails on any statement that does exactly that, so the bug cannot come
//! back unnoticed.
//!
//! A statement is flagged when it calls the host file system (`std::fs::…`, `File::open`,
//! `File::create`, `OpenOptions`) and joins a path to a value whose name says it is a tree
//! (`root`, `rootfs`, `context`, `stage`, `tree`, `image`, `layer`, `dest`), or calls a `Path`
//! method that reaches the file system (`is_dir`, `is_file`, `exists`, `metadata`,
//! `symlink_metadata`, `read_link`, `read_dir`, `canonicalize`) on such a joined path. Tests
//! (`#[cfg(test)]` modules) are not checked. A name bound to such a joined path (`let host =
//! from.root.join(&rel);`) counts as one wherever the same file hands it to the file system.

use std::path::{Path, PathBuf};

use regex::Regex;

/// The crates whose code reads or writes build trees.
const CHECKED: &[&str] = &[
    "crates/engine/src",
    "crates/context/src",
    "crates/sandbox/src",
    "crates/cache/src",
    "crates/fs/src",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without its `#[cfg(test)]` module (always the last item in this workspace).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// Splits code into statements (at `;`, `{` and `}`), dropping comments, so that a call and
/// its arguments spread over several lines are seen together.
fn statements(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start_line = 1;
    for (number, line) in code.lines().enumerate() {
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        if current.trim().is_empty() {
            start_line = number + 1;
        }
        for c in line.chars() {
            if matches!(c, ';' | '{' | '}') {
                if !current.trim().is_empty() {
                    out.push((start_line, std::mem::take(&mut current)));
                }
                current.clear();
                start_line = number + 1;
            } else {
                current.push(c);
            }
        }
        current.push(' ');
    }
    out
}

fn offenders(root: &Path) -> Vec<String> {
    let tree = r"(?i)\b[a-z_.()]*(root|rootfs|context|stage|tree|image|layer|dest)[a-z_]*(\(\))?";
    let fs_call =
        Regex::new(r"(std::)?fs::[a-z_]+\s*\(|File::(open|create)\s*\(|OpenOptions::new\(\)")
            .unwrap();
    let tree_join = Regex::new(&format!(r"{tree}\s*\.join\s*\(")).unwrap();
    let path_method = Regex::new(&format!(
        r"{tree}\s*\.join\s*\([^()]*(\([^()]*\))?[^()]*\)\s*\.(is_dir|is_file|exists|metadata|symlink_metadata|read_link|read_dir|canonicalize)\s*\("
    ))
    .unwrap();
    let mut files = Vec::new();
    for dir in CHECKED {
        rust_files(&root.join(dir), &mut files);
    }
    files.sort();
    let binding = Regex::new(&format!(
        r"let\s+(mut\s+)?([a-z_][a-z0-9_]*)\s*(:[^=]*)?=\s*&?{tree}\s*\.join\s*\("
    ))
    .unwrap();
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let statements = statements(without_tests(&text));
        // Names bound to a path joined to a tree, e.g. `let host = from.root.join(&rel);`,
        // count as tree paths wherever they are used in the same file.
        let names: Vec<String> = statements
            .iter()
            .filter_map(|(_, statement)| binding.captures(statement))
            .map(|captures| captures[2].to_owned())
            .collect();
        let uses_name = |statement: &str| {
            names.iter().any(|name| {
                Regex::new(&format!(
                    r"(fs::[a-z_]+|File::(open|create))\s*\(\s*&?{name}\b|\b{name}\s*\.(is_dir|is_file|exists|metadata|symlink_metadata|read_link|read_dir|canonicalize)\s*\(|\.open\s*\(\s*&?{name}\b"
                ))
                .unwrap()
                .is_match(statement)
            })
        };
        for (line, statement) in statements.iter() {
            let flagged = (fs_call.is_match(statement) && tree_join.is_match(statement))
                || path_method.is_match(statement)
                || uses_name(statement);
            if flagged {
                found.push(format!(
                    "{}:{line}: {}",
                    file.strip_prefix(root).unwrap_or(&file).display(),
                    statement.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
    }
    found
}

#[test]
fn no_host_file_system_call_on_a_path_joined_to_a_build_tree() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let found = offenders(&workspace);
    assert!(
        found.is_empty(),
        "std::fs on a path inside a build tree (use kiln_fs::resolve::Root):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_the_forms_it_is_for() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("crates/engine/src");
    std::fs::create_dir_all(&src).unwrap();
    for other in &CHECKED[1..] {
        std::fs::create_dir_all(dir.path().join(other)).unwrap();
    }
    std::fs::write(
        src.join("bad.rs"),
        "fn a(from: &Tree) {\n    let meta = std::fs::metadata(\n        &from.root.join(rel),\n    );\n}\n\
         fn b(rootfs: &Path) -> bool { rootfs.join(&rel).is_dir() }\n\
         fn c(stage_root: &Path) { let f = File::open(stage_root.join(x)); }\n\
         fn d(from: &Tree) { let host = from.root.join(&rel);\n let m = std::fs::symlink_metadata(&host); }\n\
         fn ok(work_dir: &Path) { std::fs::create_dir_all(work_dir.join(\"x\")); }\n\
         #[cfg(test)]\nmod tests { fn t(root: &Path) { std::fs::read(root.join(\"f\")); } }\n",
    )
    .unwrap();
    let found = offenders(dir.path());
    assert_eq!(found.len(), 4, "{found:#?}");
}
