//! Chroot mode on the busybox and Debian bases (needs root, as chroot mode does).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kiln_sandbox::{
    CancelToken, ChrootSandbox, Command, ExitStatus, MountKind, MountSpec, Network, OutputStream,
    Sandbox, SandboxError, Step, DEFAULT_PATH,
};

fn sandbox(root: &RootCopy) -> ChrootSandbox {
    ChrootSandbox::new(&root.path).unwrap()
}

#[test]
fn exit_codes_and_signals() {
    let root = busybox();
    let sb = sandbox(&root);
    assert_eq!(sh(&sb, "exit 0").code(), 0);
    assert_eq!(sh(&sb, "exit 1").code(), 1);
    assert_eq!(sh(&sb, "exit 42").code(), 42);
    let killed = sh(&sb, "kill -9 $$");
    assert_eq!(
        killed.result.as_ref().unwrap().status,
        ExitStatus::Signal(9)
    );
    assert_eq!(killed.code(), 137);
    assert_eq!(sh(&sb, "kill -TERM $$").code(), 128 + 15);
    assert!(sh(&sb, "true").result.unwrap().status.success());
}

#[test]
fn exec_form_searches_the_step_path() {
    let root = busybox();
    let sb = sandbox(&root);
    let ran = run(&sb, &Step::new(Command::exec(["echo", "exec", "form"])));
    assert_eq!(ran.ok_stdout(), vec!["exec form"]);
    let ran = run(&sb, &Step::new(Command::exec(["no-such-program"])));
    match ran.result {
        Err(SandboxError::Exec { program, source }) => {
            assert_eq!(program, "no-such-program");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected an exec error, got {other:?}"),
    }
    // A custom SHELL.
    let step = Step::new(Command::Shell {
        shell: vec!["/bin/ash".into(), "-e".into(), "-c".into()],
        script: "false; echo not reached".into(),
    });
    let ran = run(&sb, &step);
    assert_eq!(ran.code(), 1);
    assert!(ran.stdout().is_empty());
}

#[test]
fn user_switching() {
    let root = busybox();
    let sb = sandbox(&root);
    let ids = |user: &str| {
        let ran = run(
            &sb,
            &Step::new(Command::shell("id -u; id -g; id -G; echo $HOME")).user(user),
        );
        ran.ok_stdout().join("|")
    };
    assert_eq!(ids("kiln"), "1000|1000|1000 2000|/home/kiln");
    assert_eq!(ids("1000"), "1000|1000|1000 2000|/home/kiln");
    assert_eq!(ids("1000:2000"), "1000|2000|2000|/home/kiln");
    assert_eq!(ids("kiln:builders"), "1000|2000|2000|/home/kiln");
    assert_eq!(ids("kiln:daemon"), "1000|1|1|/home/kiln");
    assert_eq!(ids("4242"), "4242|0|0|/");
    assert_eq!(ids("root"), "0|0|0|/root");
    // The kernel's list of the step's groups holds the primary group too (as Docker, BuildKit
    // and buildah set it since CVE-2023-25173), which `id -G` would not show.
    let groups = |user: &str| {
        let ran = run(
            &sb,
            &Step::new(Command::shell("grep '^Groups:' /proc/self/status")).user(user),
        );
        ran.ok_stdout()
            .join(" ")
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(groups("kiln"), "1000 2000");
    assert_eq!(groups("kiln:daemon"), "1");
    assert_eq!(groups("1000:2000"), "2000");
    assert_eq!(groups("4242"), "0");

    let err = run(&sb, &Step::new(Command::shell("true")).user("nosuchuser"))
        .result
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SandboxError::UnknownUser { .. }), "{msg}");
    assert!(
        msg.contains("nosuchuser") && msg.contains("etc/passwd"),
        "{msg}"
    );
    let err = run(
        &sb,
        &Step::new(Command::shell("true")).user("kiln:nosuchgroup"),
    )
    .result
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nosuchgroup") && err.contains("etc/group"),
        "{err}"
    );
}

