//! `warren-operator`: Warren's Kubernetes operator (see `docs/design/kubernetes.md`).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use warren_operator::agent::http::{AgentAddress, HttpNodeAgent};
use warren_operator::controller::{self, Context};
use warren_operator::crd::crd_documents;
use warren_operator::leader::{run_as_leader, LeaseConfig};
use warren_operator::sandbox::PodConfig;

#[derive(Parser)]
#[command(
    name = "warren-operator",
    version,
    about = "Warren's Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the node agent on this node (the DaemonSet's container; needs root: it runs
    /// sandboxes inside the node's Pods with the single-host runtime).
    NodeAgent {
        /// Address to listen on (the DaemonSet's host port).
        #[arg(long, env = "WARREN_NODE_AGENT_LISTEN", default_value_t = format!("0.0.0.0:{}", warren_operator::agent::DEFAULT_PORT))]
        listen: String,
        /// This node's name (from the downward API's `spec.nodeName`).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The node's Warren data dir (a hostPath): sandboxes' upper dirs, checkpoints.
        #[arg(long, env = "WARREN_DATA_DIR", default_value = "/var/lib/warren")]
        data_dir: PathBuf,
        /// The sandbox init binary (`warren-envd`); default: beside this binary.
        #[arg(long, env = "WARREN_ENVD_BINARY")]
        envd_binary: Option<PathBuf>,
        /// File with the bearer token the operator sends (a mounted Secret); unset: no token
        /// is required (only for tests: the agent is privileged).
        #[arg(long, env = "WARREN_NODE_AGENT_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The cluster's Pod network(s), CIDR, comma-separated or repeated: sandboxes may not
        /// reach them unless their allowOut names them (the node's own addresses are always
        /// closed).
        #[arg(long, env = "WARREN_CLUSTER_CIDR", value_delimiter = ',')]
        cluster_cidr: Vec<String>,
        /// The cluster's Service network(s), closed like `--cluster-cidr`.
        #[arg(long, env = "WARREN_SERVICE_CIDR", value_delimiter = ',')]
        service_cidr: Vec<String>,
        /// Disk cap, in MiB, of a sandbox whose Sandbox names no `ephemeral-storage` (as
        /// `warren serve --sandbox-disk-mb`); 0: no caps.
        #[arg(long, env = "WARREN_SANDBOX_DISK_MB", default_value_t = 1024)]
        sandbox_disk_mb: u64,
        #[command(flatten)]
        tls: warren_operator::agent::server::TlsArgs,
    },
    /// Serve the E2B API and sandbox router in cluster mode, with state in the Sandbox custom
    /// resources (the same as `warren serve --cluster`).
    Api {
        #[arg(long, env = "WARREN_LISTEN", default_value = "0.0.0.0:3000")]
        listen: std::net::SocketAddr,
        /// Namespace of the Sandboxes (default: the client's, i.e. the Pod's own).
        #[arg(long, env = "WARREN_NAMESPACE")]
        namespace: Option<String>,
        /// File holding the one accepted API key (a mounted Secret).
        #[arg(long, env = "WARREN_API_KEY_FILE")]
        api_key_file: PathBuf,
        /// Sandbox domain: also route Host `<port>-<id>.<domain>`.
        #[arg(long, env = "WARREN_DOMAIN")]
        domain: Option<String>,
        /// File with the key of sandboxes' envd access tokens (a Secret shared with the
        /// operator); unset: sandboxes' envd takes calls without a token.
        #[arg(long, env = "WARREN_ENVD_KEY_FILE")]
        envd_key_file: Option<PathBuf>,
    },
    /// Print the CRDs as YAML (or write one file per CRD into --dir).
    Crds {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Reconcile Sandboxes and SandboxSets (in-cluster config, or KUBECONFIG).
    Run {
        /// Watch only this namespace (default: all).
        #[arg(long, env = "WARREN_NAMESPACE")]
        namespace: Option<String>,
        /// Image of the sandbox Pods' only container (it just holds the Pod's namespaces).
        #[arg(long, default_value_t = PodConfig::default().placeholder_image)]
        placeholder_image: String,
        /// Node selector of sandbox Pods, `key=value` (repeatable; default
        /// warren.dev/node-agent=true).
        #[arg(long = "node-selector", value_parser = parse_pair)]
        node_selector: Vec<(String, String)>,
        /// Seconds a node may be NotReady before its sandboxes are declared lost (`NodeLost`).
        #[arg(long, default_value_t = 60)]
        node_lost_after: u64,
        /// Port of the Warren node agent on every node (the DaemonSet's host port).
        #[arg(long, default_value_t = warren_operator::agent::DEFAULT_PORT)]
        node_agent_port: u16,
        /// File with the bearer token the node agents require (a mounted Secret).
        #[arg(long, env = "WARREN_NODE_AGENT_TOKEN_FILE")]
        node_agent_token_file: Option<PathBuf>,
        /// PEM file of the CA that issued the node agents' certificate (name
        /// `warren-node-agent`): call them over https only. Unset: plain HTTP.
        #[arg(long, env = "WARREN_NODE_AGENT_CA_FILE")]
        node_agent_ca_file: Option<PathBuf>,
        /// File with the key of sandboxes' envd access tokens (a Secret shared with the API).
        #[arg(long, env = "WARREN_ENVD_KEY_FILE")]
        envd_key_file: Option<PathBuf>,
        /// Disk cap, in MiB, of a Sandbox that names no `ephemeral-storage`: its Pod requests
        /// (and is limited to) this much ephemeral storage. Keep it equal to the node agents'
        /// `--sandbox-disk-mb`.
        #[arg(long, env = "WARREN_SANDBOX_DISK_MB", default_value_t = 1024)]
        sandbox_disk_mb: u64,
        /// Reconcile only while holding the Lease, so several replicas can run (`false` for a
        /// single replica, e.g. outside the cluster).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Name of the Lease.
        #[arg(long, default_value = "warren-operator")]
        lease_name: String,
        /// Namespace of the Lease (the operator's own, from the downward API).
        #[arg(long, env = "POD_NAMESPACE", default_value = "warren-system")]
        lease_namespace: String,
        /// This replica's identity in the Lease (its Pod name, from the downward API).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn read_secret(path: Option<&std::path::Path>, what: &str) -> anyhow::Result<Option<String>> {
    let Some(p) = path else { return Ok(None) };
    let v = std::fs::read_to_string(p)
        .with_context(|| format!("reading the {what} {}", p.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!v.is_empty(), "the {what} file {} is empty", p.display());
    Ok(Some(v))
}

fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    match path {
        Some(p) => Ok(Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the node agent token {}", p.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Api {
            listen,
            namespace,
            api_key_file,
            domain,
            envd_key_file,
        } => {
            let key = std::fs::read_to_string(&api_key_file)
                .with_context(|| format!("reading the API key {}", api_key_file.display()))?
                .trim()
                .to_string();
            anyhow::ensure!(!key.is_empty(), "{} is empty", api_key_file.display());
            let envd_key = read_secret(envd_key_file.as_deref(), "envd key")?;
            warren_operator::cluster_api::serve(listen, namespace, key, domain, envd_key).await?;
        }
        Command::NodeAgent {
            listen,
            node_name,
            data_dir,
            envd_binary,
            token_file,
            cluster_cidr,
            service_cidr,
            sandbox_disk_mb,
            tls,
        } => {
            warren_operator::agent::server::serve_node_agent(
                warren_operator::agent::server::NodeAgentOptions {
                    listen,
                    node_name,
                    data_dir,
                    envd_binary,
                    token: read_token(token_file.as_deref())?,
                    cluster_cidrs: cluster_cidr.into_iter().chain(service_cidr).collect(),
                    sandbox_disk_mb,
                    tls: tls.files()?,
                },
            )
            .await?;
        }
        Command::Crds { dir } => {
            let docs = crd_documents().context("serializing the CRDs")?;
            match dir {
                Some(dir) => {
                    for (file, yaml) in docs {
                        let path = dir.join(file);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                }
                None => {
                    let all: Vec<String> = docs.into_iter().map(|(_, y)| y).collect();
                    print!("{}", all.join("---\n"));
                }
            }
        }
        Command::Run {
            namespace,
            placeholder_image,
            node_selector,
            node_lost_after,
            node_agent_port,
            node_agent_token_file,
            node_agent_ca_file,
            envd_key_file,
            sandbox_disk_mb,
            leader_election,
            lease_name,
            lease_namespace,
            identity,
        } => {
            // kube's rustls uses ring; installing it explicitly keeps rustls from refusing to
            // choose when a workspace build also enables aws-lc-rs (see rust-stack.md). rustls
            // deprecates ring's provider for lacking post-quantum key exchange; aws-lc-rs has it
            // but costs a cmake/C build of aws-lc-sys on every CI run.
            #[allow(deprecated)]
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let mut pods = PodConfig {
                placeholder_image,
                node_lost_after: std::time::Duration::from_secs(node_lost_after),
                envd_key: read_secret(envd_key_file.as_deref(), "envd key")?,
                sandbox_disk_mb,
                ..PodConfig::default()
            };
            if !node_selector.is_empty() {
                pods.node_selector = node_selector.into_iter().collect::<BTreeMap<_, _>>();
            }
            tracing::info!(namespace = ?namespace, "warren-operator starting");
            let token = read_token(node_agent_token_file.as_deref())?;
            let agent = HttpNodeAgent::new(
                AgentAddress::NodeInternalIp {
                    client: client.clone(),
                    port: node_agent_port,
                },
                token,
            );
            let agent = match &node_agent_ca_file {
                Some(ca) => agent.with_ca_file(ca)?,
                None => {
                    tracing::warn!(
                        "no --node-agent-ca-file: the node agents are called over plain HTTP"
                    );
                    agent
                }
            };
            let ctx = Context::with_agent(client, pods, Some(std::sync::Arc::new(agent)));
            if leader_election {
                let identity = match identity {
                    Some(id) => id,
                    None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .context("no --identity/POD_NAME and no hostname to use instead")?
                        .trim()
                        .to_string(),
                };
                let lease = LeaseConfig {
                    name: lease_name,
                    namespace: lease_namespace,
                    identity,
                    duration_secs: 15,
                    grace_secs: 5,
                };
                run_as_leader(ctx, namespace.as_deref(), &lease).await?;
            } else {
                controller::run(ctx, namespace.as_deref()).await;
            }
        }
    }
    Ok(())
}
