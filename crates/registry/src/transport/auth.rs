//! Authentication: the credential for an endpoint, the `Authorization` header its last
//! challenge asks for, and the Bearer token cache with one fetch per scope at a time. Kept
//! apart from the request and retry machinery because it is the only part that handles secrets
//! and token lifetimes.

use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use url::Url;

use super::dates::parse_rfc3339;
use super::{read_limited, status_error, Ctx, Endpoint, Inner, ERROR_BODY_LIMIT};
use crate::challenge::Challenge;
use crate::credentials::Credential;
use crate::error::{Error, Operation};
use crate::secret::Secret;

/// A token cache key: API host and the space-joined scopes.
pub(super) type TokenKey = (String, String);

/// A Bearer token and when to stop using it.
pub(super) struct CachedToken {
    value: Secret,
    expires: Instant,
}

impl Inner {
    async fn credential(&self, ep: &Endpoint) -> Result<Option<Credential>, Error> {
        ep.credential
            .get_or_try_init(|| self.options.keychain.credential_for(&ep.registry))
            .await
            .cloned()
    }

    /// The `Authorization` header for a request needing `scopes`, per the last challenge.
    pub(super) async fn authorization(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        scopes: &[String],
    ) -> Result<Option<HeaderValue>, Error> {
        let challenge = ep
            .challenge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic { .. }) => match self.credential(ep).await? {
                Some(Credential::Basic { username, password }) => {
                    Ok(Some(basic_header(&username, &password)))
                }
                _ => Ok(None),
            },
            Some(Challenge::Bearer { realm, service, .. }) => {
                let credential = self.credential(ep).await?;
                if let Some(Credential::RegistryToken(token)) = &credential {
                    return Ok(Some(bearer_header(token)));
                }
                let key = (ep.host.clone(), scopes.join(" "));
                if let Some(header) = self.cached_token(&key) {
                    return Ok(Some(header));
                }
                // One fetch per scope at a time: parallel layer pushes share the first token
                // instead of each asking the token server.
                let fetch_lock = self
                    .token_fetches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let _fetching = fetch_lock.lock().await;
                if let Some(header) = self.cached_token(&key) {
                    return Ok(Some(header));
                }
                let token = self
                    .fetch_token(
                        ep,
                        ctx,
                        &realm,
                        service.as_deref(),
                        scopes,
                        credential.as_ref(),
                    )
                    .await?;
                let header = bearer_header(&token.value);
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, token);
                Ok(Some(header))
            }
        }
    }

    fn cached_token(&self, key: &TokenKey) -> Option<HeaderValue> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|t| t.expires > self.clock.now())
            .map(|t| bearer_header(&t.value))
    }

    pub(super) fn forget_token(&self, ep: &Endpoint, scopes: &[String]) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ep.host.clone(), scopes.join(" ")));
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        credential: Option<&Credential>,
    ) -> Result<CachedToken, Error> {
        let ctx = Ctx {
            target: ctx.target,
            operation: Operation::Token,
        };
        let realm_url = Url::parse(realm).map_err(|e| {
            Error::invalid(ctx.target, ctx.operation, format!("realm {realm:?}: {e}"))
        })?;
        let requested_at = self.clock.system_now();
        let resp = match credential {
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form: Vec<(&str, String)> = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", token.expose().to_owned()),
                    ("client_id", "kiln".to_owned()),
                ];
                if let Some(service) = service {
                    form.push(("service", service.to_owned()));
                }
                if !scopes.is_empty() {
                    form.push(("scope", scopes.join(" ")));
                }
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                self.retrying(ctx, self.options.retries, || {
                    Some(
                        ep.http
                            .post(realm_url.clone())
                            .header(
                                reqwest::header::CONTENT_TYPE,
                                "application/x-www-form-urlencoded",
                            )
                            .body(body.clone()),
                    )
                })
                .await?
            }
            _ => {
                let mut url = realm_url.clone();
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for scope in scopes {
                        query.append_pair("scope", scope);
                    }
                }
                let basic = match credential {
                    Some(Credential::Basic { username, password }) => {
                        Some(basic_header(username, password))
                    }
                    _ => None,
                };
                self.retrying(ctx, self.options.retries, || {
                    let request = ep.http.get(url.clone());
                    Some(match &basic {
                        Some(value) => request.header(AUTHORIZATION, value.clone()),
                        None => request,
                    })
                })
                .await?
            }
        };
        if !resp.status().is_success() {
            return Err(status_error(resp, ctx).await);
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
            #[serde(default)]
            issued_at: Option<String>,
        }
        let body = read_limited(resp, ERROR_BODY_LIMIT, ctx).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            Error::invalid(
                ctx.target,
                ctx.operation,
                format!("token answer is not JSON ({:?} error)", e.classify()),
            )
        })?;
        let value = answer
            .access_token
            .filter(|t| !t.is_empty())
            .or(answer.token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                Error::invalid(ctx.target, ctx.operation, "the answer holds no token")
            })?;
        // The spec's minimum lifetime is 60 s when the server does not say.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).max(1));
        let issued = answer
            .issued_at
            .as_deref()
            .and_then(parse_rfc3339)
            .filter(|t| *t <= self.clock.system_now() + Duration::from_secs(300))
            .unwrap_or(requested_at);
        let valid_until = issued + lifetime;
        let remaining = valid_until
            .duration_since(self.clock.system_now())
            .unwrap_or(Duration::ZERO);
        // Renew a little early so a token does not expire between the check and its use.
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        Ok(CachedToken {
            value: Secret::new(value),
            expires: self.clock.now() + remaining.saturating_sub(margin),
        })
    }
}

fn basic_header(username: &str, password: &Secret) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{username}:{}", password.expose()));
    sensitive(format!("Basic {encoded}"))
}

fn bearer_header(token: &Secret) -> HeaderValue {
    sensitive(format!("Bearer {}", token.expose()))
}

/// Header values marked sensitive are left out of reqwest's and hyper's debug output.
fn sensitive(value: String) -> HeaderValue {
    let mut header =
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Invalid"));
    header.set_sensitive(true);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_headers_are_sensitive() {
        let h = basic_header("user", &Secret::new("pw"));
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().unwrap(), "Basic dXNlcjpwdw==");
        assert!(!format!("{h:?}").contains("dXNlcjpwdw"));
    }
}
