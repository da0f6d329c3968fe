//! `warren-code-interpreter`: serves the E2B code-interpreter API inside a sandbox of the
//! `code-interpreter-v1` template (started by envd as the template's start command) and starts
//! the default Python kernel at once, so that the first `run_code` finds it ready.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warren_codeinterp::contexts::Contexts;
use warren_codeinterp::kernel::{KernelConfig, Language};

#[derive(Parser)]
#[command(name = "warren-code-interpreter", about)]
struct Args {
    /// Address of the HTTP API.
    #[arg(long, default_value = "0.0.0.0:49999")]
    listen: SocketAddr,
    /// Python interpreter with ipykernel and bash_kernel.
    #[arg(long, default_value = "/opt/warren/venv/bin/python")]
    python: PathBuf,
    /// Working directory of contexts that name none.
    #[arg(long, default_value = "/home/user")]
    cwd: PathBuf,
    /// Where kernel connection files (with their signing keys) are kept.
    #[arg(long, default_value = "/run/warren-code-interpreter")]
    runtime_dir: PathBuf,
    /// Matplotlib's config and font cache dir (prepared in the template).
    #[arg(long, default_value = "/opt/warren/matplotlib")]
    mplconfigdir: PathBuf,
    /// Deno, whose `deno jupyter` kernel runs JavaScript and TypeScript contexts (left out when
    /// the file does not exist).
    #[arg(long, default_value = "/opt/warren/deno/deno")]
    deno: PathBuf,
    /// Do not start the default Python kernel before the first request.
    #[arg(long)]
    no_prestart: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.runtime_dir)
            .with_context(|| format!("creating {}", args.runtime_dir.display()))?;
    }
    warren_codeinterp::kernel::kill_leftovers(&args.runtime_dir);
    // The venv's bin first, so that `!pip install` and friends in a cell use the kernel's Python.
    let mut env = Vec::new();
    if let Some(bin) = args.python.parent() {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        env.push(("PATH".to_string(), format!("{}:{path}", bin.display())));
    }
    if args.mplconfigdir.is_dir() {
        env.push((
            "MPLCONFIGDIR".to_string(),
            args.mplconfigdir.display().to_string(),
        ));
    }
    let config = KernelConfig {
        python: args.python.clone(),
        runtime_dir: args.runtime_dir.clone(),
        env,
        deno: args.deno.is_file().then(|| args.deno.clone()),
    };
    // Small: the server itself is idle I/O; the kernels do the work.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let contexts = Contexts::new(config, args.cwd.clone());
        if !args.no_prestart {
            contexts.default_for(Language::Python).prestart();
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(listen = %args.listen, "code interpreter serving");
        // NDJSON lines are small writes that must reach the client at once: without
        // TCP_NODELAY, Nagle's algorithm and the peer's delayed ACK hold them for ~40 ms.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|s| {
            let _ = s.set_nodelay(true);
        });
        axum::serve(listener, warren_codeinterp::http::router(contexts)).await?;
        Ok(())
    })
}
