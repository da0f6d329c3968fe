//! The sandbox router: requests addressed to a sandbox port are forwarded to the sandbox, on the
//! same listener as the API.
//!
//! A request is addressed to a sandbox when it carries `E2b-Sandbox-Id` + `E2b-Sandbox-Port`
//! (what the SDK sends, necessary when `E2B_SANDBOX_URL` collapses every sandbox onto one URL) or,
//! with a configured domain, when its Host is `<port>-<id>.<domain>`. Bodies stream both ways
//! (Connect streams, chunked uploads); connection upgrades (WebSocket) are spliced.
//!
//! The router only routes: envd checks the sandbox's access token itself. Proxied traffic does
//! not extend a sandbox's deadline.

use crate::error::{no_retry, ApiError};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::Duration;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Compares secrets without leaking how long a prefix matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
use warren_runtime::ENVD_PORT;

/// Largest request body the router keeps for a resend (see `SandboxProxy::forward_to`).
const REPLAY_LIMIT: usize = 1 << 20;

/// The length of a request body if it is known and small enough to keep for a resend: `Some(0)`
/// for no body, `None` for a streamed (chunked) or large one.
fn small_body_len(headers: &HeaderMap) -> Option<usize> {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    match headers.get(http::header::CONTENT_LENGTH) {
        None => Some(0),
        Some(v) => v
            .to_str()
            .ok()?
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= REPLAY_LIMIT),
    }
}

/// A pooled HTTP/1 client to sandboxes.
#[derive(Clone)]
pub struct SandboxProxy {
    client: Client<HttpConnector, Body>,
}

impl Default for SandboxProxy {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        // A sandbox is on a local bridge: an answer takes microseconds, silence means trouble.
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        SandboxProxy { client }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
}

/// Where a request goes: `Ok(None)` is the API; `Err` is a malformed sandbox address.
pub fn target_of(headers: &HeaderMap, domain: Option<&str>) -> Result<Option<Target>, ApiError> {
    let id = headers.get(SANDBOX_ID_HEADER);
    let port = headers.get(SANDBOX_PORT_HEADER);
    match (id, port) {
        (None, None) => host_target(headers, domain),
        (None, Some(_)) => Err(bad_request("Missing header: E2b-Sandbox-Id")),
        (Some(_), None) => Err(bad_request("Missing header: E2b-Sandbox-Port")),
        (Some(id), Some(port)) => {
            let id = id
                .to_str()
                .ok()
                .filter(|s| valid_id(s))
                .ok_or_else(|| bad_request("invalid sandbox id"))?;
            let port = port
                .to_str()
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| bad_request("invalid sandbox port"))?;
            Ok(Some(Target {
                sandbox_id: id.to_string(),
                port,
            }))
        }
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `<port>-<id>.<domain>` (the Host may carry the listener's port, and so may the domain).
/// Other names under the domain (say `api.<domain>`) are the API's; a name that has the
/// `<digits>-` shape of a sandbox address but a bad port or id is an error, not the API.
fn host_target(headers: &HeaderMap, domain: Option<&str>) -> Result<Option<Target>, ApiError> {
    let Some(domain) = domain.map(str::to_ascii_lowercase) else {
        return Ok(None);
    };
    let Some(host) = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase)
    else {
        return Ok(None);
    };
    let without_port = host.rsplit_once(':').map(|(h, _)| h.to_string());
    let Some(label) = [Some(host.as_str()), without_port.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|h| h.strip_suffix(&domain)?.strip_suffix('.'))
    else {
        return Ok(None);
    };
    let Some((port, id)) = label
        .split_once('-')
        .filter(|(p, _)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Ok(None);
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            bad_request(&format!(
                "host {host}: port {port} is out of range (1-65535); sandbox host names are \
                 <port>-<sandboxID>.{domain}"
            ))
        })?;
    if !valid_id(id) {
        return Err(bad_request(&format!(
            "host {host}: {id:?} is not a sandbox id; sandbox host names are \
             <port>-<sandboxID>.{domain}"
        )));
    }
    Ok(Some(Target {
        sandbox_id: id.to_string(),
        port,
    }))
}

fn bad_request(message: &str) -> ApiError {
    ApiError::bad_request(message)
}

/// The E2B proxy's answer for a sandbox that is not running; the SDK keys on "was not found".
fn sandbox_error(id: &str, message: &str) -> Response {
    let body = serde_json::json!({"sandboxId": id, "message": message, "code": 502});
    let mut resp = (StatusCode::BAD_GATEWAY, Json(body)).into_response();
    no_retry(StatusCode::BAD_GATEWAY, &mut resp);
    resp
}

