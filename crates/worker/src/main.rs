//! `shardop-worker`: the sharded DatabaseCluster reconciler.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The sharded DatabaseCluster reconciler: serves the shard of its StatefulSet ordinal while
/// it holds that shard's Lease, and takes over shards whose worker died.
#[derive(Parser, Debug)]
#[command(name = "shardop-worker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every shardop CustomResourceDefinition as YAML (or write one file per CRD).
    Crd {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { output_dir } => print_crds(output_dir),
    }
}

fn print_crds(output_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use std::io::Write;
    match output_dir {
        None => {
            let yaml = shardop_api::crd::all_to_yaml()?;
            std::io::stdout().write_all(yaml.as_bytes())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            for crd in shardop_api::crd::all() {
                let path = dir.join(shardop_api::crd::file_name(&crd));
                std::fs::write(&path, shardop_api::crd::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
