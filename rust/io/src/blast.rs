//! Load generators for the benchmark suite and the demo: a batched UDP sender and receiver, and a
//! TCP connect-rate pair.
//!
//! iperf3 sends one datagram per system call and tops out near 150k packets/s on the benchmark
//! machine, which measures iperf3 rather than the path. `udp_blast` hands the kernel 64 datagrams
//! per `sendmmsg(2)` call and `udp_sink` takes up to 64 per `recvmmsg(2)`, so a single core can
//! offer and count well over a million small datagrams per second; the figure the suite reports
//! is the one the *receiver* counted, because a sender can always "send" faster than a path
//! delivers (the surplus is dropped in a queue on the way).
//!
//! Every run is bounded: durations are clamped to [`MAX_SECONDS`] and every blocking call has a
//! timeout, so a benchmark that loses its peer still ends by itself (docs/design.md §7).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

/// Hard cap on any load generator's running time.
pub const MAX_SECONDS: f64 = 30.0;
/// Largest batch handed to one `sendmmsg`/`recvmmsg` call (the kernel's UIO_MAXIOV is 1024).
pub const MAX_BATCH: usize = 1024;
/// Largest UDP payload over IPv4 (65535 - 20 - 8).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Socket buffer asked for on both ends: large enough to absorb scheduling gaps on a busy 2-core box.
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// How often a blocked receiver wakes up to look at its deadline.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn bounded(seconds: f64) -> io::Result<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("seconds must be a positive number, got {seconds}"),
        ));
    }
    Ok(Duration::from_secs_f64(seconds.min(MAX_SECONDS)))
}

/// What the sender was asked to do.
#[derive(Debug, Clone)]
pub struct BlastConfig {
    pub dst: SocketAddr,
    /// UDP payload bytes per datagram.
    pub size: usize,
    pub seconds: f64,
    /// Datagrams per `sendmmsg` call.
    pub batch: usize,
    /// Offered rate in datagrams per second; `None` sends as fast as the kernel takes them.
    pub rate_pps: Option<u64>,
}

/// What the sender managed to hand to the kernel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlastReport {
    pub packets: u64,
    pub bytes: u64,
    /// Failed `sendmmsg` calls (ENOBUFS, ECONNREFUSED from an earlier ICMP port unreachable, ...).
    pub errors: u64,
    pub calls: u64,
    pub seconds: f64,
}

/// What the receiver counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkReport {
    pub packets: u64,
    /// UDP payload bytes (the real datagram length, even when the receive buffer was smaller).
    pub bytes: u64,
    /// The whole listening time.
    pub seconds: f64,
    /// From the first to the last datagram: the window the receive rate is computed over.
    pub active_seconds: f64,
}

impl SinkReport {
    /// Datagrams per second over the active window (0 when fewer than two batches arrived).
    pub fn pps(&self) -> f64 {
        if self.active_seconds > 0.0 {
            self.packets as f64 / self.active_seconds
        } else {
            0.0
        }
    }
}

/// One `mmsghdr` per iovec, pointing at it and at nothing else: no name (the sender's socket is
/// connected, the sink does not look at sources), no control data, zero flags. The headers hold
/// raw pointers into `iovs`, which must stay in place while they are used.
fn headers_for(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is a plain C struct of integers and pointers; all-zero is a valid
            // value (null name, no control data, zero flags).
            let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
            msg.msg_hdr.msg_iov = iov as *mut libc::iovec;
            msg.msg_hdr.msg_iovlen = 1;
            msg
        })
        .collect()
}

