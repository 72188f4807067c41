//! The config operation ([`ConfigEdit`]): a change of the image config with Docker's rules
//! (ENTRYPOINT resets a CMD inherited from the base; shell-form commands are wrapped in the
//! config's current shell). It has no layer and runs nothing; its key is the edit itself.

use std::collections::{BTreeMap, BTreeSet};

use kiln_oci::image::{ContainerConfig, Healthcheck, ImageConfig};
use kiln_plan::{CommandLine, ConfigEdit, HealthCheck};

/// The shell Docker uses for shell-form instructions when no SHELL was given.
pub(crate) const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// What a stage's config edits remember between steps: whether the command in the config was
/// inherited from the base, which ENTRYPOINT resets (Docker's rule) but a CMD of the stage
/// itself survives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EditState {
    pub(crate) cmd_inherited: bool,
}

impl EditState {
    /// The state at the start of a stage whose base config is `config`.
    pub(crate) fn new(config: &ContainerConfig) -> EditState {
        EditState {
            cmd_inherited: config.cmd.is_some(),
        }
    }
}

/// The stage's current shell (SHELL instruction, else `/bin/sh -c`).
pub(crate) fn shell(config: &ContainerConfig) -> Vec<String> {
    match &config.shell {
        Some(shell) if !shell.is_empty() => shell.clone(),
        _ => DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
    }
}

/// A CMD/ENTRYPOINT/HEALTHCHECK command as an argument vector: exec form as is, shell form
/// wrapped in the current shell.
fn command_vector(config: &ContainerConfig, command: &CommandLine) -> Vec<String> {
    match command {
        CommandLine::Exec(argv) => argv.clone(),
        CommandLine::Shell(line) => {
            let mut argv = shell(config);
            argv.push(line.clone());
            argv
        }
    }
}

/// Applies `edit` to `image`.
pub(crate) fn edit(image: &mut ImageConfig, edit: &ConfigEdit, state: &mut EditState) {
    let config = &mut image.config;
    match edit {
        ConfigEdit::Env(pairs) => {
            for (key, value) in pairs {
                config.set_env_var(key, value);
            }
        }
        ConfigEdit::Labels(pairs) => {
            let labels = config.labels.get_or_insert_with(BTreeMap::new);
            for (key, value) in pairs {
                labels.insert(key.clone(), value.clone());
            }
        }
        ConfigEdit::ExposePorts(ports) => {
            let exposed = config.exposed_ports.get_or_insert_with(BTreeSet::new);
            exposed.extend(ports.iter().cloned());
        }
        ConfigEdit::Volumes(paths) => {
            let volumes = config.volumes.get_or_insert_with(BTreeSet::new);
            volumes.extend(paths.iter().cloned());
        }
        ConfigEdit::User(user) => config.user = Some(user.clone()),
        ConfigEdit::WorkingDir(dir) => config.working_dir = Some(dir.clone()),
        ConfigEdit::StopSignal(signal) => config.stop_signal = Some(signal.clone()),
        ConfigEdit::Shell(argv) => config.shell = Some(argv.clone()),
        ConfigEdit::Cmd(command) => {
            config.cmd = Some(command_vector(config, command));
            state.cmd_inherited = false;
        }
        ConfigEdit::Entrypoint(command) => {
            config.entrypoint = Some(command_vector(config, command));
            if state.cmd_inherited {
                config.cmd = None;
                state.cmd_inherited = false;
            }
        }
        ConfigEdit::Healthcheck(check) => config.healthcheck = Some(healthcheck(check)),
        ConfigEdit::OnBuild(trigger) => config
            .on_build
            .get_or_insert_with(Vec::new)
            .push(trigger.clone()),
        ConfigEdit::Author(name) => image.author = Some(name.clone()),
    }
}

fn healthcheck(check: &HealthCheck) -> Healthcheck {
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
pub(crate) fn env_pairs(config: &ContainerConfig) -> Vec<(String, String)> {
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

    fn image(cmd: Option<&str>) -> ImageConfig {
        let mut image = ImageConfig::new(&kiln_oci::Platform::host());
        image.config.cmd = cmd.map(|c| vec![c.to_owned()]);
        image
    }

    #[test]
    fn entrypoint_resets_only_an_inherited_cmd() {
        let mut config = image(Some("sh"));
        let mut state = EditState::new(&config.config);
        let entrypoint = |argv: &str| ConfigEdit::Entrypoint(CommandLine::Exec(vec![argv.into()]));
        edit(&mut config, &entrypoint("/app"), &mut state);
        assert_eq!(config.config.cmd, None);

        edit(
            &mut config,
            &ConfigEdit::Cmd(CommandLine::Shell("run".into())),
            &mut state,
        );
        edit(&mut config, &entrypoint("/other"), &mut state);
        assert_eq!(
            config.config.cmd,
            Some(vec!["/bin/sh".into(), "-c".into(), "run".into()])
        );
    }

    #[test]
    fn shell_form_uses_the_current_shell_and_env_keeps_order() {
        let mut config = image(None);
        let mut state = EditState::new(&config.config);
        let shell = ConfigEdit::Shell(vec!["/bin/bash".into(), "-lc".into()]);
        edit(&mut config, &shell, &mut state);
        let cmd = ConfigEdit::Cmd(CommandLine::Shell("echo hi".into()));
        edit(&mut config, &cmd, &mut state);
        assert_eq!(config.config.cmd.as_deref().unwrap()[0], "/bin/bash");
        let env = |pairs: &[(&str, &str)]| {
            ConfigEdit::Env(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        edit(&mut config, &env(&[("B", "1"), ("A", "2")]), &mut state);
        edit(&mut config, &env(&[("B", "3")]), &mut state);
        assert_eq!(
            env_pairs(&config.config),
            vec![("B".into(), "3".into()), ("A".into(), "2".into())]
        );
        edit(&mut config, &ConfigEdit::Author("me".into()), &mut state);
        assert_eq!(config.author.as_deref(), Some("me"));
    }
}
