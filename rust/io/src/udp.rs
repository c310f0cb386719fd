//! Tunnel UDP sockets: batched receive with UDP GRO and the outer TOS, batched send with UDP GSO and a
//! per-message TOS.
//!
//! Receive (`bind_rx`): one socket per worker on `underlay:port` (`SO_REUSEPORT` spreads peers'
//! flows over the workers), `UDP_GRO` so the kernel hands us up to 64 KiB of same-sized datagrams of
//! one flow at once (the `UDP_GRO` cmsg carries the datagram size), `IP_RECVTOS` for the outer
//! DSCP/ECN, `recvmmsg` for several such messages per syscall.
//!
//! Send (`bind_tx`): `IP_MTU_DISCOVER = IP_PMTUDISC_DO` so the outer packet carries DF and is never
//! fragmented (a too-large inner packet is a configuration error the TUN MTU prevents), `sendmmsg`
//! where a message may carry `UDP_SEGMENT` (GSO: the kernel cuts one buffer into equal datagrams
//! and each gets its own UDP/IP header — or the NIC does). When the kernel refuses GSO on this path
//! (`EIO`: the egress device has no checksum offload; `EINVAL` on old kernels) we turn GSO off for
//! that socket and resend the same bytes as individual datagrams, as quinn-udp does.
//!
//! The outer UDP source port is the bound port, so entropy for ECMP (RFC 7348 §5, RFC 8926 §3.3)
//! comes from a pool of send sockets bound to different ports, one picked per inner flow hash.
//!
//! Both families: a socket is IPv4 or IPv6 by the address it is bound to (an IPv6 socket is
//! `IPV6_V6ONLY`; a dual-stack underlay has one pool and one set of receive sockets per family).
//! On IPv6 the same options exist under other names: `IPV6_RECVTCLASS` / an `IPV6_TCLASS` cmsg
//! for the traffic class, `IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO` (no fragmentation by us), and
//! UDP_SEGMENT / UDP_GRO work unchanged. The kernel computes the UDP checksum, which IPv6 makes
//! mandatory. The outer flow label (RFC 6438) is the message's `flow_label`, given to the kernel
//! in `sin6_flowinfo` with `IPV6_FLOWINFO_SEND` on; a kernel that refuses a label it did not
//! lease (only while some socket on the host holds an exclusive flow label lease) makes us turn
//! explicit labels off for that socket and let the kernel's automatic label stand.

use crate::sys;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Linux `UDP_MAX_SEGMENTS` (64 before 6.9's raise to 128): more segments per send is `EINVAL`.
/// The core cuts its tunnel trains at this limit.
pub const GSO_MAX_SEGMENTS: usize = podrouter_core::egress::UDP_GSO_MAX_SEGMENTS;
/// Largest UDP payload of one GSO send: IPv4 total length 65535 - 20 (IP) - 8 (UDP).
pub const GSO_MAX_BYTES: usize = podrouter_core::egress::UDP_GSO_MAX_BYTES;
/// Receive buffer per message: a GRO'd message is at most 64 KiB.
pub const RX_BUF: usize = 65536;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Room for the cmsgs we send or expect (two `CMSG_SPACE(sizeof(int))` = 2 * 24 bytes on 64-bit).
const CTRL_LEN: usize = 64;

/// Control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL_LEN]);

#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    local: SocketAddr,
    gso: AtomicBool,
    /// IPv6 send socket with `IPV6_FLOWINFO_SEND`: messages carry their flow label.
    flowlabel: AtomicBool,
    gro: bool,
    /// Datagrams the kernel refused (after fallbacks), by this socket.
    pub tx_errors: AtomicU64,
}

/// A socket address of either family in the space of the larger one (what `msg_name` points at):
/// a `sockaddr_in` lives in the first bytes of the `sockaddr_in6`, told apart by the family field
/// both start with.
fn sockaddr(a: SocketAddr) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data for which all-zeroes is a valid value.
    let mut s6: libc::sockaddr_in6 = unsafe { zeroed() };
    match a {
        SocketAddr::V6(a) => {
            s6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s6.sin6_port = a.port().to_be();
            s6.sin6_flowinfo = a.flowinfo().to_be();
            s6.sin6_addr.s6_addr = a.ip().octets();
            s6.sin6_scope_id = a.scope_id();
        }
        SocketAddr::V4(a) => {
            // SAFETY: as above for sockaddr_in.
            let mut s: libc::sockaddr_in = unsafe { zeroed() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            const _: () =
                assert!(size_of::<libc::sockaddr_in>() <= size_of::<libc::sockaddr_in6>());
            // SAFETY: a sockaddr_in (16 bytes, alignment 4) fits at the start of the sockaddr_in6
            // (28 bytes, alignment 4); both are plain C structs.
            unsafe {
                (&mut s6 as *mut libc::sockaddr_in6)
                    .cast::<libc::sockaddr_in>()
                    .write(s)
            };
        }
    }
    s6
}

