//! API keys and per-sandbox tokens.
//!
//! Keys live in the daemon's config file `<data_dir>/config.json`. At first start the daemon
//! writes one generated key (`warren_<32 hex>`) there, readable only by root, and `serve` prints it
//! once. A key given by the operator (`WARREN_API_KEY` / `--api-key`) replaces the file's keys: it
//! is then the only accepted key. Every key belongs to a team, and a team sees only its own
//! sandboxes.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKey {
    /// Stable name of the key (recorded with each sandbox it creates).
    pub id: String,
    pub team: String,
    pub key: String,
}

/// The daemon config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DaemonConfig {
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub team: String,
}

#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// Path of the daemon config file inside a data dir.
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("config.json")
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys { keys }
    }

    /// A single accepted key of the `default` team.
    pub fn single(key: impl Into<String>) -> Self {
        ApiKeys::new(vec![ApiKey {
            id: "default".into(),
            team: "default".into(),
            key: key.into(),
        }])
    }

    /// Loads the keys of `<data_dir>/config.json`, creating the file with a fresh key when it
    /// does not exist or holds no key. `override_key` (the operator's key) wins over the file.
    /// Returns the keys and the key that was just generated, if any, so the caller can show it once.
    pub fn load_or_init(
        data_dir: &Path,
        override_key: Option<&str>,
    ) -> Result<(ApiKeys, Option<String>), AuthError> {
        if let Some(k) = override_key {
            return Ok((ApiKeys::single(k), None));
        }
        let path = config_path(data_dir);
        let mut config = read_config(&path)?.unwrap_or_default();
        if !config.api_keys.is_empty() {
            return Ok((ApiKeys::new(config.api_keys), None));
        }
        let key = generate_api_key();
        config.api_keys.push(ApiKey {
            id: "default".into(),
            team: "default".into(),
            key: key.clone(),
        });
        write_config(&path, &config)?;
        Ok((ApiKeys::new(config.api_keys), Some(key)))
    }

    /// Finds the key's owner; `None` for a missing or unknown key.
    pub fn authenticate(&self, presented: &str) -> Option<Principal> {
        // Check every key in constant time so timing does not reveal a key prefix.
        let mut found = None;
        for k in &self.keys {
            if constant_time_eq(k.key.as_bytes(), presented.as_bytes()) {
                found = Some(Principal {
                    key_id: k.id.clone(),
                    team: k.team.clone(),
                });
            }
        }
        found
    }

    pub fn keys(&self) -> &[ApiKey] {
        &self.keys
    }
}

/// Reads a daemon config file; `Ok(None)` when it does not exist.
pub fn read_config(path: &Path) -> Result<Option<DaemonConfig>, AuthError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AuthError::Parse {
                path: path.into(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuthError::Io {
            op: "read",
            path: path.into(),
            source,
        }),
    }
}

fn write_config(path: &Path, config: &DaemonConfig) -> Result<(), AuthError> {
    let io = |op| {
        move |source| AuthError::Io {
            op,
            path: path.into(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create dir for"))?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(config).expect("plain data serializes");
    {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        // The file holds secrets: owner-only from the moment it exists.
        #[cfg(unix)]
        opts.mode(0o600);
        let mut f = opts.open(&tmp).map_err(io("create"))?;
        f.write_all(&body).map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
    }
    // Rename so a crash never leaves a half-written config.
    std::fs::rename(&tmp, path).map_err(io("rename into"))?;
    Ok(())
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// `warren_<32 hex>`.
pub fn generate_api_key() -> String {
    format!("warren_{}", random_hex(16))
}

/// A per-sandbox envd access token: 64 hex chars.
pub fn generate_access_token() -> String {
    random_hex(32)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_generates_and_persists_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, generated) = ApiKeys::load_or_init(dir.path(), None).unwrap();
        let key = generated.expect("a key is generated at first start");
        assert!(key.starts_with("warren_") && key.len() == 7 + 32);
        assert!(keys.authenticate(&key).is_some());

        // Second start: same key, nothing new to print.
        let (keys2, generated2) = ApiKeys::load_or_init(dir.path(), None).unwrap();
        assert_eq!(generated2, None);
        assert_eq!(keys2.authenticate(&key).unwrap().team, "default");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(config_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn override_key_is_the_only_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, generated) = ApiKeys::load_or_init(dir.path(), None).unwrap();
        let (keys, none) = ApiKeys::load_or_init(dir.path(), Some("mine")).unwrap();
        assert_eq!(none, None);
        assert!(keys.authenticate("mine").is_some());
        assert!(keys.authenticate(&generated.unwrap()).is_none());
        assert!(keys.authenticate("").is_none());
        assert!(keys.authenticate("min").is_none());
    }

    #[test]
    fn tokens_are_long_hex() {
        let t = generate_access_token();
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(t, generate_access_token());
    }
}
