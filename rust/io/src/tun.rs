//! The TUN device (`podr0`): egress packets from local pods arrive here, decapsulated ingress packets
//! are written here for the kernel to deliver.
//!
//! Opened with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` for more than one queue;
//! each queue is its own fd on the same device and the kernel spreads flows over queues by hash).
//! Every read and write carries a 10-byte `virtio_net_hdr` (`podrouter_core::offload::vnet`). `TUNSETOFFLOAD` tells
//! the kernel which offloads we accept on reads; with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` a TCP
//! sender's 64 KiB TSO skb reaches us as one read instead of ~45, which is the single biggest win
//! for egress throughput (the same trick as wireguard-go and tailscale).
//!
//! With [`TunOptions::persist`] the device is made persistent (`TUNSETPERSIST`, owner uid 0 by
//! `TUNSETOWNER`): it outlives the daemon, so the routes into it stay and a pod's packets wait in
//! (or are dropped by) the detached device instead of following the node's default route while the
//! daemon restarts. A successor attaches to the same device with the same flags; `IFF_MULTI_QUEUE`
//! must match what the device was created with (the kernel answers `EINVAL` otherwise). Without
//! `persist` the device exists while at least one queue fd is open.

use crate::sys::{self, IfReq};
use podrouter_core::offload::vnet::VNET_HDR_LEN;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

const TUNSETIFF: libc::c_ulong = sys::iow(b'T', 202, 4);
const TUNSETOFFLOAD: libc::c_ulong = sys::iow(b'T', 208, 4);
const TUNSETVNETHDRSZ: libc::c_ulong = sys::iow(b'T', 216, 4);
const TUNSETPERSIST: libc::c_ulong = sys::iow(b'T', 203, 4);
const TUNSETOWNER: libc::c_ulong = sys::iow(b'T', 204, 4);

// `TUNSETIFF` flags (`<linux/if_tun.h>`), for the TUN and the GSO TAP (`crate::tap`).
pub(crate) const IFF_TUN: i16 = 0x0001;
pub(crate) const IFF_TAP: i16 = 0x0002;
pub(crate) const IFF_NO_PI: i16 = 0x1000;
pub(crate) const IFF_VNET_HDR: i16 = 0x4000;
pub(crate) const IFF_MULTI_QUEUE: i16 = 0x0100;

/// `TUN_F_*` bits for `TUNSETOFFLOAD` (`<linux/if_tun.h>`; USO4/6 are from Linux 6.2).
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const USO4: u32 = 0x20;
    pub const USO6: u32 = 0x40;
}

/// Largest read: a 64 KiB GSO super-packet plus the vnet header.
pub const MAX_READ: usize = VNET_HDR_LEN + 65535;

#[derive(Debug, Clone)]
pub struct TunOptions {
    /// Interface name; may contain `%d` for the kernel to pick a number.
    pub name: String,
    /// Number of queues (fds); > 1 sets `IFF_MULTI_QUEUE`.
    pub queues: usize,
    /// Ask for checksum and segmentation offload on reads.
    pub offload: bool,
    /// Set the device MTU (`SIOCSIFMTU`) right after creating it.
    pub mtu: Option<u32>,
    /// Make the device persistent (`TUNSETPERSIST`, owner root): it survives the daemon.
    pub persist: bool,
}

/// One queue of the TUN device. Reads and writes are non-blocking.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
}

