//! Heredocs: parsing, line numbers, RUN programs and COPY/ADD files.

use kiln_dockerfile::{
    parse_ast, Dockerfile, FileSource, Instruction, Lines, PlanOptions, RunProgram, Step,
};

fn steps(source: &str) -> Vec<Step> {
    let dockerfile = Dockerfile::parse(source).unwrap_or_else(|e| panic!("{e}"));
    let plan = dockerfile
        .plan(&PlanOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let stage = plan.stages().last().expect("a stage");
    stage.steps(&[]).unwrap_or_else(|e| panic!("{e}")).steps
}

fn run_program(source: &str) -> RunProgram {
    match steps(source).into_iter().find_map(|s| match s.instruction {
        Instruction::Run(run) => Some(run.program),
        _ => None,
    }) {
        Some(p) => p,
        None => panic!("no RUN in {source}"),
    }
}

fn copy_sources(source: &str) -> Vec<FileSource> {
    for step in steps(source) {
        match step.instruction {
            Instruction::Copy(c) => return c.sources,
            Instruction::Add(a) => return a.sources,
            _ => {}
        }
    }
    panic!("no COPY/ADD in {source}")
}

#[test]
fn run_heredoc_body_is_the_shell_script() {
    let p = run_program("FROM alpine\nRUN <<EOF\napk add curl\necho done\nEOF\n");
    assert_eq!(p, RunProgram::Shell("apk add curl\necho done\n".into()));
}

#[test]
fn run_heredoc_with_shebang_becomes_a_script_file() {
    let p = run_program("FROM python\nRUN <<EOF\n#!/usr/bin/env python3\nprint('hi')\nEOF\n");
    assert_eq!(
        p,
        RunProgram::Script {
            name: "EOF".into(),
            content: "#!/usr/bin/env python3\nprint('hi')\n".into()
        }
    );
}

#[test]
fn run_heredoc_body_is_not_expanded() {
    let p = run_program("FROM alpine\nARG V=1\nRUN <<EOF\necho $V ${V}\nEOF\n");
    assert_eq!(p, RunProgram::Shell("echo $V ${V}\n".into()));
}

#[test]
fn chomp_strips_leading_tabs_and_allows_indented_terminator() {
    let p = run_program("FROM alpine\nRUN <<-EOF\n\t\techo a\n\techo b\n\tEOF\n");
    assert_eq!(p, RunProgram::Shell("echo a\necho b\n".into()));
}

#[test]
fn without_chomp_an_indented_terminator_is_body() {
    let err = Dockerfile::parse("FROM alpine\nRUN <<EOF\necho a\n\tEOF\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2: unterminated heredoc \"EOF\""
    );
}

#[test]
fn quoted_delimiters_disable_expansion() {
    for (marker, name) in [
        ("'EOF'", "EOF"),
        ("\"EOF\"", "EOF"),
        ("E\"O\"F", "EOF"),
        ("EOF", "EOF"),
    ] {
        let ast = parse_ast(&format!("FROM a\nCOPY <<{marker} /x\nbody\n{name}\n")).unwrap();
        let doc = &ast.nodes[1].heredocs[0];
        assert_eq!(doc.name, name, "marker {marker}");
        assert_eq!(doc.expand, marker == "EOF", "marker {marker}");
    }
}

#[test]
fn copy_heredoc_content_is_expanded_with_the_stage_scope() {
    let sources = copy_sources("FROM a\nARG NAME=kiln\nENV HOME=/root\nCOPY <<EOF /etc/motd\nhello $NAME in ${HOME}\nEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: "hello kiln in /root\n".into()
        }]
    );
}

#[test]
fn copy_heredoc_with_quoted_delimiter_keeps_variables() {
    let sources = copy_sources("FROM a\nARG NAME=kiln\nCOPY <<'EOF' /x\nhello $NAME\nEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: "hello $NAME\n".into()
        }]
    );
}

#[test]
fn copy_heredoc_keeps_quotes_and_honours_escaped_dollar() {
    let sources = copy_sources("FROM a\nARG V=x\nCOPY <<EOF /x\n\"$V\" '\\$V'\nEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: "\"x\" '$V'\n".into()
        }]
    );
}

#[test]
fn copy_chomped_heredoc() {
    let sources = copy_sources("FROM a\nCOPY <<-EOF /x\n\tline1\n\t\tline2\n\tEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: "line1\nline2\n".into()
        }]
    );
}

