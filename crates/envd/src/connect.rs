//! The Connect protocol (connectrpc.com) with the JSON codec, hand-rolled.
//!
//! Only what the E2B SDKs send is supported: unary `application/json`,
//! server streaming and client streaming with `application/connect+json`
//! envelopes, no compression.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

/// Largest single Connect message (unary body or envelope payload) envd accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

pub const CONTENT_TYPE_UNARY: &str = "application/json";
pub const CONTENT_TYPE_STREAM: &str = "application/connect+json";

const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END_STREAM: u8 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status the Connect protocol assigns to this code for unary errors.
    pub fn http_status(self) -> StatusCode {
        let status = match self {
            Code::Canceled => 499,
            Code::Unknown => 500,
            Code::InvalidArgument => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::FailedPrecondition => 400,
            Code::Aborted => 409,
            Code::OutOfRange => 400,
            Code::Unimplemented => 501,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::DataLoss => 500,
            Code::Unauthenticated => 401,
        };
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// An RPC failure as the client will see it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, message)
    }
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }

    /// The unary error response: Connect status mapping plus a JSON body.
    pub fn unary_response(&self) -> Response {
        self.unary_response_with_status(self.code.http_status())
    }

    /// connect-go answers unknown procedures with a plain 404; the body still
    /// carries the Connect error so clients get a readable message.
    pub fn unary_response_with_status(&self, status: StatusCode) -> Response {
        let mut response = (status, self.json().to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_UNARY),
        );
        response
    }

    /// A complete streaming response that carries only this error in its end-stream
    /// envelope (HTTP 200, as connect-go does for streaming errors).
    pub fn stream_response(&self) -> Response {
        let body = Bytes::from(end_stream_envelope(Some(self)));
        stream_response_headers(Response::new(Body::from(body)))
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        self.unary_response()
    }
}

impl From<std::io::Error> for RpcError {
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind;
        let code = match err.kind() {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::InvalidInput | ErrorKind::InvalidData => Code::InvalidArgument,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        RpcError::new(code, err.to_string())
    }
}

/// Frames one message: `flags | u32 BE length | payload`.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn message_envelope<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing our own message types cannot fail (no maps with non-string keys).
    let payload = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    envelope(0, &payload)
}

pub fn end_stream_envelope(error: Option<&RpcError>) -> Vec<u8> {
    let payload = match error {
        None => b"{}".to_vec(),
        Some(err) => serde_json::json!({ "error": err.json() })
            .to_string()
            .into_bytes(),
    };
    envelope(FLAG_END_STREAM, &payload)
}

/// A successful unary response with a JSON body.
pub fn unary_ok<T: Serialize>(message: &T) -> Response {
    let body = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_UNARY),
    );
    response
}

fn stream_response_headers(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_STREAM),
    );
    response
}

/// The sending half of a server-streaming response. Every `send` becomes one
/// envelope that hyper writes out as its own chunk, so nothing waits in a buffer.
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
}

impl StreamSender {
    /// Sends one message; `false` means the client went away.
    pub async fn send<T: Serialize>(&self, message: &T) -> bool {
        self.tx
            .send(Bytes::from(message_envelope(message)))
            .await
            .is_ok()
    }

    /// Ends the stream with success or an error; consumes the sender so nothing follows.
    pub async fn finish(self, error: Option<RpcError>) {
        let _ = self
            .tx
            .send(Bytes::from(end_stream_envelope(error.as_ref())))
            .await;
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the client has gone away (the response body was dropped).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Creates a streaming response and the sender that feeds it.
pub fn stream_channel() -> (StreamSender, Response) {
    // A few envelopes of slack; beyond that the producer waits for the socket.
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    let response = stream_response_headers(Response::new(Body::from_stream(stream)));
    (StreamSender { tx }, response)
}

/// Reads enveloped messages incrementally from a request body.
pub struct EnvelopeReader<S> {
    body: S,
    buffer: BytesMut,
    body_done: bool,
}

impl<S, E> EnvelopeReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(body: S) -> Self {
        EnvelopeReader {
            body,
            buffer: BytesMut::new(),
            body_done: false,
        }
    }

    async fn fill(&mut self, needed: usize) -> Result<bool, RpcError> {
        while self.buffer.len() < needed {
            if self.body_done {
                return Ok(false);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(err)) => {
                    return Err(RpcError::invalid_argument(format!(
                        "failed to read request body: {err}"
                    )))
                }
                None => self.body_done = true,
            }
        }
        Ok(true)
    }

    /// The next message payload, or `None` at a clean end of the body.
    /// Client end-stream envelopes are treated as the end of input.
    pub async fn next_message(&mut self) -> Result<Option<Bytes>, RpcError> {
        if !self.fill(5).await? {
            if self.buffer.is_empty() {
                return Ok(None);
            }
            return Err(RpcError::invalid_argument(
                "protocol error: incomplete envelope header",
            ));
        }
        let flags = self.buffer[0];
        let length = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if length > MAX_MESSAGE_BYTES {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("message size {length} is larger than configured max {MAX_MESSAGE_BYTES}"),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(RpcError::internal(
                "protocol error: compressed message received but no compression was negotiated",
            ));
        }
        if !self.fill(5 + length).await? {
            return Err(RpcError::invalid_argument(format!(
                "protocol error: promised {length} bytes in enveloped message, got {} bytes",
                self.buffer.len() - 5
            )));
        }
        self.buffer.advance(5);
        let payload = self.buffer.split_to(length).freeze();
        if flags & FLAG_END_STREAM != 0 {
            return Ok(None);
        }
        Ok(Some(payload))
    }
}

/// Reads a unary body, bounded by [`MAX_MESSAGE_BYTES`].
pub async fn read_unary_body(body: Body) -> Result<Bytes, RpcError> {
    let mut stream = body.into_data_stream();
    let mut buffer = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| {
            RpcError::invalid_argument(format!("failed to read request body: {err}"))
        })?;
        if buffer.len() + chunk.len() > MAX_MESSAGE_BYTES {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("request body is larger than configured max {MAX_MESSAGE_BYTES}"),
            ));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Decodes a JSON message; an empty body is the empty message.
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, RpcError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        payload
    };
    serde_json::from_slice(payload)
        .map_err(|err| RpcError::invalid_argument(format!("unmarshal message: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(
        chunks: Vec<&'static [u8]>,
    ) -> EnvelopeReader<impl Stream<Item = Result<Bytes, String>> + Unpin> {
        EnvelopeReader::new(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from_static(c))),
        ))
    }

    #[tokio::test]
    async fn reads_envelopes_split_across_chunks() {
        let mut reader = reader(vec![
            b"\x00\x00\x00",
            b"\x00\x02{}\x00\x00\x00\x00\x01",
            b"7",
        ]);
        assert_eq!(reader.next_message().await.unwrap().unwrap(), "{}");
        assert_eq!(reader.next_message().await.unwrap().unwrap(), "7");
        assert!(reader.next_message().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_envelope_is_invalid_argument() {
        let mut reader = reader(vec![b"\x00\x00\x00\x00\x09{}"]);
        let err = reader.next_message().await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn oversized_envelope_is_resource_exhausted() {
        let mut reader = reader(vec![b"\x00\x7f\x00\x00\x00"]);
        let err = reader.next_message().await.unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
    }

    #[test]
    fn end_stream_carries_error() {
        let bytes = end_stream_envelope(Some(&RpcError::not_found("nope")));
        assert_eq!(bytes[0], 0x02);
        let json: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert_eq!(json["error"]["code"], "not_found");
        assert_eq!(json["error"]["message"], "nope");
    }
}
