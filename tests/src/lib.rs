//! Integration fixtures: real PostgreSQL primary and streaming replicas, the
//! origin and edge binaries, each in temp dirs on free loopback ports, each
//! killed and removed when dropped (also when a test panics). One module
//! per thing started: `postgres`, `origin`, `edge`, `acme_ca` (test CA,
//! pebble and its DNS), `netlab` (network namespaces); the helpers they
//! share (processes, ports, polling) are here.
//!
//! `Postgres::primary()` → `.replica("bom1")` → `Origin::start(..)` →
//! `Edge::builder(..).run()`; [`Stack`] wires one region end to end.
//! The binaries come from the workspace's `target/release` (or
//! `EDGEFRONT_BIN_DIR`): build them first with `cargo build --release`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

mod acme_ca;
mod edge;
pub mod history;
pub mod labdb;
pub mod machines;
pub mod netlab;
mod origin;
pub mod otlp;
pub mod patroni;
mod postgres;
pub mod relay;

pub use acme_ca::*;
pub use edge::*;
pub use origin::*;
pub use postgres::*;

/// PostgreSQL server binaries (Debian layout).
pub const PG_BIN: &str = edgefront_ctl::lab::PG_BIN;

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub(crate) fn wait_port(
    addr: SocketAddr,
    timeout: Duration,
    child: &mut Child,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on {addr} within {timeout:?}")
}

/// A finished command's standard output, then its standard error, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn run(mut c: Command, what: &str) -> Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, output_text(&out));
    }
    Ok(())
}

/// Directory of the workspace's release binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("EDGEFRONT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub(crate) fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            p.display()
        );
    }
    Ok(p)
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    pub name: String,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let logdir = tempfile::Builder::new()
            .prefix(&format!("edgefront-{name}-"))
            .tempdir()?;
        let log = logdir.path().join("log");
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            child,
            name: name.into(),
            log,
            _logdir: logdir,
        })
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited (a zombie counts as exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client for tests: no proxy, no redirects followed, bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// The `p`th percentile (0–100, nearest rank) of `v`, which it sorts; NaN
/// when empty. For benchmark reports.
/// `name;dur=X` of a `server-timing` header value, in ms (the edge's
/// `replica`, `render`, …).
pub fn server_timing(header: &str, name: &str) -> Option<f64> {
    header.split(',').find_map(|part| {
        let part = part.trim();
        part.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok()
    })
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i]
}

/// A response header's value as text ("" when absent or not text).
pub fn header_text(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A process's resident memory, KiB (`VmRSS`), 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
