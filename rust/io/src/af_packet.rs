//! AF_PACKET send socket on the underlay interface, for the native (and masquerade) paths: the inner
//! packet leaves unchanged behind an Ethernet header we write (next hop MAC from the verdict, our
//! underlay MAC as source), bypassing the TUN route that brought it to us.
//!
//! `PACKET_VNET_HDR` puts a virtio-net header in front of each frame, so a 64 KiB TCP super-packet
//! read from the TUN goes out whole with its GSO metadata and the kernel (or the NIC) segments it:
//! one syscall and no userspace checksumming per 45 wire packets. `PACKET_QDISC_BYPASS` stays off so
//! that tc shaping on the underlay applies.
//!
//! The send socket is opened with protocol 0, which registers no receive hook: it never sees
//! traffic. [`PacketSocket::open_rx`] is the receive side for masquerade replies: a `SOCK_RAW`
//! socket (`PACKET_VNET_HDR` is refused on `SOCK_DGRAM`) on the underlay with a classic BPF filter ([`masquerade_filter`]) that lets through only
//! IPv4 packets to the node address on the masquerade port range (and ICMP that may belong to a
//! translated flow). AF_PACKET taps see a *copy*; the control plane drops the original before the
//! kernel's own stack answers it (an nftables rule in prerouting), as docs/design.md §3 suggests.

use crate::sys;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

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
        let fd = sys::owned(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0)
        })?;
        let raw = fd.as_raw_fd();
        let vnet =
            vnet_hdr && sys::setsockopt(raw, SOL_PACKET, PACKET_VNET_HDR, 1 as libc::c_int).is_ok();
        // Explicitly off: egress shaping (tc on the underlay) must see these packets.
        let _ = sys::setsockopt(raw, SOL_PACKET, PACKET_QDISC_BYPASS, 0 as libc::c_int);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tv)?;
        sys::grow_buffer(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20);
        Ok(PacketSocket {
            fd,
            ifindex,
            vnet,
            tx_errors: AtomicU64::new(0),
        })
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
                scratch.slots.names[j] = link_addr(self.ifindex, f.ethertype);
                scratch.slots.iovs[j] = libc::iovec {
                    iov_base: f.data.as_ptr() as *mut libc::c_void,
                    iov_len: f.data.len(),
                };
                scratch.slots.link(j);
            }
            // SAFETY: each header points at a live sockaddr_ll and iovec in `scratch` and at frame
            // data borrowed for this call; the kernel only reads them.
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

impl PacketSocket {
    /// A non-blocking receive socket for `ethertype` ([`ETHERTYPE_IPV4`] or [`ETHERTYPE_IPV6`])
    /// on `ifindex` that only sees what `filter` accepts.
    /// Reads return the Ethernet header and the packet ([`ETH_HLEN`] + IP).
    /// The filter is attached before the socket is bound, so no unfiltered packet is ever queued.
    /// With `vnet_hdr`, each packet read starts with a vnet header (GRO'd packets keep their GSO
    /// metadata and `DATA_VALID` / `NEEDS_CSUM`).
    pub fn open_rx(
        ifindex: u32,
        filter: &[libc::sock_filter],
        vnet_hdr: bool,
        ethertype: u16,
    ) -> io::Result<PacketSocket> {
        // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
        let fd = sys::owned(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        let raw = fd.as_raw_fd();
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // The kernel copies the program during the call; `filter` outlives it.
        sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, prog)?;
        let vnet =
            vnet_hdr && sys::setsockopt(raw, SOL_PACKET, PACKET_VNET_HDR, 1 as libc::c_int).is_ok();
        let _ = sys::setsockopt(raw, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1 as libc::c_int);
        sys::grow_buffer(raw, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        let sa = link_addr(ifindex, ethertype);
        // SAFETY: `sa` is a valid sockaddr_ll and its exact size is passed.
        sys::cvt(unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket {
            fd,
            ifindex,
            vnet,
            tx_errors: AtomicU64::new(0),
        })
    }

    /// Adopts a masquerade reply socket a predecessor passed (`crate::handover`): it must be an
    /// AF_PACKET `SOCK_RAW` socket bound to `ifindex` for `ethertype` (IPv4 or IPv6). `filter`
    /// replaces whatever filter it carries (ours, not the sender's, decides what it sees);
    /// packets already queued on it stay queued.
    pub fn adopt_rx(
        fd: OwnedFd,
        ifindex: u32,
        filter: &[libc::sock_filter],
        ethertype: u16,
    ) -> io::Result<PacketSocket> {
        let raw = fd.as_raw_fd();
        crate::handover::check_packet_rx("masquerade reply socket", raw, ifindex, ethertype)?;
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, prog)?;
        // SAFETY: F_SETFL with an int argument touches no memory.
        sys::cvt(unsafe { libc::fcntl(raw, libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK) })?;
        let vnet = sys::getsockopt_int(raw, SOL_PACKET, PACKET_VNET_HDR).is_ok_and(|v| v != 0);
        Ok(PacketSocket {
            fd,
            ifindex,
            vnet,
            tx_errors: AtomicU64::new(0),
        })
    }

