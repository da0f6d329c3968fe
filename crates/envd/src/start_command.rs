//! The template's start command: a long-running server that a template exists for (the code
//! interpreter of `code-interpreter-v1`), started by envd once it serves, as root in `/`, with the
//! sandbox's env vars. It is an ordinary tracked process, so `commands.list()` shows it and it can
//! be killed like any other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::process::{ProcessEvent, StartOptions};
use crate::server::AppState;
use crate::users::UserDb;

pub fn spawn(state: Arc<AppState>, command: String) {
    tokio::spawn(async move {
        let Some(user) = UserDb::load().user("root") else {
            tracing::warn!("start command not run: no root user in /etc/passwd");
            return;
        };
        let options = StartOptions {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), command.clone()],
            envs: BTreeMap::new(),
            base_env: state.live().env_vars,
            cwd: PathBuf::from("/"),
            user,
            tag: None,
            stdin: false,
            pty: None,
        };
        match state.processes.start(options).await {
            Ok((process, mut events)) => {
                tracing::info!(pid = process.pid, command, "start command running");
                // Nobody else reads its output: drain it so the process never blocks on a pipe.
                while let Some(event) = events.recv().await {
                    if let ProcessEvent::End(end) = event {
                        tracing::warn!(command, end = ?end, "start command ended");
                        break;
                    }
                }
            }
            Err(e) => tracing::warn!(command, error = %e.to_string(), "start command failed"),
        }
    });
}