/// Middleware in front of the API: sandbox traffic never reaches the API's routes.
pub async fn dispatch(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match target_of(req.headers(), st.domain.as_deref()) {
        Ok(None) => match signed_file_target(&req, &st) {
            Some((id, ip)) => st.proxy.forward_to_envd(&st, &id, ip, req).await,
            None => next.run(req).await,
        },
        Ok(Some(target)) => st.proxy.forward(&st, target, req).await,
        Err(e) => e.into_response(),
    }
}

/// The SDK's signed file URLs (`download_url`/`upload_url`) are fetched by plain clients without
/// sandbox headers. With one URL for all sandboxes, the signature is the only address: find the
/// running sandbox whose envd token reproduces it (`v1_` + base64(sha256(path:op:user:token[:exp]))).
/// envd verifies the signature again; this only routes.
fn signed_file_target(req: &Request, st: &AppState) -> Option<(String, std::net::Ipv4Addr)> {
    if req.uri().path() != "/files" {
        return None;
    }
    let op = match *req.method() {
        axum::http::Method::GET => "read",
        axum::http::Method::POST => "write",
        _ => return None,
    };
    let mut path = None;
    let mut user = String::new();
    let mut signature = None;
    let mut expiration = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query()?.as_bytes()) {
        match k.as_ref() {
            "path" => path = Some(v.into_owned()),
            "username" => user = v.into_owned(),
            "signature" => signature = Some(v.into_owned()),
            "signature_expiration" => expiration = Some(v.into_owned()),
            _ => {}
        }
    }
    let (path, signature) = (path?, signature?);
    st.warren.route_by_token(|token| {
        let mut text = format!("{path}:{op}:{user}:{token}");
        if let Some(exp) = &expiration {
            text.push(':');
            text.push_str(exp);
        }
        file_signature(&text) == signature
    })
}

