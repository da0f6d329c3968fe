//! `/files` upload and download, `/health`, auth and protocol errors.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::{json, Value};
use warren_envd::auth::{file_signature, FileOperation};
use warren_envd::EnvdConfig;

fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn body_bytes(response: hyper::Response<hyper::body::Incoming>) -> (StatusCode, Vec<u8>) {
    let status = response.status();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "envd-test-boundary-7d1a";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn download(envd: &Envd, query: &str) -> (StatusCode, Vec<u8>) {
    let request = envd
        .request("GET", &format!("/files?{query}"))
        .body(full(Vec::new()))
        .unwrap();
    body_bytes(envd.send(request).await).await
}

#[tokio::test]
async fn health_is_204_without_token() {
    let envd = start_envd(EnvdConfig {
        access_token: Some("secret".into()),
        ..root_config()
    })
    .await;
    let request = hyper::Request::get(envd.url("/health"))
        .body(full(Vec::new()))
        .unwrap();
    let (status, _) = body_bytes(envd.send(request).await).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn multipart_upload_then_download_binary() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let target = dir.path().join("nested/dir/data.bin");
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let (content_type, body) = multipart(&[("file", target.to_str().unwrap(), &data)]);
    let request = envd
        .request(
            "POST",
            &format!(
                "/files?path={}&username=root",
                encode(target.to_str().unwrap())
            ),
        )
        .header("content-type", content_type)
        .body(full(body))
        .unwrap();
    let (status, response) = body_bytes(envd.send(request).await).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response)
    );
    let entries: Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(
        entries,
        json!([{ "path": target.to_str().unwrap(), "name": "data.bin", "type": "file" }])
    );
    assert_eq!(std::fs::read(&target).unwrap(), data);

    let response = envd
        .send(
            envd.request(
                "GET",
                &format!("/files?path={}", encode(target.to_str().unwrap())),
            )
            .body(full(Vec::new()))
            .unwrap(),
        )
        .await;
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert!(response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("inline; filename=\"data.bin\""));
    let (status, downloaded) = body_bytes(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(downloaded, data);
}

#[tokio::test]
async fn multipart_with_several_files_uses_part_filenames() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let a = dir.path().join("a.txt");
    let b = dir.path().join("sub/b.txt");
    let (content_type, body) = multipart(&[
        ("file", a.to_str().unwrap(), b"AAA"),
        ("ignored", "/tmp/should-not-exist", b"zzz"),
        ("file", b.to_str().unwrap(), b"BBB"),
    ]);
    let request = envd
        .request("POST", "/files")
        .header("content-type", content_type)
        .body(full(body))
        .unwrap();
    let (status, response) = body_bytes(envd.send(request).await).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response)
    );
    let entries: Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(&a).unwrap(), b"AAA");
    assert_eq!(std::fs::read(&b).unwrap(), b"BBB");
}

#[tokio::test]
async fn octet_stream_upload_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let target = dir.path().join("raw.bin");
    let data = vec![0u8, 1, 2, 255, 254, 0, 10, 13];
    let request = envd
        .request(
            "POST",
            &format!("/files?path={}", encode(target.to_str().unwrap())),
        )
        .header("content-type", "application/octet-stream")
        .body(full(data.clone()))
        .unwrap();
    let (status, response) = body_bytes(envd.send(request).await).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(std::fs::read(&target).unwrap(), data);

    // Uploading onto a directory is a client error.
    let request = envd
        .request(
            "POST",
            &format!("/files?path={}", encode(dir.path().to_str().unwrap())),
        )
        .header("content-type", "application/octet-stream")
        .body(full(b"x".to_vec()))
        .unwrap();
    let (status, _) = body_bytes(envd.send(request).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = download(
        &envd,
        &format!("path={}", encode(dir.path().to_str().unwrap())),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );

    let missing = dir.path().join("missing.txt");
    let (status, body) = download(
        &envd,
        &format!("path={}", encode(missing.to_str().unwrap())),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({ "code": 404, "message": format!("path '{}' does not exist", missing.display()) })
    );
}

