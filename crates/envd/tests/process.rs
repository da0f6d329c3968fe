//! `process.Process` over real HTTP against an in-process envd (runs as root in CI).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::json;
use warren_envd::EnvdConfig;

#[tokio::test]
async fn start_streams_start_output_and_end() {
    let envd = start_envd(root_config()).await;
    let result = envd
        .run(start_request("echo hello; echo oops >&2"), Some("root"))
        .await;
    assert!(result.pid.is_some_and(|pid| pid > 0));
    assert!(
        result.events[0]["event"].get("start").is_some(),
        "first event must be start: {:?}",
        result.events
    );
    assert_eq!(result.stdout(), "hello\n");
    assert_eq!(String::from_utf8_lossy(&result.stderr), "oops\n");
    assert_eq!(result.exit_code(), 0);
    let end = result.end.as_ref().unwrap();
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 0");
    assert!(end.get("error").is_none());
    assert_eq!(result.trailer, Some(json!({})));
}

#[tokio::test]
async fn non_zero_exit_is_reported() {
    let envd = start_envd(root_config()).await;
    let result = envd.run(start_request("exit 7"), Some("root")).await;
    assert_eq!(result.exit_code(), 7);
    let end = result.end.unwrap();
    assert_eq!(end["status"], "exit status 7");
    assert_eq!(end["error"], "exit status 7");
}

#[tokio::test]
async fn sandbox_env_is_overlaid_by_request_env_and_cwd_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let mut env_vars = BTreeMap::new();
    env_vars.insert("SANDBOX_ONLY".to_string(), "s".to_string());
    env_vars.insert("OVERRIDDEN".to_string(), "sandbox".to_string());
    let envd = start_envd(EnvdConfig {
        env_vars,
        ..root_config()
    })
    .await;
    let request = json!({
        "process": {
            "cmd": "/bin/bash",
            "args": ["-c", "echo $SANDBOX_ONLY $OVERRIDDEN $REQ_ONLY $HOME $USER; pwd"],
            "envs": { "OVERRIDDEN": "request", "REQ_ONLY": "r" },
            "cwd": dir.path().to_str().unwrap(),
        },
        "stdin": false,
    });
    let result = envd.run(request, Some("root")).await;
    let canonical = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(
        result.stdout(),
        format!("s request r /root root\n{}\n", canonical.display())
    );
}

#[tokio::test]
async fn default_cwd_is_the_users_home() {
    let envd = start_envd(root_config()).await;
    let result = envd.run(start_request("pwd"), None).await;
    assert_eq!(result.stdout(), "/root\n");
}

#[tokio::test]
async fn runs_as_the_requested_user() {
    let envd = start_envd(root_config()).await;
    let request = json!({
        "process": { "cmd": "/bin/sh", "args": ["-c", "id -u; id -g"], "cwd": "/" },
    });
    let result = envd.run(request, Some("nobody")).await;
    let nobody = warren_envd::users::UserDb::load().user("nobody").unwrap();
    assert_eq!(result.stdout(), format!("{}\n{}\n", nobody.uid, nobody.gid));
}

#[tokio::test]
async fn unknown_user_is_rejected() {
    let envd = start_envd(root_config()).await;
    let mut stream = envd
        .stream(
            "/process.Process/Start",
            start_request("true"),
            Some("no-such-user"),
        )
        .await;
    let (flags, message) = stream.next().await.unwrap();
    assert_eq!(flags, 0x02);
    assert_eq!(message["error"]["code"], "unauthenticated");
}

#[tokio::test]
async fn missing_cwd_is_an_error_not_a_crash() {
    let envd = start_envd(root_config()).await;
    let request = json!({
        "process": { "cmd": "/bin/true", "cwd": "/definitely/not/here" },
    });
    let mut stream = envd
        .stream("/process.Process/Start", request, Some("root"))
        .await;
    let (flags, message) = stream.next().await.unwrap();
    assert_eq!(flags, 0x02);
    assert_eq!(message["error"]["code"], "invalid_argument");
    // Still serving.
    assert_eq!(
        envd.run(start_request("echo ok"), None).await.stdout(),
        "ok\n"
    );
}

#[tokio::test]
async fn nonexistent_program_fails_cleanly() {
    let envd = start_envd(root_config()).await;
    let request = json!({ "process": { "cmd": "/no/such/binary" } });
    let mut stream = envd
        .stream("/process.Process/Start", request, Some("root"))
        .await;
    let (flags, message) = stream.next().await.unwrap();
    assert_eq!(flags, 0x02);
    assert_eq!(message["error"]["code"], "not_found", "{message}");
}

