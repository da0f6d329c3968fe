//! `filesystem.Filesystem` over real HTTP against an in-process envd.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use hyper::StatusCode;
use serde_json::{json, Value};

fn path_of(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_string()
}

#[tokio::test]
async fn stat_reports_entry_info() {
    let dir = tempfile::tempdir().unwrap();
    let file = path_of(&dir, "a.txt");
    std::fs::write(&file, b"hello world!").unwrap();
    std::os::unix::fs::symlink(&file, dir.path().join("link")).unwrap();
    let envd = start_envd(root_config()).await;

    let (status, body) = envd
        .unary("/filesystem.Filesystem/Stat", json!({ "path": file }), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entry = &body["entry"];
    assert_eq!(entry["name"], "a.txt");
    assert_eq!(entry["type"], "FILE_TYPE_FILE");
    assert_eq!(entry["path"], file.as_str());
    assert_eq!(entry["size"], "12");
    let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
    assert_eq!(entry["mode"], mode);
    assert_eq!(entry["owner"], "root");
    assert_eq!(entry["group"], "root");
    assert!(entry["permissions"].as_str().unwrap().starts_with("-rw"));
    chrono::DateTime::parse_from_rfc3339(entry["modifiedTime"].as_str().unwrap()).unwrap();

    let (_, body) = envd
        .unary(
            "/filesystem.Filesystem/Stat",
            json!({ "path": path_of(&dir, "link") }),
            None,
        )
        .await;
    assert_eq!(body["entry"]["type"], "FILE_TYPE_SYMLINK");
    assert_eq!(body["entry"]["permissions"], "lrwxrwxrwx");
    let canonical = std::fs::canonicalize(&file).unwrap();
    assert_eq!(body["entry"]["symlinkTarget"], canonical.to_str().unwrap());

    let (_, body) = envd
        .unary(
            "/filesystem.Filesystem/Stat",
            json!({ "path": dir.path().to_str().unwrap() }),
            None,
        )
        .await;
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert!(body["entry"]["permissions"]
        .as_str()
        .unwrap()
        .starts_with('d'));
}

#[tokio::test]
async fn stat_missing_path_is_not_found() {
    let envd = start_envd(root_config()).await;
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/Stat",
            json!({ "path": "/no/such/file" }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("/no/such/file"));
}

#[tokio::test]
async fn relative_paths_resolve_against_home() {
    let envd = start_envd(root_config()).await;
    let name = format!("envd-test-{}", std::process::id());
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": name }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entry"]["path"], format!("/root/{name}"));
    let (status, _) = envd
        .unary(
            "/filesystem.Filesystem/Remove",
            json!({ "path": format!("~/{name}") }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!std::path::Path::new(&format!("/root/{name}")).exists());
}

