//! The history checker at CI size, as root: a three-region anycast lab with a
//! durable primary; sellers, readers and shoppers in every city while the
//! faults run (replica stop, replay pause, drain, hard kill of a region,
//! origin restart, SIGKILL of the primary); then every check over the whole
//! history. Longer runs: `edgefront-history --seconds 600`.

use std::time::Duration;

use anyhow::Result;
use edgefront_tests::history::lab::{Plan, run};

#[test]
fn history_under_faults_keeps_every_guarantee() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("the history checker needs root (network namespaces); CI runs it as root");
    }
    let plan = Plan {
        prefix: format!("efh{}", std::process::id()),
        regions: ["bom1", "sin1", "fra1"].map(str::to_owned).to_vec(),
        seconds: 50.0,
        hold: Duration::from_secs(3),
        readers: 2,
        durable: true,
    };
    let out = run(&plan)?;
    let r = &out.report;
    eprint!("{}", r.summary());
    eprintln!("converged {:.2}s after the load", out.converged_after);
    let dump = std::env::temp_dir().join(format!("edgefront-history-{}.json", plan.prefix));
    std::fs::write(&dump, serde_json::to_vec_pretty(&out)?)?;
    assert!(
        r.violations.is_empty(),
        "{} violations (history in {}):\n{}",
        r.violations.len(),
        dump.display(),
        r.summary()
    );
    // The run really exercised what it claims: every fault of the cycle ran
    // and the checks had material.
    let ran: Vec<&str> = r.faults.iter().map(|f| f.name.as_str()).collect();
    for f in plan.faults(0) {
        assert!(
            r.faults.iter().any(|x| x.name == f.name()),
            "{f:?} did not run: {ran:?}"
        );
    }
    assert!(r.pages > 1000, "{}", r.summary());
    assert!(r.writes > 50, "{}", r.summary());
    assert!(r.orders_acked > 20, "{}", r.summary());
    assert!(r.constrained_applied > 500, "{}", r.summary());
    assert!(r.checked_read_your_writes > 50, "{}", r.summary());
    assert!(r.checked_monotonic > 500, "{}", r.summary());
    assert_eq!(r.by_region.len(), plan.regions.len(), "{}", r.summary());
    Ok(())
}
