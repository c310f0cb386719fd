//! Thin, checked wrappers over the libc calls the engine shares: errno conversion, socket options,
//! epoll and eventfd. Every `unsafe` block states why the call is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `-1` -> the thread's errno as an `io::Error`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`cvt`] for calls returning `ssize_t`.
pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Writes `head` then `body` to `fd` with one `writev` (a header in front of a packet without a
/// copy to make room for it): the TUN's vnet header, the TAP's vnet and outer headers.
pub(crate) fn writev2(fd: RawFd, head: &[u8], body: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs describe live, readable slices borrowed for the call; writev only reads.
    cvt_size(unsafe { libc::writev(fd, iov.as_ptr(), 2) })
}

/// A read's return value checked against the buffer it filled: more than `cap` bytes (which a
/// correct kernel never reports, but a slice `&buf[..n]` must not trust) is an `InvalidData` error
/// that the caller counts and drops, instead of a panic that ends the worker.
pub(crate) fn cvt_read(ret: libc::ssize_t, cap: usize) -> io::Result<usize> {
    let n = cvt_size(ret)?;
    if n > cap {
        return Err(overlong_read(n, cap));
    }
    Ok(n)
}

/// The error [`cvt_read`] returns for a read longer than its buffer.
pub(crate) fn overlong_read(n: usize, cap: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("read reported {n} bytes into a buffer of {cap}"),
    )
}

/// True for the error of a read longer than its buffer (count it, drop the packet, go on).
pub(crate) fn is_overlong_read(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

/// A `recvmmsg` message length checked against its buffer: the length to use and whether the
/// message is to be treated as truncated.
pub(crate) fn clamp_msg_len(msg_len: usize, cap: usize) -> (usize, bool) {
    (msg_len.min(cap), msg_len > cap)
}

/// Eight bytes from the kernel's random source (`getrandom(2)`, blocking only until the pool is
/// initialised at boot): the NAT hash seed, so node ports are not predictable across processes.
pub(crate) fn random_u64() -> io::Result<u64> {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: `b[got..]` is valid for writes of `b.len() - got` bytes for the call.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        match cvt_read(r, b.len() - got) {
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(u64::from_ne_bytes(b))
}

/// Wraps a freshly returned descriptor so it is closed exactly once.
pub(crate) fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn setsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: T,
) -> io::Result<()> {
    // SAFETY: `val` lives on our stack for the duration of the call and its exact size is passed, so
    // the kernel reads only initialised memory that we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&val as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(r).map(drop)
}

/// Ask for a socket buffer of `bytes`: `force` (`SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, root only)
/// ignores net.core.{r,w}mem_max, which inside a fresh network namespace is the small default;
/// without the privilege fall back to `plain`, which the kernel caps. Best effort: the default
/// buffer still works, it just drops more under bursts.
pub(crate) fn grow_buffer(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: libc::c_int) {
    if setsockopt(fd, libc::SOL_SOCKET, force, bytes).is_err() {
        let _ = setsockopt(fd, libc::SOL_SOCKET, plain, bytes);
    }
}

pub(crate) fn getsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes of the sizes given; the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r).map(|_| val)
}

/// An `eventfd` used to wake workers blocked in `epoll_wait` (shutdown).
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall with constant flags; the result is checked by `owned`.
        owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }).map(EventFd)
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, the size eventfd requires. A failure (counter
        // saturated) still leaves the fd readable, which is all a wake-up needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Level-triggered epoll over a handful of descriptors identified by a `u64` token.
pub(crate) struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub(crate) fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall with a constant flag; the result is checked by `owned`.
        let fd = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
        })
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    /// Waits up to `timeout_ms` and returns the tokens of the ready descriptors.
    pub(crate) fn wait(&mut self, timeout_ms: i32, ready: &mut Vec<u64>) -> io::Result<()> {
        ready.clear();
        // SAFETY: `events` is an initialised buffer of `len` epoll_events that the kernel may fill.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        match cvt(n) {
            Ok(n) => {
                ready.extend(self.events[..n as usize].iter().map(|e| e.u64));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// `ifreq` as the TUN and interface ioctls use it: a name and a 24-byte union, of which we use the
/// leading `short` (flags) or `int` (mtu, ifindex).
#[repr(C)]
pub(crate) struct IfReq {
    pub(crate) name: [u8; libc::IFNAMSIZ],
    pub(crate) data: [u8; 24],
}

impl IfReq {
    pub(crate) fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) || b.contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    pub(crate) fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub(crate) fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    pub(crate) fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    pub(crate) fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// `ioctl(fd, req, &mut ifreq)`.
pub(crate) fn ioctl_ifreq(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a live, correctly sized (40-byte) `struct ifreq` the kernel may read and write.
    cvt(unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) }).map(drop)
}

