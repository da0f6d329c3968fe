//! The plain-HTTP `/files` endpoints: download and upload of file contents.
//!
//! Bodies are streamed to and from disk chunk by chunk; only opening the file
//! (and creating parent directories) happens with the user's identity, the data
//! then flows through the already-open descriptor.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::{self, FileOperation, SignatureError};
use crate::connect::{Code, RpcError};
use crate::filesystem::{resolve_path, run_as};
use crate::server::AppState;
use crate::users::{User, UserDb};

/// Files up to this size are read in one go (see `download_file`).
const WHOLE_READ_BYTES: u64 = 4 << 20;
const DOWNLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// An error answered in envd's HTTP shape: `{"code": <status>, "message": "..."}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    body: String,
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        json_response(self.status, self.body)
    }
}

pub fn http_error(status: StatusCode, message: impl Into<String>) -> HttpError {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    HttpError {
        status,
        body: body.to_string(),
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn rpc_to_http(err: RpcError) -> HttpError {
    let status = match err.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
            StatusCode::BAD_REQUEST
        }
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    http_error(status, err.message)
}

fn io_to_http(err: &io::Error, path: &Path) -> HttpError {
    let display = path.display();
    match err.kind() {
        io::ErrorKind::NotFound => http_error(
            StatusCode::NOT_FOUND,
            format!("path '{display}' does not exist"),
        ),
        io::ErrorKind::PermissionDenied => http_error(
            StatusCode::FORBIDDEN,
            format!("permission denied for path '{display}'"),
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => http_error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("not enough disk space to write '{display}': {err}"),
        ),
        io::ErrorKind::IsADirectory => http_error(
            StatusCode::BAD_REQUEST,
            format!("path '{display}' is a directory"),
        ),
        _ => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("error accessing '{display}': {err}"),
        ),
    }
}

fn query_params(uri: &Uri) -> HashMap<String, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|Query(params)| params)
        .unwrap_or_default()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `/files` accepts either the access token header or a signed URL.
fn check_access(
    state: &AppState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    operation: FileOperation,
) -> Result<(), HttpError> {
    let Some(token) = state.live().access_token else {
        return Ok(());
    };
    let token = token.as_str();
    if auth::header_token_valid(Some(token), headers) {
        return Ok(());
    }
    let signature = params.get("signature").map(String::as_str);
    if signature.is_none() {
        return Err(http_error(
            StatusCode::UNAUTHORIZED,
            auth::UNAUTHORIZED_MESSAGE,
        ));
    }
    let verified = auth::verify_file_signature(
        token,
        params.get("path").map(String::as_str).unwrap_or_default(),
        operation,
        params
            .get("username")
            .map(String::as_str)
            .unwrap_or_default(),
        signature,
        params.get("signature_expiration").map(String::as_str),
        unix_now(),
    );
    match verified {
        Ok(()) => Ok(()),
        // The upstream test compares this body byte for byte.
        Err(SignatureError::Expired) => Err(HttpError {
            status: StatusCode::UNAUTHORIZED,
            body: r#"{"code": 401, "message": "signature is already expired"}"#.to_string(),
        }),
        Err(err) => Err(http_error(StatusCode::UNAUTHORIZED, err.to_string())),
    }
}

fn resolve_user(state: &AppState, params: &HashMap<String, String>) -> Result<User, HttpError> {
    let name = params
        .get("username")
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| state.live().default_user);
    UserDb::load()
        .user(&name)
        .ok_or_else(|| http_error(StatusCode::UNAUTHORIZED, format!("invalid user: '{name}'")))
}

