//! Runs one shell-form step with the in-place sandbox and prints what happened; the in-place
//! tests start it inside a runc container, as Kiln would run in a Pod.
//!
//! Usage: `inplace_probe [--user U] [--workdir DIR] [--env K=V]... [--cancel-after-ms N]
//! [--expect-gone "ARG ARG"]... [--tmpfs DIR]... [--no-network] SCRIPT`
//!
//! With `--no-network`, first prints `isolates:BOOL` (whether the sandbox can give the step a
//! network of its own). Prints `out:LINE` / `err:LINE` per output line, then `status:CODE`,
//! `cancelled` or `error:MESSAGE`, then `leftover:PID CMDLINE` for every process still alive
//! whose command line is one of the `--expect-gone` ones.

use std::time::Duration;

use kiln_sandbox::{
    CancelToken, Command, InPlaceSandbox, MountKind, MountSpec, Network, OutputStream, Sandbox,
    SandboxError, Step,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut step = Step::new(Command::shell(""));
    let mut cancel_after = None;
    let mut expect_gone: Vec<String> = Vec::new();
    let mut script = None;
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("option needs a value");
        match arg.as_str() {
            "--user" => step.user = Some(value()),
            "--workdir" => step.workdir = value().into(),
            "--env" => {
                let kv = value();
                let (k, v) = kv.split_once('=').expect("--env K=V");
                step.env.push((k.into(), v.into()));
            }
            "--cancel-after-ms" => {
                cancel_after = Some(Duration::from_millis(value().parse().expect("a number")))
            }
            "--expect-gone" => expect_gone.push(value()),
            "--tmpfs" => step.mounts.push(MountSpec {
                target: value().into(),
                kind: MountKind::Tmpfs { size: None },
            }),
            "--no-network" => {
                println!("isolates:{}", InPlaceSandbox::new().isolates_network());
                step.network = Network::None;
            }
            _ => script = Some(arg),
        }
    }
    step.command = Command::shell(script.expect("a script"));

    let token = CancelToken::new();
    if let Some(delay) = cancel_after {
        let token = token.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            token.cancel();
        });
    }
    let mut sink = |stream: OutputStream, line: &[u8]| {
        let tag = match stream {
            OutputStream::Stdout => "out",
            OutputStream::Stderr => "err",
        };
        println!("{tag}:{}", String::from_utf8_lossy(line));
    };
    match InPlaceSandbox::new().run(&step, &mut sink, &token) {
        Ok(outcome) => println!("status:{}", outcome.status.code()),
        Err(SandboxError::Cancelled) => println!("cancelled"),
        Err(e) => println!("error:{e}"),
    }
    for pid in alive_with_cmdline(&expect_gone) {
        println!("leftover:{pid}");
    }
}

fn alive_with_cmdline(cmdlines: &[String]) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{name}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .replace('\0', " ");
        if cmdlines.contains(&cmdline) {
            found.push(format!("{name} {cmdline}"));
        }
    }
    found
}
