//! What is deployed is what the lab runs: the lab's config files, rendered
//! by the lab from the ansible templates, are rendered again by real
//! `ansible-playbook` (local connection, an inventory holding the lab's
//! variables) and must match byte for byte; a second run must change
//! nothing. Also: the playbooks pass `--syntax-check`, and the roles keep
//! least privilege (a user per service, group `bird` for the health hook's
//! unit only, root-only env files holding only their service's secrets,
//! private keys readable by their one service), read from the role files.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use edgefront_tests::netlab;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `ansible-playbook` in ansible/: whether it succeeded, and its output.
fn run_playbook(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ansible-playbook")
        .current_dir(repo().join("ansible"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", std::env::temp_dir())
        .args(args)
        .output()
        .context("ansible-playbook (Debian ansible-core; tests/scripts/setup.sh installs it)")?;
    Ok((out.status.success(), edgefront_tests::output_text(&out)))
}

fn playbook(args: &[&str]) -> Result<String> {
    let (ok, text) = run_playbook(args)?;
    assert!(ok, "ansible-playbook {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn ansible_renders_exactly_what_the_lab_runs_and_a_second_run_changes_nothing() -> Result<()> {
    let regions = edgefront_regions::Regions::builtin()?;
    let chosen: Vec<_> = regions.all().iter().collect();
    let labdir = tempfile::tempdir()?;
    let files = netlab::lab_files(&regions, &chosen, labdir.path(), None)?;
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

/// A deployment terraform made with origin failover is never run without
/// its failover groups (the single-primary roles would take over Patroni's
/// hosts): site.yml and rolling-upgrade.yml stop at their first play,
/// before connecting to any host. With the groups given, the same run gets
/// past that play (and fails only on the hosts, unreachable here).
#[test]
fn a_failover_deployment_without_its_groups_is_refused_before_anything_runs() -> Result<()> {
    let work = tempfile::tempdir()?;
    let all = work.path().join("group_vars/all");
    std::fs::create_dir_all(&all)?;
    for f in ["main.yml", "regions.json"] {
        std::os::unix::fs::symlink(
            repo().join("ansible/inventory/group_vars/all").join(f),
            all.join(f),
        )?;
    }
    // Hosts on a closed loopback port: a play that reaches them fails as
    // UNREACHABLE at once.
    let closed = edgefront_tests::free_port();
    let host = |region: &str| {
        serde_json::json!({
            "ansible_host": "127.0.0.1", "ansible_port": closed,
            "ansible_connection": "ssh", "edgefront_region": region,
        })
    };
    let inventory = |with_groups: bool| -> Result<String> {
        let mut children = serde_json::json!({
            "origin": { "hosts": { "origin-host": host("bom1") } },
            "edges": { "hosts": { "node-bom1": host("bom1") } },
            "replicas": { "hosts": { "node-bom1": {} } },
        });
        if with_groups {
            children["etcd"] =
                serde_json::json!({ "hosts": { "origin-host": {}, "node-bom1": {} } });
            children["db_candidates"] =
                serde_json::json!({ "hosts": { "origin-host": {}, "node-bom1": {} } });
        }
        let path = work.path().join(format!("hosts-{with_groups}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&serde_json::json!({ "all": {
                "vars": { "edgefront_origin_failover": true },
                "children": children,
            }}))?,
        )?;
        Ok(path.display().to_string())
    };
    let without = inventory(false)?;
    for book in ["playbooks/site.yml", "playbooks/rolling-upgrade.yml"] {
        let (ok, out) = run_playbook(&["-i", &without, book])?;
        assert!(
            !ok && out.contains("this deployment runs origin failover"),
            "{book} without the failover groups:\n{out}"
        );
        assert!(
            !out.contains("UNREACHABLE"),
            "{book} reached a host:\n{out}"
        );
    }
    let (ok, out) = run_playbook(&["-i", &inventory(true)?, "playbooks/site.yml"])?;
    assert!(
        !ok && out.contains("UNREACHABLE") && !out.contains("this deployment runs origin failover"),
        "with the groups the guard lets the run go on:\n{out}"
    );
    Ok(())
}

// Least privilege, read from the role files themselves (what ansible would
// install, not what a booted machine shows: that is issue 15).

fn ansible_text(rel: &str) -> Result<String> {
    let p = repo().join("ansible").join(rel);
    std::fs::read_to_string(&p).with_context(|| p.display().to_string())
}

/// `Key=value` settings of a unit's `[Service]` section.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// One task of a role's or playbook's task list, as text: from a `- name:`
/// line to the next (a block's tasks are tasks of their own).
struct Task {
    /// The role it belongs to ("" in a playbook).
    role: String,
    text: String,
}

impl Task {
    /// The value of `key:` in this task, quotes removed.
    fn field(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let v = l.trim_start().strip_prefix(key)?.strip_prefix(':')?;
            Some(v.trim().trim_matches('"'))
        })
    }

    fn uses(&self, module: &str) -> bool {
        self.text.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with(&format!("ansible.builtin.{module}:"))
                || l.starts_with(&format!("{module}:"))
        })
    }

    fn is(&self, key: &str, want: &str) -> bool {
        self.field(key) == Some(want)
    }

    /// Whether the task sets this owner, group and mode.
    fn owned(&self, owner: &str, group: &str, mode: &str) -> bool {
        self.is("owner", owner) && self.is("group", group) && self.is("mode", mode)
    }
}