/// `ioctl(fd, req, value)` for requests that take an integer argument by value.
pub(crate) fn ioctl_val(fd: RawFd, req: libc::c_ulong, val: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value, so no memory is shared with the kernel.
    cvt(unsafe { libc::ioctl(fd, req as _, val) }).map(drop)
}

/// `ioctl(fd, req, &mut int)`.
pub(crate) fn ioctl_int_ptr(
    fd: RawFd,
    req: libc::c_ulong,
    val: &mut libc::c_int,
) -> io::Result<()> {
    // SAFETY: `val` is a live int the kernel reads (`_IOW`) or writes (`_IOR`).
    cvt(unsafe { libc::ioctl(fd, req as _, val as *mut libc::c_int) }).map(drop)
}

/// `_IOW(type, nr, size)` from `<asm-generic/ioctl.h>`.
pub(crate) const fn iow(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((1 << 30) | (size << 16) | ((ty as usize) << 8) | nr as usize) as libc::c_ulong
}

/// `_IOR(type, nr, size)` from `<asm-generic/ioctl.h>`.
pub(crate) const fn ior(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((2 << 30) | (size << 16) | ((ty as usize) << 8) | nr as usize) as libc::c_ulong
}

/// Interface index of `name` in the calling thread's network namespace.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// A datagram socket for interface ioctls (SIOCSIFMTU).
pub(crate) fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
    owned(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
}

/// A socket address type that can be a `msg_name` in an [`MsgSlots`] batch.
///
/// # Safety
///
/// All-zero bytes must be a valid value of the type (a plain C struct of integers).
pub(crate) unsafe trait SockAddr: Copy {}

// SAFETY: sockaddr_in is a C struct of integers; all-zeroes is AF_UNSPEC 0.0.0.0:0.
unsafe impl SockAddr for libc::sockaddr_in {}
// SAFETY: sockaddr_in6 is a C struct of integers and a byte array; all-zeroes is valid.
unsafe impl SockAddr for libc::sockaddr_in6 {}
// SAFETY: sockaddr_ll is a C struct of integers and a byte array; all-zeroes is valid.
unsafe impl SockAddr for libc::sockaddr_ll {}

/// The C structs of a `sendmmsg` / `recvmmsg` batch, allocated once and reused: per message a
/// name, one iovec, and the header that points at both. [`MsgSlots::link`] sets the header's
/// pointers again before every call, so they never refer to a buffer a `Vec` has since moved.
pub(crate) struct MsgSlots<N: SockAddr> {
    pub(crate) names: Vec<N>,
    pub(crate) iovs: Vec<libc::iovec>,
    pub(crate) hdrs: Vec<libc::mmsghdr>,
}

impl<N: SockAddr> MsgSlots<N> {
    pub(crate) fn new(n: usize) -> Self {
        // SAFETY: all-zeroes is a valid `N` (the `SockAddr` contract), and a valid iovec and
        // mmsghdr (plain C structs: null pointers, zero lengths); `link` sets every pointer
        // before use.
        let (name, iov, hdr) = unsafe {
            (
                std::mem::zeroed::<N>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::mmsghdr>(),
            )
        };
        MsgSlots {
            names: vec![name; n],
            iovs: vec![iov; n],
            hdrs: vec![hdr; n],
        }
    }

    /// Points header `i` at name `i` and iovec `i` and clears its `msg_len`; the control buffer
    /// and `msg_flags` are the caller's to set.
    pub(crate) fn link(&mut self, i: usize) -> &mut libc::mmsghdr {
        let h = &mut self.hdrs[i];
        h.msg_hdr.msg_name = (&mut self.names[i] as *mut N).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<N>() as libc::socklen_t;
        h.msg_hdr.msg_iov = &mut self.iovs[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_len = 0;
        h
    }
}

#[cfg(test)]
mod read_clamp_tests {
    use super::*;

    #[test]
    fn reads_longer_than_the_buffer_are_errors_not_lengths() {
        assert_eq!(cvt_read(10, 10).unwrap(), 10);
        assert_eq!(cvt_read(0, 10).unwrap(), 0);
        let e = cvt_read(11, 10).unwrap_err();
        assert!(is_overlong_read(&e), "{e}");
        assert!(e.to_string().contains("11 bytes into a buffer of 10"));
        assert!(!is_overlong_read(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
        assert_eq!(clamp_msg_len(1500, 2048), (1500, false));
        assert_eq!(clamp_msg_len(70000, 65536), (65536, true));
    }

    #[test]
    fn random_seeds_differ() {
        let a = random_u64().unwrap();
        let b = random_u64().unwrap();
        assert_ne!(a, b);
    }
}
