//! `edgefront-regions export [--check] [--root DIR] [--file regions.toml]`:
//! writes the region data for terraform and ansible
//! ([`edgefront_regions::EXPORT_PATHS`]); `--check` fails (exit 1) when a
//! checked-in copy differs, which CI runs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgefront_regions::{EXPORT_PATHS, Regions};

#[derive(Parser)]
#[command(
    name = "edgefront-regions",
    version,
    about = "Region data for terraform and ansible"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write terraform/regions.json and ansible/inventory/group_vars/all/regions.json.
    Export {
        /// Only compare; exit 1 if a file is missing or stale.
        #[arg(long)]
        check: bool,
        /// Repository root.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// Region data (default: the built-in regions/regions.toml).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let Cmd::Export { check, root, file } = Cli::parse().cmd;
    let regions = match &file {
        Some(f) => Regions::load(f),
        None => Regions::builtin(),
    };
    let regions = match regions {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgefront-regions: {e}");
            return ExitCode::from(64);
        }
    };
    let json = regions.export_json();
    let mut stale = Vec::new();
    for rel in EXPORT_PATHS {
        let path = root.join(rel);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == json {
            continue;
        }
        if check {
            stale.push(rel);
            continue;
        }
        if let Some(dir) = path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("edgefront-regions: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(&path, &json) {
            eprintln!("edgefront-regions: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {rel}");
    }
    if !stale.is_empty() {
        eprintln!(
            "edgefront-regions: out of date with regions/regions.toml: {}\n  run: target/release/edgefront-regions export",
            stale.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
