//! kaniko's `--credential-helpers`: the credential providers consulted besides the docker
//! config. kaniko turns all of its built-in ones on by default; Kiln has the one that needs
//! nothing but the job's environment (GitLab CI's registry variables) and refuses, with the
//! way to do it instead, the ones that would need a cloud SDK inside the executor.

use kiln_registry::{Credential, Keychain, Secret};

use super::{Env, UsageError};

/// The user name GitLab's registry accepts with a job token.
const GITLAB_JOB_TOKEN_USER: &str = "gitlab-ci-token";

/// Which providers besides the docker config are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialProviders {
    /// GitLab CI: `$CI_REGISTRY` with `$CI_REGISTRY_USER`/`$CI_REGISTRY_PASSWORD`, or with the
    /// job token `$CI_JOB_TOKEN`.
    pub gitlab: bool,
}

impl Default for CredentialProviders {
    /// All the providers Kiln has, as kaniko enables all of its own when the flag is absent.
    fn default() -> Self {
        CredentialProviders { gitlab: true }
    }
}

impl CredentialProviders {
    /// The providers `--credential-helpers` selects: each value is one name or a
    /// comma-separated list; an empty value selects none besides the docker config (which is
    /// always consulted, as kaniko's `default` is). No value at all keeps the default.
    pub fn from_flag(values: &[String]) -> Result<Self, UsageError> {
        if values.is_empty() {
            return Ok(CredentialProviders::default());
        }
        let mut providers = CredentialProviders { gitlab: false };
        let names = values.iter().flat_map(|v| v.split(',')).map(str::trim);
        for name in names.filter(|n| !n.is_empty()) {
            match name {
                "default" => {}
                "gitlab" => providers.gitlab = true,
                "ecr" | "google" | "acr" => {
                    let helper = match name {
                        "ecr" => "ecr-login",
                        "google" => "gcr",
                        _ => "acr-env",
                    };
                    return Err(UsageError::new(format!(
                        "--credential-helpers: Kiln has no built-in `{name}` lookup (it would \
                         need that cloud's SDK in the executor); name its helper in config.json \
                         instead, e.g. \"credHelpers\": {{\"REGISTRY\": \"{helper}\"}}, with \
                         docker-credential-{helper} on PATH, or mount the registry's \
                         credentials as a docker-registry Secret"
                    )));
                }
                "env" => {
                    return Err(UsageError::new(
                        "--credential-helpers: Kiln has no `env` provider; put the credentials \
                         in config.json (a mounted docker-registry Secret) or give them to the \
                         registry's docker-credential helper",
                    ));
                }
                other => {
                    return Err(UsageError::new(format!(
                        "--credential-helpers: unknown provider `{other}` (kaniko's are \
                         default, env, google, ecr, acr and gitlab; Kiln has default and gitlab)"
                    )));
                }
            }
        }
        Ok(providers)
    }

    /// `keychain` with the credentials the enabled providers find in `env`. The docker config
    /// stays first: a registry it has credentials for keeps them.
    pub fn apply(&self, keychain: Keychain, env: &Env) -> Keychain {
        match self.gitlab.then(|| gitlab_credential(env)).flatten() {
            Some((registry, credential)) => keychain.with_fallback(&registry, credential),
            None => keychain,
        }
    }
}

/// The registry of a GitLab CI job and the job's credential for it.
fn gitlab_credential(env: &Env) -> Option<(String, Credential)> {
    let set = |name: &str| env.get(name).filter(|v| !v.is_empty());
    let registry = set("CI_REGISTRY")?;
    let (username, password) = match (set("CI_REGISTRY_USER"), set("CI_REGISTRY_PASSWORD")) {
        (Some(user), Some(password)) => (user.clone(), password.clone()),
        _ => (
            GITLAB_JOB_TOKEN_USER.to_string(),
            set("CI_JOB_TOKEN")?.clone(),
        ),
    };
    let credential = Credential::Basic {
        username,
        password: Secret::new(password),
    };
    Some((registry.clone(), credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(values: &[&str]) -> Result<CredentialProviders, UsageError> {
        CredentialProviders::from_flag(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn names_select_providers_and_cloud_lookups_are_refused_with_the_way_instead() {
        assert!(flag(&[]).unwrap().gitlab);
        assert!(!flag(&[""]).unwrap().gitlab);
        assert!(!flag(&["default"]).unwrap().gitlab);
        assert!(flag(&["default, gitlab"]).unwrap().gitlab);
        assert!(flag(&["default", "gitlab"]).unwrap().gitlab);
        let ecr = flag(&["gitlab,ecr"]).unwrap_err().to_string();
        assert!(ecr.contains("docker-credential-ecr-login"), "{ecr}");
        assert!(flag(&["env"]).unwrap_err().to_string().contains("env"));
        let unknown = flag(&["vault"]).unwrap_err().to_string();
        assert!(unknown.contains("`vault`"), "{unknown}");
    }

    #[test]
    fn gitlab_prefers_the_registry_user_and_falls_back_to_the_job_token() {
        let env = |pairs: &[(&str, &str)]| -> Env {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let user = |found: Option<(String, Credential)>| match found {
            Some((registry, Credential::Basic { username, .. })) => Some((registry, username)),
            _ => None,
        };
        assert_eq!(
            user(gitlab_credential(&env(&[("CI_JOB_TOKEN", "t")]))),
            None
        );
        let job = env(&[("CI_REGISTRY", "reg:5000"), ("CI_JOB_TOKEN", "t")]);
        assert_eq!(
            user(gitlab_credential(&job)),
            Some(("reg:5000".into(), GITLAB_JOB_TOKEN_USER.into()))
        );
        let mut both = job.clone();
        both.insert("CI_REGISTRY_USER".into(), "deployer".into());
        both.insert("CI_REGISTRY_PASSWORD".into(), "pw".into());
        assert_eq!(
            user(gitlab_credential(&both)),
            Some(("reg:5000".into(), "deployer".into()))
        );
    }
}
