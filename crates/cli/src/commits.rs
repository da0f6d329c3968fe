//! `warren commit ...` and `warren secret ...`: commits of sandboxes to OCI images and the
//! registry credentials pushes use.

use crate::client::ApiClient;
use crate::output;
use crate::Output;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};
use std::io::Read;
use std::time::Duration;

#[derive(Subcommand)]
pub enum CommitCommand {
    /// Commit a sandbox's filesystem changes as an OCI image (and template named by the image).
    Create(CreateArgs),
    /// List commits.
    #[command(visible_alias = "ls")]
    List,
    /// Show one commit.
    Get { name: String },
    /// Delete a finished commit, its image name and template, and blobs nothing else uses.
    #[command(visible_alias = "rm")]
    Delete { name: String },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The sandbox to commit.
    pub sandbox: String,
    /// Image name, `[registry/]repository[:tag]`; new sandboxes use it as their template.
    #[arg(long)]
    pub image: String,
    /// Commit object name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Push the image to its registry after the local commit.
    #[arg(long)]
    pub push: bool,
    /// Registry secret(s) to push with (see `warren secret create`).
    #[arg(long = "registry-secret")]
    pub secrets: Vec<String>,
    /// Keep the commit and its image this long (e.g. 30m, 1h, 7d), then collect them.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Return at once instead of waiting for the commit to finish.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store registry credentials; the password is read from standard input.
    Create {
        name: String,
        #[arg(long)]
        username: String,
        /// Read the password from standard input (required: passwords never go on the command
        /// line, where `ps` shows them).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List secrets (names and usernames, never passwords).
    #[command(visible_alias = "ls")]
    List,
    /// Delete a secret.
    #[command(visible_alias = "rm")]
    Delete { name: String },
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
    output::fields(&[
        ("name", c["metadata"]["name"].as_str().unwrap_or("").into()),
        ("sandbox", output::str_field(&c["spec"], "sandbox")),
        ("image", output::str_field(&c["spec"], "image")),
        ("phase", output::str_field(st, "phase")),
        ("digest", output::str_field(st, "digest")),
        ("layer size", output::str_field(st, "size")),
        ("image size", output::str_field(st, "imageSize")),
        ("frozen for", ms("freezeDurationMs")),
        ("total", ms("totalDurationMs")),
        ("pushed", output::str_field(st, "pushed")),
        ("expires", output::time_field(st, "expiresAt")),
        ("message", output::str_field(st, "message")),
    ]);
}

pub async fn run(api: &ApiClient, out: Output, cmd: CommitCommand) -> anyhow::Result<u8> {
    match cmd {
        CommitCommand::Create(a) => create(api, out, a).await,
        CommitCommand::List => {
            let (_, _, v) = api.call(Method::GET, "/warren/v1/commits", None).await?;
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
                        output::str_field(&c["spec"], "image"),
                        output::str_field(&c["status"], "phase"),
                        output::str_field(&c["status"], "digest"),
                    ]
                })
                .collect();
            output::table(&["NAME", "SANDBOX", "IMAGE", "PHASE", "DIGEST"], &rows);
            Ok(0)
        }
        CommitCommand::Get { name } => {
            let (_, _, v) = api
                .call(Method::GET, &format!("/warren/v1/commits/{name}"), None)
                .await?;
            show(out, &v);
            Ok(0)
        }
        CommitCommand::Delete { name } => {
            api.call(Method::DELETE, &format!("/warren/v1/commits/{name}"), None)
                .await?;
            println!("commit/{name} deleted");
            Ok(0)
        }
    }
}

async fn create(api: &ApiClient, out: Output, a: CreateArgs) -> anyhow::Result<u8> {
    let mut spec = json!({"sandbox": a.sandbox, "image": a.image});
    if a.push {
        spec["push"] = json!(true);
    }
    if !a.secrets.is_empty() {
        spec["registryAuth"] = json!({"secrets": a.secrets});
    }
    if let Some(t) = a.ttl {
        spec["ttl"] = json!(t);
    }
    let body = json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "Commit",
        "metadata": {"name": a.name.unwrap_or_default()},
        "spec": spec,
    });
    let (_, _, mut c) = api
        .call(Method::POST, "/warren/v1/commits", Some(body))
        .await?;
    let name = c["metadata"]["name"].as_str().unwrap_or("").to_string();
    if !a.no_wait {
        loop {
            let phase = c["status"]["phase"].as_str().unwrap_or("");
            if phase == "Succeeded" || phase == "Failed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            c = api
                .call(Method::GET, &format!("/warren/v1/commits/{name}"), None)
                .await?
                .2;
        }
    }
    show(out, &c);
    Ok(if c["status"]["phase"] == "Failed" {
        1
    } else {
        0
    })
}

pub async fn run_secret(api: &ApiClient, out: Output, cmd: SecretCommand) -> anyhow::Result<u8> {
    match cmd {
        SecretCommand::Create {
            name,
            username,
            password_stdin: _,
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                bail!("empty password on standard input");
            }
            api.call(
                Method::PUT,
                &format!("/warren/v1/secrets/{name}"),
                Some(json!({"username": username, "password": password})),
            )
            .await?;
            println!("secret/{name} stored");
        }
        SecretCommand::List => {
            let (_, _, v) = api.call(Method::GET, "/warren/v1/secrets", None).await?;
            if out == Output::Json {
                output::json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        vec![
                            output::str_field(s, "name"),
                            output::str_field(s, "username"),
                            output::time_field(s, "created_at"),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "USERNAME", "CREATED"], &rows);
            }
        }
        SecretCommand::Delete { name } => {
            api.call(Method::DELETE, &format!("/warren/v1/secrets/{name}"), None)
                .await?;
            println!("secret/{name} deleted");
        }
    }
    Ok(0)
}
