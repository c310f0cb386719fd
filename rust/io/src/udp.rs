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

use crate::sys;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Linux `UDP_MAX_SEGMENTS` (64 before 6.9's raise to 128): more segments per send is `EINVAL`.
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one GSO send: IPv4 total length 65535 - 20 (IP) - 8 (UDP).
pub const GSO_MAX_BYTES: usize = 65535 - 20 - 8;
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
    local: SocketAddrV4,
    gso: AtomicBool,
    gro: bool,
    /// Datagrams the kernel refused (after fallbacks), by this socket.
    pub tx_errors: AtomicU64,
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data for which all-zeroes is a valid value.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
    s
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(s.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(s.sin_port),
    )
}

fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
    sys::owned(unsafe { libc::socket(libc::AF_INET, ty, 0) })
}

fn bind(fd: RawFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr_in and its exact size is passed.
    sys::cvt(unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn local_addr(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: all-zeroes is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa`/`len` are valid for writes; the kernel writes at most `len` bytes.
    sys::cvt(unsafe {
        libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len)
    })?;
    Ok(from_sockaddr(&sa))
}

impl UdpSocket {
    /// A receive socket for a tunnel port (non-blocking, GRO and TOS reporting on).
    pub fn bind_rx(addr: SocketAddrV4, reuseport: bool) -> io::Result<UdpSocket> {
        let fd = new_socket(true)?;
        let raw = fd.as_raw_fd();
        if reuseport {
            sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1 as libc::c_int)?;
        }
        bind(raw, addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        let gro = sys::setsockopt(raw, SOL_UDP, UDP_GRO, 1 as libc::c_int).is_ok();
        sys::setsockopt(raw, libc::IPPROTO_IP, libc::IP_RECVTOS, 1 as libc::c_int)?;
        // Bigger socket buffers: the defaults (~208 KiB) hold only three 64 KiB GSO/GRO messages.
        sys::grow_buffer(raw, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        let local = local_addr(raw)?;
        Ok(UdpSocket {
            fd,
            local,
            gso: AtomicBool::new(false),
            gro,
            tx_errors: AtomicU64::new(0),
        })
    }

    /// A send socket bound to `addr` (port 0 lets the kernel choose). Blocking, so a full socket
    /// buffer applies back-pressure to the worker instead of dropping, with a send timeout so that a
    /// wedged path can never hang shutdown.
    pub fn bind_tx(addr: SocketAddrV4) -> io::Result<UdpSocket> {
        let fd = new_socket(false)?;
        let raw = fd.as_raw_fd();
        bind(raw, addr)?;
        sys::setsockopt(
            raw,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
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
            gro: false,
            tx_errors: AtomicU64::new(0),
        })
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
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
        let mut sent = 0;
        let mut i = 0;
        while i < msgs.len() {
            let chunk = &msgs[i..msgs.len().min(i + scratch.cap)];
            scratch.fill(chunk);
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
    pub dst: SocketAddrV4,
    /// Outer TOS byte (DSCP | ECN); 0 leaves the socket default.
    pub tos: u8,
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
    pub src: SocketAddrV4,
    /// `UDP_GRO` segment size: the message is `len / segment` datagrams of this size plus a shorter
    /// last one. 0 = a single datagram.
    pub segment: usize,
    /// Outer TOS byte (`IP_RECVTOS`).
    pub tos: u8,
    /// Larger than the buffer: the tail was cut off (cannot happen with 64 KiB buffers).
    pub truncated: bool,
}

/// Buffers and headers for `recvmmsg`, reused across calls (one per worker).
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    slots: sys::MsgSlots<libc::sockaddr_in>,
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
    slots: sys::MsgSlots<libc::sockaddr_in>,
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

    fn fill(&mut self, msgs: &[TxMsg<'_>]) {
        for (i, m) in msgs.iter().enumerate() {
            self.slots.names[i] = sockaddr(m.dst);
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
        put(
            libc::IPPROTO_IP,
            libc::IP_TOS,
            &libc::c_int::from(m.tos).to_ne_bytes(),
        );
    }
    if m.segment > 0 && m.data.len() > usize::from(m.segment) {
        put(SOL_UDP, UDP_SEGMENT, &m.segment.to_ne_bytes());
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    // Loopback in the test's own network namespace: no privileges needed, nothing leaves the host.
    fn lo() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)
    }

    #[test]
    fn gso_send_gro_receive_roundtrip() {
        let rx = UdpSocket::bind_rx(lo(), false).unwrap();
        let tx = UdpSocket::bind_tx(lo()).unwrap();
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
                segment: 1000,
            },
            TxMsg {
                data: &single,
                dst: rx.local_addr(),
                tos: 0,
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
                assert_eq!(*m.src.ip(), Ipv4Addr::LOCALHOST);
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