fn unspecified_for(dst: &SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Send `size`-byte UDP datagrams to `dst` in `sendmmsg` batches for `seconds` (at most 30 s).
pub fn udp_blast(cfg: &BlastConfig) -> io::Result<BlastReport> {
    let duration = bounded(cfg.seconds)?;
    if cfg.batch == 0 || cfg.batch > MAX_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("batch must be 1..={MAX_BATCH}, got {}", cfg.batch),
        ));
    }
    if cfg.size > MAX_UDP_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "size must be at most {MAX_UDP_PAYLOAD} bytes, got {}",
                cfg.size
            ),
        ));
    }
    if cfg.rate_pps == Some(0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rate_pps must be positive",
        ));
    }
    let sock = UdpSocket::bind(unspecified_for(&cfg.dst))?;
    // A connected socket lets every message go without a msg_name, and the kernel caches the route.
    sock.connect(cfg.dst)?;
    sock.set_write_timeout(Some(POLL_INTERVAL))?;
    let fd = sock.as_raw_fd();
    sys::grow_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SOCKET_BUFFER);

    // One payload shared by every message of a batch: the kernel copies it per datagram.
    let payload: Vec<u8> = (0..cfg.size).map(|i| (i % 251) as u8).collect();
    let mut iovs: Vec<libc::iovec> = (0..cfg.batch)
        .map(|_| libc::iovec {
            // sendmmsg only reads through iov_base; the *mut is the C prototype's, not a write.
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        })
        .collect();
    let mut msgs = headers_for(&mut iovs);

    let mut report = BlastReport::default();
    let start = Instant::now();
    let deadline = start + duration;
    let interval = cfg
        .rate_pps
        .map(|pps| Duration::from_secs_f64(cfg.batch as f64 / pps as f64));
    let mut next_due = start;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(interval) = interval {
            if now < next_due {
                std::thread::sleep((next_due - now).min(deadline - now));
                continue;
            }
            next_due += interval;
        }
        // SAFETY: `msgs` holds `cfg.batch` initialised headers whose iovecs point into `iovs`,
        // which point into `payload`; all three outlive the call and are not moved while it runs
        // (no reallocation happens after setup). The kernel only reads them and writes `msg_len`.
        let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), cfg.batch as libc::c_uint, 0) };
        report.calls += 1;
        if sent < 0 {
            // ENOBUFS (a full qdisc), EAGAIN (the write timeout) and ECONNREFUSED (an ICMP port
            // unreachable from before the sink was up) are all transient for a load generator.
            report.errors += 1;
            continue;
        }
        report.packets += sent as u64;
        report.bytes += sent as u64 * cfg.size as u64;
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Count the UDP datagrams arriving on `bind` for `seconds` (at most 30 s), `recvmmsg` in batches.
///
/// With `idle`, the sink also stops once datagrams have arrived and then none came for that long
/// (the sender is done), so a driver need not wait out a generous `seconds`.
pub fn udp_sink(bind: SocketAddr, seconds: f64, idle: Option<Duration>) -> io::Result<SinkReport> {
    udp_sink_with(bind, seconds, idle, |_| {})
}

/// `udp_sink`, calling `on_bound` with the bound address once the socket exists (port 0 picks one).
pub fn udp_sink_with(
    bind: SocketAddr,
    seconds: f64,
    idle: Option<Duration>,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<SinkReport> {
    const BATCH: usize = 64;
    // Small buffers are enough: MSG_TRUNC makes the kernel report each datagram's real length.
    const SLOT: usize = 2048;
    let duration = bounded(seconds)?;
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(POLL_INTERVAL))?;
    let fd = sock.as_raw_fd();
    sys::grow_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, SOCKET_BUFFER);
    on_bound(sock.local_addr()?);

    let mut bufs = vec![0u8; BATCH * SLOT];
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_mut(SLOT)
        .map(|chunk| libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: SLOT,
        })
        .collect();
    let mut msgs = headers_for(&mut iovs);

    let mut report = SinkReport::default();
    let start = Instant::now();
    let deadline = start + duration;
    let mut first: Option<Instant> = None;
    let mut last = start;
    while Instant::now() < deadline {
        // MSG_WAITFORONE: block (up to SO_RCVTIMEO) for the first datagram, then take whatever
        // else is queued without waiting. The recvmmsg timeout argument is not used: the kernel
        // only checks it after a datagram arrives (recvmmsg(2), BUGS).
        // SAFETY: `msgs` has BATCH headers, each pointing at its own iovec in `iovs` and its own
        // SLOT-byte region of `bufs`; none of them is moved or freed while the call runs and the
        // kernel writes at most iov_len bytes per message.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if got <= 0 {
            // EAGAIN after POLL_INTERVAL, or EINTR: look at the deadlines again
            if let (Some(idle), Some(_)) = (idle, first) {
                if last.elapsed() >= idle {
                    break;
                }
            }
            continue;
        }
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        report.packets += got as u64;
        report.bytes += msgs[..got as usize]
            .iter()
            .map(|m| u64::from(m.msg_len))
            .sum::<u64>();
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.active_seconds = first.map_or(0.0, |f| (last - f).as_secs_f64());
    Ok(report)
}

