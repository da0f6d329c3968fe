//! The CLI client against a real HTTP server running the API over FakeRuntime.

use std::process::Command;
use std::sync::Arc;
use warren_core::{ApiKeys, Store, TemplateRegistry, Warren, WarrenConfig};
use warren_runtime::fake::FakeRuntime;
use warren_runtime::RootfsSpec;

fn start_daemon() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let templates = TemplateRegistry::new(None);
            templates.register(
                "base",
                RootfsSpec {
                    lower_dirs: vec!["/nonexistent".into()],
                    ro_binds: vec![],
                },
            );
            let warren = Arc::new(Warren::new(
                Arc::new(FakeRuntime::new()),
                Store::open_in_memory().unwrap(),
                templates,
                ApiKeys::single("testkey"),
                WarrenConfig::default(),
            ));
            let app = warren_api::app(warren, Default::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap()))
                .unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn warren(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["sandbox", "--url", url, "--api-key", "testkey"])
        .args(args)
        .env_remove("WARREN_URL")
        .env_remove("WARREN_API_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn create_list_pause_resume_kill() {
    let url = start_daemon();
    let (code, id, err) = warren(&url, &["create", "-m", "owner=me", "--timeout", "60"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    assert_eq!(id.len(), 20);

    let (code, out, _) = warren(&url, &["list"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    let header: Vec<&str> = lines[0].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(
        header.iter().map(|c| c.trim()).collect::<Vec<_>>(),
        [
            "SANDBOX ID",
            "TEMPLATE",
            "STATE",
            "STARTED (UTC)",
            "ENDS (UTC)",
            "METADATA"
        ],
        "{out}"
    );
    // Columns are aligned: every row's STATE starts where the header's does.
    let state_col = lines[0].find("STATE").unwrap();
    assert_eq!(&lines[1][state_col..state_col + 7], "running", "{out}");
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("running") && lines[1].contains("owner=me")
    );

    let (code, out, _) = warren(&url, &["list", "--output", "json", "-m", "owner=someone"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "[]");

    assert_eq!(warren(&url, &["pause", &id]).0, 0);
    let (code, _, err) = warren(&url, &["pause", &id]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("warren: ") && err.contains("already paused") && err.contains("409"),
        "{err}"
    );
    let (_, out, _) = warren(&url, &["get", &id]);
    assert!(out.contains("paused"), "{out}");

    let (code, out, _) = warren(&url, &["resume", &id]);
    assert_eq!((code, out.trim()), (0, format!("resumed {id}").as_str()));
    assert_eq!(warren(&url, &["kill", &id]).0, 0);

    let (code, _, err) = warren(&url, &["kill", &id]);
    assert_eq!(code, 1);
    assert!(
        err.contains("not found") && !err.contains("panicked"),
        "{err}"
    );

    let (code, _, err) = warren(&url, &["create", "--template", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("template 'nope' not found"), "{err}");
}

#[test]
fn unreachable_daemon_is_a_readable_error() {
    let (code, _, err) = warren("http://127.0.0.1:9", &["list"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("warren: cannot reach the daemon"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
