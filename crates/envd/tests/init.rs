//! `POST /init`: claim-time reconfiguration by the daemon (runs as root in CI).

mod common;

use std::collections::BTreeMap;

use common::*;
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::json;
use warren_envd::EnvdConfig;

async fn post_init(envd: &Envd, admin: Option<&str>, body: serde_json::Value) -> StatusCode {
    let mut builder = envd
        .request("POST", "/init")
        .header("content-type", "application/json");
    if let Some(admin) = admin {
        builder = builder.header("x-admin-token", admin);
    }
    let resp = envd
        .send(builder.body(full(body.to_string())).unwrap())
        .await;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn init_replaces_env_vars_and_access_token() {
    let mut envd = start_envd(EnvdConfig {
        access_token: Some("pool-token".into()),
        admin_token: Some("admin".into()),
        env_vars: BTreeMap::from([("POOL_ONLY".to_string(), "p".to_string())]),
        ..root_config()
    })
    .await;
    let body = json!({"envVars": {"CLAIMED": "yes"}, "accessToken": "claim-token"});
    // The access token is not enough, nor is a wrong admin token.
    assert_eq!(
        post_init(&envd, None, body.clone()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_init(&envd, Some("pool-token"), body.clone()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_init(&envd, Some("admin"), json!({"accessToken": ""})).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post_init(&envd, Some("admin"), body).await,
        StatusCode::NO_CONTENT
    );

    // The old token no longer opens the sandbox.
    let (status, _) = envd
        .unary("/filesystem.Filesystem/Stat", json!({"path": "/"}), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    envd.token = Some("claim-token".into());
    let result = envd
        .run(
            start_request("echo \"[$POOL_ONLY][$CLAIMED]\""),
            Some("root"),
        )
        .await;
    assert_eq!(result.stdout(), "[][yes]\n");
}

#[tokio::test]
async fn init_is_disabled_without_an_admin_token() {
    let envd = start_envd(root_config()).await;
    assert_eq!(
        post_init(&envd, Some(""), json!({"envVars": {}})).await,
        StatusCode::FORBIDDEN
    );
}
