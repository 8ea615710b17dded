//! Reload without dropping a connection (`systemctl reload`, SIGHUP).
//!
//! On SIGHUP the edge starts its successor: the binary at the path it was
//! started from (a new release, if one was installed there), with the same
//! arguments plus `--upgrade`, so it reads the configuration file again.
//! Once the successor waits for the listening sockets, the running edge
//! hands them over as on SIGQUIT (pingora's graceful upgrade) and finishes
//! what it has in flight. Nothing is handed over to a successor that cannot
//! run: the configuration is checked first (`--check-config`), and a
//! successor that exits before it waits for the sockets is reported while
//! the running edge keeps serving.
//!
//! Under systemd (`Type=notify`, `ExecReload=kill -HUP $MAINPID`), the edge
//! tells the service manager `READY=1` once warm ([`Ready`]), and on a
//! reload names the successor `MAINPID` before handing over, so the unit
//! follows the new process and never sees its main process exit.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

/// Longest a successor may take to start waiting for the sockets.
const SUCCESSOR_START: Duration = Duration::from_secs(15);

/// Pingora's signals (SIGQUIT upgrade, SIGTERM graceful stop, SIGINT fast
/// stop) plus SIGHUP: reload through a successor.
pub struct Signals {
    /// The path this edge was started as, and its other arguments.
    program: OsString,
    args: Vec<OsString>,
    /// Where a successor waits for the sockets (crate::server::upgrade_sock).
    upgrade_sock: PathBuf,
    /// The page cache and the certificates, named to the successor
    /// ([`handed_pages`]).
    cache: std::sync::Arc<crate::cache::PageCache>,
    certs: Option<std::sync::Arc<edgefront_certs::CertMap>>,
}

/// Pages an edge names to its successor, which renders them before it says
/// it is ready: its cache starts with what this one served.
pub const HANDED_PAGES: usize = 2000;

/// The file beside the upgrade socket in which an edge names its cached
/// pages and its loaded certificates to its successor: `page <store-id>
/// <path>` and `cert <name>` lines.
pub fn handed_pages(upgrade_sock: &std::path::Path) -> PathBuf {
    let mut p = upgrade_sock.as_os_str().to_owned();
    p.push(".pages");
    PathBuf::from(p)
}

impl Signals {
    /// Reloads rerun this process's own command line.
    pub fn new(
        upgrade_sock: PathBuf,
        cache: std::sync::Arc<crate::cache::PageCache>,
        certs: Option<std::sync::Arc<edgefront_certs::CertMap>>,
    ) -> Self {
        let mut argv = std::env::args_os();
        let program = argv.next().unwrap_or_else(|| "edge".into());
        // A successor of a successor is started the same way.
        let args = argv.filter(|a| a != "--upgrade").collect();
        Signals {
            program,
            args,
            upgrade_sock,
            cache,
            certs,
        }
    }

