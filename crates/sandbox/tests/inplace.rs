//! In-place mode, tested where it is meant to run: inside a container (runc, with Docker's
//! default capabilities as a Pod gets them), through the `inplace_probe` example, which
//! `cargo test` builds alongside the tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use common::*;
use kiln_testkit::hostile::DOCKER_DEFAULT_CAPS;

/// The probe binary, next to this test binary's directory.
fn probe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let probe = dir.join("examples/inplace_probe");
    assert!(
        probe.is_file(),
        "{} is missing: run `cargo test -p kiln-sandbox` (which builds examples) or \
         `cargo build -p kiln-sandbox --example inplace_probe` first",
        probe.display()
    );
    probe
}

/// Shared libraries `binary` needs, from `ldd`.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = kiln_testkit::run(Process::new("ldd").arg(binary));
    out.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// Runs the probe with `args` as pid 1 of a runc container whose rootfs is a copy of the
/// busybox base; returns the probe's stdout lines and the rootfs copy.
fn in_container(args: &[&str]) -> (Vec<String>, RootCopy) {
    in_container_with_caps(args, &[])
}

/// [`in_container`] with capabilities added to Docker's default set.
fn in_container_with_caps(args: &[&str], extra_caps: &[&str]) -> (Vec<String>, RootCopy) {
    kiln_testkit::require_tools(&["runc", "ldd"]);
    let root = busybox();
    let probe = probe();
    std::fs::copy(&probe, root.path.join("probe")).unwrap();
    for lib in shared_libraries(&probe) {
        let dest = root.path.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &dest).unwrap();
    }
    let bundle = root.path.parent().unwrap().to_path_buf();
    kiln_testkit::run(Process::new("runc").args(["spec", "--bundle"]).arg(&bundle));
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["root"]["path"] = "rootfs".into();
    config["root"]["readonly"] = false.into();
    let process = &mut config["process"];
    process["terminal"] = false.into();
    let mut argv = vec!["/probe".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    process["args"] = argv.into();
    let mut caps = DOCKER_DEFAULT_CAPS.to_vec();
    caps.extend_from_slice(extra_caps);
    let caps: serde_json::Value = caps.into();
    for set in ["bounding", "effective", "permitted"] {
        process["capabilities"][set] = caps.clone();
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let state = tempfile::tempdir().unwrap();
    let id = format!(
        "kiln-sandbox-{}-{}",
        std::process::id(),
        bundle.file_name().unwrap().to_string_lossy()
    );
    let out = Process::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc run failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (lines, root)
}

fn stdout_of(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("out:"))
        .collect()
}

fn last(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

#[test]
fn exit_codes() {
    for (script, expected) in [
        ("exit 0", "status:0"),
        ("exit 1", "status:1"),
        ("exit 42", "status:42"),
        ("kill -9 $$", "status:137"),
    ] {
        let (lines, _root) = in_container(&[script]);
        assert_eq!(last(&lines), expected, "{script}: {lines:?}");
    }
}

#[test]
fn user_switching_and_workdir() {
    // The last line is the kernel's list of the step's groups, which holds the primary group
    // too (CVE-2023-25173), as `id -G` would not show.
    let script = "id -u; id -g; id -G; echo $HOME; pwd; awk '/^Groups:/ { $1 = $1; print }' /proc/self/status";
    let (lines, root) = in_container(&["--user", "kiln", "--workdir", "/w/x", script]);
    assert_eq!(
        stdout_of(&lines),
        vec![
            "1000",
            "1000",
            "1000 2000",
            "/home/kiln",
            "/w/x",
            "Groups: 1000 2000"
        ],
        "{lines:?}"
    );
    assert_eq!(last(&lines), "status:0");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root.path.join("w/x")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));

    let (lines, _root) = in_container(&["--user", "1000:2000", "id -u; id -G"]);
    assert_eq!(stdout_of(&lines), vec!["1000", "2000"], "{lines:?}");

    let (lines, _root) = in_container(&["--user", "nosuchuser", "true"]);
    let err = last(&lines);
    assert!(
        err.starts_with("error:") && err.contains("nosuchuser") && err.contains("/etc/passwd"),
        "{lines:?}"
    );
}

#[test]
fn background_processes_are_killed() {
    let (lines, _root) = in_container(&[
        "--expect-gone",
        "sleep 1011",
        "--expect-gone",
        "sleep 1012",
        // The daemon says when it is out of the step's session, so the test does not depend on
        // winning a race against the process group kill.
        "sleep 1011 & (setsid sh -c 'touch /tmp/up; exec sleep 1012' </dev/null >/dev/null 2>&1 &); \
         while [ ! -e /tmp/up ]; do sleep 0.05; done; echo started",
    ]);
    assert_eq!(stdout_of(&lines), vec!["started"], "{lines:?}");
    assert_eq!(last(&lines), "status:0", "{lines:?}");
}

#[test]
fn cancellation() {
    let (lines, _root) = in_container(&[
        "--cancel-after-ms",
        "500",
        "--expect-gone",
        "sleep 1013",
        "--expect-gone",
        "sleep 1014",
        "(setsid sh -c 'touch /tmp/up; exec sleep 1013' </dev/null >/dev/null 2>&1 &); \
         while [ ! -e /tmp/up ]; do sleep 0.05; done; echo running; sleep 1014",
    ]);
    assert_eq!(stdout_of(&lines), vec!["running"], "{lines:?}");
    assert_eq!(last(&lines), "cancelled", "{lines:?}");
}

#[test]
fn run_mounts_need_cap_sys_admin_and_leave_nothing() {
    let script = "echo data > /cache/x && cat /cache/x && grep -c ' /cache ' /proc/self/mountinfo";
    let (lines, root) = in_container(&["--tmpfs", "/cache", script]);
    let err = last(&lines);
    assert!(
        err.starts_with("error:") && err.contains("CAP_SYS_ADMIN"),
        "{lines:?}"
    );
    assert!(!root.path.join("cache").exists());

    let (lines, root) = in_container_with_caps(&["--tmpfs", "/cache", script], &["CAP_SYS_ADMIN"]);
    assert_eq!(stdout_of(&lines), vec!["data", "1"], "{lines:?}");
    assert_eq!(last(&lines), "status:0");
    assert!(!root.path.join("cache").exists());
}

#[test]
fn no_network_needs_cap_sys_admin_and_leaves_only_loopback() {
    // /proc/net and `ip` show the step's own network namespace (the container's /sys does not).
    let script = "cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '; \
                  ip link show lo | grep -q '[<,]UP[,>]' && echo up || echo down";
    let (lines, _root) = in_container(&["--no-network", script]);
    assert_eq!(lines[0], "isolates:false", "{lines:?}");
    let err = last(&lines);
    assert!(
        err.starts_with("error:") && err.contains("CAP_SYS_ADMIN"),
        "{lines:?}"
    );

    // Loopback comes up only with CAP_NET_ADMIN as well.
    for (caps, flags) in [
        (&["CAP_SYS_ADMIN"][..], "down"),
        (&["CAP_SYS_ADMIN", "CAP_NET_ADMIN"][..], "up"),
    ] {
        let (lines, _root) = in_container_with_caps(&["--no-network", script], caps);
        assert_eq!(lines[0], "isolates:true", "{lines:?}");
        assert_eq!(stdout_of(&lines), vec!["lo", flags], "{lines:?}");
        assert_eq!(last(&lines), "status:0");
    }
}
