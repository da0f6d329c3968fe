//! Registry credentials of a Commit's push: the operator reads the `kubernetes.io/dockerconfigjson`
//! Secrets named in `registryAuth.secrets` (in the Commit's namespace), picks the entry of the
//! image's registry and hands it to the node agent in the commit request. The agent holds no
//! Kubernetes credentials and reads no Secrets; the operator gets `get` on Secrets for this (the
//! chart says so), and the credentials travel only in that one request, never logged: their
//! `Debug` is redacted.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde::Deserialize;

/// The type of Secret a push can use.
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Its data key.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// HTTP basic credentials for one registry: the image crate's own, which pulls and pushes take
/// as they are (`Debug` hides the password).
pub use warren_image::pull::Credentials as RegistryCredentials;

/// The registry host (with port) an image reference pushes to, as `dockerconfigjson` keys name
/// it (`docker.io` for Docker Hub). `None` when it is not a reference.
pub fn registry_of(image: &str) -> Option<String> {
    let r = warren_image::pull::parse_reference(image).ok()?;
    Some(normalize(r.registry()))
}

/// A `dockerconfigjson` key or a registry as one host name: no scheme, no path, Docker Hub's
/// aliases as `docker.io`.
fn normalize(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// base64 of `username:password`.
    #[serde(default)]
    auth: Option<String>,
}

/// The credentials Secret `name` holds for `registry`; `Ok(None)` when it has no entry for it.
/// A Secret of another type, or one whose config does not parse, is an error naming it (never
/// its contents).
pub fn from_secret(
    name: &str,
    secret: &Secret,
    registry: &str,
) -> Result<Option<RegistryCredentials>, String> {
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != DOCKER_CONFIG_JSON {
        return Err(format!(
            "Secret {name} is of type {kind}, not {DOCKER_CONFIG_JSON} (create it with \
             `kubectl create secret docker-registry`)"
        ));
    }
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DOCKER_CONFIG_KEY))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(DOCKER_CONFIG_KEY))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| format!("Secret {name} has no {DOCKER_CONFIG_KEY} key"))?;
    let config: DockerConfig = serde_json::from_slice(&raw)
        .map_err(|e| format!("Secret {name}: {DOCKER_CONFIG_KEY} is not a Docker config: {e}"))?;
    let wanted = normalize(registry);
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| normalize(k) == wanted)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let (username, password) = match (&entry.username, &entry.password, &entry.auth) {
        (Some(u), Some(p), _) if !u.is_empty() => (u.clone(), p.clone()),
        (_, _, Some(a)) => {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    format!("Secret {name}: the auth of {wanted} is not base64 of user:password")
                })?;
            let (u, p) = decoded.split_once(':').ok_or_else(|| {
                format!("Secret {name}: the auth of {wanted} is not base64 of user:password")
            })?;
            (u.to_string(), p.to_string())
        }
        _ => {
            return Err(format!(
                "Secret {name}: the entry of {wanted} has neither username and password nor auth"
            ))
        }
    };
    Ok(Some(RegistryCredentials { username, password }))
}

/// The credentials for pushing `image`, from the first of `secrets` (in `api`'s namespace) that
/// has an entry for its registry. Every failure is a message for the Commit's condition: a
/// Secret that is missing or of the wrong type, or no Secret with an entry for the registry.
pub async fn credentials_for(
    api: &Api<Secret>,
    secrets: &[String],
    image: &str,
) -> Result<RegistryCredentials, String> {
    first_entry(api, secrets, "registryAuth.secrets", image)
        .await?
        .ok_or_else(|| {
            format!(
                "none of the Secrets {} has credentials for registry {}",
                secrets.join(", "),
                registry_of(image).unwrap_or_default()
            )
        })
}

/// The credentials for pulling `image`, from the first of `secrets` (in `api`'s namespace) that
/// has an entry for its registry; `Ok(None)` when none has one (an anonymous pull, as kubelet
/// does). A Secret that is missing or of the wrong type is an error naming it: it is a mistake
/// in the spec, which an anonymous pull would only hide behind the registry's refusal.
pub async fn pull_credentials(
    api: &Api<Secret>,
    secrets: &[String],
    image: &str,
) -> Result<Option<RegistryCredentials>, String> {
    if secrets.is_empty() {
        return Ok(None);
    }
    first_entry(api, secrets, "imagePullSecrets", image).await
}

/// The entry for `image`'s registry in the first of `secrets` that has one; `field` names where
/// the spec lists them, for the message of a missing Secret.
async fn first_entry(
    api: &Api<Secret>,
    secrets: &[String],
    field: &str,
    image: &str,
) -> Result<Option<RegistryCredentials>, String> {
    let registry = registry_of(image)
        .ok_or_else(|| format!("spec.image: {image:?} is not an image reference"))?;
    for name in secrets {
        let secret = api
            .get_opt(name)
            .await
            .map_err(|e| format!("reading Secret {name}: {e}"))?
            .ok_or_else(|| format!("Secret {name} ({field}) does not exist"))?;
        if let Some(c) = from_secret(name, &secret, &registry)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(kind: &str, config: &str) -> Secret {
        Secret {
            type_: Some(kind.into()),
            data: Some(BTreeMap::from([(
                DOCKER_CONFIG_KEY.to_string(),
                ByteString(config.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn the_entry_of_the_images_registry_is_picked() {
        assert_eq!(
            registry_of("127.0.0.1:5000/team/py:v2").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(registry_of("python:3.12").as_deref(), Some("docker.io"));
        let s = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"p"},
                "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldDpjb2xvbg=="}}}"#,
        );
        let c = from_secret("regcred", &s, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        // `auth` is base64 of user:password (the password may hold colons).
        let c = from_secret("regcred", &s, "docker.io").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("hub", "secret:colon")
        );
        assert_eq!(from_secret("regcred", &s, "ghcr.io").unwrap(), None);
    }

    #[test]
    fn wrong_secrets_are_named_and_their_contents_never_shown() {
        let e = from_secret("plain", &secret("Opaque", "{}"), "r").unwrap_err();
        assert!(e.contains("plain") && e.contains("Opaque"), "{e}");
        let e = from_secret(
            "bad",
            &secret(DOCKER_CONFIG_JSON, "hunter2 is not json"),
            "r",
        )
        .unwrap_err();
        assert!(e.contains("bad") && !e.contains("hunter2"), "{e}");
        let c = RegistryCredentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let req = crate::agent::CommitRequest {
            registry_credentials: Some(c),
            ..Default::default()
        };
        assert!(!format!("{req:?}").contains("hunter2"), "{req:?}");
    }

    #[test]
    fn credentials_travel_only_when_given() {
        let mut req = crate::agent::CommitRequest {
            commit_id: "c".into(),
            image: "127.0.0.1:5000/a:b".into(),
            push: true,
            ..Default::default()
        };
        let wire = serde_json::to_value(&req).unwrap();
        assert!(wire.get("registryCredentials").is_none(), "{wire}");
        req.registry_credentials = Some(RegistryCredentials {
            username: "u".into(),
            password: "p".into(),
        });
        let wire = serde_json::to_value(&req).unwrap();
        assert_eq!(
            wire["registryCredentials"],
            serde_json::json!({"username": "u", "password": "p"})
        );
        let back: crate::agent::CommitRequest = serde_json::from_value(wire).unwrap();
        assert_eq!(back, req);
    }
}