fn file_signature(text: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes headers that describe one connection, not the message. For an upgrade the
/// `Connection: upgrade` + `Upgrade` pair is what the next hop needs, so it is kept.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

impl SandboxProxy {
    pub async fn forward(&self, st: &AppState, target: Target, req: Request) -> Response {
        let id = target.sandbox_id;
        let Some(ip) = st.warren.route_or_wake(&id).await else {
            return sandbox_error(&id, "The sandbox was not found");
        };
        // Private ports (`allowPublicTraffic: false`) need the sandbox's traffic token; envd
        // has its own access token.
        if target.port != ENVD_PORT {
            if let Some(token) = st.warren.traffic_token(&id) {
                let given = req
                    .headers()
                    .get(TRAFFIC_TOKEN_HEADER)
                    .map(|v| v.as_bytes());
                if !given.is_some_and(|g| constant_time_eq(g, token.as_bytes())) {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "sandbox {id} does not accept public traffic: send its traffic \
                             access token in the E2B-Traffic-Access-Token header"
                        ),
                    )
                    .into_response();
                }
            }
        }
        if target.port == ENVD_PORT {
            return self.forward_to_envd(st, &id, ip, req).await;
        }
        self.forward_to(&id, ip, target.port, req).await
    }

    /// Forwards to envd, recording in the audit log what it wants of the request.
    async fn forward_to_envd(
        &self,
        st: &AppState,
        id: &str,
        ip: std::net::Ipv4Addr,
        req: Request,
    ) -> Response {
        let (req, observed) = crate::audit::observe_envd(st, id, req).await;
        let resp = self.forward_to(id, ip, ENVD_PORT, req).await;
        match observed {
            Some(obs) => obs.finish(resp),
            None => resp,
        }
    }

    async fn forward_to(
        &self,
        id: &str,
        ip: std::net::Ipv4Addr,
        port: u16,
        mut req: Request,
    ) -> Response {
        let upgrade = is_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match format!("http://{ip}:{port}{path}").parse() {
            Ok(u) => u,
            Err(_) => return bad_request("invalid request path").into_response(),
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);

        // A pooled connection can be closed by the sandbox's server just as it is reused (after
        // an interrupted stream, say), which fails the request before any answer. A small body
        // is kept so the request can be sent once more on a fresh connection; a large or
        // streamed one (uploads, Connect client streams) is passed through and not retried.
        if upgrade || small_body_len(&parts.headers).is_none() {
            let out = Request::from_parts(parts, body);
            return self.send(id, port, out, client_side).await;
        }
        let bytes = match axum::body::to_bytes(body, REPLAY_LIMIT).await {
            Ok(b) => b,
            Err(_) => return bad_request("request body larger than announced").into_response(),
        };
        let copy = |b: bytes::Bytes| {
            let mut r = Request::new(Body::from(b));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        };
        match self.client.request(copy(bytes.clone())).await {
            Err(e) if !e.is_connect() => {
                tracing::debug!(sandbox = %id, port, error = %e, "retrying on a fresh connection");
                self.send(id, port, copy(bytes), None).await
            }
            first => self.finish(id, port, first, None),
        }
    }

    async fn send(
        &self,
        id: &str,
        port: u16,
        out: Request,
        client_side: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response {
        let result = self.client.request(out).await;
        self.finish(id, port, result, client_side)
    }

    fn finish(
        &self,
        id: &str,
        port: u16,
        result: Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
        client_side: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response {
        let mut resp = match result {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return sandbox_error(
                    id,
                    &format!("The sandbox is running but port is not open (port {port})"),
                )
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, port, error = %e, "proxy error");
                return sandbox_error(id, &format!("error talking to the sandbox: {e}"));
            }
        };
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_side)) = (switched, client_side) {
            let sandbox_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_side, sandbox_side) {
                    Ok((c, s)) => {
                        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
        strip_hop_by_hop(resp.headers_mut(), switched);
        resp.map(Body::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn targets() {
        let t = |p: &[(&str, &str)], d: Option<&str>| target_of(&headers(p), d).ok().flatten();
        assert_eq!(
            t(
                &[("e2b-sandbox-id", "abc1"), ("e2b-sandbox-port", "49983")],
                None
            ),
            Some(Target {
                sandbox_id: "abc1".into(),
                port: 49983
            })
        );
        assert_eq!(
            t(&[("host", "49999-abc1.sbx.local:3000")], Some("sbx.local")),
            Some(Target {
                sandbox_id: "abc1".into(),
                port: 49999
            })
        );
        assert_eq!(
            t(
                &[("host", "8080-abc1.localhost:3000")],
                Some("localhost:3000")
            ),
            Some(Target {
                sandbox_id: "abc1".into(),
                port: 8080
            })
        );
        assert_eq!(
            t(&[("host", "localhost:3000")], Some("localhost:3000")),
            None
        );
        assert_eq!(t(&[("host", "49983-abc1.other")], Some("sbx.local")), None);
        assert_eq!(t(&[("host", "49983-abc1.sbx.local")], None), None);
        assert!(target_of(&headers(&[("e2b-sandbox-id", "abc")]), None).is_err());
        assert!(target_of(&headers(&[("e2b-sandbox-port", "1")]), None).is_err());
        for bad in ["x", "0", "65536", "-1"] {
            assert!(target_of(
                &headers(&[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", bad)]),
                None
            )
            .is_err());
        }
    }

    #[test]
    fn file_signature_matches_the_sdk() {
        // Vector from e2b.sandbox.signature.get_signature("/home/user/a.txt", "read", "user", "tok123").
        assert_eq!(
            file_signature("/home/user/a.txt:read:user:tok123"),
            "v1_HB2bgZ+RgifWQVkD4WDT8wNBFTVrggZWSRD5EqI0H/0"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("x-access-token", "t"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-access-token"));

        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    fn by_host(host: &str) -> Result<Option<Target>, ApiError> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        target_of(&h, Some("sbx.test"))
    }

    fn message(r: Result<Option<Target>, ApiError>) -> String {
        let e = r.expect_err("an error");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        e.message
    }

    #[test]
    fn sandbox_host_names() {
        let t = by_host("8000-abc123.sbx.test:3000").unwrap().unwrap();
        assert_eq!((t.sandbox_id.as_str(), t.port), ("abc123", 8000));
        let t = by_host("49983-abc123.SBX.test").unwrap().unwrap();
        assert_eq!(t.port, 49983);
    }

    #[test]
    fn other_names_are_the_api() {
        for host in [
            "api.sbx.test",
            "sbx.test",
            "localhost:3000",
            "8000-abc.other.test",
            "x-1.sbx.test",
        ] {
            assert_eq!(by_host(host).unwrap(), None, "{host}");
        }
    }

    #[test]
    fn malformed_sandbox_host_names_are_clear_400s() {
        assert!(message(by_host("70000-abc.sbx.test")).contains("out of range"));
        assert!(message(by_host("0-abc.sbx.test")).contains("out of range"));
        assert!(message(by_host("99999999999999999999-abc.sbx.test")).contains("out of range"));
        assert!(message(by_host("8000-ABC_x.sbx.test")).contains("not a sandbox id"));
        assert!(message(by_host("8000-.sbx.test")).contains("not a sandbox id"));
    }
}
