//! `warren`: the daemon (`warren serve`) and a command-line client of its HTTP API.

mod audit;
mod build;
mod checkpoints;
mod client;
mod code_interpreter;
mod commits;
mod exec;
mod output;
mod pools;
mod serve;
mod templates;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Self-hosted E2B-compatible sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: E2B API and sandbox router on one listener.
    Serve(serve::ServeArgs),
    /// Serve the Kubernetes node agent on this node (the Helm chart's DaemonSet; root): runs
    /// sandboxes inside Pods' cgroups and network namespaces with the single-host runtime.
    NodeAgent(NodeAgentArgs),
    /// Manage sandboxes through a running daemon.
    #[command(visible_alias = "sb")]
    Sandbox {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Create or update SandboxSets, PoolingAutoScalers and Commits from a YAML file (`-` for
    /// stdin).
    Apply {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Delete the objects named in a YAML file.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Read the audit log: API calls, processes, file changes, network rules, state changes.
    Audit {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: audit::AuditArgs,
    },
    /// Templates: from OCI images, archives and rootfs dirs.
    #[command(visible_alias = "tpl")]
    Template {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: templates::TemplateCommand,
    },
    /// Commit sandboxes to OCI images.
    Commit {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: commits::CommitCommand,
    },
    /// Checkpoints of sandboxes (memory and files), and sandboxes restored from them.
    #[command(visible_alias = "ckpt")]
    Checkpoint {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: checkpoints::CheckpointCommand,
    },
    /// Registry credentials for pushes.
    Secret {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: commits::SecretCommand,
    },
    /// Warm pools.
    Pool {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PoolCommand,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Ready / starting / claimed members per pool.
    #[command(visible_alias = "ls")]
    List,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Daemon URL.
    #[arg(
        long,
        global = true,
        env = "WARREN_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub url: String,
    /// API key (default: the key in the daemon's config.json, if readable).
    #[arg(long, global = true, env = "WARREN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create(client::CreateArgs),
    /// List running and paused sandboxes.
    #[command(visible_alias = "ls")]
    List(client::ListArgs),
    /// Show one sandbox.
    Get { id: String },
    /// Run a command in a sandbox, streaming its output; exits with the command's exit code.
    Exec(exec::ExecArgs),
    /// Pause (freeze) a sandbox.
    Pause { id: String },
    /// Hibernate a sandbox now: its memory goes to disk (CRIU); `resume` brings it back.
    Hibernate { id: String },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        /// New lifetime in seconds (default: the daemon's default, 300).
        #[arg(long)]
        timeout: Option<i64>,
    },
    /// Kill a sandbox.
    #[command(visible_alias = "rm")]
    Kill { id: String },
    /// Set a sandbox's remaining lifetime.
    Timeout { id: String, seconds: i64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Registry pulls use rustls with no provider chosen by crate features (rust-stack.md: both
    // ring and aws-lc-rs would otherwise be candidates): pick ring, once, for the process.
    // ring's provider is deprecated in favour of aws-lc-rs (post-quantum key exchange), but
    // aws-lc-rs needs cmake and a C toolchain build we avoid; registries speak classic TLS.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await.map(|()| 0),
            Command::NodeAgent(a) => node_agent(a).await.map(|()| 0),
            Command::Sandbox { client, command } => run_client(client, command).await,
            Command::Apply { client, file } => {
                pools::apply(&client::ApiClient::new(&client)?, &file).await
            }
            Command::Delete { client, file } => {
                pools::delete(&client::ApiClient::new(&client)?, &file).await
            }
            Command::Audit { client, args } => {
                audit::run(&client::ApiClient::new(&client)?, client.output, args)
                    .await
                    .map(|()| 0)
            }
            Command::Template { client, command } => {
                templates::run(&client::ApiClient::new(&client)?, client.output, command).await
            }
            Command::Commit { client, command } => {
                commits::run(&client::ApiClient::new(&client)?, client.output, command).await
            }
            Command::Checkpoint { client, command } => {
                checkpoints::run(&client::ApiClient::new(&client)?, client.output, command).await
            }
            Command::Secret { client, command } => {
                commits::run_secret(&client::ApiClient::new(&client)?, client.output, command).await
            }
            Command::Pool {
                client,
                command: PoolCommand::List,
            } => pools::list(&client::ApiClient::new(&client)?, client.output)
                .await
                .map(|()| 0),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_client(args: ClientArgs, command: SandboxCommand) -> anyhow::Result<u8> {
    let api = client::ApiClient::new(&args)?;
    let out = args.output;
    match command {
        SandboxCommand::Create(c) => client::create(&api, out, c).await?,
        SandboxCommand::List(l) => client::list(&api, out, l).await?,
        SandboxCommand::Get { id } => client::get(&api, out, &id).await?,
        SandboxCommand::Exec(e) => return exec::run(&api, e).await,
        SandboxCommand::Pause { id } => client::pause(&api, &id).await?,
        SandboxCommand::Hibernate { id } => client::hibernate(&api, &id).await?,
        SandboxCommand::Resume { id, timeout } => client::resume(&api, out, &id, timeout).await?,
        SandboxCommand::Kill { id } => client::kill(&api, &id).await?,
        SandboxCommand::Timeout { id, seconds } => client::set_timeout(&api, &id, seconds).await?,
    }
    Ok(0)
}

#[derive(clap::Args)]
struct NodeAgentArgs {
    /// Address to listen on (the DaemonSet's host port).
    #[arg(long, env = "WARREN_NODE_AGENT_LISTEN", default_value = "0.0.0.0:7070")]
    listen: String,
    /// This node's name (the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The node's Warren data dir (a hostPath).
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "/var/lib/warren")]
    data_dir: std::path::PathBuf,
    /// The sandbox init binary (`warren-envd`); default: beside this binary.
    #[arg(long, env = "WARREN_ENVD_BINARY")]
    envd_binary: Option<std::path::PathBuf>,
    /// File with the bearer token the operator sends (a mounted Secret).
    #[arg(long, env = "WARREN_NODE_AGENT_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// The cluster's Pod network(s), CIDR, comma-separated or repeated: sandboxes may not
    /// reach them unless their allowOut names them (the node's own addresses are always
    /// closed).
    #[arg(long, env = "WARREN_CLUSTER_CIDR", value_delimiter = ',')]
    cluster_cidr: Vec<String>,
    /// The cluster's Service network(s), closed like `--cluster-cidr`.
    #[arg(long, env = "WARREN_SERVICE_CIDR", value_delimiter = ',')]
    service_cidr: Vec<String>,
    /// Disk cap, in MiB, of a sandbox whose Sandbox names no `ephemeral-storage` (as `warren
    /// serve --sandbox-disk-mb`); 0: no caps.
    #[arg(long, env = "WARREN_SANDBOX_DISK_MB", default_value_t = 1024)]
    sandbox_disk_mb: u64,
    #[command(flatten)]
    tls: warren_operator::agent::server::TlsArgs,
}

async fn node_agent(a: NodeAgentArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let token = match &a.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the node agent token {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    warren_operator::agent::server::serve_node_agent(
        warren_operator::agent::server::NodeAgentOptions {
            listen: a.listen,
            node_name: a.node_name,
            data_dir: a.data_dir,
            envd_binary: a.envd_binary,
            token,
            cluster_cidrs: a.cluster_cidr.into_iter().chain(a.service_cidr).collect(),
            sandbox_disk_mb: a.sandbox_disk_mb,
            tls: a.tls.files()?,
        },
    )
    .await
}