#[test]
fn env_and_workdir() {
    let root = busybox();
    let sb = sandbox(&root);
    let step = Step::new(Command::shell(
        "pwd; echo $FOO; echo $PATH; echo $HOME; touch file",
    ))
    .env("FOO", "bar baz")
    .user("kiln")
    .workdir("/work/sub");
    assert_eq!(
        run(&sb, &step).ok_stdout(),
        vec!["/work/sub", "bar baz", DEFAULT_PATH, "/home/kiln"]
    );
    use std::os::unix::fs::MetadataExt;
    for dir in ["work", "work/sub"] {
        let meta = std::fs::metadata(root.path.join(dir)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1000, 1000, 0o755),
            "{dir}"
        );
    }
    let file = std::fs::metadata(root.path.join("work/sub/file")).unwrap();
    assert_eq!((file.uid(), file.mode() & 0o777), (1000, 0o644));

    // The caller's PATH and HOME win; only the caller's variables plus those two are set.
    let step = Step::new(Command::shell("echo $PATH; echo $HOME; env | sort"))
        .env("PATH", "/bin")
        .env("HOME", "/tmp");
    let out = run(&sb, &step).ok_stdout();
    assert_eq!(out[0], "/bin");
    assert_eq!(out[1], "/tmp");
    let vars: Vec<&str> = out[2..]
        .iter()
        .map(|l| l.split('=').next().unwrap())
        .filter(|k| *k != "PWD" && *k != "SHLVL")
        .collect();
    assert_eq!(vars, vec!["HOME", "PATH"]);
}

#[test]
fn background_processes_are_killed() {
    let root = busybox();
    let sb = sandbox(&root);
    let start = Instant::now();
    // A plain background job that keeps stdout open, and a double-forked daemon in its own
    // session that does not.
    let ran = sh(
        &sb,
        "sleep 1001 & (setsid sh -c 'touch /tmp/up; exec sleep 1002' </dev/null >/dev/null 2>&1 &); \
         while [ ! -e /tmp/up ]; do sleep 0.05; done; echo started",
    );
    assert_eq!(ran.ok_stdout(), vec!["started"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(host_processes(&["sleep", "1001"]).is_empty());
    assert!(host_processes(&["sleep", "1002"]).is_empty());
}

#[test]
fn proc_shows_only_the_step() {
    let root = busybox();
    let sb = sandbox(&root);
    // `; true` keeps the shell from exec-ing ps itself.
    let out = sh(&sb, "ps -o pid,comm; true").ok_stdout();
    let procs: Vec<&str> = out[1..].iter().map(|l| l.trim()).collect();
    assert_eq!(procs.len(), 3, "{out:?}");
    assert_eq!(procs[0], "1 kiln-init");
    assert!(procs[1].ends_with(" sh"), "{out:?}");
    assert!(procs[2].ends_with(" ps"), "{out:?}");
}

#[test]
fn dev_sys_and_etc_files() {
    let root = busybox();
    let sb = sandbox(&root);
    let out = sh(
        &sb,
        "ls /dev; echo ---; cat /etc/hosts; echo ---; cat /etc/hostname; hostname; \
         echo x > /dev/null; head -c 4 /dev/zero | wc -c; head -c 4 /dev/urandom | wc -c; \
         ls /sys/kernel >/dev/null && echo sys-readable; touch /sys/x 2>/dev/null || echo sys-ro; \
         echo > /dev/shm/x && echo shm-ok; test -c /dev/pts/ptmx && echo pts-ok",
    )
    .ok_stdout();
    let sep: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, l)| *l == "---")
        .map(|(i, _)| i)
        .collect();
    let dev: Vec<&str> = out[..sep[0]].iter().map(String::as_str).collect();
    for name in [
        "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
        "urandom", "zero", "fd",
    ] {
        assert!(dev.contains(&name), "/dev lacks {name}: {dev:?}");
    }
    let hosts = &out[sep[0] + 1..sep[1]];
    assert!(hosts
        .iter()
        .any(|l| l.starts_with("127.0.0.1") && l.contains("localhost")));
    let rest = &out[sep[1] + 1..];
    assert_eq!(
        rest,
        &[
            "kiln-sandbox",
            "kiln-sandbox",
            "4",
            "4",
            "sys-readable",
            "sys-ro",
            "shm-ok",
            "pts-ok"
        ]
    );
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv = sh(&sb, "cat /etc/resolv.conf").ok_stdout().join("\n");
    assert_eq!(resolv.trim_end(), host_resolv.trim_end());
}