    /// Reads one packet (vnet header first when enabled) without blocking.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let ret = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        sys::cvt_read(ret, buf.len())
    }
}

/// The `sockaddr_ll` naming `ifindex` and `ethertype`, for bind(2) and as a sendmmsg `msg_name`.
fn link_addr(ifindex: u32, ethertype: u16) -> libc::sockaddr_ll {
    // SAFETY: all-zeroes is a valid sockaddr_ll.
    let mut sa: libc::sockaddr_ll = unsafe { zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ethertype.to_be();
    sa.sll_ifindex = ifindex as i32;
    sa
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Classic BPF (run on the Ethernet frame: the IPv4 header starts at [`ETH_HLEN`]) that accepts
/// the packets to `node` that can be masquerade replies: TCP/UDP with a destination port in
/// `lo..=hi` (first fragments and unfragmented only), ICMP echo replies with an identifier in the
/// range, and ICMP errors (destination unreachable, time exceeded, parameter problem) quoting a
/// packet we translated: a TCP/UDP source port or an echo request identifier in the range (RFC 792:
/// the quote is the offending IP header plus at least 8 bytes, so both are present). Every other
/// ICMP error to the node (about the node's own connections, whose ports lie outside the range)
/// belongs to the node's stack alone and is not copied to us.
pub fn masquerade_filter(node: std::net::Ipv4Addr, lo: u16, hi: u16) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const LDX_MSH: u16 = 0xb1;
    const LD_H_IND: u16 = 0x48;
    const LD_B_IND: u16 = 0x50;
    const AND_K: u16 = 0x54;
    const LSH_K: u16 = 0x64;
    const ADD_X: u16 = 0x0c;
    const TAX: u16 = 0x07;
    const JEQ: u16 = 0x15;
    const JGE: u16 = 0x35;
    const JGT: u16 = 0x25;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    let (lo, hi) = (u32::from(lo), u32::from(hi));
    // Jump offsets count instructions after the current one: ACCEPT is 43, REJECT 44.
    const L2: u32 = ETH_HLEN as u32;
    // The quoted IP header starts 8 bytes into the ICMP message (L2 + X + 8 with X = outer IHL).
    const Q: u32 = L2 + 8;
    vec![
        /* 0 */ insn(LD_W_ABS, 0, 0, L2 + 16), // destination address
        /* 1 */ insn(JEQ, 0, 42, u32::from(node)),
        /* 2 */ insn(LD_B_ABS, 0, 0, L2 + 9), // protocol
        /* 3 */ insn(JEQ, 2, 0, 6), // TCP -> 6
        /* 4 */ insn(JEQ, 1, 0, 17), // UDP -> 6
        /* 5 */ insn(JEQ, 6, 38, 1), // ICMP -> 12, else REJECT
        /* 6 */ insn(LD_H_ABS, 0, 0, L2 + 6), // flags + fragment offset
        /* 7 */ insn(JSET, 36, 0, 0x1fff), // a later fragment carries no ports: REJECT
        /* 8 */ insn(LDX_MSH, 0, 0, L2), // X = IP header length
        /* 9 */ insn(LD_H_IND, 0, 0, L2 + 2), // destination port
        /* 10 */ insn(JGE, 0, 33, lo),
        /* 11 */ insn(JGT, 32, 31, hi),
        /* 12 */ insn(LDX_MSH, 0, 0, L2),
        /* 13 */ insn(LD_B_IND, 0, 0, L2), // ICMP type
        /* 14 */ insn(JEQ, 0, 3, 0), // echo reply: check the identifier; else -> 18
        /* 15 */ insn(LD_H_IND, 0, 0, L2 + 4),
        /* 16 */ insn(JGE, 0, 27, lo),
        /* 17 */ insn(JGT, 26, 25, hi),
        /* 18 */ insn(JEQ, 2, 0, 3), // destination unreachable -> 21
        /* 19 */ insn(JEQ, 1, 0, 11), // time exceeded -> 21
        /* 20 */ insn(JEQ, 0, 23, 12), // parameter problem -> 21, else REJECT
        /* 21 */ insn(LD_B_IND, 0, 0, Q + 9), // quoted protocol
        /* 22 */ insn(JEQ, 2, 0, 6), // TCP -> 25
        /* 23 */ insn(JEQ, 1, 0, 17), // UDP -> 25
        /* 24 */ insn(JEQ, 8, 19, 1), // ICMP -> 33, else REJECT
        /* 25 */ insn(LD_B_IND, 0, 0, Q), // X += quoted IP header length
        /* 26 */ insn(AND_K, 0, 0, 0x0f),
        /* 27 */ insn(LSH_K, 0, 0, 2),
        /* 28 */ insn(ADD_X, 0, 0, 0),
        /* 29 */ insn(TAX, 0, 0, 0),
        /* 30 */ insn(LD_H_IND, 0, 0, Q), // quoted source port: the node port we chose
        /* 31 */ insn(JGE, 0, 12, lo),
        /* 32 */ insn(JGT, 11, 10, hi),
        /* 33 */ insn(LD_B_IND, 0, 0, Q), // X += quoted IP header length
        /* 34 */ insn(AND_K, 0, 0, 0x0f),
        /* 35 */ insn(LSH_K, 0, 0, 2),
        /* 36 */ insn(ADD_X, 0, 0, 0),
        /* 37 */ insn(TAX, 0, 0, 0),
        /* 38 */ insn(LD_B_IND, 0, 0, Q), // quoted ICMP type: only our echo requests
        /* 39 */ insn(JEQ, 0, 4, 8),
        /* 40 */ insn(LD_H_IND, 0, 0, Q + 4), // quoted identifier
        /* 41 */ insn(JGE, 0, 2, lo),
        /* 42 */ insn(JGT, 1, 0, hi),
        /* 43 */ insn(RET, 0, 0, 0x0004_0000), // ACCEPT (whole packet)
        /* 44 */ insn(RET, 0, 0, 0), // REJECT
    ]
}

/// [`masquerade_filter`] for IPv6 (the NAT66 core, `nat::translate_ingress_v6`): accepts IPv6
/// frames (EtherType checked, so it is correct on a socket bound to any protocol) to `node` whose
/// Next Header is directly TCP / UDP with a destination port in `lo..=hi`, an ICMPv6 echo reply
/// with an identifier in the range, or an ICMPv6 error (destination unreachable, packet too big,
/// time exceeded, parameter problem) quoting a bare IPv6 header followed by TCP / UDP with a
/// source port, or an echo request with an identifier, in the range. IPv6 has a fixed 40-byte
/// header, so every load is at an absolute offset; a packet with extension headers (fragments
/// included) is not a reply the core translates and is rejected. The engine's IPv6 reply socket
/// (bound to ETH_P_IPV6) runs it.
pub fn masquerade_filter_v6(node: std::net::Ipv6Addr, lo: u16, hi: u16) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ: u16 = 0x15;
    const JGE: u16 = 0x35;
    const JGT: u16 = 0x25;
    const RET: u16 = 0x06;
    const L2: u32 = ETH_HLEN as u32;
    const L4: u32 = L2 + 40;
    // The quoted IPv6 header starts 8 bytes into the ICMPv6 message, its transport 40 later.
    const Q: u32 = L4 + 8;
    const QL4: u32 = Q + 40;
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Next,
        L(&'static str),
    }
    use T::{Next, L};
    let (lo, hi) = (u32::from(lo), u32::from(hi));
    let w = node.octets();
    let word = |i: usize| u32::from_be_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
    // (label, code, jump if true, jump if false, k)
    let prog: Vec<(Option<&str>, u16, T, T, u32)> = vec![
        (None, LD_H_ABS, Next, Next, 12), // EtherType
        (None, JEQ, Next, L("rej"), 0x86dd),
        (None, LD_W_ABS, Next, Next, L2 + 24), // destination address, 4 words
        (None, JEQ, Next, L("rej"), word(0)),
        (None, LD_W_ABS, Next, Next, L2 + 28),
        (None, JEQ, Next, L("rej"), word(4)),
        (None, LD_W_ABS, Next, Next, L2 + 32),
        (None, JEQ, Next, L("rej"), word(8)),
        (None, LD_W_ABS, Next, Next, L2 + 36),
        (None, JEQ, Next, L("rej"), word(12)),
        (None, LD_B_ABS, Next, Next, L2 + 6), // Next Header
        (None, JEQ, L("dport"), Next, 6),
        (None, JEQ, L("dport"), Next, 17),
        (None, JEQ, L("icmp"), L("rej"), 58),
        (Some("dport"), LD_H_ABS, Next, Next, L4 + 2),
        (None, JGE, L("top"), L("rej"), lo),
        (Some("icmp"), LD_B_ABS, Next, Next, L4), // ICMPv6 type
        (None, JEQ, Next, L("err"), 129),         // echo reply: its identifier
        (None, LD_H_ABS, Next, Next, L4 + 4),
        (None, JGE, L("top"), L("rej"), lo),
        (Some("err"), JGT, L("rej"), Next, 4), // errors are types 1..=4
        (None, JGE, Next, L("rej"), 1),
        (None, LD_B_ABS, Next, Next, Q + 6), // quoted Next Header
        (None, JEQ, L("sport"), Next, 6),
        (None, JEQ, L("sport"), Next, 17),
        (None, JEQ, Next, L("rej"), 58),
        (None, LD_B_ABS, Next, Next, QL4), // quoted ICMPv6 type: only our echo requests
        (None, JEQ, Next, L("rej"), 128),
        (None, LD_H_ABS, Next, Next, QL4 + 4),
        (None, JGE, L("top"), L("rej"), lo),
        (Some("sport"), LD_H_ABS, Next, Next, QL4), // quoted source port: the node port
        (None, JGE, L("top"), L("rej"), lo),
        (Some("top"), JGT, L("rej"), L("acc"), hi),
        (Some("acc"), RET, Next, Next, 0x0004_0000), // ACCEPT (whole packet)
        (Some("rej"), RET, Next, Next, 0),           // REJECT
    ];
    let at = |t: T, pc: usize| -> u8 {
        match t {
            Next => 0,
            L(name) => {
                let target = prog
                    .iter()
                    .position(|i| i.0 == Some(name))
                    .expect("label defined");
                // Classic BPF jumps forward only, relative to the next instruction.
                u8::try_from(target - pc - 1).expect("jump fits")
            }
        }
    };
    prog.iter()
        .enumerate()
        .map(|(pc, &(_, code, jt, jf, k))| insn(code, at(jt, pc), at(jf, pc), k))
        .collect()
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Headers for `sendmmsg` on a packet socket, reused across calls.
pub struct FrameScratch {
    cap: usize,
    slots: sys::MsgSlots<libc::sockaddr_ll>,
}

impl FrameScratch {
    pub fn new(frames: usize) -> FrameScratch {
        let n = frames.max(1);
        FrameScratch {
            cap: n,
            slots: sys::MsgSlots::new(n),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A classic BPF interpreter for the instructions `masquerade_filter` uses, following
    /// Documentation/networking/filter.rst (out-of-bounds loads reject the packet, as the kernel does).
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let ld = |off: usize, n: usize| {
            pkt.get(off..off + n)
                .map(|b| b.iter().fold(0u32, |v, &c| v << 8 | u32::from(c)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let k = i.k as usize;
            let jump = |c: bool| {
                if c {
                    usize::from(i.jt)
                } else {
                    usize::from(i.jf)
                }
            };
            match i.code {
                0x20 | 0x28 | 0x30 => match ld(k, [4, 2, 1][usize::from(i.code - 0x20) / 8]) {
                    Some(v) => a = v,
                    None => return 0,
                },
                0x48 | 0x50 => match ld(x as usize + k, if i.code == 0x48 { 2 } else { 1 }) {
                    Some(v) => a = v,
                    None => return 0,
                },
                0xb1 => match pkt.get(k) {
                    Some(b) => x = u32::from(b & 0x0f) * 4,
                    None => return 0,
                },
                0x54 => a &= i.k,
                0x64 => a <<= i.k,
                0x0c => a = a.wrapping_add(x),
                0x07 => x = a,
                0x15 => pc += jump(a == i.k),
                0x25 => pc += jump(a > i.k),
                0x35 => pc += jump(a >= i.k),
                0x45 => pc += jump(a & i.k != 0),
                0x06 => return i.k,
                c => panic!("opcode {c:#x} not modelled"),
            }
        }
    }

    fn ip(proto: u8, dst: [u8; 4], frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0]; // Ethernet
        p.extend_from_slice(&[
            0x45,
            0,
            0,
            0,
            0,
            0,
            (frag >> 8) as u8,
            frag as u8,
            64,
            proto,
            0,
            0,
            203,
            0,
            113,
            10,
        ]);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    /// An Ethernet + IPv6 frame to `dst` with Next Header `nh`.
    fn ip6(nh: u8, dst: std::net::Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[nh, 64]);
        p.extend_from_slice(
            &"2001:db8:ff::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn v6_filter_takes_only_masquerade_replies() {
        let node: std::net::Ipv6Addr = "2001:db8:0:1::2".parse().unwrap();
        let other: std::net::Ipv6Addr = "2001:db8:0:1::3".parse().unwrap();
        let f = masquerade_filter_v6(node, 61000, 65000);
        let accept = |p: &[u8]| run(&f, p) != 0;
        let ports =
            |sp: u16, dp: u16| [sp.to_be_bytes(), dp.to_be_bytes(), [0, 8], [0, 0]].concat();
        assert!(accept(&ip6(6, node, &ports(443, 61000))));
        assert!(accept(&ip6(17, node, &ports(53, 65000))));
        assert!(!accept(&ip6(6, node, &ports(443, 60999))));
        assert!(!accept(&ip6(17, node, &ports(53, 65001))));
        assert!(
            !accept(&ip6(6, other, &ports(443, 61000))),
            "another address"
        );
        assert!(
            !accept(&ip6(44, node, &ports(443, 61000))),
            "fragment header"
        );
        let mut v4 = ip6(6, node, &ports(443, 61000));
        v4[12..14].copy_from_slice(&[8, 0]);
        assert!(!accept(&v4), "not an IPv6 frame");
        let icmp =
            |ty: u8, id: u16| [[ty, 0, 0, 0].as_slice(), &id.to_be_bytes(), &[0, 1]].concat();
        assert!(
            accept(&ip6(58, node, &icmp(129, 61005))),
            "echo reply in range"
        );
        assert!(
            !accept(&ip6(58, node, &icmp(129, 7))),
            "echo reply out of range"
        );
        assert!(!accept(&ip6(58, node, &icmp(128, 61005))), "echo request");
        assert!(
            !accept(&ip6(58, node, &icmp(135, 61005))),
            "neighbour solicitation"
        );
        let error = |ty: u8, quoted_nh: u8, quoted_l4: &[u8]| {
            let mut m = vec![ty, 0, 0, 0, 0, 0, 5, 0];
            m.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, quoted_nh, 63]);
            m.extend_from_slice(&node.octets());
            m.extend_from_slice(
                &"2001:db8:ff::7"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            m.extend_from_slice(quoted_l4);
            ip6(58, node, &m)
        };
        for ty in [1, 2, 3, 4] {
            assert!(
                accept(&error(ty, 6, &ports(61000, 443))),
                "error {ty} about TCP"
            );
            assert!(
                accept(&error(ty, 17, &ports(65000, 53))),
                "error {ty} about UDP"
            );
            assert!(
                accept(&error(ty, 58, &icmp(128, 61005))),
                "error {ty} about a ping"
            );
            assert!(
                !accept(&error(ty, 6, &ports(40000, 443))),
                "error {ty}: node's own"
            );
            assert!(
                !accept(&error(ty, 17, &ports(65001, 53))),
                "error {ty} above the range"
            );
            assert!(
                !accept(&error(ty, 58, &icmp(129, 61005))),
                "error {ty} about a reply"
            );
            assert!(
                !accept(&error(ty, 43, &ports(61000, 443))),
                "error {ty}: ext header"
            );
        }
        assert!(
            !accept(&error(5, 6, &ports(61000, 443))),
            "not an error type"
        );
        assert!(!accept(&error(0, 6, &ports(61000, 443))), "type 0");
        // Cut short: the kernel's out-of-bounds load rejects.
        let e = error(1, 6, &ports(61000, 443));
        assert!(!accept(&e[..e.len() - 8]));
    }

    #[test]
    fn filter_takes_only_masquerade_replies() {
        let node = Ipv4Addr::new(172, 16, 2, 2);
        let f = masquerade_filter(node, 61000, 65000);
        let me = node.octets();
        let ports =
            |sp: u16, dp: u16| [sp.to_be_bytes(), dp.to_be_bytes(), [0, 8], [0, 0]].concat();
        let accept = |p: &[u8]| run(&f, p) != 0;
        assert!(accept(&ip(6, me, 0, &ports(443, 61000))));
        assert!(
            accept(&ip(17, me, 0x4000, &ports(53, 65000))),
            "DF is not a fragment"
        );
        assert!(!accept(&ip(6, me, 0, &ports(443, 60999))));
        assert!(!accept(&ip(17, me, 0, &ports(53, 65001))));
        assert!(
            !accept(&ip(6, [172, 16, 2, 3], 0, &ports(443, 61000))),
            "another address"
        );
        assert!(
            !accept(&ip(6, me, 0x0010, &ports(443, 61000))),
            "later fragment"
        );
        assert!(!accept(&ip(47, me, 0, &ports(443, 61000))), "GRE");
        let icmp =
            |ty: u8, id: u16| [[ty, 0, 0, 0].as_slice(), &id.to_be_bytes(), &[0, 1]].concat();
        assert!(
            accept(&ip(1, me, 0, &icmp(0, 61005))),
            "echo reply in range"
        );
        assert!(
            !accept(&ip(1, me, 0, &icmp(0, 7))),
            "echo reply out of range"
        );
        assert!(!accept(&ip(1, me, 0, &icmp(8, 61005))), "echo request");
        // ICMP errors: only those quoting a packet we translated (source port / echo identifier
        // in the range); the quoted header here has options (IHL 6) to exercise the offsets.
        let error = |ty: u8, quoted_proto: u8, quoted_l4: &[u8]| {
            let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&[0x46, 0, 0, 60, 0, 0, 0x40, 0, 63, quoted_proto, 0, 0]);
            m.extend_from_slice(&me);
            m.extend_from_slice(&[203, 0, 113, 10, 1, 1, 0, 0]); // destination + NOP options
            m.extend_from_slice(quoted_l4);
            ip(1, me, 0, &m)
        };
        for ty in [3, 11, 12] {
            assert!(
                accept(&error(ty, 6, &ports(61000, 443))),
                "ICMP error {ty} about TCP"
            );
            assert!(
                accept(&error(ty, 17, &ports(65000, 53))),
                "ICMP error {ty} about UDP"
            );
            assert!(
                accept(&error(ty, 1, &icmp(8, 61005))),
                "ICMP error {ty} about a ping"
            );
            assert!(
                !accept(&error(ty, 6, &ports(40000, 443))),
                "ICMP error {ty} about a node connection"
            );
            assert!(
                !accept(&error(ty, 17, &ports(65001, 53))),
                "ICMP error {ty} above the range"
            );
            assert!(
                !accept(&error(ty, 1, &icmp(8, 7))),
                "ICMP error {ty} about the node's own ping"
            );
            assert!(
                !accept(&error(ty, 1, &icmp(0, 61005))),
                "ICMP error {ty} about an echo reply"
            );
            assert!(!accept(&error(ty, 47, &ports(61000, 443))), "quoted GRE");
        }
        assert!(!accept(&error(4, 6, &ports(61000, 443))), "source quench");
        assert!(
            !accept(&error(3, 6, &[0xee])),
            "quote too short for the port"
        );
        assert!(!accept(&ip(6, me, 0, &[0xbb])), "truncated TCP header");
        assert!(!accept(&[0; 16]), "truncated IP header");
    }
}