fn yml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_dir() {
            yml_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yml") {
            out.push(p);
        }
    }
    Ok(())
}

/// Every task of every role's `tasks/` and every playbook.
fn all_tasks() -> Result<Vec<Task>> {
    let ansible = repo().join("ansible");
    let mut files = Vec::new();
    yml_files(&ansible.join("roles"), &mut files)?;
    yml_files(&ansible.join("playbooks"), &mut files)?;
    let mut tasks = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&ansible)?.to_path_buf();
        let parts: Vec<_> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let role = match parts.as_slice() {
            [roles, role, tasks, ..] if roles == "roles" && tasks == "tasks" => role.clone(),
            [playbooks, ..] if playbooks == "playbooks" => String::new(),
            _ => continue,
        };
        let mut current: Option<Task> = None;
        for line in std::fs::read_to_string(&f)?.lines() {
            if line.trim_start().starts_with("- name:") {
                tasks.extend(current.take());
                current = Some(Task {
                    role: role.clone(),
                    text: String::new(),
                });
            }
            if let Some(t) = current.as_mut() {
                t.text.push_str(line);
                t.text.push('\n');
            }
        }
        tasks.extend(current);
    }
    Ok(tasks)
}

const UNITS: [(&str, &str); 3] = [
    ("edge", "roles/edge/templates/edgefront-edge.service.j2"),
    (
        "health",
        "roles/health/templates/edgefront-health.service.j2",
    ),
    (
        "origin",
        "roles/origin/templates/edgefront-origin.service.j2",
    ),
];

