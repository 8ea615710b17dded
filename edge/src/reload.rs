//! Reload without dropping a connection (`systemctl reload`, SIGHUP).
//!
//! On SIGHUP the edge starts its successor: the binary at the path it was
//! started from (a new release, if one was installed there), with the same
//! arguments plus `--upgrade`, so it reads the configuration file again.
//! Once the successor waits for the listening sockets, the running edge
//! sends it copies of them (pingora's hand-off protocol) and keeps
//! accepting on its own: both serve until the successor is warm and says
//! so ([`ready_file`]); only then does the running edge stop taking new
//! requests and finish what it has in flight (pingora's graceful stop).
//! Nothing is lost to a successor that cannot run: the configuration is
//! checked first (`--check-config`); a successor that exits before it waits
//! for the sockets, or after it has them but before it is ready, or that is
//! not ready within [`SUCCESSOR_READY`] (then it is stopped), is reported
//! while the running edge keeps serving, its listeners never closed. That
//! is the way back pingora's own upgrade (SIGQUIT, below) does not have: it
//! hands the sockets over and stops, whatever becomes of the successor.
//!
//! Under systemd (`Type=notify`, `NotifyAccess=all`,
//! `ExecReload=kill -HUP $MAINPID`), the edge tells the service manager
//! `MAINPID` and `READY=1` once warm ([`Ready`]). A reload's successor
//! claims nothing itself (it may yet be refused): the running edge names it
//! `MAINPID`, ready, once it has accepted it and before it stops, so the
//! unit follows the new process and never sees its main process exit.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

/// Longest a successor may take to start waiting for the sockets.
const SUCCESSOR_START: Duration = Duration::from_secs(15);

/// Longest a successor that has the sockets may take to be warm and say
/// so: past pingora's hand-off, its start ([`crate::server::WARM_UP_BOUND`]
/// bounds the wait for the replica) and the warm-up of the pages it was
/// named. One that takes longer is stopped (SIGTERM: it finishes what it
/// accepted) and this edge keeps serving.
pub const SUCCESSOR_READY: Duration = Duration::from_secs(60);

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
    /// The addresses this edge listens on, as pingora names them in the
    /// hand-off ([`crate::server::listeners`]).
    listeners: Vec<String>,
}

/// Pages an edge names to its successor, which renders them before it says
/// it is ready: its cache starts with what this one served.
pub const HANDED_PAGES: usize = 2000;

/// Set in the environment of a successor a reload starts: it says it is
/// ready in the [`ready_file`], not to the service manager (an edge started
/// with `--upgrade` by hand, for pingora's SIGQUIT upgrade, tells the
/// service manager itself).
pub const RELOAD_ENV: &str = "EDGEFRONT_EDGE_RELOAD_SUCCESSOR";

/// The file beside the upgrade socket in which a successor started by a
/// reload says, with its process id, that it is warm.
pub fn ready_file(upgrade_sock: &std::path::Path) -> PathBuf {
    let mut p = upgrade_sock.as_os_str().to_owned();
    p.push(".ready");
    PathBuf::from(p)
}

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
        listeners: Vec<String>,
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
            listeners,
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
        match write_whole_private(&handed_pages(&self.upgrade_sock), text.as_bytes()) {
            Ok(()) => tracing::info!(
                pages = pages.len(),
                certificates = names.len(),
                "named the cached pages and certificates to the successor"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot name the cached pages to the successor"),
        }
    }

    /// Checks the configuration, starts the successor and waits until it
    /// waits for the sockets; the successor. Dropped before it returns
    /// (another signal came), it kills the successor it started.
    async fn start_successor(&self) -> Result<tokio::process::Child, String> {
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
        // The successor creates the socket and the ready file: ones left
        // from an earlier upgrade must not pass for its.
        for stale in [self.upgrade_sock.clone(), ready_file(&self.upgrade_sock)] {
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", stale.display())),
            }
        }
        let mut successor = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg("--upgrade")
            .env(RELOAD_ENV, "1")
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
                return Ok(successor);
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
                    // successor, if started, is killed with the future; once
                    // it has the sockets, it is stopped gracefully).
                    let started = tokio::select! {
                        r = self.start_successor() => r,
                        _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                        _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                        _ = int.recv() => return ShutdownSignal::FastShutdown,
                    };
                    let mut successor = match started {
                        Ok(child) => Successor::new(child),
                        Err(e) => {
                            tracing::error!(error = %e, "reload refused: this edge keeps serving");
                            continue;
                        }
                    };
                    let pid = successor.pid;
                    tracing::warn!(successor = pid, "reload: the successor gets the listening sockets; this edge serves beside it until it is ready");
                    // A SIGQUIT (pingora's upgrade by hand) waits until the
                    // reload is over: the upgrade socket is the successor's.
                    let handed = tokio::select! {
                        r = self.hand_over(&mut successor) => r,
                        _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                        _ = int.recv() => return ShutdownSignal::FastShutdown,
                    };
                    match handed {
                        Ok(()) => {
                            successor.keep();
                            tracing::warn!(successor = pid, "reload: the successor is ready; this edge finishes what it has in flight and stops");
                            // systemd follows the successor before this one
                            // exits: it is the service, and ready, from now.
                            notify(&[
                                sd_notify::NotifyState::MainPid(pid),
                                sd_notify::NotifyState::Ready,
                            ]);
                            return ShutdownSignal::GracefulTerminate;
                        }
                        Err(e) => tracing::error!(
                            successor = pid,
                            error = %e,
                            "reload failed after the hand-over: the successor is stopped and this edge keeps serving"
                        ),
                    }
                }
            }
        }
    }
}