/// What the connect-rate client did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectReport {
    /// Connections that completed the three-way handshake.
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
}

/// Open and immediately reset TCP connections to `dst` from `threads` threads for `seconds`.
///
/// This measures new-connection setup (the NAT's allocation path, conntrack's for nftables).
/// Each connection is closed with SO_LINGER 0, i.e. a RST, so the client leaves no TIME_WAIT
/// entry behind and the ephemeral port range does not run dry within the run.
pub fn tcp_connect_rate(
    dst: SocketAddr,
    seconds: f64,
    threads: usize,
) -> io::Result<ConnectReport> {
    let duration = bounded(seconds)?;
    if threads == 0 || threads > 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "threads must be 1..=64",
        ));
    }
    let connections = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (connections, errors) = (connections.clone(), errors.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                        Ok(stream) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            let _ = set_linger_zero(&stream);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            // Do not spin on a refused port: it would burn the CPU being measured.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(ConnectReport {
        connections: connections.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    sys::setsockopt(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        linger,
    )
}

/// Accept and drop TCP connections on `bind` for `seconds`; returns how many were accepted.
pub fn tcp_accept_sink(bind: SocketAddr, seconds: f64) -> io::Result<u64> {
    tcp_accept_sink_with(bind, seconds, &AtomicBool::new(false), |_| {})
}