#[tokio::test]
async fn list_signal_and_connect() {
    let envd = start_envd(root_config()).await;
    let mut running = envd
        .stream(
            "/process.Process/Start",
            json!({
                "process": { "cmd": "/bin/bash", "args": ["-c", "echo ready; sleep 60"] },
                "tag": "sleeper",
            }),
            Some("root"),
        )
        .await;
    let start = running
        .next_matching(|m| m["event"].get("start").is_some())
        .await;
    let pid = start["event"]["start"]["pid"].as_u64().unwrap();
    running
        .next_matching(|m| m["event"].get("data").is_some())
        .await;

    let (status, list) = envd.unary("/process.Process/List", json!({}), None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .expect("process listed");
    assert_eq!(listed["tag"], "sleeper");
    assert_eq!(listed["config"]["cmd"], "/bin/bash");
    assert_eq!(listed["config"]["cwd"], "/root");

    // Attach a second stream; it must start with the same pid.
    let mut attached = envd
        .stream(
            "/process.Process/Connect",
            json!({ "process": { "pid": pid } }),
            None,
        )
        .await;
    let (_, first) = attached.next().await.unwrap();
    assert_eq!(first["event"]["start"]["pid"].as_u64(), Some(pid));

    let (status, body) = envd
        .unary(
            "/process.Process/SendSignal",
            json!({ "process": { "pid": pid }, "signal": "SIGNAL_SIGKILL" }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    for stream in [&mut running, &mut attached] {
        let end = stream
            .next_matching(|m| m["event"].get("end").is_some())
            .await;
        assert_eq!(end["event"]["end"]["status"], "signal: killed");
        assert_eq!(end["event"]["end"]["exitCode"], -1);
        assert!(end["event"]["end"].get("exited").is_none());
        let (flags, trailer) = stream.next().await.unwrap();
        assert_eq!((flags, trailer), (0x02, json!({})));
    }

    let (status, body) = envd
        .unary(
            "/process.Process/SendSignal",
            json!({ "process": { "pid": pid }, "signal": 9 }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");

    let (_, list) = envd.unary("/process.Process/List", json!({}), None).await;
    assert!(!list.to_string().contains(&format!("\"pid\":{pid}")));
}

#[tokio::test]
async fn send_input_and_close_stdin() {
    let envd = start_envd(root_config()).await;
    let mut stream = envd
        .stream(
            "/process.Process/Start",
            json!({ "process": { "cmd": "/bin/cat" }, "stdin": true }),
            Some("root"),
        )
        .await;
    let start = stream.next().await.unwrap().1;
    let pid = start["event"]["start"]["pid"].as_u64().unwrap();
    let (status, body) = envd
        .unary(
            "/process.Process/SendInput",
            json!({ "process": { "pid": pid }, "input": { "stdin": b64(b"hello\n") } }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = stream
        .next_matching(|m| m["event"].get("data").is_some())
        .await;
    assert_eq!(
        unb64(data["event"]["data"]["stdout"].as_str().unwrap()),
        b"hello\n"
    );

    let (status, _) = envd
        .unary(
            "/process.Process/CloseStdin",
            json!({ "process": { "pid": pid } }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let end = stream
        .next_matching(|m| m["event"].get("end").is_some())
        .await;
    assert_eq!(end["event"]["end"]["status"], "exit status 0");
}

#[tokio::test]
async fn send_input_without_stdin_is_rejected() {
    let envd = start_envd(root_config()).await;
    let mut stream = envd
        .stream("/process.Process/Start", start_request("sleep 5"), None)
        .await;
    let pid = stream.next().await.unwrap().1["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    let (status, body) = envd
        .unary(
            "/process.Process/SendInput",
            json!({ "process": { "pid": pid }, "input": { "stdin": b64(b"x") } }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "failed_precondition");
    envd.unary(
        "/process.Process/SendSignal",
        json!({ "process": { "pid": pid }, "signal": "SIGNAL_SIGTERM" }),
        None,
    )
    .await;
    let end = stream
        .next_matching(|m| m["event"].get("end").is_some())
        .await;
    assert_eq!(end["event"]["end"]["status"], "signal: terminated");
}

#[tokio::test]
async fn stream_input_delivers_each_message_as_it_arrives() {
    let envd = start_envd(root_config()).await;
    let mut output = envd
        .stream(
            "/process.Process/Start",
            json!({ "process": { "cmd": "/bin/cat" }, "stdin": true }),
            Some("root"),
        )
        .await;
    let pid = output.next().await.unwrap().1["event"]["start"]["pid"]
        .as_u64()
        .unwrap();

    let (input, response) = envd
        .client_stream("/process.Process/StreamInput", None)
        .await;
    input
        .send(json!({ "start": { "process": { "pid": pid } } }))
        .await
        .unwrap();
    input
        .send(json!({ "data": { "input": { "stdin": b64(b"first\n") } } }))
        .await
        .unwrap();
    // The body is still open: the first chunk must already have reached cat.
    let data = tokio::time::timeout(
        Duration::from_secs(10),
        output.next_matching(|m| m["event"].get("data").is_some()),
    )
    .await
    .expect("input was not forwarded before the request body ended");
    assert_eq!(
        unb64(data["event"]["data"]["stdout"].as_str().unwrap()),
        b"first\n"
    );
    input.send(json!({ "keepalive": {} })).await.unwrap();
    drop(input);

    let mut response = response.await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.next().await.unwrap(), (0, json!({})));
    assert_eq!(response.next().await.unwrap(), (2, json!({})));

    envd.unary(
        "/process.Process/CloseStdin",
        json!({ "process": { "pid": pid } }),
        None,
    )
    .await;
    let end = output
        .next_matching(|m| m["event"].get("end").is_some())
        .await;
    assert_eq!(end["event"]["end"]["exited"], true);
}

#[tokio::test]
async fn large_output_arrives_complete() {
    let envd = start_envd(root_config()).await;
    let result = envd
        .run(
            start_request("head -c 3000000 /dev/zero | tr '\\0' 'a'"),
            None,
        )
        .await;
    assert_eq!(result.stdout.len(), 3_000_000);
    assert!(result.stdout.iter().all(|b| *b == b'a'));
    assert_eq!(result.exit_code(), 0);
}

#[tokio::test]
async fn background_grandchild_does_not_block_the_end() {
    let envd = start_envd(root_config()).await;
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        envd.run(start_request("sleep 8 & echo started"), None),
    )
    .await
    .expect("command with a background child never ended");
    assert_eq!(result.stdout(), "started\n");
    assert_eq!(result.exit_code(), 0);
}

#[tokio::test]
async fn many_fast_processes_all_get_their_exit_status() {
    let envd = start_envd(root_config()).await;
    let runs = (0..20).map(|i| {
        let envd = &envd;
        async move {
            let request =
                json!({ "process": { "cmd": "/bin/sh", "args": ["-c", format!("exit {i}")] } });
            envd.run(request, None).await.exit_code()
        }
    });
    let codes = futures::future::join_all(runs).await;
    assert_eq!(codes, (0..20).collect::<Vec<i64>>());
}

async fn read_pty_until(stream: &mut ConnectStream, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            stream.next_matching(|m| m["event"].get("data").is_some()),
        )
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in PTY output {seen:?}"));
        let data = &message["event"]["data"];
        assert!(
            data.get("stdout").is_none(),
            "PTY output must come as data.pty"
        );
        seen.push_str(&String::from_utf8_lossy(&unb64(
            data["pty"].as_str().unwrap(),
        )));
    }
    seen
}

#[tokio::test]
async fn pty_runs_interactive_input_and_resizes() {
    let envd = start_envd(root_config()).await;
    let request = json!({
        "process": { "cmd": "/bin/sh", "envs": { "TERM": "xterm-256color", "PS1": "$ " } },
        "pty": { "size": { "cols": 80, "rows": 24 } },
    });
    let mut stream = envd
        .stream("/process.Process/Start", request, Some("root"))
        .await;
    let pid = stream.next().await.unwrap().1["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    let send = |text: &'static str| {
        let envd = &envd;
        async move {
            let (status, body) = envd
                .unary(
                    "/process.Process/SendInput",
                    json!({ "process": { "pid": pid }, "input": { "pty": b64(text.as_bytes()) } }),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    send("stty size; tty\n").await;
    let output = read_pty_until(&mut stream, "/dev/pts/").await;
    assert!(output.contains("24 80"), "{output:?}");

    let (status, body) = envd
        .unary(
            "/process.Process/Update",
            json!({ "process": { "pid": pid }, "pty": { "size": { "cols": 100, "rows": 30 } } }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    send("stty size\n").await;
    read_pty_until(&mut stream, "30 100").await;

    send("exit 3\n").await;
    let end = stream
        .next_matching(|m| m["event"].get("end").is_some())
        .await;
    assert_eq!(end["event"]["end"]["exitCode"], 3);
}
