//! The envd messages in their proto3 JSON form.
//!
//! Decoding is lenient the way protobuf's `from_json(ignore_unknown_fields=True)`
//! is: camelCase or snake_case keys, `null` for absent, enums by name or number,
//! integers as numbers or strings, unknown fields ignored. Encoding is canonical:
//! camelCase, defaults omitted, int64 as string, bytes as standard base64.

use std::collections::BTreeMap;

use base64::Engine;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

fn integer_from_value<T, E>(value: serde_json::Value) -> Result<T, E>
where
    T: TryFrom<i64> + TryFrom<u64>,
    E: serde::de::Error,
{
    let out_of_range = || E::custom("integer out of range");
    match value {
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                T::try_from(u).map_err(|_| out_of_range())
            } else if let Some(i) = n.as_i64() {
                T::try_from(i).map_err(|_| out_of_range())
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 => {
                        T::try_from(f as i64).map_err(|_| out_of_range())
                    }
                    _ => Err(E::custom("expected an integer")),
                }
            }
        }
        serde_json::Value::String(s) => {
            let s = s.trim();
            if let Ok(u) = s.parse::<u64>() {
                T::try_from(u).map_err(|_| out_of_range())
            } else if let Ok(i) = s.parse::<i64>() {
                T::try_from(i).map_err(|_| out_of_range())
            } else {
                Err(E::custom(format!("invalid integer string {s:?}")))
            }
        }
        other => Err(E::custom(format!("expected an integer, got {other}"))),
    }
}

/// An optional integer that may be a JSON number or a decimal string.
pub fn flex_u32<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u32>, D::Error> {
    match Option::<serde_json::Value>::deserialize(de)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => integer_from_value(value).map(Some),
    }
}

/// Optional `bytes` in base64; accepts the standard and URL-safe alphabets,
/// padded or not, as protobuf JSON parsers do.
pub fn flex_bytes<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Vec<u8>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(de)? else {
        return Ok(None);
    };
    let trimmed = text.trim_end_matches('=');
    let decoded = if trimmed.contains(['-', '_']) {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed)
    } else {
        base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed)
    };
    decoded.map(Some).map_err(D::Error::custom)
}

pub fn encode_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProcessConfig {
    pub cmd: Option<String>,
    pub args: Option<Vec<String>>,
    pub envs: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct PtySize {
    #[serde(deserialize_with = "flex_u32")]
    pub cols: Option<u32>,
    #[serde(deserialize_with = "flex_u32")]
    pub rows: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pty {
    pub size: Option<PtySize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    pub process: Option<ProcessConfig>,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    pub stdin: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProcessSelector {
    #[serde(deserialize_with = "flex_u32")]
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SelectorRequest {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Unspecified,
    Term,
    Kill,
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        match Option::<serde_json::Value>::deserialize(de)? {
            None | Some(serde_json::Value::Null) => Ok(Signal::Unspecified),
            Some(serde_json::Value::String(name)) => match name.as_str() {
                "SIGNAL_UNSPECIFIED" => Ok(Signal::Unspecified),
                "SIGNAL_SIGTERM" => Ok(Signal::Term),
                "SIGNAL_SIGKILL" => Ok(Signal::Kill),
                other => Err(D::Error::custom(format!("unknown signal {other:?}"))),
            },
            Some(value) => match integer_from_value::<i64, D::Error>(value)? {
                0 => Ok(Signal::Unspecified),
                15 => Ok(Signal::Term),
                9 => Ok(Signal::Kill),
                other => Err(D::Error::custom(format!("unknown signal number {other}"))),
            },
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    pub process: Option<ProcessSelector>,
    pub signal: Option<Signal>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProcessInput {
    #[serde(deserialize_with = "flex_bytes")]
    pub stdin: Option<Vec<u8>>,
    #[serde(deserialize_with = "flex_bytes")]
    pub pty: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    pub process: Option<ProcessSelector>,
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    pub process: Option<ProcessSelector>,
    pub pty: Option<Pty>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputData {
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputRequest {
    pub start: Option<SelectorRequest>,
    pub data: Option<StreamInputData>,
    pub keepalive: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    pub path: Option<String>,
    #[serde(deserialize_with = "flex_u32")]
    pub depth: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    pub source: Option<String>,
    pub destination: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchRequest {
    pub path: Option<String>,
    pub recursive: Option<bool>,
    #[serde(alias = "include_entry")]
    pub include_entry: Option<bool>,
    #[serde(alias = "allow_network_mounts")]
    pub allow_network_mounts: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatcherIdRequest {
    #[serde(alias = "watcher_id")]
    pub watcher_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FileType {
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

fn i64_as_string<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub path: String,
    #[serde(skip_serializing_if = "is_zero_i64", serialize_with = "i64_as_string")]
    pub size: i64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    #[serde(skip_serializing_if = "is_false")]
    pub is_symlink: bool,
    /// User metadata (`user.e2b.*` extended attributes).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_lenient_json() {
        let req: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"12"},"signal":9,"extra":1}"#).unwrap();
        assert_eq!(req.process.unwrap().pid, Some(12));
        assert_eq!(req.signal, Some(Signal::Kill));

        let req: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":3},"signal":"SIGNAL_SIGTERM"}"#).unwrap();
        assert_eq!(req.signal, Some(Signal::Term));

        let req: WatcherIdRequest = serde_json::from_str(r#"{"watcher_id":"w1"}"#).unwrap();
        assert_eq!(req.watcher_id.as_deref(), Some("w1"));
        let req: WatcherIdRequest = serde_json::from_str(r#"{"watcherId":"w2"}"#).unwrap();
        assert_eq!(req.watcher_id.as_deref(), Some("w2"));

        let req: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"stdin":"aGVsbG8K"}}"#).unwrap();
        assert_eq!(req.input.unwrap().stdin.unwrap(), b"hello\n");

        let req: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":null,"cwd":null},"stdin":false,"pty":null}"#,
        )
        .unwrap();
        assert_eq!(req.process.unwrap().cmd.as_deref(), Some("/bin/bash"));
    }

    #[test]
    fn encodes_canonical_entry() {
        let entry = EntryInfo {
            name: "a".into(),
            file_type: FileType::File,
            path: "/a".into(),
            size: 12,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "root".into(),
            group: "root".into(),
            modified_time: "2024-01-02T03:04:05Z".into(),
            symlink_target: None,
            is_symlink: false,
            metadata: Default::default(),
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["size"], "12");
        assert_eq!(json["mode"], 420);
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert_eq!(json["modifiedTime"], "2024-01-02T03:04:05Z");
        assert!(json.get("symlinkTarget").is_none());
        assert!(json.get("isSymlink").is_none());
    }
}