#[tokio::test]
async fn make_dir_list_move_remove() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let nested = path_of(&dir, "a/b/c");

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": nested }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert!(std::path::Path::new(&nested).is_dir());

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": nested }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "already_exists");

    std::fs::write(dir.path().join("a/file.txt"), b"x").unwrap();

    let names = |body: &Value| -> Vec<String> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect()
    };
    let root = dir.path().to_str().unwrap();
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/ListDir",
            json!({ "path": root }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&body), vec![format!("{root}/a")]);

    let (_, body) = envd
        .unary(
            "/filesystem.Filesystem/ListDir",
            json!({ "path": root, "depth": 3 }),
            None,
        )
        .await;
    let mut listed = names(&body);
    listed.sort();
    assert_eq!(
        listed,
        vec![
            format!("{root}/a"),
            format!("{root}/a/b"),
            format!("{root}/a/b/c"),
            format!("{root}/a/file.txt"),
        ]
    );
    let file_entry = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "file.txt")
        .unwrap();
    assert_eq!(file_entry["type"], "FILE_TYPE_FILE");
    assert_eq!(file_entry["size"], "1");

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/Move",
            json!({ "source": path_of(&dir, "a/file.txt"), "destination": path_of(&dir, "moved/f.txt") }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entry"]["name"], "f.txt");
    assert_eq!(std::fs::read(dir.path().join("moved/f.txt")).unwrap(), b"x");
    assert!(!dir.path().join("a/file.txt").exists());

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/Move",
            json!({ "source": path_of(&dir, "missing"), "destination": path_of(&dir, "x") }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, _) = envd
        .unary(
            "/filesystem.Filesystem/Remove",
            json!({ "path": path_of(&dir, "a") }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!dir.path().join("a").exists());

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/Remove",
            json!({ "path": path_of(&dir, "a") }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn file_operations_run_with_the_users_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let envd = start_envd(root_config()).await;
    let nobody = warren_envd::users::UserDb::load().user("nobody").unwrap();

    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": private.join("x").to_str().unwrap() }),
            Some("nobody"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "permission_denied");
    assert!(!private.join("x").exists());

    let created = shared.join("mine");
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": created.to_str().unwrap() }),
            Some("nobody"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(std::fs::metadata(&created).unwrap().uid(), nobody.uid);
    assert_eq!(body["entry"]["owner"], "nobody");

    // The same request as root still works: identities never leak between requests.
    let (status, _) = envd
        .unary(
            "/filesystem.Filesystem/MakeDir",
            json!({ "path": private.join("y").to_str().unwrap() }),
            Some("root"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(std::fs::metadata(private.join("y")).unwrap().uid(), 0);
}

#[tokio::test]
async fn polling_watcher_reports_events() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let envd = start_envd(root_config()).await;
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/CreateWatcher",
            json!({ "path": dir.path().to_str().unwrap(), "recursive": true }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["watcherId"].as_str().unwrap().to_string();

    std::fs::write(dir.path().join("new.txt"), b"1").unwrap();
    std::fs::write(dir.path().join("sub/deep.txt"), b"2").unwrap();
    std::fs::remove_file(dir.path().join("new.txt")).unwrap();

    let mut seen: Vec<(String, String)> = Vec::new();
    for _ in 0..50 {
        let (status, body) = envd
            .unary(
                "/filesystem.Filesystem/GetWatcherEvents",
                json!({ "watcher_id": id }),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for event in body["events"].as_array().unwrap() {
            seen.push((
                event["name"].as_str().unwrap().to_string(),
                event["type"].as_str().unwrap().to_string(),
            ));
        }
        if seen
            .iter()
            .any(|(n, t)| n == "new.txt" && t == "EVENT_TYPE_REMOVE")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let has = |name: &str, kind: &str| seen.iter().any(|(n, t)| n == name && t == kind);
    assert!(has("new.txt", "EVENT_TYPE_CREATE"), "{seen:?}");
    assert!(has("new.txt", "EVENT_TYPE_WRITE"), "{seen:?}");
    assert!(has("sub/deep.txt", "EVENT_TYPE_CREATE"), "{seen:?}");
    assert!(has("new.txt", "EVENT_TYPE_REMOVE"), "{seen:?}");

    let (status, _) = envd
        .unary(
            "/filesystem.Filesystem/RemoveWatcher",
            json!({ "watcherId": id }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/GetWatcherEvents",
            json!({ "watcherId": id }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn watch_dir_streams_events() {
    let dir = tempfile::tempdir().unwrap();
    let envd = start_envd(root_config()).await;
    let mut stream = envd
        .stream(
            "/filesystem.Filesystem/WatchDir",
            json!({ "path": dir.path().to_str().unwrap(), "includeEntry": true }),
            None,
        )
        .await;
    let (flags, first) = stream.next().await.unwrap();
    assert_eq!((flags, first), (0, json!({ "start": {} })));
    std::fs::create_dir(dir.path().join("made")).unwrap();
    let event = stream
        .next_matching(|m| m.get("filesystem").is_some())
        .await;
    assert_eq!(event["filesystem"]["name"], "made");
    assert_eq!(event["filesystem"]["type"], "EVENT_TYPE_CREATE");
    assert_eq!(event["filesystem"]["entry"]["type"], "FILE_TYPE_DIRECTORY");
}

#[tokio::test]
async fn watching_a_missing_directory_is_not_found() {
    let envd = start_envd(root_config()).await;
    let (status, body) = envd
        .unary(
            "/filesystem.Filesystem/CreateWatcher",
            json!({ "path": "/no/such/dir" }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let mut stream = envd
        .stream(
            "/filesystem.Filesystem/WatchDir",
            json!({ "path": "/no/such/dir" }),
            None,
        )
        .await;
    let (flags, message) = stream.next().await.unwrap();
    assert_eq!(flags, 0x02);
    assert_eq!(message["error"]["code"], "not_found");
}