/// The length of the `sockaddr_*` [`sockaddr`] wrote for `a`.
fn sockaddr_len(a: &SocketAddr) -> libc::socklen_t {
    (match a {
        SocketAddr::V4(_) => size_of::<libc::sockaddr_in>(),
        SocketAddr::V6(_) => size_of::<libc::sockaddr_in6>(),
    }) as libc::socklen_t
}

/// Reads back a [`sockaddr`] (or what the kernel wrote into one); an unknown family is
/// `0.0.0.0:0` (the worker then finds no peer for it).
fn from_sockaddr(s: &libc::sockaddr_in6) -> SocketAddr {
    match i32::from(s.sin6_family) {
        libc::AF_INET6 => SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(s.sin6_addr.s6_addr),
            u16::from_be(s.sin6_port),
            u32::from_be(s.sin6_flowinfo),
            s.sin6_scope_id,
        )),
        libc::AF_INET => {
            // SAFETY: the family says the first bytes are a sockaddr_in (see `sockaddr`).
            let s4 = unsafe {
                (s as *const libc::sockaddr_in6)
                    .cast::<libc::sockaddr_in>()
                    .read()
            };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(s4.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(s4.sin_port),
            ))
        }
        _ => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    }
}

fn new_socket(v6: bool, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
    let fd = sys::owned(unsafe { libc::socket(family, ty, 0) })?;
    if v6 {
        sys::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            1 as libc::c_int,
        )?;
    }
    Ok(fd)
}

fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: `sa` holds a valid sockaddr of `addr`'s family and that family's size is passed.
    sys::cvt(unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            sockaddr_len(&addr),
        )
    })
    .map(drop)
}

fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: all-zeroes is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `sa`/`len` are valid for writes; the kernel writes at most `len` bytes.
    sys::cvt(unsafe {
        libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in6).cast(), &mut len)
    })?;
    Ok(from_sockaddr(&sa))
}

impl UdpSocket {
    /// A receive socket for a tunnel port (non-blocking, GRO and TOS reporting on).
    pub fn bind_rx(addr: SocketAddr, reuseport: bool) -> io::Result<UdpSocket> {
        let fd = new_socket(addr.is_ipv6(), true)?;
        let raw = fd.as_raw_fd();
        if reuseport {
            sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1 as libc::c_int)?;
        }
        bind(raw, addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        let local = local_addr(raw)?;
        UdpSocket::receiving(fd, local)
    }

