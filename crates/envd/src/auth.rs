//! Access-token checks, signed `/files` URLs and user selection.

use axum::http::HeaderMap;
use base64::Engine;
use sha2::{Digest, Sha256};

pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// Byte-for-byte comparison whose duration does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `X-Access-Token` matches the configured token (always true without one).
pub fn header_token_valid(expected: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    headers
        .get("x-access-token")
        .is_some_and(|value| constant_time_eq(value.as_bytes(), expected.as_bytes()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOperation {
    Read,
    Write,
}

impl FileOperation {
    fn as_str(self) -> &'static str {
        match self {
            FileOperation::Read => "read",
            FileOperation::Write => "write",
        }
    }
}

/// The `v1_` signature the SDKs put into signed `/files` URLs.
pub fn file_signature(
    path: &str,
    operation: FileOperation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut material = format!("{path}:{}:{username}:{token}", operation.as_str());
    if let Some(expiration) = expiration {
        material.push_str(&format!(":{expiration}"));
    }
    let digest = Sha256::digest(material.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature query parameter")]
    Missing,
    #[error("invalid signature")]
    Invalid,
    #[error("invalid signature expiration")]
    BadExpiration,
    #[error("signature is already expired")]
    Expired,
}

/// Checks a signed-URL signature for a `/files` request.
pub fn verify_file_signature(
    token: &str,
    path: &str,
    operation: FileOperation,
    username: &str,
    signature: Option<&str>,
    expiration: Option<&str>,
    now_unix: i64,
) -> Result<(), SignatureError> {
    let signature = signature.ok_or(SignatureError::Missing)?;
    let expiration = match expiration {
        None | Some("") => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| SignatureError::BadExpiration)?,
        ),
    };
    let expected = file_signature(path, operation, username, token, expiration);
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(SignatureError::Invalid);
    }
    if expiration.is_some_and(|exp| exp < now_unix) {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

/// The user named by `Authorization: Basic base64("user:")`, if any.
pub fn basic_auth_user(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_sdk_algorithm() {
        // sha256("/a:read:user:tok") computed by the Python SDK's algorithm.
        let digest = Sha256::digest(b"/a:read:user:tok");
        let expected = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        );
        assert_eq!(
            file_signature("/a", FileOperation::Read, "user", "tok", None),
            expected
        );
        assert!(!expected.ends_with('='));
    }

    #[test]
    fn verifies_and_expires_signatures() {
        let sig = file_signature("/a", FileOperation::Write, "", "tok", Some(100));
        let check = |sig: Option<&str>, exp: Option<&str>, now| {
            verify_file_signature("tok", "/a", FileOperation::Write, "", sig, exp, now)
        };
        assert_eq!(check(Some(&sig), Some("100"), 50), Ok(()));
        assert_eq!(
            check(Some(&sig), Some("100"), 101),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            check(Some(&sig), Some("101"), 50),
            Err(SignatureError::Invalid)
        );
        assert_eq!(check(None, None, 50), Err(SignatureError::Missing));
    }

    #[test]
    fn parses_basic_auth_user() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_auth_user(&headers).as_deref(), Some("root"));
        headers.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(basic_auth_user(&headers), None);
    }
}
