//! `warren template ...`: create templates from images (with progress bars while the daemon
//! pulls and unpacks), list, inspect and delete them.

use crate::client::ApiClient;
use crate::output;
use crate::Output;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Create a template from an image, an OCI layout or archive, a docker-archive, a rootfs dir
    /// or a checkpoint.
    Create(CreateArgs),
    /// List templates.
    #[command(visible_alias = "ls")]
    List,
    /// Show one template (its image, layers, env, workdir, user, start command, or its build).
    Inspect { name: String },
    /// Delete a template (refused while sandboxes or pools use it).
    #[command(visible_alias = "rm")]
    Delete { name: String },
    /// Build a template from a Dockerfile subset (FROM, RUN, COPY, ENV, WORKDIR, USER, CMD,
    /// ENTRYPOINT) in the daemon; each RUN, COPY and WORKDIR is a committed layer, unchanged steps
    /// come from the cache (shown as CACHED). Prints each step and the RUN output as the daemon
    /// runs them; ENV, WORKDIR, USER, CMD and ENTRYPOINT apply to the template's sandboxes.
    Build {
        /// The template (and image) name.
        name: String,
        /// The build file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Where COPY sources are (default: the build file's directory).
        #[arg(long)]
        context: Option<PathBuf>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(false)))]
pub struct CreateArgs {
    /// The template's name (the `templateID` of creates).
    pub name: String,
    /// Image reference; pulled unless the daemon's store has it (e.g. a commit).
    #[arg(long, group = "source")]
    pub image: Option<String>,
    /// OCI image layout directory (on the daemon's host).
    #[arg(long, group = "source")]
    pub oci_dir: Option<PathBuf>,
    /// OCI image layout as a tar file (skopeo's oci-archive).
    #[arg(long, group = "source")]
    pub oci_archive: Option<PathBuf>,
    /// `docker save` tarball.
    #[arg(long, group = "source")]
    pub docker_archive: Option<PathBuf>,
    /// A root filesystem directory, used as the template's single read-only layer.
    #[arg(long, group = "source")]
    pub rootfs: Option<PathBuf>,
    /// A checkpoint: every sandbox of the template (and of a pool on it) is a restore of it,
    /// e.g. a code interpreter with its imports done.
    #[arg(long, group = "source")]
    pub checkpoint: Option<String>,
    /// Which image of the layout or archive (ref name or tag), when it holds several.
    #[arg(long)]
    pub image_name: Option<String>,
    /// Registry user name (with --password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Return at once instead of following the build.
    #[arg(long)]
    pub no_wait: bool,
}

fn absolute(p: &Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    p.as_ref()
        .map(|p| std::path::absolute(p).with_context(|| format!("resolving {}", p.display())))
        .transpose()
}

pub async fn run(api: &ApiClient, out: Output, cmd: TemplateCommand) -> anyhow::Result<u8> {
    match cmd {
        TemplateCommand::Create(a) => create(api, out, a).await,
        TemplateCommand::Build {
            name,
            file,
            context,
        } => crate::build::build(api, &name, &file, context.as_deref()).await,
        TemplateCommand::List => {
            let (_, _, v) = api.call(Method::GET, "/warren/v1/templates", None).await?;
            if out == Output::Json {
                output::json(&v);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        output::str_field(t, "name"),
                        output::str_field(t, "kind"),
                        output::str_field(t, "status"),
                        source_of(t),
                        size_of(t),
                    ]
                })
                .collect();
            output::table(&["NAME", "KIND", "STATUS", "SOURCE", "SIZE"], &rows);
            Ok(0)
        }
        TemplateCommand::Inspect { name } => {
            let v = get(api, &name).await?;
            output::json(&v);
            Ok(0)
        }
        TemplateCommand::Delete { name } => {
            api.call(
                Method::DELETE,
                &format!("/warren/v1/templates/{name}"),
                None,
            )
            .await?;
            println!("deleted template {name}");
            Ok(0)
        }
    }
}

fn source_of(t: &Value) -> String {
    let s = if t["template"].is_object() {
        &t["template"]["source"]
    } else {
        &t["build"]["source"]
    };
    match s["kind"].as_str() {
        Some("image") => s["reference"].as_str().unwrap_or("").to_string(),
        Some("checkpoint") => format!("checkpoint {}", s["checkpoint"].as_str().unwrap_or("")),
        Some(k) => format!("{k} {}", s["path"].as_str().unwrap_or("")),
        None => "-".into(),
    }
}

fn size_of(t: &Value) -> String {
    match t["template"]["sizeBytes"].as_u64() {
        Some(b) if b > 0 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        _ => "-".into(),
    }
}

async fn get(api: &ApiClient, name: &str) -> anyhow::Result<Value> {
    let (_, _, v) = api
        .call(Method::GET, &format!("/warren/v1/templates/{name}"), None)
        .await?;
    Ok(v)
}

async fn create(api: &ApiClient, out: Output, a: CreateArgs) -> anyhow::Result<u8> {
    let mut body = json!({"name": a.name});
    if let Some(i) = &a.image {
        body["image"] = json!(i);
    }
    for (key, path) in [
        ("ociDir", absolute(&a.oci_dir)?),
        ("ociArchive", absolute(&a.oci_archive)?),
        ("dockerArchive", absolute(&a.docker_archive)?),
        ("rootfs", absolute(&a.rootfs)?),
    ] {
        if let Some(p) = path {
            body[key] = json!(p);
        }
    }
    if let Some(n) = &a.image_name {
        body["imageName"] = json!(n);
    }
    if let Some(c) = &a.checkpoint {
        body["checkpoint"] = json!(c);
    }
    if let Some(u) = &a.username {
        let mut password = String::new();
        std::io::stdin()
            .read_to_string(&mut password)
            .context("reading the password from stdin")?;
        let password = password.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            bail!("--password-stdin: stdin was empty");
        }
        body["username"] = json!(u);
        body["password"] = json!(password);
    }
    api.call(Method::POST, "/warren/v1/templates", Some(body))
        .await?;
    if a.no_wait {
        println!("building template {}", a.name);
        return Ok(0);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {prefix:>7} {wide_msg} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let final_view = loop {
        let v = get(api, &a.name).await?;
        match v["status"].as_str() {
            Some("building") => {
                let p = &v["build"]["progress"];
                if p.is_object() {
                    bar.set_prefix(p["phase"].as_str().unwrap_or("").to_string());
                    bar.set_message(p["item"].as_str().unwrap_or("").to_string());
                    bar.set_length(p["total"].as_u64().unwrap_or(0));
                    bar.set_position(p["done"].as_u64().unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => break v,
        }
    };
    bar.finish_and_clear();
    match final_view["status"].as_str() {
        Some("ready") => {
            if out == Output::Json {
                output::json(&final_view);
            } else {
                let t = &final_view["template"];
                output::fields(&[
                    ("template", a.name.clone()),
                    ("source", source_of(&final_view)),
                    (
                        "image",
                        t["manifestDigest"].as_str().unwrap_or("-").to_string(),
                    ),
                    (
                        "layers",
                        t["layers"]
                            .as_array()
                            .map(|l| l.len())
                            .unwrap_or(0)
                            .to_string(),
                    ),
                    ("size", size_of(&final_view)),
                ]);
            }
            Ok(0)
        }
        _ => bail!(
            "template {} failed: {}",
            a.name,
            final_view["build"]["error"]
                .as_str()
                .unwrap_or("unknown error")
        ),
    }
}
