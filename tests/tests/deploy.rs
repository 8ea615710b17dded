//! What is deployed is what the lab runs: the lab's config files, rendered
//! by the lab from the ansible templates, are rendered again by real
//! `ansible-playbook` (local connection, an inventory holding the lab's
//! variables) and must match byte for byte; a second run must change
//! nothing. Also: the playbooks pass `--syntax-check`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use edgefront_tests::netlab;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn playbook(args: &[&str]) -> Result<String> {
    let out = Command::new("ansible-playbook")
        .current_dir(repo().join("ansible"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", std::env::temp_dir())
        .args(args)
        .output()
        .context("ansible-playbook (Debian ansible-core; tests/scripts/setup.sh installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "ansible-playbook {args:?} failed:\n{text}"
    );
    Ok(text)
}

#[test]
fn ansible_renders_exactly_what_the_lab_runs_and_a_second_run_changes_nothing() -> Result<()> {
    let regions = edgefront_regions::Regions::builtin()?;
    let chosen: Vec<_> = regions.all().iter().collect();
    let labdir = tempfile::tempdir()?;
    let files = netlab::lab_files(&regions, &chosen, labdir.path())?;
    // One inventory host per lab host, with the variables the lab used.
    let mut hosts = serde_json::Map::new();
    for f in &files {
        let h = hosts
            .entry(f.host.clone())
            .or_insert_with(|| serde_json::json!({ "lab_templates": [] }));
        for (k, v) in f.vars.as_object().unwrap() {
            if let Some(old) = h.get(k) {
                assert_eq!(old, v, "{}: {k} differs between templates", f.host);
            }
            h[k] = v.clone();
        }
        h["lab_templates"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({ "src": f.template, "dest": f.dest }));
    }
    let work = tempfile::tempdir()?;
    let inventory = work.path().join("lab.json");
    std::fs::write(
        &inventory,
        serde_json::to_vec_pretty(&serde_json::json!({ "all": { "hosts": hosts } }))?,
    )?;
    let out = work.path().join("out");
    let inv = inventory.display().to_string();
    let dir = format!("render_dir={}", out.display());
    let first = playbook(&["-i", &inv, "playbooks/render.yml", "-e", &dir])?;
    assert!(first.contains("changed="), "{first}");
    for f in &files {
        let got = std::fs::read_to_string(out.join(&f.host).join(f.dest))
            .with_context(|| format!("{}/{}", f.host, f.dest))?;
        assert_eq!(
            got, f.text,
            "{} for {}: ansible and the lab render differently",
            f.template, f.host
        );
    }
    assert_eq!(
        files.len(),
        1 + 5 * chosen.len(),
        "one primary config, five per region"
    );
    // Idempotent: nothing changes the second time.
    let second = playbook(&["-i", &inv, "playbooks/render.yml", "-e", &dir])?;
    let recap: Vec<&str> = second.lines().filter(|l| l.contains(" ok=")).collect();
    assert_eq!(recap.len(), hosts.len(), "{second}");
    assert!(
        recap
            .iter()
            .all(|l| l.contains("changed=0") && l.contains("failed=0")),
        "{second}"
    );
    Ok(())
}

#[test]
fn playbooks_pass_the_syntax_check() -> Result<()> {
    let out = playbook(&[
        "-i",
        "inventory/example.yml",
        "--syntax-check",
        "playbooks/site.yml",
        "playbooks/rolling-upgrade.yml",
        "playbooks/render.yml",
    ])?;
    assert!(out.contains("playbook: playbooks/site.yml"), "{out}");
    Ok(())
}