impl Signals {
    /// Names the cached pages to the successor, sends it copies of the
    /// listening sockets (this edge keeps its own and keeps accepting) and
    /// waits until it says it is ready. An error if it exits first, is not
    /// ready within [`SUCCESSOR_READY`], or the sockets cannot be sent.
    async fn hand_over(&self, successor: &mut Successor) -> Result<(), String> {
        let pid = successor.pid;
        let fds = listening_fds(&self.listeners)?;
        self.hand_over_pages();
        let sock = self
            .upgrade_sock
            .to_str()
            .ok_or("the upgrade socket's path is not UTF-8")?
            .to_owned();
        tokio::task::spawn_blocking(move || fds.send_to_sock(sock.as_str()))
            .await
            .map_err(|e| format!("sending the sockets: {e}"))?
            .map_err(|e| format!("sending the sockets: {e}"))?;
        let ready = ready_file(&self.upgrade_sock);
        let deadline = tokio::time::Instant::now() + SUCCESSOR_READY;
        loop {
            if let Some(status) = successor.try_wait()? {
                return Err(format!(
                    "the successor {pid} exited ({status}) after it was sent the sockets"
                ));
            }
            // Ready and still running (it may have died since it wrote).
            if says_ready(&ready, pid) && successor.try_wait()?.is_none() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the successor {pid} was not ready within {SUCCESSOR_READY:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A successor started by a reload. Dropped before [`Successor::keep`], it
/// is stopped gracefully (SIGTERM: it finishes what it accepted; SIGKILL
/// after 30 s), and reaped by a thread of its own (the runtime may end
/// first: this edge stops if a stop won over the reload).
struct Successor {
    child: Option<tokio::process::Child>,
    pid: u32,
}

impl Successor {
    fn new(child: tokio::process::Child) -> Self {
        let pid = child.id().unwrap_or(0);
        Successor {
            child: Some(child),
            pid,
        }
    }

    fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>, String> {
        match &mut self.child {
            Some(c) => c.try_wait().map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    /// It is the edge now: it outlives this process (not killed on drop,
    /// and nothing here waits for it).
    fn keep(mut self) {
        if let Some(child) = self.child.take() {
            std::mem::forget(child);
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) || self.pid == 0 {
            return;
        }
        // Not killed by tokio on drop: the thread below decides.
        std::mem::forget(child);
        use nix::sys::signal::{Signal, kill};
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(100)),
                    _ => return,
                }
            }
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        });
    }
}

/// Whether `path` is a file of this user naming process `pid` ready.
fn says_ready(path: &std::path::Path, pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_file() && m.uid() == nix::unistd::geteuid().as_raw())
        && std::fs::read_to_string(path).is_ok_and(|s| s.trim() == pid.to_string())
}

