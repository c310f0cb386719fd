//! Handover: a running daemon passes the fds its engine reads from (TUN queues, tunnel receive
//! sockets, the masquerade reply sockets) to a successor over a unix socket (SCM_RIGHTS, done by
//! the control plane), and the successor's engine adopts them instead of opening new ones
//! (docs/handover.md). Packets that arrive meanwhile wait in the TUN queue and the socket buffers
//! (the same open file descriptions, so nothing is detached or closed) instead of being dropped.
//!
//! The fds come from another process and are untrusted: every one is checked here (its file type
//! with `fstat`, a socket's `SO_DOMAIN` / `SO_TYPE` / `SO_PROTOCOL` and bound address, a TUN
//! queue's device name and flags with `TUNGETIFF`) against what this engine's config would have
//! opened. A mismatch refuses the whole handover; the sender then resumes its own workers.
//!
//! The fd keeper (python/podrouter/keeper.py) holds copies of the same fds while no daemon runs;
//! a successor adopts them the same way (`Engine::adopt`), taken while the workers ran
//! (`Engine::take_keeper_fds`).

use crate::sys;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{OwnedFd, RawFd};

/// Largest number of fds one handover carries (`SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 253;

/// What the old engine passes, by role; the successor fills one from what it received.
#[derive(Debug, Default)]
pub struct AdoptFds {
    /// One per worker, in queue order.
    pub tun: Vec<OwnedFd>,
    /// Per worker, the tunnel receive sockets in the order `start` binds them (for each underlay
    /// address, for each enabled tunnel port: VXLAN then Geneve).
    pub rx: Vec<Vec<OwnedFd>>,
    /// The masquerade reply socket (worker 0), if masquerade was on.
    pub masq: Option<OwnedFd>,
    /// The IPv6 masquerade reply socket (worker 0), with `masquerade.address6`.
    pub masq6: Option<OwnedFd>,
}

/// Role of one fd in a handover manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdRole {
    Tun { queue: usize },
    Rx { worker: usize, index: usize },
    Masq,
    Masq6,
}

fn bad(what: &str, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"))
}

/// A close-on-exec duplicate of `fd` (the caller keeps and closes its own). `EBADF` for an fd
/// that is not open.
pub fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and touches no memory; the result is checked.
    sys::owned(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })
}

/// `S_IFMT` bits of the fd's file.
fn file_type(fd: RawFd) -> io::Result<libc::mode_t> {
    // SAFETY: all-zeroes is a valid `stat`; the kernel writes at most its size.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: `st` is valid for writes for the duration of the call.
    sys::cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// Checks that `fd` is a socket of `domain` / `ty` / `proto`.
pub(crate) fn check_socket(
    what: &str,
    fd: RawFd,
    domain: libc::c_int,
    ty: libc::c_int,
    proto: Option<libc::c_int>,
) -> io::Result<()> {
    if file_type(fd)? != libc::S_IFSOCK {
        return Err(bad(what, "not a socket"));
    }
    let d = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let t = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    if d != domain || t != ty {
        return Err(bad(
            what,
            format!("socket domain/type {d}/{t}, expected {domain}/{ty}"),
        ));
    }
    if let Some(p) = proto {
        let got = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
        if got != p {
            return Err(bad(what, format!("socket protocol {got}, expected {p}")));
        }
    }
    Ok(())
}

/// Checks that `fd` is an attached TUN queue; returns the device name and its `IFF_*` flags.
pub(crate) fn tun_info(fd: RawFd) -> io::Result<(String, i16)> {
    const TUNGETIFF: libc::c_ulong = sys::ior(b'T', 210, 4);
    if file_type(fd)? != libc::S_IFCHR {
        return Err(bad("TUN queue", "not a character device"));
    }
    let mut ifr = sys::IfReq::new("x")?;
    ifr.name = [0; libc::IFNAMSIZ];
    // A detached queue (or another character device) answers with an error.
    sys::ioctl_ifreq(fd, TUNGETIFF, &mut ifr).map_err(|e| bad("TUN queue", e))?;
    let f = i16::from_ne_bytes([ifr.data[0], ifr.data[1]]);
    Ok((ifr.name(), f))
}

/// Checks that `fd` is an AF_PACKET `SOCK_RAW` socket bound to `ifindex` for `ethertype` (a
/// masquerade reply socket).
pub(crate) fn check_packet_rx(
    what: &str,
    fd: RawFd,
    ifindex: u32,
    ethertype: u16,
) -> io::Result<()> {
    check_socket(what, fd, libc::AF_PACKET, libc::SOCK_RAW, None)?;
    let (idx, proto) = packet_binding(fd)?;
    if idx != ifindex || proto != ethertype {
        return Err(bad(
            what,
            format!(
                "bound to ifindex {idx} protocol {proto:#06x}, expected {ifindex} {ethertype:#06x}"
            ),
        ));
    }
    Ok(())
}

/// The interface index and protocol an AF_PACKET socket is bound to.
pub(crate) fn packet_binding(fd: RawFd) -> io::Result<(u32, u16)> {
    // SAFETY: all-zeroes is a valid sockaddr_ll.
    let mut sa: libc::sockaddr_ll = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sa`/`len` are valid for writes; the kernel writes at most `len` bytes.
    sys::cvt(unsafe {
        libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_ll).cast(), &mut len)
    })?;
    Ok((sa.sll_ifindex as u32, u16::from_be(sa.sll_protocol)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn non_sockets_and_non_tun_devices_are_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e =
            check_socket("x", f.as_raw_fd(), libc::AF_INET, libc::SOCK_DGRAM, None).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        // a character device that is not a TUN queue fails TUNGETIFF
        assert!(tun_info(f.as_raw_fd()).is_err());
        let dir = std::fs::File::open("/").unwrap();
        let e = tun_info(dir.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a character device"), "{e}");
        assert!(dup_fd(-1).is_err());
    }

    #[test]
    fn a_udp_socket_is_not_a_masquerade_reply_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_packet_rx("masquerade reply socket", s.as_raw_fd(), 1, 0x0800).unwrap_err();
        assert!(e.to_string().contains("domain/type"), "{e}");
    }
}