#[test]
fn several_heredocs_and_paths_in_one_copy() {
    let sources = copy_sources("FROM a\nCOPY <<A file.txt <<B /dst/\none\nA\ntwo\nB\n");
    assert_eq!(
        sources,
        vec![
            FileSource::Heredoc {
                name: "A".into(),
                content: "one\n".into()
            },
            FileSource::Path("file.txt".into()),
            FileSource::Heredoc {
                name: "B".into(),
                content: "two\n".into()
            },
        ]
    );
}

#[test]
fn add_accepts_heredocs_too() {
    let sources = copy_sources("FROM a\nADD <<EOF /x\nadded\nEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: "added\n".into()
        }]
    );
}

#[test]
fn several_heredocs_in_a_run_command_line_are_rebuilt_for_the_shell() {
    let p = run_program("FROM a\nRUN cat <<A > /a && cat <<'B' > /b\nfirst $X\nA\nsecond\nB\n");
    assert_eq!(
        p,
        RunProgram::Shell("cat <<A > /a && cat <<'B' > /b\nfirst $X\nA\nsecond\nB".into())
    );
}

#[test]
fn heredoc_as_program_input() {
    let p = run_program("FROM python\nRUN python3 <<EOF\nprint(1)\nEOF\n");
    assert_eq!(p, RunProgram::Shell("python3 <<EOF\nprint(1)\nEOF".into()));
}

#[test]
fn heredoc_destination_is_an_error() {
    let err = Dockerfile::parse("FROM a\nCOPY x <<EOF\nbody\nEOF\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2: COPY cannot accept a heredoc as a destination"
    );
}

#[test]
fn unterminated_heredoc_is_an_error_with_its_line() {
    let err = parse_ast("FROM a\n\nRUN <<EOF\necho\n").unwrap_err();
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("unterminated heredoc"), "{err}");
}

#[test]
fn heredoc_lines_and_following_instructions() {
    let ast =
        parse_ast("FROM a\nRUN <<EOF\n# not a comment\nFROM not-an-instruction\nEOF\nRUN true\n")
            .unwrap();
    assert_eq!(ast.nodes[1].lines, Lines { start: 2, end: 5 });
    assert_eq!(
        ast.nodes[1].heredocs[0].content,
        "# not a comment\nFROM not-an-instruction\n"
    );
    assert_eq!(ast.nodes[2].lines, Lines::single(6));
    assert_eq!(ast.nodes.len(), 3);
}

#[test]
fn file_descriptor_prefix() {
    let ast = parse_ast("FROM a\nRUN cat /dev/fd/3 3<<EOF\nx\nEOF\n").unwrap();
    assert_eq!(ast.nodes[1].heredocs[0].fd, 3);
}

#[test]
fn json_form_and_quoted_markers_are_not_heredocs() {
    let ast =
        parse_ast("FROM a\nRUN [\"cat\", \"<<EOF\"]\nRUN echo \"<<EOF\"\nRUN echo a<<EOF\nEOF\n")
            .unwrap();
    assert!(ast.nodes.iter().all(|n| n.heredocs.is_empty()));
    assert_eq!(
        ast.nodes.len(),
        5,
        "EOF on the last line is an (unknown) instruction"
    );
}

#[test]
fn onbuild_heredoc_is_consumed() {
    let ast = parse_ast("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\nRUN true\n").unwrap();
    assert_eq!(ast.nodes.len(), 3);
    assert_eq!(ast.nodes[1].heredocs[0].content, "echo hi\n");
    assert_eq!(ast.nodes[1].lines, Lines { start: 2, end: 4 });
}

#[test]
fn crlf_line_endings() {
    let ast = parse_ast("FROM a\r\nRUN <<EOF\r\necho hi\r\nEOF\r\nRUN true\r\n").unwrap();
    assert_eq!(ast.nodes.len(), 3);
    assert_eq!(ast.nodes[1].heredocs[0].content, "echo hi\r\n");
}

#[test]
fn empty_heredoc() {
    let sources = copy_sources("FROM a\nCOPY <<EOF /empty\nEOF\n");
    assert_eq!(
        sources,
        vec![FileSource::Heredoc {
            name: "EOF".into(),
            content: String::new()
        }]
    );
}

#[test]
fn heredoc_markers_are_not_dumped() {
    let ast = parse_ast("FROM a\nCOPY --chmod=644 <<EOF /x\nbody\nEOF\n").unwrap();
    assert_eq!(
        ast.dump(),
        "(from \"a\")\n(copy [\"--chmod=644\"] \"<<EOF\" \"/x\")\n"
    );
}
