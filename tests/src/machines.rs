//! Real Debian 12 machines for the deploy test: systemd as PID 1 under
//! `systemd-nspawn`, each in a network namespace of its own, joined to one
//! LAN (a bridge in a namespace this fixture creates), reached by ansible
//! over ssh from inside that namespace, as a controller reaches hosts.
//!
//! Each machine boots from an overlay on one cached root file system
//! (`tests/scripts/debian-rootfs.sh`), so a boot costs about a second and
//! nothing of a run survives it. Measured facts behind the flags:
//! ../shared/design/lab-notes.md, "Real Debian machines for deploy tests".
//!
//! Everything started is stopped by `Drop`, also when a test fails:
//! machines are powered off (SIGTERM to nspawn; SIGKILL to the whole
//! container after 10 s), overlays unmounted, namespaces deleted.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netlab::sh;

/// The LAN's bridge address (the controller, and the router beside it);
/// machines take the others of 198.51.100.0/25 (the region data's node
/// addresses are 198.51.100.1–9).
pub const LAN_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 126);
/// The LAN's prefix length (198.51.100.0/25; the upper half is for links).
pub const LAN_PREFIX: u8 = 25;

/// Where the cached root file system is (built on first use).
pub fn rootfs() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debian-rootfs.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    let path = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !path.join(".complete").exists() {
        bail!("{}: no complete root file system", path.display());
    }
    Ok(path)
}

/// One booted machine.
pub struct Machine {
    pub name: String,
    pub addr: Ipv4Addr,
    /// Its network namespace (its interfaces are `eth0` and `lo`).
    pub netns: String,
    root: PathBuf,
    nspawn: Option<Child>,
}

impl Machine {
    /// The root file system as the machine sees it (the overlay's top).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The container's PID 1 (systemd), for `nsenter -t`.
    pub fn init_pid(&self) -> Option<u32> {
        pid1_of(self.nspawn.as_ref()?.id())
    }
}

fn pid1_of(nspawn: u32) -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &nspawn.to_string(), "-x", "systemd"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The LAN and the machines on it.
pub struct Lan {
    prefix: String,
    dir: tempfile::TempDir,
    key: PathBuf,
    machines: Vec<Machine>,
    namespaces: Vec<String>,
    mounts: Vec<PathBuf>,
}

impl Lan {
    /// A LAN whose namespaces and machines are named `<prefix>…` (keep it
    /// short: interface names are at most 15 bytes).
    pub fn new(prefix: &str) -> Result<Lan> {
        sweep_stale();
        let dir = tempfile::Builder::new()
            .prefix("edgefront-machines")
            .tempdir()?;
        let key = dir.path().join("id_ed25519");
        sh(&[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "edgefront-deploy-test",
            "-f",
            &key.display().to_string(),
        ])?;
        let mut lan = Lan {
            prefix: prefix.to_string(),
            dir,
            key,
            machines: Vec::new(),
            namespaces: Vec::new(),
            mounts: Vec::new(),
        };
        let ns = lan.netns();
        lan.add_netns(&ns)?;
        ipn(&ns, &["link", "add", "br0", "type", "bridge"])?;
        ipn(&ns, &["link", "set", "br0", "up"])?;
        let gw = format!("{LAN_GATEWAY}/{LAN_PREFIX}");
        ipn(&ns, &["addr", "add", &gw, "dev", "br0"])?;
        Ok(lan)
    }

    /// The LAN's namespace: the controller (ansible) runs here.
    pub fn netns(&self) -> String {
        format!("{}lan", self.prefix)
    }