/// `tcp_accept_sink` with a stop flag and a callback receiving the bound address.
pub fn tcp_accept_sink_with(
    bind: SocketAddr,
    seconds: f64,
    stop: &AtomicBool,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<u64> {
    let duration = bounded(seconds)?;
    let listener = TcpListener::bind(bind)?;
    // A blocking accept that wakes up every POLL_INTERVAL to look at the deadline: SO_RCVTIMEO
    // applies to accept(2) on Linux (socket(7)), and std has no accept timeout of its own. A
    // sleeping poll loop would let the accept queue overflow under load, and the SYNs the kernel
    // then drops would show up as 1-second stalls in the connect rate being measured.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL_INTERVAL.as_micros() as libc::suseconds_t,
    };
    sys::setsockopt(
        listener.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        tv,
    )?;
    // std listens with a backlog of 128; a connect-rate client on a busy machine outruns that between
    // two scheduling slots of this thread, and SYNs arriving at a full accept queue are dropped
    // (retried after 1 s). Calling listen(2) again on a listening socket only resizes its queue; the
    // kernel caps the value at net.core.somaxconn.
    // SAFETY: plain syscall on a socket this function owns; no memory is passed.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(io::Error::last_os_error());
    }
    on_bound(listener.local_addr()?);
    let deadline = Instant::now() + duration;
    let mut accepted = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted += 1;
                drop(stream);
            }
            // EAGAIN: the timeout passed with nothing queued; EINTR: a signal. Look at the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)), // EMFILE, ECONNABORTED: keep going
        }
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    /// Runs a sink on loopback for `sink_seconds` (with `idle`), blasts `cfg` at it once it is
    /// bound, and returns both reports.
    fn blast_into_sink(
        sink_seconds: f64,
        idle: Option<Duration>,
        size: usize,
        seconds: f64,
        batch: usize,
        rate_pps: Option<u64>,
    ) -> (BlastReport, SinkReport) {
        let (tx, rx) = mpsc::channel();
        let sink = std::thread::spawn(move || {
            udp_sink_with(loopback(), sink_seconds, idle, |a| tx.send(a).unwrap())
        });
        let sent = udp_blast(&BlastConfig {
            dst: rx.recv().unwrap(),
            size,
            seconds,
            batch,
            rate_pps,
        })
        .unwrap();
        (sent, sink.join().unwrap().unwrap())
    }

    #[test]
    fn blast_reaches_sink_over_loopback() {
        let (sent, got) = blast_into_sink(1.5, None, 64, 0.5, 64, None);
        assert!(sent.packets > 0 && sent.calls > 0);
        assert_eq!(sent.bytes, sent.packets * 64);
        assert!(got.packets > 0, "sink counted nothing");
        assert!(got.packets <= sent.packets);
        assert_eq!(
            got.bytes,
            got.packets * 64,
            "MSG_TRUNC lengths must be the datagram size"
        );
        assert!(got.active_seconds <= got.seconds);
    }

    #[test]
    fn sink_reports_real_length_of_datagrams_larger_than_its_slots() {
        let (sent, got) = blast_into_sink(1.0, None, 9000, 0.2, 4, Some(200));
        assert!(got.packets > 0 && got.packets <= sent.packets);
        assert_eq!(got.bytes, got.packets * 9000);
    }

    #[test]
    fn rate_limit_bounds_the_offered_load() {
        let (sent, _) = blast_into_sink(1.5, None, 32, 1.0, 10, Some(1000));
        // 1000 pps for 1 s in batches of 10: about 1000, never wildly more.
        assert!(
            (500..=1100).contains(&sent.packets),
            "sent {}",
            sent.packets
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let base = BlastConfig {
            dst,
            size: 64,
            seconds: 0.1,
            batch: 64,
            rate_pps: None,
        };
        for bad in [
            BlastConfig {
                batch: 0,
                ..base.clone()
            },
            BlastConfig {
                batch: MAX_BATCH + 1,
                ..base.clone()
            },
            BlastConfig {
                size: MAX_UDP_PAYLOAD + 1,
                ..base.clone()
            },
            BlastConfig {
                seconds: 0.0,
                ..base.clone()
            },
            BlastConfig {
                seconds: f64::NAN,
                ..base.clone()
            },
            BlastConfig {
                rate_pps: Some(0),
                ..base.clone()
            },
        ] {
            assert_eq!(
                udp_blast(&bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
        assert!(udp_sink(loopback(), -1.0, None).is_err());
        assert!(tcp_connect_rate(dst, 1.0, 0).is_err());
    }

    #[test]
    fn idle_sink_stops_after_the_sender() {
        let t0 = Instant::now();
        let (_, got) = blast_into_sink(
            10.0,
            Some(Duration::from_millis(300)),
            64,
            0.3,
            8,
            Some(1000),
        );
        assert!(got.packets > 0);
        // 0.3 s of sending, then ~0.3-0.4 s of silence: far less than the 10 s asked for
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(got.seconds < 3.0);
    }

    #[test]
    fn durations_are_capped() {
        assert_eq!(bounded(1e9).unwrap(), Duration::from_secs_f64(MAX_SECONDS));
    }

    #[test]
    fn connect_rate_against_accept_sink() {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let server = std::thread::spawn(move || {
            tcp_accept_sink_with(loopback(), 5.0, &stop2, |a| tx.send(a).unwrap())
        });
        let addr = rx.recv().unwrap();
        let report = tcp_connect_rate(addr, 0.3, 2).unwrap();
        stop.store(true, Ordering::Relaxed);
        let accepted = server.join().unwrap().unwrap();
        assert!(report.connections > 0);
        // The listener may not have accepted the last few queued connections before stopping.
        assert!(accepted <= report.connections);
    }
}