    /// The receive options of a tunnel socket (GRO, TOS/traffic class reporting, a large receive
    /// buffer) set on a bound socket; idempotent, so an adopted socket gets them again.
    fn receiving(fd: OwnedFd, local: SocketAddr) -> io::Result<UdpSocket> {
        let raw = fd.as_raw_fd();
        let gro = sys::setsockopt(raw, SOL_UDP, UDP_GRO, 1 as libc::c_int).is_ok();
        if local.is_ipv6() {
            sys::setsockopt(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVTCLASS,
                1 as libc::c_int,
            )?;
        } else {
            sys::setsockopt(raw, libc::IPPROTO_IP, libc::IP_RECVTOS, 1 as libc::c_int)?;
        }
        // Bigger socket buffers: the defaults (~208 KiB) hold only three 64 KiB GSO/GRO messages.
        sys::grow_buffer(raw, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        Ok(UdpSocket {
            fd,
            local,
            gso: AtomicBool::new(false),
            flowlabel: AtomicBool::new(false),
            gro,
            tx_errors: AtomicU64::new(0),
        })
    }

    /// Adopts a receive socket a predecessor passed (`crate::handover`): it must be a UDP socket
    /// of `addr`'s family bound to exactly `addr`. The receive options `bind_rx` sets are set
    /// again (idempotent); datagrams already queued on it stay queued.
    pub fn adopt_rx(fd: OwnedFd, addr: SocketAddr) -> io::Result<UdpSocket> {
        let raw = fd.as_raw_fd();
        let what = format!("tunnel socket {addr}");
        let domain = if addr.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        crate::handover::check_socket(
            &what,
            raw,
            domain,
            libc::SOCK_DGRAM,
            Some(libc::IPPROTO_UDP),
        )?;
        let local = local_addr(raw)?;
        if local != addr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what}: the passed socket is bound to {local}"),
            ));
        }
        // SAFETY: F_SETFL with an int argument touches no memory.
        sys::cvt(unsafe { libc::fcntl(raw, libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK) })?;
        UdpSocket::receiving(fd, local)
    }

    /// A send socket bound to `addr` (port 0 lets the kernel choose). Blocking, so a full socket
    /// buffer applies back-pressure to the worker instead of dropping, with a send timeout so that a
    /// wedged path can never hang shutdown.
    pub fn bind_tx(addr: SocketAddr) -> io::Result<UdpSocket> {
        let v6 = addr.is_ipv6();
        let fd = new_socket(v6, false)?;
        let raw = fd.as_raw_fd();
        bind(raw, addr)?;
        let flowlabel = if v6 {
            sys::setsockopt(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            )?;
            sys::setsockopt(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_FLOWINFO_SEND,
                1 as libc::c_int,
            )
            .is_ok()
        } else {
            sys::setsockopt(
                raw,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            )?;
            false
        };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tv)?;
        sys::grow_buffer(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20);
        // Setting the socket-wide segment size to 0 (= off) succeeds exactly when the kernel knows
        // UDP_SEGMENT (4.18+); the per-message cmsg is what we use.
        let gso = sys::setsockopt(raw, SOL_UDP, UDP_SEGMENT, 0 as libc::c_int).is_ok();
        let local = local_addr(raw)?;
        Ok(UdpSocket {
            fd,
            local,
            gso: AtomicBool::new(gso),
            flowlabel: AtomicBool::new(flowlabel),
            gro: false,
            tx_errors: AtomicU64::new(0),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Outer IPv6 flow labels are set per message (see the module documentation).
    pub fn flowlabel_enabled(&self) -> bool {
        self.flowlabel.load(Relaxed)
    }

    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Relaxed)
    }

    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    /// `SO_RCVBUF` as the kernel reports it (doubled bookkeeping value).
    pub fn recv_buffer(&self) -> io::Result<usize> {
        sys::getsockopt_int(self.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)
            .map(|v| v as usize)
    }

    /// Receives up to `batch.capacity()` messages without blocking; returns how many (0 when
    /// nothing is queued).
    pub fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let n = batch.bufs.len();
        for i in 0..n {
            batch.slots.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.bufs[i].len(),
            };
            let h = batch.slots.link(i);
            h.msg_hdr.msg_control = batch.ctrl[i].0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CTRL_LEN as _;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: every header points at buffers owned by `batch` (iovecs, names, control) that stay
        // alive and unaliased for the call; the kernel writes at most the lengths given.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.slots.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = match sys::cvt(r) {
            Ok(k) => k as usize,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                0
            }
            Err(e) => return Err(e),
        };
        batch.meta.clear();
        // Neither the message count nor a message length is trusted beyond the buffers given:
        // an overlong one is clamped and marked truncated (the worker counts and drops it).
        for i in 0..got.min(n) {
            let h = &batch.slots.hdrs[i];
            let (len, overlong) = sys::clamp_msg_len(h.msg_len as usize, batch.bufs[i].len());
            let mut m = RxMeta {
                len,
                src: from_sockaddr(&batch.slots.names[i]),
                segment: 0,
                tos: 0,
                truncated: overlong || h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
            // SAFETY: the kernel filled `msg_control`/`msg_controllen` of this header; the CMSG_*
            // helpers only walk inside that length, and each data read is bounds-checked below.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    let data = libc::CMSG_DATA(c);
                    let dlen = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    match ((*c).cmsg_level, (*c).cmsg_type) {
                        (SOL_UDP, UDP_GRO) if dlen >= 4 => {
                            m.segment = data.cast::<libc::c_int>().read_unaligned().max(0) as usize;
                        }
                        (libc::IPPROTO_IP, libc::IP_TOS) if dlen >= 1 => m.tos = *data,
                        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if dlen >= 4 => {
                            m.tos = data.cast::<libc::c_int>().read_unaligned() as u8;
                        }
                        _ => {}
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            batch.meta.push(m);
        }
        Ok(got)
    }

    /// Sends `msgs`; returns the number of datagrams the kernel accepted. Failures are counted in
    /// `tx_errors` (and reported by the caller as drops); they never abort the batch.
    pub fn send(&self, scratch: &mut SendScratch, msgs: &[TxMsg<'_>]) -> usize {
        if !self.gso_enabled()
            && msgs
                .iter()
                .any(|m| m.segment > 0 && m.data.len() > usize::from(m.segment))
        {
            return self.send_split(scratch, msgs);
        }
        let labels = self.flowlabel_enabled();
        let mut sent = 0;
        let mut i = 0;
        while i < msgs.len() {
            let chunk = &msgs[i..msgs.len().min(i + scratch.cap)];
            scratch.fill(chunk, labels);
            // SAFETY: `fill` pointed every header at `chunk`'s data (live for this call) and at
            // `scratch`'s names, iovecs and control buffers; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    scratch.slots.hdrs.as_mut_ptr(),
                    chunk.len() as libc::c_uint,
                    0,
                )
            };
            match sys::cvt(r) {
                Ok(k) => {
                    let k = k as usize;
                    sent += chunk[..k].iter().map(TxMsg::datagrams).sum::<usize>();
                    i += k.max(1);
                    if k == 0 {
                        self.tx_errors
                            .fetch_add(chunk[0].datagrams() as u64, Relaxed);
                    }
                }
                Err(e) => {
                    let m = &chunk[0];
                    let gso_msg = m.segment > 0 && m.data.len() > usize::from(m.segment);
                    let refused = matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL));
                    if gso_msg && refused && self.gso.swap(false, Relaxed) {
                        return sent + self.send_split(scratch, &msgs[i..]);
                    }
                    // EINVAL for a label the kernel wants leased: labels off, same bytes again.
                    let labelled = labels && m.flow_label != 0 && m.dst.is_ipv6();
                    if labelled
                        && e.raw_os_error() == Some(libc::EINVAL)
                        && self.flowlabel.swap(false, Relaxed)
                    {
                        return sent + self.send(scratch, &msgs[i..]);
                    }
                    if e.kind() != io::ErrorKind::Interrupted {
                        self.tx_errors.fetch_add(m.datagrams() as u64, Relaxed);
                        i += 1;
                    }
                }
            }
        }
        sent
    }

    /// Sends GSO messages as individual datagrams (GSO off or refused).
    fn send_split(&self, scratch: &mut SendScratch, msgs: &[TxMsg<'_>]) -> usize {
        let mut plain: Vec<TxMsg<'_>> = Vec::with_capacity(msgs.len() * 4);
        for m in msgs {
            if m.segment == 0 {
                plain.push(*m);
            } else {
                plain.extend(m.data.chunks(usize::from(m.segment)).map(|d| TxMsg {
                    data: d,
                    segment: 0,
                    ..*m
                }));
            }
        }
        self.send(scratch, &plain)
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One outgoing message: one datagram, or with `segment > 0` a GSO train of `segment`-byte
/// datagrams (the last may be shorter).
#[derive(Debug, Clone, Copy)]
pub struct TxMsg<'a> {
    pub data: &'a [u8],
    /// Of the socket's family.
    pub dst: SocketAddr,
    /// Outer TOS / IPv6 traffic class byte (DSCP | ECN); 0 leaves the socket default.
    pub tos: u8,
    /// Outer IPv6 flow label (20 bits; 0: the kernel's choice). Ignored over IPv4.
    pub flow_label: u32,
    pub segment: u16,
}

impl TxMsg<'_> {
    pub fn datagrams(&self) -> usize {
        if self.segment == 0 {
            1
        } else {
            self.data.len().div_ceil(usize::from(self.segment)).max(1)
        }
    }
}

