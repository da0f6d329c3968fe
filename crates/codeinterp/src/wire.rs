//! The Jupyter messaging protocol (v5.3) wire format: multipart ZeroMQ messages signed with
//! HMAC-SHA256 over the header, parent header, metadata and content frames.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

pub const PROTOCOL_VERSION: &str = "5.3";
const DELIMITER: &[u8] = b"<IDS|MSG>";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message has no <IDS|MSG> delimiter")]
    NoDelimiter,
    #[error("message has {0} frames after the delimiter, expected at least 5")]
    TooFewFrames(usize),
    #[error("message signature does not match")]
    BadSignature,
    #[error("invalid JSON in the {frame} frame: {source}")]
    Json {
        frame: &'static str,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub msg_id: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub date: String,
    pub msg_type: String,
    #[serde(default)]
    pub version: String,
}

/// One Jupyter message (identities and buffers are not used by this server).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub header: Header,
    /// The header of the request this message answers; `Null` or `{}` when none.
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
}

impl Message {
    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    /// `msg_id` of the request this message belongs to.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent_header.get("msg_id").and_then(Value::as_str)
    }
}

/// A client session: the signing key and the session id put in every header.
#[derive(Clone)]
pub struct Session {
    key: Vec<u8>,
    id: String,
}

pub fn random_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Session {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Session {
            key: key.into(),
            id: random_id(),
        }
    }

    /// A new request of `msg_type` from this session.
    pub fn request(&self, msg_type: &str, content: Value) -> Message {
        Message {
            header: Header {
                msg_id: random_id(),
                session: self.id.clone(),
                username: "warren".into(),
                date: now_iso(),
                msg_type: msg_type.into(),
                version: PROTOCOL_VERSION.into(),
            },
            parent_header: Value::Object(Default::default()),
            metadata: Value::Object(Default::default()),
            content,
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    /// The frames of `msg` as a DEALER sends them: delimiter, signature, four JSON parts.
    pub fn encode(&self, msg: &Message) -> Vec<Bytes> {
        let parts = [
            serde_json::to_vec(&msg.header).unwrap_or_default(),
            serde_json::to_vec(&msg.parent_header).unwrap_or_default(),
            serde_json::to_vec(&msg.metadata).unwrap_or_default(),
            serde_json::to_vec(&msg.content).unwrap_or_default(),
        ];
        let signature = if self.key.is_empty() {
            String::new()
        } else {
            let mut mac = self.mac();
            for p in &parts {
                mac.update(p);
            }
            hex(&mac.finalize().into_bytes())
        };
        let mut frames = vec![Bytes::from_static(DELIMITER), Bytes::from(signature)];
        frames.extend(parts.into_iter().map(Bytes::from));
        frames
    }

    /// Parses the frames of a received message (any identities or topic before the delimiter
    /// are skipped) and checks its signature.
    pub fn decode(&self, frames: &[Bytes]) -> Result<Message, WireError> {
        let at = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(WireError::NoDelimiter)?;
        let rest = &frames[at + 1..];
        if rest.len() < 5 {
            return Err(WireError::TooFewFrames(rest.len()));
        }
        if !self.key.is_empty() {
            let mut mac = self.mac();
            for p in &rest[1..5] {
                mac.update(p);
            }
            let given = unhex(&rest[0]).ok_or(WireError::BadSignature)?;
            // verify_slice compares in constant time.
            mac.verify_slice(&given)
                .map_err(|_| WireError::BadSignature)?;
        }
        let json = |frame: &'static str, b: &Bytes| -> Result<Value, WireError> {
            serde_json::from_slice(b).map_err(|source| WireError::Json { frame, source })
        };
        let header: Header =
            serde_json::from_slice(&rest[1]).map_err(|source| WireError::Json {
                frame: "header",
                source,
            })?;
        Ok(Message {
            header,
            parent_header: json("parent_header", &rest[2])?,
            metadata: json("metadata", &rest[3])?,
            content: json("content", &rest[4])?,
        })
    }
}

pub fn now_iso() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|c| {
            let s = std::str::from_utf8(c).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_signature() {
        let s = Session::new("secret");
        let msg = s.request("execute_request", json!({"code": "1+1"}));
        let mut frames = s.encode(&msg);
        // A topic frame before the delimiter (as on iopub) is skipped.
        frames.insert(0, Bytes::from_static(b"kernel.abc.status"));
        assert_eq!(s.decode(&frames).unwrap(), msg);

        // Known vector: hex(HMAC-SHA256("secret", h|p|m|c)) as jupyter_client computes it.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        for f in &frames[3..7] {
            mac.update(f);
        }
        assert_eq!(frames[2], hex(&mac.finalize().into_bytes()));

        let mut tampered = frames.clone();
        tampered[6] = Bytes::from_static(b"{\"code\":\"2+2\"}");
        assert!(matches!(s.decode(&tampered), Err(WireError::BadSignature)));
        let other = Session::new("other");
        assert!(matches!(
            other.decode(&frames),
            Err(WireError::BadSignature)
        ));
        assert!(matches!(
            s.decode(&frames[..4]),
            Err(WireError::TooFewFrames(_))
        ));
        assert!(matches!(
            s.decode(&[Bytes::from_static(b"x")]),
            Err(WireError::NoDelimiter)
        ));
    }

    #[test]
    fn parent_id() {
        let s = Session::new("k");
        let req = s.request("kernel_info_request", json!({}));
        let mut reply = s.request("kernel_info_reply", json!({}));
        reply.parent_header = serde_json::to_value(&req.header).unwrap();
        assert_eq!(reply.parent_id(), Some(req.header.msg_id.as_str()));
        assert_eq!(req.parent_id(), None);
        assert_eq!(random_id().len(), 36);
    }
}
