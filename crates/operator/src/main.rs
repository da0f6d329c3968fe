//! `warren-operator`: Warren's Kubernetes operator (see `docs/design/kubernetes.md`).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use warren_operator::crd::crd_documents;

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
}

fn main() -> anyhow::Result<()> {
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
    }
    Ok(())
}