/// What `recv` learnt about message *i*.
#[derive(Debug, Clone, Copy)]
pub struct RxMeta {
    pub len: usize,
    pub src: SocketAddr,
    /// `UDP_GRO` segment size: the message is `len / segment` datagrams of this size plus a shorter
    /// last one. 0 = a single datagram.
    pub segment: usize,
    /// Outer TOS byte (`IP_RECVTOS`) or IPv6 traffic class (`IPV6_RECVTCLASS`).
    pub tos: u8,
    /// Larger than the buffer: the tail was cut off (cannot happen with 64 KiB buffers).
    pub truncated: bool,
}

/// Buffers and headers for `recvmmsg`, reused across calls (one per worker).
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    slots: sys::MsgSlots<libc::sockaddr_in6>,
    ctrl: Vec<Ctrl>,
    meta: Vec<RxMeta>,
}

impl RecvBatch {
    pub fn new(messages: usize) -> RecvBatch {
        let n = messages.max(1);
        RecvBatch {
            bufs: (0..n)
                .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
                .collect(),
            slots: sys::MsgSlots::new(n),
            ctrl: vec![Ctrl([0; CTRL_LEN]); n],
            meta: Vec::with_capacity(n),
        }
    }

    /// Metadata of the messages the last `recv` returned.
    pub fn meta(&self) -> &[RxMeta] {
        &self.meta
    }

