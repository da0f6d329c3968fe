//! `warren serve`: the daemon.

use anyhow::Context;
use clap::Args;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use warren_core::{ApiKeys, Store, TemplateRegistry, Warren, WarrenConfig};
use warren_runtime::linux::{prepare_base_template, LinuxRuntime, LinuxRuntimeConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// Cluster mode: serve the E2B API and router with all state in the `warren.dev` custom
    /// resources of the Kubernetes cluster (in-cluster config or KUBECONFIG) instead of SQLite;
    /// sandboxes run on the nodes (operator + node agents). Needs --api-key.
    #[arg(long)]
    cluster: bool,
    /// Cluster mode: the namespace of the Sandboxes (default: the client's).
    #[arg(long, env = "WARREN_NAMESPACE", requires = "cluster")]
    namespace: Option<String>,
    /// Cluster mode: file with the key of sandboxes' envd access tokens (shared with the
    /// operator's `--envd-key-file`).
    #[arg(long, env = "WARREN_ENVD_KEY_FILE", requires = "cluster")]
    envd_key_file: Option<PathBuf>,
    /// Address of the API and sandbox router.
    #[arg(long, env = "WARREN_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Where the database, config, templates and sandbox state live.
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "/var/lib/warren")]
    data_dir: PathBuf,
    /// Extra templates: each `<dir>/<name>/rootfs` is a template named `<name>`.
    #[arg(long, env = "WARREN_TEMPLATES_DIR")]
    templates_dir: Option<PathBuf>,
    /// The accepted API key (replaces the keys of `<data-dir>/config.json`).
    #[arg(long, env = "WARREN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sandbox domain: also route Host `<port>-<id>.<domain>` and report it to SDKs.
    #[arg(long, env = "WARREN_DOMAIN")]
    domain: Option<String>,
    /// Path of warren-envd (default: next to this executable, else /usr/local/bin/warren-envd).
    #[arg(long, env = "WARREN_ENVD_BINARY")]
    envd_binary: Option<PathBuf>,
    /// The Python layer of the code-interpreter-v1 template, as built by
    /// scripts/build-code-interpreter-template.sh (the template is left out when it is missing).
    #[arg(long, env = "WARREN_CODE_INTERPRETER_LAYER", default_value = crate::code_interpreter::DEFAULT_LAYER_DIR)]
    code_interpreter_layer: PathBuf,
    /// Path of warren-code-interpreter (default: next to this executable, else
    /// /usr/local/bin/warren-code-interpreter).
    #[arg(long, env = "WARREN_CODE_INTERPRETER_BINARY")]
    code_interpreter_binary: Option<PathBuf>,
    /// Sandbox subnet in CIDR form, e.g. 10.210.0.0/20 (default: a free /20 in 10.200.0.0/13,
    /// recorded in the data dir at first start).
    #[arg(long, env = "WARREN_SUBNET", value_parser = parse_subnet)]
    subnet: Option<(std::net::Ipv4Addr, u8)>,
    /// DNS server (IP or IP:PORT) that sandboxes with domain names in their egress rules are
    /// resolved through; repeatable (default: the host's resolvers from /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_parser = parse_dns_upstream)]
    dns_upstreams: Vec<std::net::SocketAddr>,
    /// Run every sandbox in its own user namespace, root inside mapped to an unprivileged host
    /// uid range of its own (the default); `--user-namespaces=false` runs sandboxes as host ids.
    #[arg(
        long,
        env = "WARREN_USER_NAMESPACES",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    user_namespaces: bool,
    /// Keep no audit log (<data-dir>/audit.db); for measuring what it costs.
    #[arg(long)]
    no_audit: bool,
    /// A paused sandbox idle this long is hibernated: its memory goes to disk (CRIU) and comes
    /// back on connect. Seconds, or with a unit (`90s`, `10m`, `1h`); `off` never hibernates.
    #[arg(long, env = "WARREN_HIBERNATE_AFTER", default_value = "10m", value_parser = parse_idle)]
    hibernate_after: HibernateAfter,
    /// Each sandbox's own disk, in MiB: its files live on a file system of this size (a sparse
    /// image, loop-mounted), and writing past it fails with "No space left on device" inside the
    /// sandbox only. 0 puts upper dirs on the host's file system without a cap.
    #[arg(long, env = "WARREN_SANDBOX_DISK_MB", default_value_t = 1024, value_parser = parse_disk_mb)]
    sandbox_disk_mb: u64,
}

