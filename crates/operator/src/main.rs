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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
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
                ..PodConfig::default()
            };
            if !node_selector.is_empty() {
                pods.node_selector = node_selector.into_iter().collect::<BTreeMap<_, _>>();
            }
            tracing::info!(namespace = ?namespace, "warren-operator starting");
            let token = match node_agent_token_file {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading the node agent token {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let agent = HttpNodeAgent::new(
                AgentAddress::NodeInternalIp {
                    client: client.clone(),
                    port: node_agent_port,
                },
                token,
            );
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