impl TunQueue {
    /// Reads one packet, vnet header included, into `buf` (size it [`MAX_READ`]).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        // Never trust the length more than the buffer: see `sys::cvt_read`.
        sys::cvt_read(ret, buf.len())
    }

    /// Writes one packet whose first [`VNET_HDR_LEN`] bytes are its vnet header.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        sys::cvt_size(unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }

    /// Writes `pkt` behind the vnet header `hdr` with one `writev` (no copy to make room in front).
    pub fn write_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], pkt: &[u8]) -> io::Result<usize> {
        sys::writev2(self.fd.as_raw_fd(), hdr, pkt)
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Opens one queue of the TUN/TAP device `name` (`%d` for the kernel to pick a number): a
/// non-blocking `/dev/net/tun` fd attached with `TUNSETIFF(flags)` and a vnet header of
/// `vnet_hdr_len` bytes (`TUNSETVNETHDRSZ`). Returns the fd and the device's final name, which
/// the next queue of the same device attaches to. Serves the TUN and the GSO TAP (`crate::tap`).
pub(crate) fn open_queue(
    name: &str,
    flags: i16,
    vnet_hdr_len: usize,
) -> io::Result<(OwnedFd, String)> {
    // SAFETY: the path is a NUL-terminated literal; the result is checked by `owned`.
    let fd = sys::owned(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    let mut ifr = IfReq::new(name)?;
    ifr.set_short(flags);
    sys::ioctl_ifreq(fd.as_raw_fd(), TUNSETIFF, &mut ifr)
        .map_err(|e| io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")))?;
    let mut sz = libc::c_int::try_from(vnet_hdr_len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "vnet header too long"))?;
    sys::ioctl_int_ptr(fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz)?;
    // The kernel writes back the final name (resolving `%d`).
    Ok((fd, ifr.name()))
}

#[derive(Debug)]
pub struct Tun {
    name: String,
    ifindex: u32,
    queues: Vec<Arc<TunQueue>>,
    offload: u32,
}

impl Tun {
    pub fn open(opts: &TunOptions) -> io::Result<Tun> {
        let nq = opts.queues.max(1);
        let mut flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
        if nq > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut name = opts.name.clone();
        let mut queues = Vec::with_capacity(nq);
        for _ in 0..nq {
            let (fd, resolved) = open_queue(&name, flags, VNET_HDR_LEN)?;
            if opts.persist && queues.is_empty() {
                // owner first: a persistent device nobody owns could be attached by any user
                // with CAP_NET_ADMIN anyway, but the owner makes the intent visible (`ip tuntap`)
                sys::ioctl_val(fd.as_raw_fd(), TUNSETOWNER, 0)?;
                sys::ioctl_val(fd.as_raw_fd(), TUNSETPERSIST, 1)?;
            }
            // later queues attach to the name the kernel resolved (`%d`)
            name = resolved;
            queues.push(Arc::new(TunQueue { fd }));
        }
        let offload = if opts.offload {
            probe_offload(queues[0].as_raw_fd())
        } else {
            0
        };
        if !opts.offload {
            sys::ioctl_val(queues[0].as_raw_fd(), TUNSETOFFLOAD, 0)?;
        }
        let ifindex = sys::if_index(&name)?;
        if let Some(mtu) = opts.mtu {
            set_mtu(&name, mtu)?;
        }
        Ok(Tun {
            name,
            ifindex,
            queues,
            offload,
        })
    }

    /// Adopts the queue fds a predecessor passed (`crate::handover`): each must be an attached
    /// queue of the device `opts.name` with this engine's flags (`IFF_TUN | IFF_NO_PI |
    /// IFF_VNET_HDR`, `IFF_MULTI_QUEUE` exactly when `opts.queues > 1`), one per queue. The
    /// offload is probed again (the same call `open` makes); the MTU and persistence are the
    /// device's already.
    pub fn adopt(opts: &TunOptions, fds: Vec<OwnedFd>) -> io::Result<Tun> {
        let nq = opts.queues.max(1);
        if fds.len() != nq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} TUN queues passed, this config has {nq} workers",
                    fds.len()
                ),
            ));
        }
        let mut want = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
        if nq > 1 {
            want |= IFF_MULTI_QUEUE;
        }
        let mask = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE | IFF_TAP;
        let mut queues = Vec::with_capacity(nq);
        for (i, fd) in fds.into_iter().enumerate() {
            let (name, flags) = crate::handover::tun_info(fd.as_raw_fd())?;
            if name != opts.name {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TUN queue {i} belongs to {name:?}, not {:?}", opts.name),
                ));
            }
            if flags & mask != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TUN queue {i} has flags {flags:#06x}, expected {want:#06x}"),
                ));
            }
            let mut sz = VNET_HDR_LEN as libc::c_int;
            sys::ioctl_int_ptr(fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz)?;
            // SAFETY: F_SETFL with an int argument touches no memory.
            sys::cvt(unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_SETFL,
                    libc::O_RDWR | libc::O_NONBLOCK,
                )
            })?;
            queues.push(Arc::new(TunQueue { fd }));
        }
        let offload = if opts.offload {
            probe_offload(queues[0].as_raw_fd())
        } else {
            sys::ioctl_val(queues[0].as_raw_fd(), TUNSETOFFLOAD, 0)?;
            0
        };
        Ok(Tun {
            ifindex: sys::if_index(&opts.name)?,
            name: opts.name.clone(),
            queues,
            offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn queues(&self) -> &[Arc<TunQueue>] {
        &self.queues
    }

    /// The `TUN_F_*` bits the kernel accepted.
    pub fn offload(&self) -> u32 {
        self.offload
    }
}

/// Asks for the richest offload set the kernel accepts: `TUNSETOFFLOAD` fails with `EINVAL` on any
/// bit it does not know (USO before Linux 6.2), so we step down until one is accepted.
fn probe_offload(fd: RawFd) -> u32 {
    use offload::*;
    let tso = CSUM | TSO4 | TSO6 | TSO_ECN;
    for want in [tso | USO4 | USO6, tso, CSUM | TSO4 | TSO6, CSUM, 0] {
        if sys::ioctl_val(fd, TUNSETOFFLOAD, libc::c_ulong::from(want)).is_ok() {
            return want;
        }
    }
    0
}

fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let s = sys::ctl_socket()?;
    let mut ifr = IfReq::new(name)?;
    ifr.set_int(i32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?);
    sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFMTU, &mut ifr)
}

/// Current MTU of an interface (used by tests and for the offload report).
pub fn get_mtu(name: &str) -> io::Result<u32> {
    let s = sys::ctl_socket()?;
    let mut ifr = IfReq::new(name)?;
    sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr)?;
    Ok(ifr.int() as u32)
}
