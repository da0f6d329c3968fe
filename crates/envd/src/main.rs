//! The `warren-envd` binary. `serve` runs the envd API on a TCP address; the
//! sandbox-init mode (PID 1 setup before serving) is added by the runtime.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use warren_envd::EnvdConfig;

const USAGE: &str = "usage: warren-envd serve --listen ADDR [--access-token TOKEN] \
[--default-user USER] [--env KEY=VALUE]...
       warren-envd init   (started by the Warren daemon as a sandbox's first process)";

struct ServeArgs {
    listen: String,
    config: EnvdConfig,
}

fn parse_serve_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<ServeArgs> {
    let mut listen = "127.0.0.1:49983".to_string();
    let mut config = EnvdConfig {
        access_token: None,
        env_vars: BTreeMap::new(),
        default_user: "user".to_string(),
        admin_token: None,
        start_command: None,
        default_cwd: None,
    };
    while let Some(flag) = args.next() {
        let (flag, inline_value) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || -> anyhow::Result<String> {
            match inline_value.clone() {
                Some(v) => Ok(v),
                None => args.next().with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--access-token" => config.access_token = Some(value()?),
            "--default-user" => config.default_user = value()?,
            "--env" => {
                let pair = value()?;
                let (key, val) = pair
                    .split_once('=')
                    .with_context(|| format!("--env expects KEY=VALUE, got {pair:?}"))?;
                config.env_vars.insert(key.to_string(), val.to_string());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(ServeArgs { listen, config })
}

/// `warren-envd init`: build the sandbox around this process (see `warren_runtime::init`), then
/// serve on the listener it bound. Never returns.
fn sandbox_init() -> ! {
    warren_runtime::init::run_sandbox_init(|settings, listener| {
        let config = EnvdConfig {
            access_token: settings.access_token,
            env_vars: settings.env_vars,
            default_user: settings.default_user,
            admin_token: settings.admin_token,
            start_command: settings.start_command,
            default_cwd: settings.default_cwd.map(Into::into),
        };
        // Non-dumpable: root in the sandbox has no CAP_SYS_PTRACE, so it can neither attach to
        // envd nor read its memory, fds or environment (where the access and admin tokens
        // live). Children get their own setting at exec.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        warren_envd::start_reaper();
        // One worker keeps the per-sandbox footprint small; blocking file work has its own pool.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            warren_envd::serve(config, listener).await
        })
    })
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("init") {
        sandbox_init();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("serve") => {
            let ServeArgs { listen, config } = parse_serve_args(args)?;
            warren_envd::start_reaper();
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                tracing::info!("envd listening on {}", listener.local_addr()?);
                warren_envd::serve(config, listener).await?;
                Ok(())
            })
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