#[test]
fn nothing_is_left_in_the_rootfs_or_the_host_mount_table() {
    // The busybox base lacks /etc/hosts, /etc/resolv.conf and /etc/hostname, so their mount
    // targets are created for the step and must be gone after it with /etc's mtime restored.
    let root = busybox();
    assert!(!root.path.join("etc/hosts").exists());
    let before = listing(&root.path);
    let sb = sandbox(&root);
    let ran = sh(
        &sb,
        "cat /etc/hosts /etc/resolv.conf /etc/hostname >/dev/null; ls /proc /dev /sys >/dev/null; \
         echo > /etc/hosts; echo > /dev/shm/x; grep -c . /proc/self/mountinfo",
    );
    let mounts_inside: usize = ran.ok_stdout()[0].parse().unwrap();
    assert!(
        mounts_inside >= 10,
        "{mounts_inside} mounts inside the step"
    );
    let after = listing(&root.path);
    assert_eq!(before, after);
    assert!(host_mounts_under(&root.path).is_empty());
    let restored = ran.result.unwrap().restored_dirs;
    assert_eq!(restored, vec![Path::new("/etc").to_path_buf()]);
}

#[test]
fn output_is_streamed_line_by_line_in_order() {
    let root = busybox();
    let sb = sandbox(&root);
    let ran = sh(
        &sb,
        "i=1; while [ $i -le 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; printf tail",
    );
    let expect = |prefix: &str| {
        (1..=300)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
    };
    let mut out_expected = expect("out");
    out_expected.push("tail".into());
    assert_eq!(ran.ok_stdout(), out_expected);
    assert_eq!(ran.stderr(), expect("err"));

    // Lines reach the sink while the step is still running.
    let arrivals: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let log = arrivals.clone();
    let mut sink = move |_: OutputStream, line: &[u8]| {
        log.lock()
            .unwrap()
            .push((String::from_utf8_lossy(line).into_owned(), Instant::now()));
    };
    let status = sb
        .run(
            &Step::new(Command::shell("echo first; sleep 2; echo second")),
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap()
        .status;
    assert!(status.success());
    let arrivals = arrivals.lock().unwrap();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1].1 - arrivals[0].1;
    assert!(
        gap >= Duration::from_millis(1500),
        "first line came late: {gap:?}"
    );
}

#[test]
fn cancellation_kills_everything() {
    let root = busybox();
    let sb = sandbox(&root);
    let token = CancelToken::new();
    let canceller = {
        let token = token.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            token.cancel();
        })
    };
    let start = Instant::now();
    let mut sink = |_: OutputStream, _: &[u8]| {};
    let result = sb.run(
        &Step::new(Command::shell("sleep 1003 & echo running; sleep 1004")),
        &mut sink,
        &token,
    );
    canceller.join().unwrap();
    assert!(matches!(result, Err(SandboxError::Cancelled)), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(host_processes(&["sleep", "1003"]).is_empty());
    assert!(host_processes(&["sleep", "1004"]).is_empty());
    // A cancelled token does not start anything.
    let result = sb.run(&Step::new(Command::shell("exit 0")), &mut sink, &token);
    assert!(matches!(result, Err(SandboxError::Cancelled)));
    assert!(host_mounts_under(&root.path).is_empty());
}

