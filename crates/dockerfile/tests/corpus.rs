//! Conformance against BuildKit's own test vectors, read from the shared corpus (never copied
//! into the project). Each test collects every failing case and names them all.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_dockerfile::{parse_ast, Lexer, Lines};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/buildkit-dockerfile")
}

fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read corpus directory {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn name(dir: &Path) -> String {
    dir.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn parser_testfiles_dump_identically() {
    let dirs = case_dirs(&corpus().join("parser/testfiles"));
    assert!(
        dirs.len() >= 30,
        "corpus looks incomplete: {} cases",
        dirs.len()
    );
    let mut failures = Vec::new();
    for dir in &dirs {
        let source = read(&dir.join("Dockerfile"));
        let expected = read(&dir.join("result"));
        match parse_ast(&source) {
            Ok(ast) if ast.dump() == expected => {}
            Ok(ast) => failures.push(format!(
                "{}: dump differs\n--- expected\n{expected}--- got\n{}",
                name(dir),
                ast.dump()
            )),
            Err(e) => failures.push(format!("{}: parse failed: {e}", name(dir))),
        }
    }
    println!(
        "parser testfiles: {}/{} pass",
        dirs.len() - failures.len(),
        dirs.len()
    );
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn parser_negative_testfiles_fail() {
    let dirs = case_dirs(&corpus().join("parser/testfiles-negative"));
    assert!(!dirs.is_empty());
    let mut failures = Vec::new();
    for dir in &dirs {
        let source = read(&dir.join("Dockerfile"));
        if let Ok(ast) = parse_ast(&source) {
            failures.push(format!(
                "{}: parsed but must fail:\n{}",
                name(dir),
                ast.dump()
            ));
        }
    }
    println!(
        "negative testfiles: {}/{} pass",
        dirs.len() - failures.len(),
        dirs.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn testfile_line_ranges() {
    let source = read(&corpus().join("parser/testfile-line/Dockerfile"));
    let ast = parse_ast(&source).expect("testfile-line parses");
    let ranges: Vec<(usize, usize)> = ast
        .nodes
        .iter()
        .map(|n| (n.lines.start, n.lines.end))
        .collect();
    assert_eq!(ranges, vec![(5, 5), (11, 12), (17, 31)]);
    assert_eq!(ast.lines(), Lines { start: 5, end: 31 });
}

#[test]
fn env_var_test_a_and_u_lines() {
    let text = read(&corpus().join("shell/envVarTest"));
    let env: Vec<(String, String)> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let lexer = Lexer::new('\\');
    let (mut total, mut failures) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields.len(),
            3,
            "envVarTest:{}: malformed line {line:?}",
            n + 1
        );
        let (platform, input, expected) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
        if platform != "A" && platform != "U" {
            continue;
        }
        total += 1;
        let got = lexer.expand(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(v), e) => v == e,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "envVarTest:{}: {input:?} expected {expected:?}, got {got:?}",
                n + 1
            ));
        }
    }
    println!(
        "envVarTest A/U lines: {}/{total} pass",
        total - failures.len()
    );
    assert!(total > 200, "only {total} cases found");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn words_test_lines() {
    let text = read(&corpus().join("shell/wordsTest"));
    let lexer = Lexer::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();
    let (mut total, mut failures) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(assignment) = line.strip_prefix("ENV ") {
            let (k, v) = assignment
                .trim_start()
                .split_once('=')
                .unwrap_or_else(|| panic!("wordsTest:{}: bad ENV line", n + 1));
            env.push((k.to_string(), v.to_string()));
            continue;
        }
        let (input, expected) = line
            .split_once('|')
            .unwrap_or_else(|| panic!("wordsTest:{}: malformed line {line:?}", n + 1));
        let input = input.trim();
        let expected = expected.trim_start_matches(' ');
        total += 1;
        let got = lexer.split(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(words), e) => words.join(",") == e && words.len() == e.split(',').count(),
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "wordsTest:{}: {input:?} expected {expected:?}, got {got:?}",
                n + 1
            ));
        }
    }
    println!("wordsTest lines: {}/{total} pass", total - failures.len());
    assert!(total >= 20, "only {total} cases found");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