    /// The private key root's `authorized_keys` on every machine accepts.
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// A scratch directory that lives as long as the LAN.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn machine(&self, name: &str) -> &Machine {
        self.machines
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no machine {name}"))
    }

    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        sh(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ipn(ns, &["link", "set", "lo", "up"])
    }

    /// A namespace joined to the LAN's namespace by a veth pair of its own
    /// (`<inner>` inside, 198.51.100.<128 + 4i + 1>/30 on the LAN side):
    /// a city or an outside host.
    pub fn attach(&mut self, name: &str, i: u8) -> Result<(String, Ipv4Addr, Ipv4Addr)> {
        let ns = format!("{}{name}", self.prefix);
        self.add_netns(&ns)?;
        let outer = format!("{}a{i}", self.prefix);
        let lan = self.netns();
        let near = Ipv4Addr::new(198, 51, 100, 128 + 4 * i + 1);
        let far = Ipv4Addr::new(198, 51, 100, 128 + 4 * i + 2);
        sh(&[
            "ip", "link", "add", &outer, "netns", &lan, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        ipn(&lan, &["addr", "add", &format!("{near}/30"), "dev", &outer])?;
        ipn(&lan, &["link", "set", &outer, "up"])?;
        ipn(&ns, &["addr", "add", &format!("{far}/30"), "dev", "eth0"])?;
        ipn(&ns, &["link", "set", "eth0", "up"])?;
        ipn(&ns, &["route", "add", "default", "via", &near.to_string()])?;
        Ok((ns, near, far))
    }

    /// Boots a machine at `addr` on the LAN, hostname `name`, and waits
    /// until systemd says it is running and sshd answers.
    pub fn boot(&mut self, rootfs: &Path, name: &str, addr: Ipv4Addr) -> Result<()> {
        let ns = format!("{}{name}", self.prefix);
        self.add_netns(&ns)?;
        let outer = format!("{}v{}", self.prefix, self.machines.len());
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        let lan = self.netns();
        sh(&["ip", "link", "set", &outer, "netns", &lan])?;
        ipn(&lan, &["link", "set", &outer, "master", "br0", "up"])?;
        ipn(
            &ns,
            &[
                "addr",
                "add",
                &format!("{addr}/{LAN_PREFIX}"),
                "dev",
                "eth0",
            ],
        )?;
        ipn(&ns, &["link", "set", "eth0", "up"])?;
        ipn(
            &ns,
            &["route", "add", "default", "via", &LAN_GATEWAY.to_string()],
        )?;

        let base = self.dir.path().join(name);
        let (upper, work, root) = (base.join("upper"), base.join("work"), base.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            upper.display(),
            work.display()
        );
        sh(&[
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            &root.display().to_string(),
        ])?;
        self.mounts.push(root.clone());
        std::fs::write(root.join("etc/hostname"), format!("{name}\n"))?;
        std::fs::write(
            root.join("etc/hosts"),
            format!("127.0.0.1 localhost\n{addr} {name}\n"),
        )?;
        // udev makes /dev/net/tun 0666 on a booted VM; nspawn copies the
        // host's node, 0600 on this machine kind (the health hook, not root,
        // opens it for its liveness device).
        std::fs::write(
            root.join("etc/tmpfiles.d/edgefront-test-tun.conf"),
            "z /dev/net/tun 0666 root root -\n",
        )?;
        let pubkey = std::fs::read_to_string(self.key.with_extension("pub"))?;
        let auth = root.join("root/.ssh/authorized_keys");
        std::fs::write(&auth, pubkey)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600))?;

        let log = std::fs::File::create(base.join("console.log"))?;
        let machine_name = format!("{}{name}", self.prefix);
        let child = Command::new("setsid")
            .args(["systemd-nspawn", "-b", "-D"])
            .arg(&root)
            .args([
                "-M",
                &machine_name,
                "--register=no",
                "--keep-unit",
                "--console=passive",
                &format!("--network-namespace-path=/run/netns/{ns}"),
                "--capability=CAP_NET_ADMIN",
            ])
            // /proc/sys/net writable inside (its own namespace's): roles set
            // forwarding and reverse-path filtering, as on a VM.
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("systemd-nspawn (tests/scripts/setup.sh installs systemd-container)")?;
        self.machines.push(Machine {
            name: name.to_string(),
            addr,
            netns: ns,
            root,
            nspawn: Some(child),
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.ssh(name, "systemctl is-system-running --wait") {
                Ok(state) if matches!(state.trim(), "running" | "degraded") => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(300))
                }
                Ok(state) => bail!("{name}: system {}", state.trim()),
                Err(e) => {
                    let console =
                        std::fs::read_to_string(base.join("console.log")).unwrap_or_default();
                    return Err(e.context(format!("{name} did not boot; console:\n{console}")));
                }
            }
        }
    }

    fn ssh_command(&self, addr: Ipv4Addr) -> Command {
        let mut c = Command::new("ip");
        // Bounded: a command that hangs on a machine fails the test instead.
        c.args(["netns", "exec", &self.netns(), "timeout", "300", "ssh"])
            .args(["-i", &self.key.display().to_string()])
            .args(ssh_options())
            .arg(format!("root@{addr}"));
        c
    }

    /// Pulls a machine's power: its network goes silent first (no reset or
    /// FIN leaves it, as from a host without power), then everything in it
    /// dies at once (SIGKILL of its PID namespace's init). Not restartable.
    pub fn power_pull(&mut self, name: &str) -> Result<()> {
        let i = self
            .machines
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no machine {name}"))?;
        let ns = self.machines[i].netns.clone();
        ipn(&ns, &["link", "set", "eth0", "down"])?;
        let pid1 = self.machines[i]
            .init_pid()
            .with_context(|| format!("{name} has no init"))?;
        sh(&["kill", "-KILL", &pid1.to_string()])?;
        if let Some(mut c) = self.machines[i].nspawn.take() {
            let _ = c.wait();
        }
        Ok(())
    }

    /// Runs a shell command on a machine as root; fails with its output.
    pub fn ssh(&self, name: &str, cmd: &str) -> Result<String> {
        let addr = self.machine(name).addr;
        let out = self
            .ssh_command(addr)
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .context("ssh")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // `systemctl is-system-running` exits non-zero when degraded.
        if !out.status.success() && text.trim().is_empty() {
            bail!(
                "{name}: `{cmd}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }

    /// Runs `ansible-playbook` from the LAN's namespace with this LAN's key;
    /// returns its output and whether it succeeded.
    pub fn ansible_playbook(&self, cwd: &Path, args: &[&str]) -> Result<(bool, String)> {
        let ssh_args = ssh_options().join(" ");
        let out = Command::new("ip")
            // Bounded: a task that hangs fails the test (15 min).
            .args([
                "netns",
                "exec",
                &self.netns(),
                "timeout",
                "900",
                "ansible-playbook",
            ])
            .args(args)
            .current_dir(cwd)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_PRIVATE_KEY_FILE", &self.key)
            .env("ANSIBLE_REMOTE_USER", "root")
            .env("ANSIBLE_SSH_ARGS", ssh_args)
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.path().join("ansible-local"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", self.dir.path().join("cp"))
            .stdin(Stdio::null())
            .output()
            .context("ansible-playbook (Debian ansible-core)")?;
        Ok((out.status.success(), crate::output_text(&out)))
    }
}

/// What an earlier run killed before its `Drop` left behind: namespaces
/// `efd<pid>…` of a process that is gone, with the containers in them (their
/// PID 1 dies with the kill, and nspawn with it).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = ns.strip_prefix("efd") else {
            continue;
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let alive = digits
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if digits.is_empty() || alive {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-KILL", pid]);
            }
        }
        let _ = sh(&["ip", "netns", "del", ns]);
    }
}

fn ssh_options() -> Vec<String> {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "ControlMaster=auto",
        "-o",
        "ControlPersist=60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    sh(&v)
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Power off: nspawn turns SIGTERM into a clean shutdown of the
        // container's systemd.
        for m in &mut self.machines {
            if let Some(c) = &m.nspawn {
                let _ = sh(&["kill", "-TERM", &c.id().to_string()]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for m in &mut self.machines {
            let Some(mut c) = m.nspawn.take() else {
                continue;
            };
            let pid1 = pid1_of(c.id());
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Ok(None) => {
                        // Killing a PID namespace's init kills everything in it.
                        if let Some(p) = pid1 {
                            let _ = sh(&["kill", "-KILL", &p.to_string()]);
                        }
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
            let _ = std::fs::remove_dir_all(format!(
                "/run/systemd/nspawn/propagate/{}{}",
                self.prefix, m.name
            ));
        }
        for root in self.mounts.drain(..).rev() {
            let r = root.display().to_string();
            if sh(&["umount", &r]).is_err() {
                let _ = sh(&["umount", "-l", &r]);
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            // Anything still inside (a stray process) goes first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = sh(&["kill", "-KILL", pid]);
                }
            }
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
    }
}