#[test]
fn run_mounts_are_mounted_and_their_targets_removed() {
    let root = busybox();
    let before = listing(&root.path);
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("data.txt"), "from the host\n").unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "s3cr3t\n").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let step = Step::new(Command::shell(
        "cat /src/data.txt; touch /src/new 2>/dev/null || echo src-ro; \
         echo cached > /var/cache/kiln/entry; cat /run/secrets/token; \
         echo t > /scratch/x && echo tmpfs-ok",
    ))
    .mount(MountSpec {
        target: "/src".into(),
        kind: MountKind::Bind {
            source: host.path().to_path_buf(),
            readonly: true,
        },
    })
    .mount(MountSpec {
        target: "/var/cache/kiln".into(),
        kind: MountKind::Bind {
            source: cache.path().to_path_buf(),
            readonly: false,
        },
    })
    .mount(MountSpec {
        target: "/run/secrets/token".into(),
        kind: MountKind::Bind {
            source: secret,
            readonly: true,
        },
    })
    .mount(MountSpec {
        target: "/scratch".into(),
        kind: MountKind::Tmpfs {
            size: Some(1 << 20),
        },
    });
    let ran = run(&sandbox(&root), &step);
    assert_eq!(
        ran.ok_stdout(),
        vec!["from the host", "src-ro", "s3cr3t", "tmpfs-ok"]
    );
    assert_eq!(
        std::fs::read_to_string(cache.path().join("entry")).unwrap(),
        "cached\n"
    );
    assert_eq!(before, listing(&root.path));
    assert!(host_mounts_under(&root.path).is_empty());
}

#[test]
fn a_step_without_network_has_only_loopback_and_reaches_nothing_of_the_hosts() {
    let root = busybox();
    let sb = sandbox(&root);
    assert!(sb.isolates_network());
    // A server on the host's loopback that greets whoever connects, which a step on the
    // host's network reaches.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut connection in listener.incoming().flatten() {
            use std::io::Write;
            let _ = connection.write_all(b"reached\n");
        }
    });
    let script = format!(
        "cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort | tr '\\n' ' '; echo; \
         ip link show lo | grep -q '[<,]UP[,>]' && echo up || echo down; \
         nc -w 2 127.0.0.1 {port} </dev/null || echo unreachable"
    );
    let host = run(&sb, &Step::new(Command::shell(script.clone())));
    let host_lines = host.ok_stdout();
    assert_eq!(host_lines[2], "reached", "{host_lines:?}");
    assert_ne!(
        host_lines[0], "lo ",
        "the host has interfaces besides loopback"
    );

    let isolated = run(
        &sb,
        &Step::new(Command::shell(script)).network(Network::None),
    );
    let lines = isolated.ok_stdout();
    assert_eq!(lines[0], "lo ", "{lines:?}");
    // Loopback is up, so a step can still serve itself on 127.0.0.1.
    assert_eq!(lines[1], "up", "{lines:?}");
    assert_eq!(lines[2], "unreachable", "{lines:?}");
    let own_loopback = run(
        &sb,
        &Step::new(Command::shell(
            "nc -l -p 7777 -e echo served & sleep 0.2; nc 127.0.0.1 7777",
        ))
        .network(Network::None),
    );
    assert_eq!(own_loopback.ok_stdout(), vec!["served"]);
}

#[test]
fn symlinked_mount_targets_stay_inside_the_rootfs() {
    // An image whose /etc/hosts points at an absolute path must not get anything mounted on
    // the host's file of that name.
    let root = busybox();
    std::os::unix::fs::symlink("/tmp/hosts-elsewhere", root.path.join("etc/hosts")).unwrap();
    let ran = sh(&sandbox(&root), "cat /tmp/hosts-elsewhere");
    assert!(ran.ok_stdout().iter().any(|l| l.contains("localhost")));
    assert!(!root.path.join("tmp/hosts-elsewhere").exists());
    assert!(host_mounts_under(&root.path).is_empty());
}