    /// The buffer of message `i` (its first `meta()[i].len` bytes are the message).
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i]
    }
}

/// Headers for `sendmmsg`, reused across calls.
pub struct SendScratch {
    cap: usize,
    slots: sys::MsgSlots<libc::sockaddr_in6>,
    ctrl: Vec<Ctrl>,
}

impl SendScratch {
    pub fn new(messages: usize) -> SendScratch {
        let n = messages.max(1);
        SendScratch {
            cap: n,
            slots: sys::MsgSlots::new(n),
            ctrl: vec![Ctrl([0; CTRL_LEN]); n],
        }
    }

    fn fill(&mut self, msgs: &[TxMsg<'_>], labels: bool) {
        for (i, m) in msgs.iter().enumerate() {
            let dst = match m.dst {
                SocketAddr::V6(d) if labels => SocketAddr::V6(SocketAddrV6::new(
                    *d.ip(),
                    d.port(),
                    m.flow_label & 0x000f_ffff,
                    d.scope_id(),
                )),
                d => d,
            };
            self.slots.names[i] = sockaddr(dst);
            self.slots.iovs[i] = libc::iovec {
                iov_base: m.data.as_ptr() as *mut libc::c_void,
                iov_len: m.data.len(),
            };
            let clen = write_cmsgs(&mut self.ctrl[i], m);
            let h = self.slots.link(i);
            h.msg_hdr.msg_control = if clen == 0 {
                std::ptr::null_mut()
            } else {
                self.ctrl[i].0.as_mut_ptr().cast()
            };
            h.msg_hdr.msg_controllen = clen as _;
            h.msg_hdr.msg_flags = 0;
        }
    }
}

/// Writes the IP_TOS and UDP_SEGMENT cmsgs for `m` into `ctrl`; returns the control length.
fn write_cmsgs(ctrl: &mut Ctrl, m: &TxMsg<'_>) -> usize {
    let mut off = 0;
    let mut put = |level: libc::c_int, ty: libc::c_int, val: &[u8]| {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on a small constant length.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(val.len() as u32) as usize,
                libc::CMSG_LEN(val.len() as u32) as usize,
            )
        };
        // SAFETY: an all-zero cmsghdr is valid plain data.
        let mut hdr: libc::cmsghdr = unsafe { zeroed() };
        hdr.cmsg_len = len as _;
        hdr.cmsg_level = level;
        hdr.cmsg_type = ty;
        let hsz = size_of::<libc::cmsghdr>();
        let buf = &mut ctrl.0[off..off + space];
        buf.fill(0);
        // SAFETY: `buf` has room for the header (space >= hsz + val.len()); unaligned write is fine.
        unsafe {
            buf.as_mut_ptr()
                .cast::<libc::cmsghdr>()
                .write_unaligned(hdr)
        };
        buf[hsz..hsz + val.len()].copy_from_slice(val);
        off += space;
    };
    if m.tos != 0 {
        let (level, ty) = match m.dst {
            SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_TOS),
            SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
        };
        put(level, ty, &libc::c_int::from(m.tos).to_ne_bytes());
    }
    if m.segment > 0 && m.data.len() > usize::from(m.segment) {
        put(SOL_UDP, UDP_SEGMENT, &m.segment.to_ne_bytes());
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handover_lo() -> std::net::SocketAddr {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0)
    }

    #[test]
    fn adopted_rx_socket_keeps_what_was_queued() {
        let rx = UdpSocket::bind_rx(handover_lo(), false).unwrap();
        let addr = rx.local_addr();
        let tx = std::net::UdpSocket::bind(handover_lo()).unwrap();
        tx.send_to(b"queued before the handover", addr).unwrap();
        let copy = crate::handover::dup_fd(std::os::fd::AsRawFd::as_raw_fd(&rx)).unwrap();
        drop(rx); // the sender closes its own fd: the socket lives on in the copy
        let s = UdpSocket::adopt_rx(copy, addr).unwrap();
        let mut b = RecvBatch::new(4);
        let mut n = 0;
        for _ in 0..100 {
            n = s.recv(&mut b).unwrap();
            if n > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(n, 1);
    }

    #[test]
    fn rx_socket_bound_elsewhere_is_refused() {
        let rx = UdpSocket::bind_rx(handover_lo(), false).unwrap();
        let other = std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 1);
        let e = UdpSocket::adopt_rx(
            crate::handover::dup_fd(std::os::fd::AsRawFd::as_raw_fd(&rx)).unwrap(),
            other,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bound to"), "{e}");
        // a TCP socket on the right address is not a tunnel socket
        let tcp = std::net::TcpListener::bind(handover_lo()).unwrap();
        let a = tcp.local_addr().unwrap();
        let e = UdpSocket::adopt_rx(
            crate::handover::dup_fd(std::os::fd::AsRawFd::as_raw_fd(&tcp)).unwrap(),
            a,
        )
        .unwrap_err();
        assert!(e.to_string().contains("domain/type"), "{e}");
    }

    // Loopback in the test's own network namespace: no privileges needed, nothing leaves the host.
    fn lo() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }
    fn lo6() -> SocketAddr {
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
    }

    #[test]
    fn gso_send_gro_receive_roundtrip() {
        roundtrip(lo());
    }

    /// The same over IPv6: UDP_SEGMENT / UDP_GRO, the traffic class cmsg both ways, and an
    /// explicit flow label on the send (accepted by the kernel, or turned off without a loss).
    #[test]
    fn gso_send_gro_receive_roundtrip_v6() {
        roundtrip(lo6());
    }

    fn roundtrip(lo: SocketAddr) {
        let rx = UdpSocket::bind_rx(lo, false).unwrap();
        let tx = UdpSocket::bind_tx(lo).unwrap();
        assert_eq!(rx.local_addr().is_ipv6(), lo.is_ipv6());
        let mut scratch = SendScratch::new(8);
        // 10 datagrams of 1000 bytes and a short one, each tagged with its index.
        let mut data = vec![0u8; 10 * 1000 + 300];
        for (i, c) in data.chunks_mut(1000).enumerate() {
            c.fill(i as u8);
        }
        let single = [0xaau8; 50];
        let msgs = [
            TxMsg {
                data: &data,
                dst: rx.local_addr(),
                tos: 0x2e << 2 | 0b10,
                flow_label: 0x12345,
                segment: 1000,
            },
            TxMsg {
                data: &single,
                dst: rx.local_addr(),
                tos: 0,
                flow_label: 0,
                segment: 0,
            },
        ];
        assert_eq!(tx.send(&mut scratch, &msgs), 12);
        let mut batch = RecvBatch::new(16);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut tos_seen = Vec::new();
        for _ in 0..200 {
            let n = rx.recv(&mut batch).unwrap();
            for i in 0..n {
                let m = batch.meta()[i];
                assert!(!m.truncated);
                assert_eq!(m.src.ip(), lo.ip());
                assert_eq!(m.src.port(), tx.local_addr().port());
                tos_seen.push(m.tos);
                let seg = if m.segment == 0 { m.len } else { m.segment };
                let buf = &batch.buf_mut(i)[..m.len];
                got.extend(buf.chunks(seg).map(<[u8]>::to_vec));
            }
            if got.len() >= 12 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got.len(), 12);
        for (i, d) in got[..11].iter().enumerate() {
            assert_eq!(d.len(), if i == 10 { 300 } else { 1000 });
            assert!(d.iter().all(|&b| b == i as u8));
        }
        assert_eq!(got[11], single);
        assert!(
            tos_seen.contains(&(0x2e << 2 | 0b10)),
            "outer TOS is delivered: {tos_seen:?}"
        );
    }

    #[test]
    fn split_path_sends_the_same_datagrams() {
        let rx = UdpSocket::bind_rx(lo(), false).unwrap();
        let tx = UdpSocket::bind_tx(lo()).unwrap();
        tx.gso.store(false, Relaxed);
        let data = vec![7u8; 2500];
        let mut scratch = SendScratch::new(2);
        let n = tx.send(
            &mut scratch,
            &[TxMsg {
                data: &data,
                dst: rx.local_addr(),
                tos: 0,
                flow_label: 0,
                segment: 1000,
            }],
        );
        assert_eq!(n, 3);
        let mut batch = RecvBatch::new(8);
        let mut sizes = Vec::new();
        for _ in 0..100 {
            let k = rx.recv(&mut batch).unwrap();
            sizes.extend(batch.meta()[..k].iter().map(|m| m.len));
            if sizes.len() >= 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(sizes, [1000, 1000, 500]);
    }
}
