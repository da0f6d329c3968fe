//! `warren checkpoint ...`: snapshots of a sandbox's memory and filesystem, and sandboxes
//! restored (forked) from them.

use crate::client::ApiClient;
use crate::output;
use crate::Output;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Checkpoint a sandbox (memory and filesystem; it runs on unless --stop).
    Create(CreateArgs),
    /// List checkpoints.
    #[command(visible_alias = "ls")]
    List,
    /// Show one checkpoint.
    Get { name: String },
    /// Delete a checkpoint (refused while sandboxes restored from it still run).
    #[command(visible_alias = "rm")]
    Delete { name: String },
    /// Create sandboxes from a checkpoint (each with its own id, address, token and files).
    Restore {
        name: String,
        /// How many sandboxes (1-100).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Their timeout in seconds.
        #[arg(long)]
        timeout: Option<i64>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The sandbox to checkpoint.
    pub sandbox: String,
    /// Checkpoint name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// End the sandbox after the checkpoint (keepRunning: false).
    #[arg(long)]
    pub stop: bool,
    /// Keep only the filesystem: restores start fresh processes on the checkpoint's files.
    #[arg(long)]
    pub filesystem_only: bool,
    /// Keep the checkpoint this long (e.g. 30m, 1h, 7d), then collect it.
    #[arg(long)]
    pub ttl: Option<String>,
}

fn show(out: Output, c: &Value) {
    if out == Output::Json {
        output::json(c);
        return;
    }
    let st = &c["status"];
    let ms = |k: &str| {
        st[k]
            .as_f64()
            .map(|v| format!("{v:.1} ms"))
            .unwrap_or_default()
    };
    let contents = c["spec"]["persistentContents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    output::fields(&[
        ("name", c["metadata"]["name"].as_str().unwrap_or("").into()),
        ("sandbox", output::str_field(&c["spec"], "sandbox")),
        ("template", output::str_field(st, "template")),
        ("contents", contents),
        ("keep running", output::str_field(&c["spec"], "keepRunning")),
        ("phase", output::str_field(st, "phase")),
        ("size", output::str_field(st, "size")),
        ("memory size", output::str_field(st, "memorySize")),
        ("files size", output::str_field(st, "filesystemSize")),
        ("frozen for", ms("freezeDurationMs")),
        ("duration", ms("durationMs")),
        ("expires", output::time_field(st, "expiresAt")),
        ("message", output::str_field(st, "message")),
    ]);
}

pub async fn run(api: &ApiClient, out: Output, cmd: CheckpointCommand) -> anyhow::Result<u8> {
    match cmd {
        CheckpointCommand::Create(a) => {
            let mut spec = json!({"sandbox": a.sandbox, "keepRunning": !a.stop});
            spec["persistentContents"] = if a.filesystem_only {
                json!(["filesystem"])
            } else {
                json!(["memory", "filesystem"])
            };
            if let Some(t) = a.ttl {
                spec["ttlAfterFinished"] = json!(t);
            }
            let body = json!({
                "apiVersion": "warren.dev/v1alpha1",
                "kind": "Checkpoint",
                "metadata": {"name": a.name.unwrap_or_default()},
                "spec": spec,
            });
            let (_, _, c) = api
                .call(Method::POST, "/warren/v1/checkpoints", Some(body))
                .await?;
            show(out, &c);
            Ok(0)
        }
        CheckpointCommand::List => {
            let (_, _, v) = api
                .call(Method::GET, "/warren/v1/checkpoints", None)
                .await?;
            if out == Output::Json {
                output::json(&v);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    vec![
                        c["metadata"]["name"].as_str().unwrap_or("").into(),
                        output::str_field(&c["spec"], "sandbox"),
                        output::str_field(&c["status"], "phase"),
                        output::str_field(&c["status"], "size"),
                        output::time_field(&c["status"], "expiresAt"),
                    ]
                })
                .collect();
            output::table(&["NAME", "SANDBOX", "PHASE", "SIZE", "EXPIRES"], &rows);
            Ok(0)
        }
        CheckpointCommand::Get { name } => {
            let (_, _, v) = api
                .call(Method::GET, &format!("/warren/v1/checkpoints/{name}"), None)
                .await?;
            show(out, &v);
            Ok(0)
        }
        CheckpointCommand::Delete { name } => {
            api.call(
                Method::DELETE,
                &format!("/warren/v1/checkpoints/{name}"),
                None,
            )
            .await?;
            println!("checkpoint/{name} deleted");
            Ok(0)
        }
        CheckpointCommand::Restore {
            name,
            count,
            timeout,
        } => {
            let mut body = json!({"count": count});
            if let Some(t) = timeout {
                body["timeout"] = json!(t);
            }
            let (_, _, v) = api
                .call(
                    Method::POST,
                    &format!("/warren/v1/checkpoints/{name}/restore"),
                    Some(body),
                )
                .await?;
            if out == Output::Json {
                output::json(&v);
            }
            let mut failed = 0;
            for item in v.as_array().into_iter().flatten() {
                if let Some(id) = item["sandbox"]["sandboxID"].as_str() {
                    if out != Output::Json {
                        println!("{id}");
                    }
                } else {
                    failed += 1;
                    eprintln!(
                        "error: {}",
                        item["error"]["message"]
                            .as_str()
                            .unwrap_or("restore failed")
                    );
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
    }
}