#[test]
fn debian_base() {
    let root = debian();
    let before = listing(&root.path);
    let sb = sandbox(&root);
    assert_eq!(sh(&sb, "exit 42").code(), 42);
    assert_eq!(
        run(
            &sb,
            &Step::new(Command::shell("id -un; id -Gn; echo $HOME")).user("kiln")
        )
        .ok_stdout(),
        vec!["kiln", "kiln builders", "/home/kiln"]
    );
    assert_eq!(
        run(
            &sb,
            &Step::new(Command::exec(["id", "-u"])).user("1000:2000")
        )
        .ok_stdout(),
        vec!["1000"]
    );
    // glibc's own resolver reads the generated /etc/hosts; /proc shows only the step.
    let out = sh(
        &sb,
        "getent hosts localhost | head -n1; hostname; \
         ls /proc | grep -E '^[0-9]+$' | wc -l; readlink /proc/1/exe || cat /proc/1/comm",
    )
    .ok_stdout();
    assert!(out[0].contains("localhost"), "{out:?}");
    assert_eq!(out[1], "kiln-sandbox");
    // init, sh, ls, grep, wc (the pipeline runs concurrently) and readlink's subshell at most.
    let count: usize = out[2].trim().parse().unwrap();
    assert!((4..=7).contains(&count), "{out:?}");
    assert_eq!(sh(&sb, "sleep 1005 & echo bg").ok_stdout(), vec!["bg"]);
    assert!(host_processes(&["sleep", "1005"]).is_empty());
    assert_eq!(before, listing(&root.path));
    assert!(host_mounts_under(&root.path).is_empty());
}

#[test]
fn a_bare_rootfs_gets_its_mount_targets_and_loses_them_again() {
    // Only a static busybox: no /proc, /dev, /sys or /etc at all.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(
        kiln_testkit::bases::busybox_rootfs().join("bin/busybox"),
        root.join("bin/busybox"),
    )
    .unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let before = listing(&root);
    let sb = ChrootSandbox::new(&root).unwrap();
    let step = Step::new(Command::shell(
        "/bin/busybox ls /proc/self/ >/dev/null && /bin/busybox cat /etc/hostname",
    ));
    let ran = run(&sb, &step);
    assert_eq!(ran.ok_stdout(), vec!["kiln-sandbox"]);
    assert_eq!(before, listing(&root));
    assert_eq!(
        ran.result.unwrap().restored_dirs,
        vec![Path::new("/").to_path_buf()]
    );
    assert!(host_mounts_under(&root).is_empty());
}

#[test]
fn steps_get_dockers_default_capabilities() {
    let root = busybox();
    let script = "grep CapEff /proc/self/status; mkdir -p /mnt/t; mount -t tmpfs none /mnt/t 2>/dev/null && echo mounted || echo denied";
    let ran = sh(&sandbox(&root), script);
    assert_eq!(ran.ok_stdout(), vec!["CapEff:\t00000000a80425fb", "denied"]);
    let ran = sh(&sandbox(&root), "grep CapBnd /proc/self/status");
    assert_eq!(ran.ok_stdout(), vec!["CapBnd:\t00000000a80425fb"]);
    // A non-root user has none.
    let ran = run(
        &sandbox(&root),
        &Step::new(Command::shell("grep CapEff /proc/self/status")).user("kiln"),
    );
    assert_eq!(ran.ok_stdout(), vec!["CapEff:\t0000000000000000"]);
    let all = ChrootSandbox::new(&root.path)
        .unwrap()
        .with_all_capabilities();
    let ran = sh(&all, script);
    assert_eq!(ran.ok_stdout().last().map(String::as_str), Some("mounted"));
}