#[test]
fn services_run_as_their_own_users_and_only_the_hook_gets_group_bird() -> Result<()> {
    let mut users = Vec::new();
    for (name, path) in UNITS {
        let s = service_settings(&ansible_text(path)?);
        let user = setting(&s, "User");
        assert_eq!(user.len(), 1, "{path}: one User= line: {user:?}");
        assert_eq!(user[0], format!("edgefront-{name}"), "{path}");
        assert_eq!(
            setting(&s, "Group"),
            user,
            "{path}: Group= is the user's own"
        );
        let groups: Vec<&str> = setting(&s, "SupplementaryGroups")
            .into_iter()
            .flat_map(str::split_whitespace)
            .collect();
        assert_eq!(
            groups.contains(&"bird"),
            name == "health",
            "{path}: only the health hook has group bird (BIRD's control socket): {groups:?}"
        );
        for key in ["NoNewPrivileges", "ProtectHome", "PrivateTmp"] {
            assert_eq!(setting(&s, key), ["yes"], "{path}: {key}");
        }
        assert_eq!(setting(&s, "ProtectSystem"), ["strict"], "{path}");
        users.push(user[0].to_owned());
    }
    users.sort();
    users.dedup();
    assert_eq!(users.len(), UNITS.len(), "no two services share a user");

    let tasks = all_tasks()?;
    // Users get no supplementary groups from tasks (group bird comes from
    // the hook's unit alone), and nothing else adds anyone to bird.
    let user_tasks: Vec<_> = tasks
        .iter()
        .filter(|t| t.uses("user") && !t.is("state", "absent"))
        .collect();
    assert!(
        !user_tasks.is_empty(),
        "the service users are made by a task"
    );
    for t in user_tasks {
        assert!(
            t.is("groups", "[]") && t.is("append", "false"),
            "a user task must give no supplementary groups:\n{}",
            t.text
        );
    }
    for t in &tasks {
        let lines = t.text.lines().map(str::trim_start);
        for l in lines.filter(|l| !l.starts_with('#')).map(str::to_lowercase) {
            assert!(
                !(l.contains("bird")
                    && ["usermod", "gpasswd", "adduser", "groups:"]
                        .iter()
                        .any(|c| l.contains(c))),
                "a task adds a user to group bird:\n{}",
                t.text
            );
        }
        // The shared user of older releases owns nothing any more.
        for key in ["owner", "group"] {
            assert!(!t.is(key, "edgefront"), "{key}: edgefront in\n{}", t.text);
        }
    }
    // BIRD's config holds the BGP password: group bird (the hook) must not read it.
    let bird_conf = tasks
        .iter()
        .find(|t| t.role == "bird" && t.is("dest", "/etc/bird/bird.conf"))
        .context("the bird.conf task")?;
    assert!(
        bird_conf.is("owner", "bird") && bird_conf.is("mode", "0600"),
        "{}",
        bird_conf.text
    );
    Ok(())
}