    /// Names the cached pages to the successor, before the sockets go (a
    /// successor reads the file once it has them). Written whole or not at
    /// all; owner-only.
    fn hand_over_pages(&self) {
        let pages = self.cache.cached_pages(HANDED_PAGES);
        let names = self.certs.as_ref().map(|c| c.names()).unwrap_or_default();
        let text: String = pages
            .iter()
            .map(|(store, page)| format!("page {} {}\n", store.0, page.path()))
            .chain(
                names
                    .iter()
                    .take(HANDED_PAGES)
                    .map(|name| format!("cert {name}\n")),
            )
            .collect();
        let path = handed_pages(&self.upgrade_sock);
        let tmp = path.with_extension("pages.tmp");
        let written = (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, &path)
        })();
        match written {
            Ok(()) => tracing::info!(
                pages = pages.len(),
                certificates = names.len(),
                "named the cached pages and certificates to the successor"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot name the cached pages to the successor"),
        }
    }

    /// Checks the configuration, starts the successor and waits until it
    /// waits for the sockets; its process id. Dropped before it returns
    /// (another signal came), it kills the successor it started.
    async fn start_successor(&self) -> Result<u32, String> {
        let check = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg("--check-config")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let check = tokio::time::timeout(SUCCESSOR_START, check)
            .await
            .map_err(|_| "the configuration check did not finish".to_owned())?
            .map_err(|e| format!("cannot run {:?}: {e}", self.program))?;
        if !check.status.success() {
            return Err(format!(
                "the configuration check failed ({}): {}",
                check.status,
                String::from_utf8_lossy(&check.stderr).trim()
            ));
        }
        // The successor creates the socket: one left from an earlier
        // upgrade must not pass for it.
        match std::fs::remove_file(&self.upgrade_sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", self.upgrade_sock.display())),
        }
        let mut successor = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg("--upgrade")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.program))?;
        let pid = successor.id().ok_or("the successor exited at once")?;
        let me = nix::unistd::geteuid().as_raw();
        let deadline = tokio::time::Instant::now() + SUCCESSOR_START;
        loop {
            if let Some(status) = successor.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("the successor {pid} exited ({status})"));
            }
            // Only a socket of this user: the sockets go to whoever listens
            // there.
            if let Ok(m) = std::fs::symlink_metadata(&self.upgrade_sock) {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                if !m.file_type().is_socket() || m.uid() != me {
                    return Err(format!(
                        "{} is not a socket of this user: nothing handed over",
                        self.upgrade_sock.display()
                    ));
                }
                // It outlives this process: not killed on drop, and nothing
                // here waits for it.
                std::mem::forget(successor);
                return Ok(pid);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the successor {pid} did not wait for the sockets within {SUCCESSOR_START:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Takes SIGHUP over from its default action (ending the process) at once:
/// call it first in `main`. A reload asked for while this edge is still
/// starting (systemd already names it the service when its predecessor hands
/// over) is then a no-op rather than the death of the new edge.
pub fn hold_sighup() {
    let held = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map(|rt| rt.block_on(async { signal(SignalKind::hangup()).map(drop) }));
    if !matches!(held, Ok(Ok(()))) {
        eprintln!("edge: cannot take SIGHUP over: a reload before the start is over would stop it");
    }
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot listen for signals: stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    self.hand_over_pages();
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => {
                    // A stop asked for meanwhile wins over the reload (the
                    // successor, if started, is killed with the future).
                    let started = tokio::select! {
                        r = self.start_successor() => r,
                        _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                        _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                        _ = int.recv() => return ShutdownSignal::FastShutdown,
                    };
                    match started {
                        Ok(pid) => {
                            tracing::warn!(successor = pid, "reload: the successor takes the listening sockets over");
                            self.hand_over_pages();
                            // systemd follows the successor before this one exits.
                            notify(&[sd_notify::NotifyState::MainPid(pid)]);
                            return ShutdownSignal::GracefulUpgrade;
                        }
                        Err(e) => tracing::error!(error = %e, "reload refused: this edge keeps serving"),
                    }
                }
            }
        }
    }
}

/// Renders the pages the edge this one took over from named
/// ([`handed_pages`]) into the cache, and loads the certificates it named,
/// four lanes at a time, then removes the file; `(named, now in memory)`.
/// Only a recent file of this user is read. Call it on the proxy's runtime
/// (its pools live there), bounded by the caller.
pub async fn warm_handed_pages(
    pages: std::sync::Arc<crate::proxy::Pages>,
    certs: Option<std::sync::Arc<crate::tls::CertLoader>>,
    path: &std::path::Path,
) -> (usize, usize) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return (0, 0);
    };
    let fresh = meta
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(120));
    let text = if meta.is_file() && meta.uid() == nix::unistd::geteuid().as_raw() && fresh {
        std::fs::read_to_string(path).unwrap_or_default()
    } else {
        String::new()
    };
    let _ = std::fs::remove_file(path);
    enum Named {
        Page(edgefront_schema::StoreId, crate::route::Page),
        Cert(String),
    }
    let named: Vec<Named> = text
        .lines()
        .take(2 * HANDED_PAGES)
        .filter_map(|line| match line.split_once(' ')? {
            ("page", rest) => {
                let (store, target) = rest.split_once(' ')?;
                let store = edgefront_schema::StoreId(store.parse().ok()?);
                match crate::route::classify(&http::Method::GET, target) {
                    crate::route::Route::Page(page) => Some(Named::Page(store, page)),
                    _ => None,
                }
            }
            // A wildcard is loaded by a name under it.
            ("cert", name) => Some(Named::Cert(match name.strip_prefix("*.") {
                Some(parent) => format!("warm-up.{parent}"),
                None => name.to_owned(),
            })),
            _ => None,
        })
        .collect();
    let n = named.len();
    let named = std::sync::Arc::new(named);
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let (pages, certs, named) = (pages.clone(), certs.clone(), named.clone());
        lanes.spawn(async move {
            let mut done = 0;
            for item in named.iter().skip(lane).step_by(4) {
                done += usize::from(match item {
                    Named::Page(store, page) => pages.warm(*store, page.clone()).await,
                    Named::Cert(sni) => match &certs {
                        Some(c) => {
                            c.ensure(sni, None).await;
                            c.certs.get(sni).is_some()
                        }
                        None => false,
                    },
                });
            }
            done
        });
    }
    (n, lanes.join_all().await.into_iter().sum())
}

/// Tells the service manager, if one asked (`NOTIFY_SOCKET`); successors
/// inherit the variable.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager this process is the service and is ready,
/// once the start's warm-up is over (the same moment `/healthz` may say
/// healthy).
pub struct Ready(pub std::sync::Arc<crate::traffic::Traffic>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Ready {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        while !self.0.warmed() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
        ]);
    }
}