#[tokio::test]
async fn uploads_are_owned_by_the_user() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let envd = start_envd(root_config()).await;
    let target = dir.path().join("by-nobody/file.txt");
    let request = envd
        .request(
            "POST",
            &format!(
                "/files?path={}&username=nobody",
                encode(target.to_str().unwrap())
            ),
        )
        .header("content-type", "application/octet-stream")
        .body(full(b"mine".to_vec()))
        .unwrap();
    let (status, body) = body_bytes(envd.send(request).await).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let nobody = warren_envd::users::UserDb::load().user("nobody").unwrap();
    assert_eq!(std::fs::metadata(&target).unwrap().uid(), nobody.uid);
    assert_eq!(
        std::fs::metadata(target.parent().unwrap()).unwrap().uid(),
        nobody.uid
    );

    // nobody cannot read a root-only file.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"s").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (status, _) = download(
        &envd,
        &format!("path={}&username=nobody", encode(secret.to_str().unwrap())),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn access_token_is_enforced() {
    let envd = start_envd(EnvdConfig {
        access_token: Some("secret".into()),
        ..root_config()
    })
    .await;
    let unauthorized = json!({
        "code": 401,
        "message": "unauthorized access, please provide a valid access token or method signing if supported",
    });

    for token in [None, Some("wrong")] {
        let mut builder = hyper::Request::post(envd.url("/process.Process/List"))
            .header("content-type", "application/json");
        if let Some(token) = token {
            builder = builder.header("x-access-token", token);
        }
        let (status, body) = body_bytes(envd.send(builder.body(full("{}")).unwrap()).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            unauthorized
        );

        let mut builder = hyper::Request::get(envd.url("/files?path=/etc/hostname"));
        if let Some(token) = token {
            builder = builder.header("x-access-token", token);
        }
        let (status, _) =
            body_bytes(envd.send(builder.body(full(Vec::new())).unwrap()).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // With the token (the helper adds it) everything works.
    let (status, _) = envd.unary("/process.Process/List", json!({}), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn signed_urls_grant_file_access() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("signed.txt");
    std::fs::write(&file, b"signed content").unwrap();
    let path = file.to_str().unwrap();
    let envd = start_envd(EnvdConfig {
        access_token: Some("secret".into()),
        ..root_config()
    })
    .await;
    let get = |query: String| {
        let request = hyper::Request::get(envd.url(&format!("/files?{query}")))
            .body(full(Vec::new()))
            .unwrap();
        let envd = &envd;
        async move { body_bytes(envd.send(request).await).await }
    };

    let signature = file_signature(path, FileOperation::Read, "root", "secret", None);
    let (status, body) = get(format!(
        "path={}&username=root&signature={}",
        encode(path),
        encode(&signature)
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"signed content");

    // A write signature does not allow reading.
    let write_signature = file_signature(path, FileOperation::Write, "root", "secret", None);
    let (status, _) = get(format!(
        "path={}&username=root&signature={}",
        encode(path),
        encode(&write_signature)
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let expired_at = 1_000;
    let expired = file_signature(
        path,
        FileOperation::Read,
        "root",
        "secret",
        Some(expired_at),
    );
    let (status, body) = get(format!(
        "path={}&username=root&signature={}&signature_expiration={expired_at}",
        encode(path),
        encode(&expired)
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"code": 401, "message": "signature is already expired"}"#
    );

    let future = chrono::Utc::now().timestamp() + 600;
    let valid = file_signature(path, FileOperation::Read, "", "secret", Some(future));
    let (status, _) = get(format!(
        "path={}&signature={}&signature_expiration={future}",
        encode(path),
        encode(&valid)
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_requests_get_connect_errors_and_the_server_survives() {
    let envd = start_envd(root_config()).await;

    // Truncated envelope.
    let stream = envd
        .stream_raw(
            "/process.Process/Start",
            b"\x00\x00\x00\x00\x40{\"pro".to_vec(),
            None,
        )
        .await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.content_type, "application/connect+json");
    let mut stream = stream;
    let (flags, message) = stream.next().await.unwrap();
    assert_eq!(flags, 0x02);
    assert_eq!(message["error"]["code"], "invalid_argument");

    // Valid envelope, invalid JSON.
    let mut stream = envd
        .stream_raw("/process.Process/Start", envelope(0, b"{not json"), None)
        .await;
    let (_, message) = stream.next().await.unwrap();
    assert_eq!(message["error"]["code"], "invalid_argument");

    // Oversized envelope header.
    let mut stream = envd
        .stream_raw(
            "/process.Process/Start",
            b"\x00\x7f\xff\xff\xff".to_vec(),
            None,
        )
        .await;
    let (_, message) = stream.next().await.unwrap();
    assert_eq!(message["error"]["code"], "resource_exhausted");

    // Unary with broken JSON.
    let request = envd
        .request("POST", "/filesystem.Filesystem/Stat")
        .header("content-type", "application/json")
        .body(full("{\"path\": 12"))
        .unwrap();
    let (status, body) = body_bytes(envd.send(request).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "invalid_argument"
    );

    // Unknown procedure.
    let (status, body) = envd
        .unary("/process.Process/Explode", json!({}), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unimplemented");
    let (status, body) = envd.unary("/nope.Nope/Nothing", json!({}), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unimplemented");

    // Still healthy and serving.
    let result = envd.run(start_request("echo alive"), None).await;
    assert_eq!(result.stdout(), "alive\n");
}

#[tokio::test]
async fn unary_responses_use_the_connect_content_type() {
    let envd = start_envd(root_config()).await;
    let request = envd
        .request("POST", "/process.Process/List")
        .header("content-type", "application/json")
        .body(full("{}"))
        .unwrap();
    let response = envd.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
}

/// Sends one HTTP/1.1 request on `stream` in full, then reads one answer's status line and
/// headers, and its body when sized. Fails if the server stops reading before the body's end.
async fn raw_exchange(
    stream: &mut tokio::net::TcpStream,
    target: &str,
    content_type: &str,
    body: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST {target} HTTP/1.1\r\nhost: envd\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(body).await?;
        writer.flush().await
    };
    let receive = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before the answer"));
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if answer.len() >= end + 4 + len {
                    return Ok(text);
                }
            }
        }
    };
    let (sent, answer) = tokio::join!(send, receive);
    sent.unwrap_or_else(|e| panic!("the server stopped reading the body of {target}: {e}"));
    answer.unwrap()
}

/// An upload that fails part-way still reads its whole body before answering, and keeps the
/// connection: a server that answers and closes while the client still sends resets the
/// connection, and the client (the daemon's router, then the SDK) can lose the answer.
#[tokio::test]
async fn an_upload_that_fails_part_way_reads_its_body_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let mut stream = tokio::net::TcpStream::connect(envd.addr).await.unwrap();
    let big = vec![b'x'; 32 << 20];
    let (form_type, form) = multipart(&[("file", "big.bin", &big)]);
    let onto_dir = format!("/files?path={}", encode(dir.path().to_str().unwrap()));
    // Writes to /dev/full fail with ENOSPC once the first chunk has been read.
    for (target, content_type, body, status) in [
        (
            "/files?path=/dev/full",
            "application/octet-stream",
            &big,
            "507",
        ),
        ("/files?path=/dev/full", form_type.as_str(), &form, "507"),
        (onto_dir.as_str(), "application/octet-stream", &big, "400"),
        (onto_dir.as_str(), form_type.as_str(), &form, "400"),
    ] {
        let answer = raw_exchange(&mut stream, target, content_type, body).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {answer}"
        );
    }
}
