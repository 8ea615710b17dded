//! `edgefront-delaylink`: the lab's inter-metro fiber. This kernel has no
//! `sch_netem`, so each backbone link is two veth ends in the lab's wire
//! namespace bridged by this process: every Ethernet frame read from one end
//! (AF_PACKET, ETH_P_ALL) is written to the other end `delay` later. One
//! reader and one writer thread per direction; the delay is constant per
//! direction, so a FIFO keeps frames in deadline order. Frames the process
//! itself sent (PACKET_OUTGOING) are never forwarded back. Offloads must be
//! off on the veths (the lab does it) so frames are wire-sized and checksummed.
//!
//! Usage: `edgefront-delaylink --link bb0:a0:b0:23450 --link …` (name, the two
//! interfaces, one-way delay in microseconds).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Forward frames between two interfaces after a fixed one-way delay")]
struct Cli {
    /// NAME:IF_A:IF_B:DELAY_MICROSECONDS, repeatable.
    #[arg(long = "link", required = true)]
    links: Vec<String>,
    /// Frames queued per direction before new ones are dropped (a full queue).
    #[arg(long, default_value_t = 20_000)]
    queue: usize,
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const MAX_FRAME: usize = 65_536;

/// An AF_PACKET socket bound to one interface.
struct Port {
    fd: OwnedFd,
}

impl Port {
    fn open(ifname: &str) -> io::Result<Port> {
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
        #[allow(unsafe_code)]
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {ifname}"),
            ));
        }
        let proto = ETH_P_ALL.to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        #[allow(unsafe_code)]
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own from here on.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        #[allow(unsafe_code)]
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        let rcvbuf: libc::c_int = 8 << 20;
        for (level, opt, val) in [
            (libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &one),
            (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf),
        ] {
            // SAFETY: `val` points to a c_int of the size passed. Failure is
            // tolerated: outgoing frames are also filtered by type below.
            #[allow(unsafe_code)]
            let _ = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    opt,
                    (val as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(Port { fd })
    }

    /// Receives one frame; returns its length and packet type.
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, u8)> {
        // SAFETY: zeroed sockaddr_ll is valid plain data.
        #[allow(unsafe_code)]
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for writes of the lengths given.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize, from.sll_pkttype))
    }

    /// Sends one frame out of the bound interface.
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length.
        #[allow(unsafe_code)]
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped_full: AtomicU64,
    send_errors: AtomicU64,
}

fn reader(from: Arc<Port>, delay: Duration, tx: SyncSender<(Instant, Vec<u8>)>, c: Arc<Counters>) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        match from.recv(&mut buf) {
            Ok((_, PACKET_OUTGOING)) => continue,
            Ok((n, _)) => match tx.try_send((Instant::now() + delay, buf[..n].to_vec())) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    c.dropped_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("delaylink: receive failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn writer(to: Arc<Port>, rx: Receiver<(Instant, Vec<u8>)>, c: Arc<Counters>) {
    while let Ok((due, frame)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.send(&frame).is_ok() {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
        } else {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut all = Vec::new();
    for spec in &cli.links {
        let parts: Vec<&str> = spec.split(':').collect();
        let [name, a, b, us] = parts[..] else {
            bail!("--link {spec:?}: expected NAME:IF_A:IF_B:DELAY_MICROSECONDS");
        };
        let us: u64 = us
            .parse()
            .with_context(|| format!("--link {spec:?}: delay {us:?} is not a number"))?;
        let delay = Duration::from_micros(us);
        let pa = Arc::new(Port::open(a).with_context(|| format!("link {name}: {a}"))?);
        let pb = Arc::new(Port::open(b).with_context(|| format!("link {name}: {b}"))?);
        for (from, to) in [(pa.clone(), pb.clone()), (pb, pa)] {
            let c = Arc::new(Counters::default());
            let (tx, rx) = sync_channel(cli.queue);
            let cr = c.clone();
            std::thread::Builder::new()
                .name(format!("{name}-rx"))
                .spawn(move || reader(from, delay, tx, cr))?;
            let cw = c.clone();
            std::thread::Builder::new()
                .name(format!("{name}-tx"))
                .spawn(move || writer(to, rx, cw))?;
            all.push((name.to_owned(), c));
        }
        eprintln!("delaylink: {name}: {a} <-> {b}, {us} us one way");
    }
    // Report totals now and then so a drop or error shows up in the lab's log.
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let (mut f, mut d, mut e) = (0, 0, 0);
        for (_, c) in &all {
            f += c.forwarded.load(Ordering::Relaxed);
            d += c.dropped_full.load(Ordering::Relaxed);
            e += c.send_errors.load(Ordering::Relaxed);
        }
        if f != last {
            eprintln!("delaylink: forwarded {f} frames, dropped {d} (queue full), {e} send errors");
            last = f;
        }
    }
}
