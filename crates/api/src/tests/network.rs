//! Network rules, private traffic and metrics through the API, over FakeRuntime.

use super::*;

#[tokio::test]
async fn network_rules_at_create_in_info_and_updated_live() {
    let app = test_app(None);
    let v = create(
        &app,
        KEY1,
        r#"{"templateID":"base","network":{"allowOut":["10.1.2.3"],"denyOut":["0.0.0.0/0"]}}"#,
    )
    .await;
    assert!(v["trafficAccessToken"].is_null(), "{v}");
    let id = v["sandboxID"].as_str().unwrap().to_string();
    let (s, info, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["network"]["allowOut"], json!(["10.1.2.3/32"]));
    assert_eq!(info["network"]["denyOut"], json!(["0.0.0.0/0"]));
    assert_eq!(info["network"]["allowPublicTraffic"], json!(true));

    // The update replaces everything; an omitted allow_internet_access means allowed.
    let uri = format!("/sandboxes/{id}/network");
    let (s, _, _) = call(
        &app,
        "PUT",
        &uri,
        Some(KEY1),
        Some(r#"{"denyOut":["8.8.8.8/32"]}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, info, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(info["network"]["allowOut"], json!([]));
    assert_eq!(info["network"]["denyOut"], json!(["8.8.8.8/32"]));
    assert_eq!(info["allowInternetAccess"], json!(true));
    let (s, _, _) = call(
        &app,
        "PUT",
        &uri,
        Some(KEY1),
        Some(r#"{"allow_internet_access":false}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, info, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(info["allowInternetAccess"], json!(false));

    // Bad entries, other teams, unknown sandboxes.
    for body in [
        r#"{"denyOut":["example.com"]}"#,
        r#"{"allowOut":["not a name"]}"#,
        r#"{"denyOut":["1.2.3.4/40"]}"#,
        r#"{"denyOut":"1.2.3.4"}"#,
    ] {
        let (s, v, _) = call(&app, "PUT", &uri, Some(KEY1), Some(body), &[]).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    let (s, v, _) = call(&app, "PUT", &uri, Some(KEY2), Some("{}"), &[]).await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v, _) = call(
        &app,
        "PUT",
        "/sandboxes/nosuch/network",
        Some(KEY1),
        Some("{}"),
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v, _) = call(&app, "PUT", &uri, None, Some("{}"), &[]).await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED);

    // A domain in denyOut at create is refused before anything is made.
    let (s, v, _) = call(
        &app,
        "POST",
        "/v2/sandboxes",
        Some(KEY1),
        Some(r#"{"templateID":"base","network":{"denyOut":["example.com"]}}"#),
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn private_traffic_needs_the_traffic_token_on_non_envd_ports() {
    let app = test_app(Some("sbx.test"));
    let v = create(
        &app,
        KEY1,
        r#"{"templateID":"base","network":{"allowPublicTraffic":false}}"#,
    )
    .await;
    let id = v["sandboxID"].as_str().unwrap().to_string();
    let token = v["trafficAccessToken"]
        .as_str()
        .expect("token returned")
        .to_string();
    assert_ne!(token, v["envdAccessToken"].as_str().unwrap());
    let port = upstream().await.to_string();
    let send = |extra: Vec<(&'static str, String)>| {
        let app = app.clone();
        let (id, port) = (id.clone(), port.clone());
        async move {
            let mut req = Request::post("/echo")
                .header("E2b-Sandbox-Id", id)
                .header("E2b-Sandbox-Port", port);
            for (k, v) in extra {
                req = req.header(k, v);
            }
            app.oneshot(req.body(Body::from("hi")).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(send(vec![]).await, StatusCode::FORBIDDEN);
    assert_eq!(
        send(vec![("E2B-Traffic-Access-Token", "wrong".into())]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(vec![("E2B-Traffic-Access-Token", token.clone())]).await,
        StatusCode::OK
    );
    // connect returns the same token; a public sandbox needs none.
    let (_, c, _) = call(
        &app,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(KEY1),
        Some("{}"),
        &[],
    )
    .await;
    assert_eq!(c["trafficAccessToken"], json!(token));
    let public = create(&app, KEY1, r#"{"templateID":"base"}"#).await;
    let req = Request::post("/echo")
        .header("E2b-Sandbox-Id", public["sandboxID"].as_str().unwrap())
        .header("E2b-Sandbox-Port", &port)
        .body(Body::from("hi"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn metrics_have_the_sdk_shape_and_filter_by_time() {
    let app = test_app(None);
    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let uri = format!("/sandboxes/{id}/metrics");
    let (s, v, _) = call(&app, "GET", &uri, Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = &v[0];
    for k in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!m[k].is_null(), "{k} missing in {m}");
    }
    assert_eq!(m["memTotal"], json!(512 * 1024 * 1024));
    let (s, v, _) = call(
        &app,
        "GET",
        &format!("{uri}?start=1&end=2"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!([]));
    let (s, v, _) = call(
        &app,
        "GET",
        &format!("{uri}?start=x"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);
    let (s, v, _) = call(
        &app,
        "GET",
        &format!("{uri}?start=5&end=1"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);
    let (s, v, _) = call(
        &app,
        "GET",
        "/sandboxes/nosuch/metrics",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
}