/// Writes a file beside the upgrade socket for the other edge to read:
/// whole or not at all (a temporary file renamed into place), owner-only.
fn write_whole_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// This process's listening TCP sockets for `binds` (pingora's names for
/// them, `ip:port`), as pingora's hand-off carries them. Found through
/// `/proc` (`/proc/self/net/tcp{,6}` for the listening sockets' inodes and
/// addresses, `/proc/self/fd` for the descriptors); an error if one is
/// missing, so nothing is handed over short.
fn listening_fds(binds: &[String]) -> Result<pingora::server::Fds, String> {
    let mut listening = std::collections::HashMap::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => listening.extend(listening_sockets(&text)),
            // No IPv6 on this host (`ipv6.disable=1`): no such listeners.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{table}: {e}")),
        }
    }
    let mut fds = pingora::server::Fds::new();
    let mut found = std::collections::HashSet::new();
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    for entry in dir.flatten() {
        let Ok(fd) = entry
            .file_name()
            .to_string_lossy()
            .parse::<std::os::fd::RawFd>()
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(addr) = listening.get(&inode) else {
            continue;
        };
        if let Some(bind) = binds
            .iter()
            .find(|b| b.parse::<std::net::SocketAddr>().ok() == Some(*addr))
            && found.insert(bind.clone())
        {
            fds.add(bind.clone(), fd);
        }
    }
    match binds.iter().find(|b| !found.contains(*b)) {
        Some(missing) => Err(format!("no listening socket of this process for {missing}")),
        None => Ok(fds),
    }
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` table: inode and
/// local address of each line in state `0A` (LISTEN).
fn listening_sockets(table: &str) -> Vec<(u64, std::net::SocketAddr)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(3) != Some(&"0A") {
                return None;
            }
            let (ip, port) = cols.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the address as 32-bit words in host order.
            let words = (0..ip.len() / 8)
                .map(|i| u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok())
                .collect::<Option<Vec<u32>>>()?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let ip: std::net::IpAddr = match bytes.len() {
                4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
                16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
                _ => return None,
            };
            Some((cols.get(9)?.parse().ok()?, (ip, port).into()))
        })
        .collect()
}

/// Renders the pages the edge this one took over from named
/// ([`handed_pages`]) into the cache, and loads the certificates it named,
/// four lanes at a time, then removes the file; `(named, now in memory)`.
/// Only a recent file of this user is read. Call it on the proxy's runtime
/// (its pools live there), bounded by the caller.
pub async fn warm_handed_pages(
    pages: std::sync::Arc<crate::pages::Pages>,
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
/// healthy), and, when it was handed the sockets, the edge that handed them
/// ([`ready_file`]): that one stops only then.
pub struct Ready {
    pub traffic: std::sync::Arc<crate::traffic::Traffic>,
    /// Where to say it instead of to the service manager: set in a
    /// successor a reload started ([`RELOAD_ENV`]).
    pub ready_file: Option<PathBuf>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Ready {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        while !self.traffic.warmed() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        match &self.ready_file {
            // Handed the sockets by a reload: the edge that handed them
            // names this one to the service manager once it has stopped
            // taking requests (it may yet refuse it); this one claims
            // nothing itself.
            Some(path) => {
                if let Err(e) =
                    write_whole_private(path, format!("{}\n", std::process::id()).as_bytes())
                {
                    tracing::error!(error = %e, path = %path.display(), "cannot tell the edge that handed the sockets over that this one is ready: it will stop this one");
                }
            }
            None => notify(&[
                sd_notify::NotifyState::MainPid(std::process::id()),
                sd_notify::NotifyState::Ready,
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_procs_tables() {
        // Lines as Linux prints them: a listener on 127.0.0.1:8080, an
        // established connection from it, and one on [::1]:443.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1\n";
        assert_eq!(
            listening_sockets(v4),
            vec![(4242, "127.0.0.1:8080".parse().expect("addr"))]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0 100 0 0 10 0\n";
        assert_eq!(
            listening_sockets(v6),
            vec![(77, "[::1]:443".parse().expect("addr"))]
        );
    }

    /// The descriptors found are this process's listeners, named as
    /// pingora names them; a connection to one is never taken for it, and
    /// a missing listener refuses the hand-off.
    #[test]
    fn listening_fds_finds_this_processs_listeners_and_nothing_else() {
        use std::os::fd::AsRawFd;
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        // A connection to `a` and its accepted end share its local address.
        let _client = std::net::TcpStream::connect(a_addr).expect("connect");
        let (_accepted, _) = a.accept().expect("accept");
        let binds = [a_addr.to_string(), b_addr.to_string()];
        let fds = listening_fds(&binds).expect("both found");
        assert_eq!(fds.get(&binds[0]), Some(&a.as_raw_fd()));
        assert_eq!(fds.get(&binds[1]), Some(&b.as_raw_fd()));
        let gone = {
            let c = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            c.local_addr().expect("c").to_string()
        };
        let err = listening_fds(&[binds[0].clone(), gone.clone()])
            .err()
            .expect("a closed listener is missing");
        assert!(err.contains(&gone), "{err}");
    }
}