#[test]
fn env_files_are_root_only_and_hold_only_their_own_services_secrets() -> Result<()> {
    let tasks = all_tasks()?;
    let env_tasks: Vec<_> = tasks
        .iter()
        .filter(|t| t.field("dest").is_some_and(|d| d.ends_with(".env")))
        .collect();
    for t in &env_tasks {
        assert!(
            t.owned("root", "root", "0600"),
            "an env file must be root:root 0600 (systemd reads it before dropping privileges):\n{}",
            t.text
        );
    }
    // What each service's env files say: the template, or the task's own content.
    let mut env = std::collections::BTreeMap::new();
    for (name, path) in UNITS {
        let s = service_settings(&ansible_text(path)?);
        let files = setting(&s, "EnvironmentFile");
        assert!(!files.is_empty(), "{path}: loads its env file");
        let mut text = String::new();
        for f in files {
            let f = f.trim_start_matches('-');
            let t = env_tasks
                .iter()
                .find(|t| t.is("dest", f))
                .with_context(|| format!("{path}: no task writes {f}"))?;
            match t.field("src") {
                Some(src) if !src.is_empty() => {
                    text += &ansible_text(&format!("roles/{}/templates/{src}", t.role))?;
                }
                _ => text += &t.text,
            }
        }
        env.insert(name, text);
    }
    let has = |service: &str, needle: &str| env[service].contains(needle);
    // Only the edge's (the origin, on its own host, shares the master key and
    // the internal token): never the hook's.
    for secret in [
        "EDGEFRONT_CERT_KEY",
        "edgefront_cert_key",
        "EDGEFRONT_INTERNAL_TOKEN",
        "edgefront_internal_token",
        "EDGEFRONT_RYW_KEYS",
        "edgefront_ryw_keys",
        "EAB_HMAC",
        "eab_hmac",
    ] {
        assert!(
            !has("health", secret),
            "the health hook's env holds {secret}"
        );
    }
    // The edge's own secrets are files it reads at every start (so a reload
    // picks up a rotated one), its group's alone: none in its environment.
    for secret in [
        "EDGEFRONT_CERT_KEY",
        "EDGEFRONT_ADMIN_TOKEN",
        "EDGEFRONT_INTERNAL_TOKEN",
        "EDGEFRONT_RYW_KEYS",
        "EAB_HMAC",
    ] {
        assert!(!has("edge", secret), "the edge's env holds {secret}");
    }
    let files = tasks
        .iter()
        .find(|t| t.role == "edge" && t.is("dest", "{{ edge_secrets_dir }}/{{ item.key }}"))
        .context("the edge role's secret files task")?;
    assert!(
        files.owned("root", "edgefront-edge", "0640"),
        "{}",
        files.text
    );
    let dir = tasks
        .iter()
        .find(|t| t.role == "edge" && t.is("path", "{{ edge_secrets_dir }}"))
        .context("the edge role's secrets directory task")?;
    assert!(dir.owned("root", "edgefront-edge", "0750"), "{}", dir.text);
    let defaults = ansible_text("roles/edge/defaults/main.yml")?;
    for key in [
        "'cert_key'",
        "'admin_token'",
        "'internal_token'",
        "'ryw_keys'",
    ] {
        assert!(defaults.contains(key), "edge_secrets lacks {key}");
    }
    // Only the hook's: never the edge's or the origin's.
    for secret in ["EDGEFRONT_STATUS_TOKEN", "edgefront_status_token"] {
        assert!(!has("edge", secret), "the edge's env holds {secret}");
        assert!(!has("origin", secret), "the origin's env holds {secret}");
    }
    // The hook's tokens are files it reads again on reload (a rotation
    // never restarts it: a restart is a withdraw), its group's alone, and
    // nothing in its environment.
    for secret in ["EDGEFRONT_STATUS_TOKEN", "EDGEFRONT_ADMIN_TOKEN"] {
        assert!(!has("health", secret), "the hook's env holds {secret}");
    }
    let tokens = tasks
        .iter()
        .find(|t| t.role == "health" && t.is("dest", "{{ health_secrets_dir }}/{{ item.key }}"))
        .context("the health role's token files task")?;
    assert!(
        tokens.owned("root", "edgefront-health", "0640") && tokens.text.contains("Reload health"),
        "{}",
        tokens.text
    );
    let health_defaults = ansible_text("roles/health/defaults/main.yml")?;
    for key in ["admin_token:", "status_token:"] {
        assert!(health_defaults.contains(key), "health_secrets lacks {key}");
    }
    // Region admin tokens and read-your-writes keys are no business of the origin.
    for secret in ["EDGEFRONT_ADMIN_TOKEN", "admin_token", "EDGEFRONT_RYW_KEYS"] {
        assert!(!has("origin", secret), "the origin's env holds {secret}");
    }
    Ok(())
}

#[test]
fn private_keys_are_readable_by_their_one_service_only() -> Result<()> {
    let tasks = all_tasks()?;
    let pki_key = tasks
        .iter()
        .find(|t| t.role == "pki" && t.field("dest").is_some_and(|d| d.ends_with(".key")))
        .context("the pki role's key task")?;
    assert!(
        pki_key.owned("root", "{{ pki_group }}", "0640"),
        "{}",
        pki_key.text
    );
    let site = ansible_text("playbooks/site.yml")?;
    for group in ["pki_group: edgefront-origin", "pki_group: edgefront-edge"] {
        assert!(site.contains(group), "site.yml: {group}");
    }
    let pg_key = tasks
        .iter()
        .find(|t| t.role == "postgresql" && t.is("dest", "{{ pg_ssl_key_file }}"))
        .context("the postgresql role's key task")?;
    assert!(
        pg_key.is("owner", "postgres") && pg_key.is("mode", "0600"),
        "{}",
        pg_key.text
    );
    Ok(())
}

/// The alert rules shipped for production are valid, and their unit tests
/// (promtool's: series in, alerts out) pass.
#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let dir = repo().join("ansible/files");
    for args in [
        &["check", "rules", "prometheus-alerts.yml"][..],
        &["test", "rules", "prometheus-alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .context("promtool (Debian prometheus; tests/scripts/setup.sh installs it)")?;
        let text = edgefront_tests::output_text(&out);
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
    Ok(())
}