fn parse_disk_mb(s: &str) -> Result<u64, String> {
    let mb: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of MiB"))?;
    let min = warren_runtime::linux::disk::MIN_MB;
    if mb != 0 && mb < min {
        return Err(format!(
            "{mb} MiB is too small for a sandbox disk: at least {min} (or 0 for no cap)"
        ));
    }
    if mb > 1 << 24 {
        return Err(format!("{mb} MiB is more than 16 TiB"));
    }
    Ok(mb)
}

/// `--hibernate-after`: `None` is `off`. (A newtype: clap reads a bare `Option` as "flag absent".)
#[derive(Debug, Clone, Copy)]
struct HibernateAfter(Option<Duration>);

fn parse_idle(s: &str) -> Result<HibernateAfter, String> {
    if s == "off" || s == "never" {
        return Ok(HibernateAfter(None));
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 600, 90s, 10m or 1h (or off)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use s, m or h")),
    };
    Ok(HibernateAfter(Some(Duration::from_secs(secs))))
}

fn parse_dns_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

fn parse_subnet(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (net, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR form (like 10.210.0.0/20)"))?;
    let net = net
        .parse()
        .map_err(|_| format!("{net:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (8..=28).contains(l))
        .ok_or_else(|| format!("prefix length {len:?} must be between 8 and 28"))?;
    Ok((net, len))
}

fn default_envd_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("warren-envd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/warren-envd"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // Owner-only: it holds the API keys, the database with access tokens, and sandbox disks.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    if args.cluster {
        let key = args
            .api_key
            .clone()
            .context("--cluster needs --api-key (or WARREN_API_KEY): there is no data dir to keep a generated one")?;
        let envd_key = match &args.envd_key_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the envd key {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        return warren_operator::cluster_api::serve(
            args.listen,
            args.namespace,
            key,
            args.domain,
            envd_key,
        )
        .await;
    }
    let data_dir = std::path::absolute(&args.data_dir).unwrap_or(args.data_dir.clone());
    create_data_dir(&data_dir)?;

    let (keys, generated) =
        ApiKeys::load_or_init(&data_dir, args.api_key.as_deref()).context("loading API keys")?;
    if let Some(key) = generated {
        println!(
            "Generated API key (stored in {}):\n\n    {key}\n\nUse it as E2B_API_KEY / WARREN_API_KEY.",
            warren_core::auth::config_path(&data_dir).display()
        );
    }

    let envd = args.envd_binary.clone().unwrap_or_else(default_envd_binary);
    let mut runtime_config = LinuxRuntimeConfig::derived(data_dir.clone(), envd);
    runtime_config.dns_upstreams = args.dns_upstreams.clone();
    runtime_config.user_namespaces = args.user_namespaces;
    if let Some(subnet) = args.subnet {
        runtime_config.subnet = subnet;
        runtime_config.subnet_fixed = true;
    }
    let runtime = LinuxRuntime::new(runtime_config)
        .await
        .context("initialising the sandbox runtime (warren serve needs root)")?;

    let templates = TemplateRegistry::new(args.templates_dir.clone());
    let dd = data_dir.clone();
    let base = tokio::task::spawn_blocking(move || prepare_base_template(&dd))
        .await?
        .context("preparing the base template")?;
    templates.register("base", base.clone());
    let mut store = Store::open(&data_dir).context("opening the database")?;
    let layers_in_use = store
        .list_all()
        .await
        .context("listing the stored sandboxes")?
        .into_iter()
        .flat_map(|r| r.spec.rootfs.lower_dirs)
        .collect();
    let ci_binary = args
        .code_interpreter_binary
        .clone()
        .unwrap_or_else(crate::code_interpreter::default_server_binary);
    crate::code_interpreter::register(
        &templates,
        &data_dir,
        &args.code_interpreter_layer,
        &ci_binary,
        &base,
        &layers_in_use,
    )
    .context("preparing the code-interpreter-v1 template")?;

    // Templates from OCI images: the layer store and Warren's /etc layer on top of their layers.
    let images = warren_image::ImageStore::open(data_dir.join("images"))
        .context("opening the image store")?;
    let etc_layer = warren_core::image_templates::prepare_etc_layer(&data_dir)
        .context("preparing the /etc layer of image templates")?;
    templates.images.enable(images.clone(), etc_layer);

    if !args.no_audit {
        let audit = warren_core::AuditLog::open(&data_dir).context("opening the audit log")?;
        store = store.with_audit(audit);
    }
    if args.sandbox_disk_mb > 0 {
        warren_runtime::linux::disk::check_support().map_err(|why| {
            anyhow::anyhow!("sandbox disk caps (--sandbox-disk-mb) cannot work here: {why}; --sandbox-disk-mb 0 runs without them")
        })?;
    }
    let runtime = Arc::new(runtime);
    let warren = Arc::new(Warren::new(
        runtime.clone(),
        store,
        templates,
        keys,
        WarrenConfig {
            hibernate_after: args.hibernate_after.0,
            default_resources: warren_runtime::Resources {
                disk_mb: args.sandbox_disk_mb,
                ..Default::default()
            },
            ..WarrenConfig::default()
        },
    ));
    // Commits write into the same store (one index writer, one gc); their images are image
    // templates, loaded with the others.
    warren
        .set_image_store(Arc::new(warren_image::commit::Committer::new(images)))
        .await
        .context("setting up commits")?;
    warren.set_pusher(Arc::new(RegistryPusher));
    warren.set_step_runner(Arc::new(warren_api::envd_exec::EnvdStepRunner::default()));
    let n = warren
        .load_image_templates()
        .await
        .context("loading image templates")?;
    tracing::info!(templates = n, "image templates loaded");
    let builds = warren.load_build_jobs();
    let e2b_builds = warren.load_e2b_builds();
    tracing::info!(builds, e2b_builds, "build records loaded");
    match warren.hibernate_support() {
        Ok(()) => tracing::info!(
            after_secs = args.hibernate_after.0.map(|d| d.as_secs()),
            "hibernation available (CRIU)"
        ),
        Err(why) => {
            tracing::warn!("hibernation unavailable, paused sandboxes stay frozen in RAM: {why}")
        }
    }
    let report = warren.recover().await.context("recovering sandboxes")?;
    tracing::info!(
        adopted = report.adopted.len(),
        removed = report.killed.len(),
        swept = report.swept.len(),
        "recovery done"
    );
    let background = warren.spawn_background();
    // Warm pools: refill, rolling updates and autoscalers.
    let pools = warren.spawn_pool_loop();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, data_dir = %data_dir.display(), "warren is serving");

    let app = warren_api::app(
        warren.clone(),
        warren_api::ApiOptions {
            domain: args.domain.clone(),
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        // Connect streams are many small writes: without TCP_NODELAY, Nagle's algorithm holds
        // each one until the client's delayed ACK (40 ms per command round trip).
        axum::serve(
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY");
                }
            }),
            app,
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .into_future(),
    );
    let mut server = std::pin::pin!(server);

    tokio::select! {
        res = &mut server => {
            background.abort();
            pools.abort();
            return res.context("server task")?.context("serving");
        }
        sig = shutdown_signal() => tracing::info!(signal = sig, "shutting down; sandboxes keep running"),
    }
    let _ = stop_tx.send(());
    background.abort();
    pools.abort();
    // Open streams (a running `commands.run`) would keep a graceful shutdown waiting forever;
    // give them a moment, then go. Sandboxes are unaffected and are re-adopted at next start.
    if tokio::time::timeout(Duration::from_secs(5), &mut server)
        .await
        .is_err()
    {
        tracing::info!("closing remaining connections");
    }
    if let Err(e) = runtime.shutdown().await {
        tracing::warn!(error = %e, "releasing host network state");
    }
    // Entries still queued for the audit writer go to disk before the process exits.
    if let Some(audit) = warren.audit().cloned() {
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    }
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// Pushes committed images with oci-client (see `warren_image::push`).
struct RegistryPusher;

#[async_trait::async_trait]
impl warren_core::orchestrator::commits::Pusher for RegistryPusher {
    async fn push(
        &self,
        store: warren_image::ImageStore,
        image: &str,
        auth: Option<(String, String)>,
    ) -> Result<(), String> {
        warren_image::push::push_image(&store, image, auth)
            .await
            .map_err(|e| e.to_string())
    }
}
