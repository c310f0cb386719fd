//! AF_PACKET send socket on the underlay interface, for the native (and masquerade) paths: the inner
//! packet leaves unchanged behind an Ethernet header we write (next hop MAC from the verdict, our
//! underlay MAC as source), bypassing the TUN route that brought it to us.
//!
//! `PACKET_VNET_HDR` puts a virtio-net header in front of each frame, so a 64 KiB TCP super-packet
//! read from the TUN goes out whole with its GSO metadata and the kernel (or the NIC) segments it:
//! one syscall and no userspace checksumming per 45 wire packets. `PACKET_QDISC_BYPASS` stays off so
//! that tc shaping on the underlay applies.
//!
//! The socket is opened with protocol 0, which registers no receive hook: it never sees traffic.

use crate::sys;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    vnet: bool,
    /// Frames the kernel refused.
    pub tx_errors: AtomicU64,
}

/// One frame to send: `data` starts with the vnet header when [`PacketSocket::vnet_hdr`] is on,
/// then the Ethernet header.
#[derive(Debug, Clone, Copy)]
pub struct TxFrame<'a> {
    pub data: &'a [u8],
    /// EtherType, for `sll_protocol` (the kernel sets `skb->protocol` from it).
    pub ethertype: u16,
}

impl PacketSocket {
    /// Opens the socket for `ifindex`; `vnet_hdr` asks for `PACKET_VNET_HDR` (check
    /// [`PacketSocket::vnet_hdr`] for whether the kernel agreed).
    pub fn open(ifindex: u32, vnet_hdr: bool) -> io::Result<PacketSocket> {
        // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
        let fd = sys::owned(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        let raw = fd.as_raw_fd();
        let vnet = vnet_hdr && sys::setsockopt(raw, SOL_PACKET, PACKET_VNET_HDR, 1 as libc::c_int).is_ok();
        // Explicitly off: egress shaping (tc on the underlay) must see these packets.
        let _ = sys::setsockopt(raw, SOL_PACKET, PACKET_QDISC_BYPASS, 0 as libc::c_int);
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tv)?;
        if sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20 as libc::c_int).is_err() {
            let _ = sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20 as libc::c_int);
        }
        Ok(PacketSocket { fd, ifindex, vnet, tx_errors: AtomicU64::new(0) })
    }

    pub fn vnet_hdr(&self) -> bool {
        self.vnet
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends `frames` with `sendmmsg`; returns how many the kernel accepted. A refused frame is
    /// counted in `tx_errors` and skipped; it never aborts the rest of the batch.
    pub fn send(&self, scratch: &mut FrameScratch, frames: &[TxFrame<'_>]) -> usize {
        let mut sent = 0;
        let mut i = 0;
        while i < frames.len() {
            let chunk = &frames[i..frames.len().min(i + scratch.cap)];
            for (j, f) in chunk.iter().enumerate() {
                // SAFETY: all-zeroes is a valid sockaddr_ll.
                let mut sa: libc::sockaddr_ll = unsafe { zeroed() };
                sa.sll_family = libc::AF_PACKET as u16;
                sa.sll_protocol = f.ethertype.to_be();
                sa.sll_ifindex = self.ifindex as i32;
                scratch.names[j] = sa;
                scratch.iovs[j] = libc::iovec { iov_base: f.data.as_ptr() as *mut libc::c_void, iov_len: f.data.len() };
                let h = &mut scratch.hdrs[j];
                h.msg_hdr.msg_name = (&mut scratch.names[j] as *mut libc::sockaddr_ll).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut scratch.iovs[j];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_len = 0;
            }
            // SAFETY: each header points at a live sockaddr_ll and iovec in `scratch` and at frame
            // data borrowed for this call; the kernel only reads them.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), scratch.hdrs.as_mut_ptr(), chunk.len() as libc::c_uint, 0) };
            match sys::cvt(r) {
                Ok(k) => {
                    sent += k as usize;
                    i += (k as usize).max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.tx_errors.fetch_add(1, Relaxed);
                    i += 1;
                }
            }
        }
        sent
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Headers for `sendmmsg` on a packet socket, reused across calls.
pub struct FrameScratch {
    cap: usize,
    names: Vec<libc::sockaddr_ll>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl FrameScratch {
    pub fn new(frames: usize) -> FrameScratch {
        let n = frames.max(1);
        // SAFETY: all-zeroes is a valid value for these plain C structs; `send` sets every pointer.
        let (name, iov, hdr) = unsafe { (zeroed::<libc::sockaddr_ll>(), zeroed::<libc::iovec>(), zeroed::<libc::mmsghdr>()) };
        FrameScratch { cap: n, names: vec![name; n], iovs: vec![iov; n], hdrs: vec![hdr; n] }
    }
}

/// Writes an Ethernet II header into `b[..14]`.
pub fn write_eth(b: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) -> bool {
    let Some(b) = b.get_mut(..ETH_HLEN) else {
        return false;
    };
    b[..6].copy_from_slice(&dst);
    b[6..12].copy_from_slice(&src);
    b[12..14].copy_from_slice(&ethertype.to_be_bytes());
    true
}