fn content_disposition(path: &Path) -> HeaderValue {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ascii_safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC);
    HeaderValue::from_str(&format!(
        "inline; filename=\"{ascii_safe}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("inline"))
}

pub async fn download(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    download_file(&state, &uri, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn download_file(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let params = query_params(uri);
    check_access(state, headers, &params, FileOperation::Read)?;
    let user = resolve_user(state, &params)?;
    let raw_path = params
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| http_error(StatusCode::BAD_REQUEST, "missing path query parameter"))?;
    let path = resolve_path(raw_path, &user).map_err(rpc_to_http)?;

    // Small files are read whole, so the body always matches the length announced even if the
    // file changes meanwhile (a process rewriting it). Larger ones stream without a length: a
    // file that shrinks during the download then ends early instead of breaking the protocol.
    let open_path = path.clone();
    let opened = run_as(&user, move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&open_path)?;
        let meta = file.metadata()?;
        let whole = if meta.is_file() && meta.len() <= WHOLE_READ_BYTES {
            let mut content = Vec::with_capacity(meta.len() as usize);
            file.read_to_end(&mut content)?;
            Some(content)
        } else {
            None
        };
        Ok::<_, io::Error>((file, meta, whole))
    })
    .await;
    let (file, meta, whole) = opened
        .map_err(rpc_to_http)?
        .map_err(|err| io_to_http(&err, &path))?;
    if meta.is_dir() {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        ));
    }

    let mut response = match whole {
        Some(content) => {
            let len = content.len();
            let mut response = Response::new(Body::from(content));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            response
        }
        None => {
            let file = tokio::fs::File::from_std(file);
            let stream = futures::stream::unfold(Some(file), |file| async move {
                let mut file = file?;
                let mut buffer = vec![0u8; DOWNLOAD_CHUNK_BYTES];
                match file.read(&mut buffer).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buffer.truncate(n);
                        Some((Ok(Bytes::from(buffer)), Some(file)))
                    }
                    Err(err) => Some((Err(err), None)),
                }
            });
            Response::new(Body::from_stream(stream))
        }
    };
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::CONTENT_DISPOSITION, content_disposition(&path));
    let wants_gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::gzip::accepts_gzip);
    if wants_gzip {
        let (mut parts, body) = response.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        parts
            .headers
            .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        let packed = crate::gzip::gzip(body.into_data_stream());
        response = Response::from_parts(parts, Body::from_stream(packed));
    }
    Ok(response)
}

/// Opens `path` for writing as `user`, creating missing parent directories.
async fn create_file(user: &User, path: &Path) -> Result<tokio::fs::File, HttpError> {
    let target = path.to_path_buf();
    let created = run_as(user, move || {
        if std::fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::from(io::ErrorKind::IsADirectory));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::File::create(&target)
    })
    .await;
    match created {
        Ok(Ok(file)) => Ok(tokio::fs::File::from_std(file)),
        Ok(Err(err)) => Err(io_to_http(&err, path)),
        Err(err) => Err(rpc_to_http(err)),
    }
}

/// A failed upload still reads (and drops) up to this much of the rest of its body, for at most
/// [`DRAIN_TIME`], before it answers: a server that answers and closes while the client is still
/// sending makes the client's kernel see a reset, and the client (the daemon's router, then the
/// SDK) loses the answer, reporting an unreachable sandbox instead of, say, 507.
const DRAIN_BYTES: u64 = 1 << 30;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and drops what is left of `chunks`, within the drain limits.
async fn drain<S, E>(chunks: &mut S)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = chunks.next().await {
            left = left.saturating_sub(chunk.len() as u64);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Writes the body to `path`; on failure the rest of the body is drained (see [`DRAIN_BYTES`]).
async fn write_body<S, E>(
    user: &User,
    path: &Path,
    chunks: &mut S,
    metadata: &BTreeMap<String, String>,
) -> Result<(), HttpError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let result = write_chunks(user, path, chunks, metadata).await;
    if result.is_err() {
        drain(chunks).await;
    }
    result
}

