//! The instructions that only change the image config (ENV, LABEL, EXPOSE, VOLUME, USER,
//! STOPSIGNAL, HEALTHCHECK, SHELL, CMD, ENTRYPOINT, MAINTAINER, ONBUILD), with Docker's rules.
//! WORKDIR also changes the config but may create a directory, so the stage handles it.

use std::collections::{BTreeMap, BTreeSet};

use kiln_dockerfile::{CommandLine, HealthCheck, Instruction, Protocol};
use kiln_oci::image::{ContainerConfig, Healthcheck};

/// The shell Docker uses for shell-form instructions when no SHELL was given.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// The stage's current shell (SHELL instruction, else `/bin/sh -c`).
pub fn shell(config: &ContainerConfig) -> Vec<String> {
    match &config.shell {
        Some(shell) if !shell.is_empty() => shell.clone(),
        _ => DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
    }
}

/// A CMD/ENTRYPOINT/HEALTHCHECK command as an argument vector: exec form as is, shell form
/// wrapped in the current shell.
pub fn command_vector(config: &ContainerConfig, command: &CommandLine) -> Vec<String> {
    match command {
        CommandLine::Exec(argv) => argv.clone(),
        CommandLine::Shell(line) => {
            let mut argv = shell(config);
            argv.push(line.clone());
            argv
        }
    }
}

/// Applies a config-only instruction. Returns `false` for instructions this module does not
/// handle (RUN, COPY, ADD, WORKDIR, ARG), which the caller dispatches elsewhere.
///
/// `cmd_inherited` tracks Docker's rule that ENTRYPOINT resets a CMD inherited from the base
/// image (but not one set earlier in the same stage).
pub fn apply(
    config: &mut ContainerConfig,
    instruction: &Instruction,
    cmd_inherited: &mut bool,
) -> bool {
    match instruction {
        Instruction::Env(pairs) => {
            for pair in pairs {
                config.set_env_var(&pair.key, &pair.value);
            }
        }
        Instruction::Label(pairs) => {
            let labels = config.labels.get_or_insert_with(BTreeMap::new);
            for pair in pairs {
                labels.insert(pair.key.clone(), pair.value.clone());
            }
        }
        Instruction::Expose(ports) => {
            let exposed = config.exposed_ports.get_or_insert_with(BTreeSet::new);
            for port in ports {
                let protocol = match port.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Sctp => "sctp",
                };
                for number in port.start..=port.end {
                    exposed.insert(format!("{number}/{protocol}"));
                }
            }
        }
        Instruction::Volume(paths) => {
            let volumes = config.volumes.get_or_insert_with(BTreeSet::new);
            for path in paths {
                volumes.insert(path.clone());
            }
        }
        Instruction::User(user) => config.user = Some(user.clone()),
        Instruction::StopSignal(signal) => config.stop_signal = Some(signal.clone()),
        Instruction::Shell(argv) => config.shell = Some(argv.clone()),
        Instruction::Cmd(command) => {
            config.cmd = Some(command_vector(config, command));
            *cmd_inherited = false;
        }
        Instruction::Entrypoint(command) => {
            config.entrypoint = Some(command_vector(config, command));
            if *cmd_inherited {
                config.cmd = None;
                *cmd_inherited = false;
            }
        }
        Instruction::Healthcheck(check) => config.healthcheck = Some(healthcheck(config, check)),
        Instruction::Onbuild(trigger) => config
            .on_build
            .get_or_insert_with(Vec::new)
            .push(trigger.clone()),
        // MAINTAINER sets the image author, which lives outside ContainerConfig; the stage
        // handles it.
        _ => return false,
    }
    true
}

fn healthcheck(config: &ContainerConfig, check: &HealthCheck) -> Healthcheck {
    match check {
        HealthCheck::Disable => Healthcheck {
            test: Some(vec!["NONE".to_owned()]),
            ..Healthcheck::default()
        },
        HealthCheck::Check {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => {
            let test = match test {
                CommandLine::Exec(argv) => {
                    let mut v = vec!["CMD".to_owned()];
                    v.extend(argv.iter().cloned());
                    v
                }
                CommandLine::Shell(line) => vec!["CMD-SHELL".to_owned(), line.clone()],
            };
            let nanos = |d: &Option<std::time::Duration>| {
                d.filter(|d| !d.is_zero()).map(|d| d.as_nanos() as i64)
            };
            let _ = config;
            Healthcheck {
                test: Some(test),
                interval: nanos(interval),
                timeout: nanos(timeout),
                start_period: nanos(start_period),
                start_interval: nanos(start_interval),
                retries: retries.filter(|r| *r != 0).map(i64::from),
            }
        }
    }
}

/// `KEY=VALUE` strings of an image config's Env as pairs, in order.
pub fn env_pairs(config: &ContainerConfig) -> Vec<(String, String)> {
    config
        .env
        .iter()
        .flatten()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.clone(), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_dockerfile::KeyValue;

    #[test]
    fn entrypoint_resets_only_an_inherited_cmd() {
        let mut config = ContainerConfig {
            cmd: Some(vec!["sh".into()]),
            ..ContainerConfig::default()
        };
        let mut inherited = true;
        apply(
            &mut config,
            &Instruction::Entrypoint(CommandLine::Exec(vec!["/app".into()])),
            &mut inherited,
        );
        assert_eq!(config.cmd, None);

        apply(
            &mut config,
            &Instruction::Cmd(CommandLine::Shell("run".into())),
            &mut inherited,
        );
        apply(
            &mut config,
            &Instruction::Entrypoint(CommandLine::Exec(vec!["/other".into()])),
            &mut inherited,
        );
        assert_eq!(
            config.cmd,
            Some(vec!["/bin/sh".into(), "-c".into(), "run".into()])
        );
    }

    #[test]
    fn shell_form_uses_the_current_shell_and_env_keeps_order() {
        let mut config = ContainerConfig::default();
        let mut inherited = false;
        apply(
            &mut config,
            &Instruction::Shell(vec!["/bin/bash".into(), "-lc".into()]),
            &mut inherited,
        );
        apply(
            &mut config,
            &Instruction::Cmd(CommandLine::Shell("echo hi".into())),
            &mut inherited,
        );
        assert_eq!(config.cmd.as_deref().unwrap()[0], "/bin/bash");
        let env = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        apply(
            &mut config,
            &Instruction::Env(vec![env("B", "1"), env("A", "2")]),
            &mut inherited,
        );
        apply(
            &mut config,
            &Instruction::Env(vec![env("B", "3")]),
            &mut inherited,
        );
        assert_eq!(
            env_pairs(&config),
            vec![("B".into(), "3".into()), ("A".into(), "2".into())]
        );
    }
}
