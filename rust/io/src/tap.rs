//! The UDP-tunnel GSO TAP (`podrgso<N>`): whole encapsulated TCP super-packets go to the kernel
//! here instead of being segmented in userspace (`podrouter_core::offload::tnl` builds them).
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` for more than one
//! worker), a 24-byte vnet header (`TUNSETVNETHDRSZ`, `struct virtio_net_hdr_v1_hash_tunnel`) and
//! `TUNSETOFFLOAD(CSUM | TSO4 | TSO6 | TSO_ECN | UDP_TUNNEL_GSO | UDP_TUNNEL_GSO_CSUM)` (the last
//! lets a frame ask for the outer UDP checksum, which IPv6 frames do); a kernel before 6.17
//! answers `EINVAL` and [`GsoTap::open`] fails, so the engine keeps segmenting itself. A frame
//! written here enters the node's stack as if received on the TAP (destination: the TAP's own
//! MAC) and is forwarded to the underlay like any routed packet; the kernel segments it only
//! where a device cannot carry it whole (a veth keeps it whole up to the peer's socket). The TAP
//! is never read: what the kernel might send to it (it has no address and no route points at
//! it) stays in its queue.
//!
//! One TAP carries both underlay families, each frame its own ([`Families`]); what each needs is
//! written for the TAP only, through `/proc/sys` (no `ip`/`sysctl` subprocess), never for another
//! interface:
//! * IPv4: the source is the node's own underlay address, so `accept_local = 1` and reverse-path
//!   filtering off (`rp_filter = 0`; the effective value is the larger of `all` and the
//!   device's, so a node with `net.ipv4.conf.all.rp_filter` ≠ 0 cannot use it for IPv4: that
//!   family is refused and the reason kept), and `forwarding = 1`.
//! * IPv6 (has no reverse-path filter and no local-source check on forwarding): IPv6 on, but
//!   silent (no addresses: `addr_gen_mode = 1`, no RAs, no DAD, no router solicitations; the
//!   TAP is up without `IFF_MULTICAST`), and forwarding for what arrives on it:
//!   `force_forwarding = 1` (Linux 6.17+, the TAP only), else `net.ipv6.conf.all.forwarding`
//!   must already be 1 (the family is refused otherwise). Hop limit and MTU are the frame's and
//!   the route's: `ip6_forward` decrements the hop limit once and checks each segment a GSO
//!   frame will become (`skb_gso_validate_network_len`) against the route MTU.
//!
//! Without IPv6, `disable_ipv6 = 1` (best effort).

use crate::sys::{self, IfReq};
use crate::tun::{IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};
use podrouter_core::offload::tnl::TNL_HDR_LEN;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

const TUNSETOFFLOAD: libc::c_ulong = sys::iow(b'T', 208, 4);

/// `TUN_F_UDP_TUNNEL_GSO` / `TUN_F_UDP_TUNNEL_GSO_CSUM` (`<linux/if_tun.h>`, Linux 6.17).
pub const TUN_F_UDP_TUNNEL_GSO: u32 = 0x080;
pub const TUN_F_UDP_TUNNEL_GSO_CSUM: u32 = 0x100;

/// The underlay families whose tunnel frames go through the TAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

/// One queue of the TAP; writes are non-blocking.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    /// Writes one frame: `prefix` (vnet header and outer headers) then the UDP payload.
    pub fn write(&self, prefix: &[u8], payload: &[u8]) -> io::Result<usize> {
        sys::writev2(self.fd.as_raw_fd(), prefix, payload)
    }
}

#[derive(Debug)]
pub struct GsoTap {
    name: String,
    mac: [u8; 6],
    queues: Vec<Arc<TapQueue>>,
    families: Families,
    refused: Option<String>,
}

impl GsoTap {
    /// Creates the TAP (`podrgso%d` when `name` is `None`) with `queues` queues for the families
    /// in `want`, or fails with the reason the kernel or the node's settings refuse it. A family
    /// the node's settings refuse while the other is usable leaves the TAP open for the other
    /// ([`GsoTap::families`]) and says why ([`GsoTap::refused`]).
    pub fn open(name: Option<&str>, queues: usize, want: Families) -> io::Result<GsoTap> {
        let mut why: Vec<String> = Vec::new();
        let mut fam = want;
        if fam.v4 {
            let rp_all = read_sysctl("net/ipv4/conf/all/rp_filter").unwrap_or_default();
            if rp_all.trim() != "0" {
                why.push(format!(
                    "net.ipv4.conf.all.rp_filter is {}, not 0",
                    rp_all.trim()
                ));
                fam.v4 = false;
            }
        }
        if fam.v6 && read_sysctl("net/ipv6/conf/all/disable_ipv6").is_err() {
            why.push("IPv6 is disabled in this namespace".to_string());
            fam.v6 = false;
        }
        refuse_if_none(fam, &why)?;
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
        let want_offload = crate::tun::offload::CSUM
            | crate::tun::offload::TSO4
            | crate::tun::offload::TSO6
            | crate::tun::offload::TSO_ECN
            | TUN_F_UDP_TUNNEL_GSO
            | TUN_F_UDP_TUNNEL_GSO_CSUM;
        sys::ioctl_val(
            qs[0].fd.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(want_offload),
        )
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TUNSETOFFLOAD UDP_TUNNEL_GSO on {name}: {e} (Linux 6.17+ needed)"),
            )
        })?;
        if fam.v4 {
            for (key, val) in [
                ("rp_filter", "0"),
                ("accept_local", "1"),
                ("forwarding", "1"),
            ] {
                if let Err(e) = write_sysctl(&format!("net/ipv4/conf/{name}/{key}"), val) {
                    why.push(e.to_string());
                    fam.v4 = false;
                    break;
                }
            }
        }
        if fam.v6 {
            if let Err(e) = ipv6_on(&name) {
                why.push(e.to_string());
                fam.v6 = false;
            }
        }
        if !fam.v6 {
            // No IPv6 on the TAP (no link-local address, no router solicitations); best effort.
            let _ = write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
        }
        refuse_if_none(fam, &why)?;
        let s = sys::ctl_socket()?;
        let mut ifr = IfReq::new(&name)?;
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr)?;
        // struct sockaddr: sa_family (2 bytes) then the address
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&ifr.data[2..8]);
        let mut ifr = IfReq::new(&name)?;
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr)?;
        // up, and no multicast (no MLD / IGMP reports: the TAP has no address and is not read)
        let up = (i16::from_ne_bytes([ifr.data[0], ifr.data[1]]) | libc::IFF_UP as i16)
            & !(libc::IFF_MULTICAST as i16);
        ifr.set_short(up);
        sys::ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr)?;
        let refused = (!why.is_empty()).then(|| {
            let lost = match (want.v4 && !fam.v4, want.v6 && !fam.v6) {
                (true, _) => "IPv4",
                (_, true) => "IPv6",
                _ => "",
            };
            format!("{lost} underlay: {}", why.join("; "))
        });
        Ok(GsoTap {
            name,
            mac,
            queues: qs,
            families: fam,
            refused,
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

    /// The underlay families whose frames the TAP carries.
    pub fn families(&self) -> Families {
        self.families
    }

    /// Why a family asked for at `open` is not carried (the other one is), if one is not.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }
}

fn refuse_if_none(fam: Families, why: &[String]) -> io::Result<()> {
    if fam.v4 || fam.v6 {
        return Ok(());
    }
    let msg = if why.is_empty() {
        "no underlay address".to_string()
    } else {
        why.join("; ")
    };
    Err(io::Error::new(io::ErrorKind::Unsupported, msg))
}

/// IPv6 on the TAP, silent, forwarding what arrives on it (see the module documentation).
fn ipv6_on(name: &str) -> io::Result<()> {
    let conf = |key: &str| format!("net/ipv6/conf/{name}/{key}");
    for (key, val) in [
        ("addr_gen_mode", "1"),
        ("accept_ra", "0"),
        ("accept_dad", "0"),
        ("dad_transmits", "0"),
        ("router_solicitations", "0"),
    ] {
        // quiet if possible; none of these decides whether frames are forwarded
        let _ = write_sysctl(&conf(key), val);
    }
    if write_sysctl(&conf("force_forwarding"), "1").is_err() {
        let all = read_sysctl("net/ipv6/conf/all/forwarding").unwrap_or_default();
        if all.trim() != "1" {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "net.ipv6.conf.all.forwarding is {} and {name} has no force_forwarding \
                     (Linux 6.17+)",
                    all.trim()
                ),
            ));
        }
    }
    write_sysctl(&conf("disable_ipv6"), "0")
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
    use podrouter_core::offload::tnl::{
        self, Outer, Outer6, TnlHdr, OUTER_LEN, PREFIX6_LEN, PREFIX_LEN,
    };
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
    /// TAP with the tunnel offload (and its outer checksum) and takes, on every queue, the frames
    /// `tnl::build_prefix` (IPv4 underlay) and `tnl::build_prefix6` (IPv6 underlay) make (a header
    /// it refuses is `EINVAL` on the write), and refuses one with both tunnel bits. The TAP
    /// forwards IPv6 although the namespace does not (`force_forwarding`).
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
            let both = Families { v4: true, v6: true };
            let tap = match GsoTap::open(Some("podrgsotest%d"), 2, both) {
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
            assert_eq!((tap.families(), tap.refused()), (both, None));
            let name = tap.name().to_string();
            assert!(name.starts_with("podrgsotest"), "{name}");
            for (k, v) in [
                ("ipv4/conf/{}/rp_filter", "0"),
                ("ipv4/conf/{}/accept_local", "1"),
                ("ipv4/conf/{}/forwarding", "1"),
                ("ipv6/conf/{}/disable_ipv6", "0"),
                ("ipv6/conf/{}/force_forwarding", "1"),
                ("ipv6/conf/{}/addr_gen_mode", "1"),
                ("ipv6/conf/all/forwarding", "0"),
            ] {
                let key = format!("net/{}", k.replace("{}", &name));
                let got = read_sysctl(&key).unwrap();
                assert_eq!(got.trim(), v, "{key}");
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
            let outer6 = Outer6 {
                dst_mac: tap.mac(),
                src_mac: [2, 0, 0, 0, 0, 2],
                src: "2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
                dst: "2001:db8::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
                src_port: 50000,
                dst_port: 4789,
                tclass: 0,
                flow_label: 0x12345,
                hop_limit: 65,
            };
            let mut pre6 = [0u8; PREFIX6_LEN];
            tnl::build_prefix6(&mut pre6, &outer6, &p, off, &h).unwrap();
            for q in tap.queues() {
                assert_eq!(q.write(&pre, &p).unwrap(), PREFIX_LEN + p.len());
                assert_eq!(q.write(&pre6, &p).unwrap(), PREFIX6_LEN + p.len());
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

    /// IPv4 reverse-path filtering on: an IPv4-only TAP is refused with the reason, a dual-stack
    /// one keeps IPv6 and says why IPv4 is not carried.
    #[test]
    fn rp_filter_refuses_ipv4_only() {
        let t = std::thread::spawn(|| {
            // SAFETY: as above: only this fresh thread moves into a new network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", io::Error::last_os_error());
            write_sysctl("net/ipv4/conf/all/rp_filter", "2").unwrap();
            let v4 = Families {
                v4: true,
                v6: false,
            };
            let e = GsoTap::open(Some("podrgsorp%d"), 1, v4).unwrap_err();
            assert!(e.to_string().contains("rp_filter is 2"), "{e}");
            match GsoTap::open(Some("podrgsorp%d"), 1, Families { v4: true, v6: true }) {
                Ok(tap) => {
                    assert_eq!(
                        tap.families(),
                        Families {
                            v4: false,
                            v6: true
                        }
                    );
                    let why = tap.refused().unwrap_or_default();
                    assert!(
                        why.starts_with("IPv4 underlay") && why.contains("rp_filter"),
                        "{why}"
                    );
                }
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
            }
        });
        t.join().unwrap();
    }
}