async fn write_chunks<S, E>(
    user: &User,
    path: &Path,
    chunks: &mut S,
    metadata: &BTreeMap<String, String>,
) -> Result<(), HttpError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = create_file(user, path).await?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| {
            http_error(
                StatusCode::BAD_REQUEST,
                format!("failed to read request body: {err}"),
            )
        })?;
        file.write_all(&chunk)
            .await
            .map_err(|err| io_to_http(&err, path))?;
    }
    // tokio's File completes writes in the background; flush surfaces their errors.
    file.flush().await.map_err(|err| io_to_http(&err, path))?;
    if !metadata.is_empty() {
        crate::file_metadata::write(&file, metadata).map_err(|err| {
            http_error(
                StatusCode::BAD_REQUEST,
                format!("cannot store metadata on '{}': {err}", path.display()),
            )
        })?;
    }
    Ok(())
}

fn upload_entry(path: &Path, metadata: &BTreeMap<String, String>) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "path": path.to_string_lossy(),
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
    });
    if !metadata.is_empty() {
        entry["metadata"] = serde_json::json!(metadata);
    }
    entry
}

pub async fn upload(State(state): State<Arc<AppState>>, request: Request) -> Response {
    upload_files(&state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn upload_files(state: &AppState, request: Request) -> Result<Response, HttpError> {
    let params = query_params(request.uri());
    check_access(state, request.headers(), &params, FileOperation::Write)?;
    let user = resolve_user(state, &params)?;
    let query_path = params.get("path").filter(|p| !p.is_empty()).cloned();

    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let content_encoding = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let gzipped = match content_encoding.trim() {
        "" | "identity" => false,
        "gzip" | "x-gzip" => true,
        other => {
            return Err(http_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content encoding '{other}': use gzip or none"),
            ))
        }
    };
    let metadata = crate::file_metadata::from_headers(request.headers())
        .map_err(|m| http_error(StatusCode::BAD_REQUEST, m))?;
    // A gzip body is inflated as it streams in, before multipart parsing or the disk see it.
    let request = if gzipped {
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
        let inflated = crate::gzip::gunzip(body.into_data_stream());
        Request::from_parts(parts, Body::from_stream(inflated))
    } else {
        request
    };

    let mut written: Vec<PathBuf> = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|err| http_error(StatusCode::BAD_REQUEST, err.body_text()))?;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|err| http_error(StatusCode::BAD_REQUEST, err.body_text()))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let raw_path = query_path
                .clone()
                .or_else(|| field.file_name().map(str::to_string))
                .filter(|p| !p.is_empty());
            let raw_path = raw_path.ok_or_else(|| {
                http_error(
                    StatusCode::BAD_REQUEST,
                    "missing path: set the path query parameter or the part's filename",
                )
            })?;
            let path = resolve_path(&raw_path, &user).map_err(rpc_to_http)?;
            // A multipart field is itself a stream of body chunks.
            let mut chunks = Box::pin(field);
            if let Err(err) = write_body(&user, &path, &mut chunks, &metadata).await {
                drop(chunks);
                // The parts after the failed one are drained too, for the reason given at
                // `DRAIN_BYTES`.
                let _ = tokio::time::timeout(DRAIN_TIME, async {
                    while let Ok(Some(mut part)) = multipart.next_field().await {
                        while let Ok(Some(_)) = part.chunk().await {}
                    }
                })
                .await;
                return Err(err);
            }
            written.push(path);
        }
    } else {
        let raw_path = query_path
            .ok_or_else(|| http_error(StatusCode::BAD_REQUEST, "missing path query parameter"))?;
        let path = resolve_path(&raw_path, &user).map_err(rpc_to_http)?;
        let mut body = request.into_body().into_data_stream();
        write_body(&user, &path, &mut body, &metadata).await?;
        written.push(path);
    }

    if written.is_empty() {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            "no file part in the request",
        ));
    }
    let entries: Vec<_> = written.iter().map(|p| upload_entry(p, &metadata)).collect();
    Ok(json_response(
        StatusCode::OK,
        serde_json::Value::Array(entries).to_string(),
    ))
}
