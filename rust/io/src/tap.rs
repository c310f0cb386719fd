//! The UDP-tunnel GSO TAP (`podrgso<N>`): whole encapsulated TCP super-packets go to the kernel
//! here instead of being segmented in userspace (`podrouter_core::offload::tnl` builds them).
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` for more than one
//! worker), a 24-byte vnet header (`TUNSETVNETHDRSZ`, `struct virtio_net_hdr_v1_hash_tunnel`) and
//! `TUNSETOFFLOAD(CSUM | TSO4 | TSO6 | TSO_ECN | UDP_TUNNEL_GSO)`; a kernel before 6.17 answers
//! `EINVAL` to the last and [`GsoTap::open`] fails, so the engine keeps segmenting itself. A
//! frame written here enters the node's stack as if received on the TAP (destination: the TAP's
//! own MAC) and is forwarded to the underlay like any routed packet; the kernel segments it only
//! where a device cannot carry it whole (a veth keeps it whole up to the peer's socket).
//!
//! Its source is the node's own underlay address, so the TAP needs `accept_local = 1` and
//! reverse-path filtering off (`rp_filter = 0`; the effective value is the larger of `all` and
//! the device's, so a node with `net.ipv4.conf.all.rp_filter` ≠ 0 cannot use it: `open` fails
//! and says why), and `forwarding = 1`. These are written for the TAP only, through
//! `/proc/sys` (no `ip`/`sysctl` subprocess), never for another interface.

use crate::sys::{self, IfReq};
use crate::tun::{IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};
use podrouter_core::offload::tnl::{PREFIX_LEN, TNL_HDR_LEN};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

const TUNSETOFFLOAD: libc::c_ulong = sys::iow(b'T', 208, 4);

/// `TUN_F_UDP_TUNNEL_GSO` / `TUN_F_UDP_TUNNEL_GSO_CSUM` (`<linux/if_tun.h>`, Linux 6.17).
pub const TUN_F_UDP_TUNNEL_GSO: u32 = 0x080;
pub const TUN_F_UDP_TUNNEL_GSO_CSUM: u32 = 0x100;

/// One queue of the TAP; writes are non-blocking.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    /// Writes one frame: `prefix` (vnet header and outer headers) then the UDP payload.
    pub fn write(&self, prefix: &[u8; PREFIX_LEN], payload: &[u8]) -> io::Result<usize> {
        sys::writev2(self.fd.as_raw_fd(), prefix, payload)
    }
}

#[derive(Debug)]
pub struct GsoTap {
    name: String,
    mac: [u8; 6],
    queues: Vec<Arc<TapQueue>>,
}

impl GsoTap {
    /// Creates the TAP (`podrgso%d` when `name` is `None`) with `queues` queues, or fails with
    /// the reason the kernel or the node's settings refuse it.
    pub fn open(name: Option<&str>, queues: usize) -> io::Result<GsoTap> {
        let rp_all = read_sysctl("net/ipv4/conf/all/rp_filter").unwrap_or_default();
        if rp_all.trim() != "0" {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("net.ipv4.conf.all.rp_filter is {}, not 0", rp_all.trim()),
            ));
        }
        let nq = queues.max(1);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if nq > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut name = name.unwrap_or("podrgso%d").to_string();
        let mut qs = Vec::with_capacity(nq);
        for _ in 0..nq {
            let (fd, resolved) = crate::tun::open_queue(&name, flags, TNL_HDR_LEN)?;
            name = resolved;
            qs.push(Arc::new(TapQueue { fd }));
        }
        let want = crate::tun::offload::CSUM
            | crate::tun::offload::TSO4
            | crate::tun::offload::TSO6
            | crate::tun::offload::TSO_ECN
            | TUN_F_UDP_TUNNEL_GSO;
        sys::ioctl_val(
            qs[0].fd.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(want),
        )
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TUNSETOFFLOAD UDP_TUNNEL_GSO on {name}: {e} (Linux 6.17+ needed)"),
            )
        })?;
        for (key, val) in [
            ("rp_filter", "0"),
            ("accept_local", "1"),
            ("forwarding", "1"),
        ] {
            write_sysctl(&format!("net/ipv4/conf/{name}/{key}"), val)?;
        }
        // No IPv6 on the TAP (no link-local address, no router solicitations); best effort.
        let _ = write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
        let s = sys::ctl_socket()?;
        let mut ifr = IfReq::new(&name)?;
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr)?;
        // struct sockaddr: sa_family (2 bytes) then the address
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&ifr.data[2..8]);
        let mut ifr = IfReq::new(&name)?;
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr)?;
        let up = i16::from_ne_bytes([ifr.data[0], ifr.data[1]]) | libc::IFF_UP as i16;
        ifr.set_short(up);
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr)?;
        Ok(GsoTap {
            name,
            mac,
            queues: qs,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP's MAC: the destination of every frame written to it.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }
}

fn read_sysctl(key: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
}

fn write_sysctl(key: &str, val: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), val)
        .map_err(|e| io::Error::new(e.kind(), format!("/proc/sys/{key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podrouter_core::offload::tnl::{self, Outer, TnlHdr, OUTER_LEN};
    use podrouter_core::offload::vnet::{flags, gso_type, VnetHdr};

    /// A TCP/IPv4 super-packet behind a VXLAN header and inner Ethernet, its checksum field the
    /// pseudo-header seed: (UDP payload, inner offset, the TUN read's vnet header).
    fn payload(tcp_payload: usize, mss: u16) -> (Vec<u8>, usize, VnetHdr) {
        let mut p = vec![0u8; 22 + 40 + tcp_payload];
        p[0] = 0x08;
        p[20..22].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut p[22..];
        let total = ip.len() as u16;
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 244, 1, 1]);
        ip[16..20].copy_from_slice(&[10, 244, 2, 1]);
        let c = !podrouter_core::offload::csum::sum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip[32] = 0x50;
        ip[33] = 0x10;
        let seed = podrouter_core::offload::csum::pseudo_v4(
            &[10, 244, 1, 1],
            &[10, 244, 2, 1],
            6,
            total - 20,
        );
        ip[36..38].copy_from_slice(&seed.to_be_bytes());
        let h = VnetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (p, 22, h)
    }

    /// In a private network namespace (never the machine's): the kernel creates the multi-queue
    /// TAP with the tunnel offload and takes, on every queue, the frames `tnl::build_prefix` makes
    /// (a header it refuses is `EINVAL` on the write), and refuses one with both tunnel bits.
    #[test]
    fn the_kernel_accepts_our_frames_on_every_queue() {
        let t = std::thread::spawn(|| {
            // SAFETY: unshare with a constant flag; it moves only this (fresh) thread into a new,
            // empty network namespace, which ends with the thread.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            let tap = match GsoTap::open(Some("podrgsotest%d"), 2) {
                Ok(t) => t,
                // only a kernel before 6.17 may refuse the offload (the engine then segments)
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
                    let mut v = rel.split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
                    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
                    assert!((major, minor) < (6, 17), "Linux {rel} refused: {e}");
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            assert_eq!(tap.queues().len(), 2);
            assert_ne!(tap.mac(), [0; 6]);
            let name = tap.name().to_string();
            assert!(name.starts_with("podrgsotest"), "{name}");
            for (k, v) in [
                ("rp_filter", "0"),
                ("accept_local", "1"),
                ("forwarding", "1"),
            ] {
                let got = read_sysctl(&format!("net/ipv4/conf/{name}/{k}")).unwrap();
                assert_eq!(got.trim(), v, "{k}");
            }
            let (p, off, h) = payload(20_000, 1400);
            let outer = Outer {
                dst_mac: tap.mac(),
                src_mac: [2, 0, 0, 0, 0, 2],
                src: [192, 0, 2, 1],
                dst: [192, 0, 2, 2],
                src_port: 50000,
                dst_port: 4789,
                tos: 0,
                ttl: 65,
                id: 1,
            };
            let mut pre = [0u8; PREFIX_LEN];
            tnl::build_prefix(&mut pre, &outer, &p, off, &h).unwrap();
            for q in tap.queues() {
                assert_eq!(q.write(&pre, &p).unwrap(), PREFIX_LEN + p.len());
            }
            let mut bad = TnlHdr::parse(&pre).unwrap();
            bad.base.gso_type |= tnl::GSO_UDP_TUNNEL_IPV6;
            assert!(!bad.kernel_accepts(OUTER_LEN + p.len()));
            let mut b = [0u8; TNL_HDR_LEN];
            bad.emit(&mut b);
            pre[..TNL_HDR_LEN].copy_from_slice(&b);
            let e = tap.queues()[0].write(&pre, &p).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        });
        t.join().unwrap();
    }
}
