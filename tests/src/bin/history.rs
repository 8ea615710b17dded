//! `edgefront-history`: the history checker as a command, for runs longer
//! than CI's (`tests/tests/history.rs` runs the short one). Starts its own
//! lab, records every operation while faults run, checks the history and
//! prints the verdict; exit 1 on a violation.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use edgefront_tests::history::lab::{Plan, run};

#[derive(Parser)]
#[command(
    name = "edgefront-history",
    version,
    about = "Record reads, writes and orders in the anycast lab while faults run, then check the history (root)"
)]
struct Cli {
    /// Seconds of load (the fault cycle repeats, rotating regions).
    #[arg(long, default_value_t = 300.0)]
    seconds: f64,
    /// Regions of the lab (must include the primary's).
    #[arg(long, default_value = "bom1,sin1,fra1")]
    regions: String,
    /// Seconds each fault holds before it is healed.
    #[arg(long, default_value_t = 3.0)]
    hold: f64,
    /// Readers per city.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Lab prefix (letters and digits).
    #[arg(long, default_value = "efhist")]
    prefix: String,
    /// Run the primary with the lab's fast settings (fsync and synchronous
    /// commit off) instead of production durability: shows what the orders
    /// check catches when acknowledged commits can be lost.
    #[arg(long)]
    unsafe_primary: bool,
    /// Write the whole history and report as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    match go(&Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("edgefront-history: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn go(cli: &Cli) -> Result<bool> {
    let plan = Plan {
        prefix: cli.prefix.clone(),
        regions: cli
            .regions
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect(),
        seconds: cli.seconds,
        hold: Duration::from_secs_f64(cli.hold),
        readers: cli.readers,
        durable: !cli.unsafe_primary,
    };
    let out = run(&plan)?;
    print!("{}", out.report.summary());
    println!(
        "converged: every city saw every store's last write {:.2}s after the load",
        out.converged_after
    );
    if let Some(p) = &cli.out {
        std::fs::write(p, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(out.report.violations.is_empty())
}
