//! Zero-copy views over the wire formats podrouter reads and writes.
//!
//! One module per protocol, in the style of smoltcp's `wire`: a `Packet<T: AsRef<[u8]>>` (or
//! `Header`/`Frame`) view whose fields are named byte ranges in a private `mod field`, getters for any
//! `T: AsRef<[u8]>` and setters for `T: AsMut<[u8]>`.
//!
//! # Panic rules
//!
//! * `new_checked(buffer)` runs `check_len()` and only then returns a view. On a view obtained this way
//!   **no getter panics, whatever the bytes are**: fixed-offset fields are inside the length that
//!   `check_len` proved, and every variable-length accessor (options, payload, extension headers)
//!   clamps its range to the buffer instead of indexing past it.
//! * `new_unchecked(buffer)` exists for building packets into buffers the caller sized itself. On such
//!   a view fixed-offset getters and setters may panic if the buffer is shorter than the fixed header;
//!   variable-length accessors still never panic.
//! * Setters can make a packet inconsistent (for example a total length larger than the buffer); the
//!   getters keep clamping, so reading such a packet back still does not panic.
//!
//! Untrusted bytes must therefore only ever enter through `new_checked` or [`parse_ip`].

// Textually first: the view macros are used by every protocol module below.
#[macro_use]
mod macros;

pub mod checksum;
pub mod ethernet;
pub mod geneve;
pub mod icmp;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod vxlan;

use core::fmt;
use core::net::IpAddr;
use core::ops::Range;

/// A named byte range inside a header.
pub(crate) type Field = Range<usize>;
/// The first byte of a variable-length region that runs to the end of the header.
pub(crate) type Rest = core::ops::RangeFrom<usize>;

/// Why a buffer was rejected. Kept small on purpose: callers map it onto a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer ends before a length the header promises.
    Truncated,
    /// A field holds a value the protocol forbids (bad IHL, length smaller than the header, ...).
    Malformed,
    /// Well formed but not something podrouter handles (wrong IP version, Geneve version != 0, ...).
    Unsupported,
    /// A checksum did not verify.
    BadChecksum,
    /// A Geneve option with the critical bit set that this implementation does not understand
    /// (RFC 8926 §3.5: the packet MUST be dropped).
    UnknownCriticalOption,
}

impl Error {
    /// Stable snake_case name, suitable as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::Malformed => "malformed",
            Error::Unsupported => "unsupported",
            Error::BadChecksum => "bad_checksum",
            Error::UnknownCriticalOption => "geneve_critical_option",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Error {}

pub type Result<T> = core::result::Result<T, Error>;

/// IANA protocol numbers used across the crate.
pub mod ip_proto {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const IPV6_NO_NEXT: u8 = 59;
    pub const IPV6_DEST_OPTS: u8 = 60;
    pub const SCTP: u8 = 132;
}

/// ECN codepoints (RFC 3168 §5), the low two bits of the TOS / traffic class byte.
pub mod ecn {
    pub const NOT_ECT: u8 = 0b00;
    pub const ECT1: u8 = 0b01;
    pub const ECT0: u8 = 0b10;
    pub const CE: u8 = 0b11;
}

/// Big-endian reads that cannot panic: callers index only inside lengths they checked, and these
/// helpers turn a logic error into a zero instead of an out-of-bounds panic.
#[inline]
pub(crate) fn be16(data: &[u8], at: usize) -> u16 {
    match data.get(at..at + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

#[inline]
pub(crate) fn be32(data: &[u8], at: usize) -> u32 {
    match data.get(at..at + 4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

/// A sub-slice clamped to the buffer: never panics, returns an empty slice when out of range.
#[inline]
pub(crate) fn clamp(data: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(data.len());
    data.get(start.min(end)..end).unwrap_or(&[])
}

#[inline]
pub(crate) fn clamp_mut(data: &mut [u8], start: usize, end: usize) -> &mut [u8] {
    let end = end.min(data.len());
    let start = start.min(end);
    &mut data[start..end]
}

/// What the transport header of a packet told us, as far as it is visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Info {
    /// No transport header is visible: a non-first fragment, or a protocol podrouter does not read.
    None,
    /// TCP, UDP or SCTP: source and destination ports. `tcp_flags` is the TCP flags byte (0 else).
    Ports { src: u16, dst: u16, tcp_flags: u8 },
    /// ICMP or ICMPv6 echo request / reply: the identifier plays the role of a port for NAT.
    IcmpEcho { ident: u16, seq: u16, request: bool },
    /// ICMP / ICMPv6 error (destination unreachable, time exceeded, ...): the offending packet is
    /// embedded at `l4_offset + 8`.
    IcmpError { msg_type: u8, code: u8 },
    /// Any other ICMP / ICMPv6 message.
    IcmpOther { msg_type: u8, code: u8 },
}

/// The one-stop parse of an IP packet that the datapath uses; see [`parse_ip`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpMeta {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The transport protocol: for IPv6, the Next Header after the extension header chain.
    pub protocol: u8,
    /// Offset of the transport header from the start of the IP packet.
    pub l4_offset: usize,
    /// Bytes of the IP packet (header included) as its length fields say; never more than the buffer.
    pub total_len: usize,
    pub dscp: u8,
    pub ecn: u8,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// Part of a fragmented datagram (first or later).
    pub is_fragment: bool,
    /// Fragment offset in bytes (0 for the first fragment and for unfragmented packets).
    pub frag_offset: u16,
    pub l4: L4Info,
}

impl IpMeta {
    /// `true` for a fragment other than the first: it carries no transport header.
    pub fn is_later_fragment(&self) -> bool {
        self.is_fragment && self.frag_offset != 0
    }

    /// Source and destination port, when the transport has ports.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            L4Info::Ports { src, dst, .. } => Some((src, dst)),
            _ => None,
        }
    }

    /// The ICMP echo identifier, when this is an echo request or reply.
    pub fn icmp_id(&self) -> Option<u16> {
        match self.l4 {
            L4Info::IcmpEcho { ident, .. } => Some(ident),
            _ => None,
        }
    }
}

/// Parse an IPv4 or IPv6 packet starting at `bytes[0]` (no link-layer header).
///
/// Validates the IP header (version, lengths, the IPv4 header checksum as RFC 1812 §5.2.2 asks of a
/// router), walks IPv6 extension headers, and reads the transport header:
/// * unfragmented packets must carry a complete transport header (TCP data offset in bounds, UDP
///   length consistent with the IP payload, 8 bytes of ICMP) or the packet is rejected;
/// * a first fragment yields ports when its first bytes are there, and [`L4Info::None`] otherwise;
/// * a later fragment yields [`L4Info::None`].
///
/// Never panics.
#[inline]
pub fn parse_ip(bytes: &[u8]) -> Result<IpMeta> {
    match bytes.first().map(|b| b >> 4) {
        None => Err(Error::Truncated),
        Some(4) => parse_ipv4(bytes),
        Some(6) => parse_ipv6(bytes),
        Some(_) => Err(Error::Unsupported),
    }
}

#[inline]
fn parse_ipv4(bytes: &[u8]) -> Result<IpMeta> {
    let ip = ipv4::Packet::new_checked(bytes)?;
    if !ip.verify_checksum() {
        return Err(Error::BadChecksum);
    }
    // Linux drops packets whose options do not parse (`ip_options_compile`); so do we.
    if ip.header_len() > ipv4::HEADER_LEN {
        ip.check_options()?;
    }
    let header_len = ip.header_len();
    let total_len = usize::from(ip.total_len());
    let is_fragment = ip.is_fragment();
    let frag_offset = ip.frag_offset();
    let protocol = ip.protocol();
    let payload = ip.payload();
    let l4 = if frag_offset != 0 {
        L4Info::None
    } else {
        read_l4(protocol, payload, is_fragment, false)?
    };
    Ok(IpMeta {
        src: IpAddr::V4(ip.src_addr()),
        dst: IpAddr::V4(ip.dst_addr()),
        protocol,
        l4_offset: header_len,
        total_len,
        dscp: ip.dscp(),
        ecn: ip.ecn(),
        ttl: ip.ttl(),
        is_fragment,
        frag_offset,
        l4,
    })
}

fn parse_ipv6(bytes: &[u8]) -> Result<IpMeta> {
    let ip = ipv6::Packet::new_checked(bytes)?;
    let chain = ip.walk_extension_headers()?;
    let total_len = ip.total_len();
    let (is_fragment, frag_offset) = match chain.fragment {
        // RFC 6946: an atomic fragment is a whole datagram.
        Some(f) if !f.is_atomic() => (true, f.offset),
        _ => (false, 0),
    };
    let l4 = if frag_offset != 0 {
        L4Info::None
    } else {
        read_l4(
            chain.protocol,
            clamp(bytes, chain.l4_offset, total_len),
            is_fragment,
            true,
        )?
    };
    Ok(IpMeta {
        src: IpAddr::V6(ip.src_addr()),
        dst: IpAddr::V6(ip.dst_addr()),
        protocol: chain.protocol,
        l4_offset: chain.l4_offset,
        total_len,
        dscp: ip.dscp(),
        ecn: ip.ecn(),
        ttl: ip.hop_limit(),
        is_fragment,
        frag_offset,
        l4,
    })
}

/// Read the transport header at the start of `l4`. `partial` (a first fragment) tolerates a
/// transport header cut short by fragmentation; a whole packet does not.
fn read_l4(protocol: u8, l4: &[u8], partial: bool, v6: bool) -> Result<L4Info> {
    let icmp_proto = if v6 { ip_proto::ICMPV6 } else { ip_proto::ICMP };
    match protocol {
        ip_proto::TCP => {
            if partial {
                return Ok(match l4.len() {
                    n if n >= 14 => L4Info::Ports {
                        src: be16(l4, 0),
                        dst: be16(l4, 2),
                        tcp_flags: l4[13],
                    },
                    n if n >= 4 => L4Info::Ports {
                        src: be16(l4, 0),
                        dst: be16(l4, 2),
                        tcp_flags: 0,
                    },
                    _ => L4Info::None,
                });
            }
            let tcp = tcp::Packet::new_checked(l4)?;
            Ok(L4Info::Ports {
                src: tcp.src_port(),
                dst: tcp.dst_port(),
                tcp_flags: tcp.flags(),
            })
        }
        ip_proto::UDP => {
            if partial {
                return Ok(if l4.len() >= 4 {
                    L4Info::Ports {
                        src: be16(l4, 0),
                        dst: be16(l4, 2),
                        tcp_flags: 0,
                    }
                } else {
                    L4Info::None
                });
            }
            let udp = udp::Packet::new_checked(l4)?;
            Ok(L4Info::Ports {
                src: udp.src_port(),
                dst: udp.dst_port(),
                tcp_flags: 0,
            })
        }
        ip_proto::SCTP => {
            // RFC 9260 §3.1: 12-byte common header, ports first.
            if l4.len() >= 12 || (partial && l4.len() >= 4) {
                Ok(L4Info::Ports {
                    src: be16(l4, 0),
                    dst: be16(l4, 2),
                    tcp_flags: 0,
                })
            } else if partial {
                Ok(L4Info::None)
            } else {
                Err(Error::Truncated)
            }
        }
        p if p == icmp_proto => {
            if l4.len() < 8 {
                return if partial {
                    Ok(L4Info::None)
                } else {
                    Err(Error::Truncated)
                };
            }
            let (msg_type, code) = (l4[0], l4[1]);
            let (echo_req, echo_rep, is_err) = if v6 {
                (
                    icmpv6::msg_type::ECHO_REQUEST,
                    icmpv6::msg_type::ECHO_REPLY,
                    icmpv6::msg_type::is_error(msg_type),
                )
            } else {
                (
                    icmp::msg_type::ECHO_REQUEST,
                    icmp::msg_type::ECHO_REPLY,
                    icmp::msg_type::is_error(msg_type),
                )
            };
            Ok(if msg_type == echo_req || msg_type == echo_rep {
                L4Info::IcmpEcho {
                    ident: be16(l4, 4),
                    seq: be16(l4, 6),
                    request: msg_type == echo_req,
                }
            } else if is_err {
                L4Info::IcmpError { msg_type, code }
            } else {
                L4Info::IcmpOther { msg_type, code }
            })
        }
        _ => Ok(L4Info::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};

    // ping -c1 10.244.2.1 from 10.244.1.1: IPv4 + ICMP echo request, 8 bytes of data.
    const PING: [u8; 36] = [
        0x45, 0x00, 0x00, 0x24, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 244, 1, 1, 10,
        244, 2, 1, 0x08, 0x00, 0x00, 0x00, 0xbe, 0xef, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    fn ping() -> Vec<u8> {
        let mut p = PING.to_vec();
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        icmp::Packet::new_unchecked(&mut p[20..]).fill_checksum();
        p
    }

    #[test]
    fn parse_ping() {
        let m = parse_ip(&ping()).unwrap();
        assert_eq!(m.src, IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(m.dst, IpAddr::V4(Ipv4Addr::new(10, 244, 2, 1)));
        assert_eq!(m.protocol, ip_proto::ICMP);
        assert_eq!(m.l4_offset, 20);
        assert_eq!(m.total_len, 36);
        assert_eq!(m.ttl, 64);
        assert!(!m.is_fragment);
        assert_eq!(m.icmp_id(), Some(0xbeef));
        assert_eq!(
            m.l4,
            L4Info::IcmpEcho {
                ident: 0xbeef,
                seq: 1,
                request: true
            }
        );
    }

    #[test]
    fn parse_rejects_bad_header_checksum() {
        let mut p = ping();
        p[10] ^= 0xff;
        assert_eq!(parse_ip(&p), Err(Error::BadChecksum));
    }

    #[test]
    fn parse_empty_and_bad_version() {
        assert_eq!(parse_ip(&[]), Err(Error::Truncated));
        assert_eq!(parse_ip(&[0x55; 40]), Err(Error::Unsupported));
        assert_eq!(parse_ip(&[0x45; 10]), Err(Error::Truncated));
    }

    #[test]
    fn parse_checks_ipv4_options() {
        // IHL 6: one Router Alert option (148, length 4), then the ICMP message.
        let mut p = PING[..20].to_vec();
        p[0] = 0x46;
        p[3] = 40;
        p.extend_from_slice(&[148, 4, 0, 0]);
        p.extend_from_slice(&PING[20..]);
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        icmp::Packet::new_unchecked(&mut p[24..]).fill_checksum();
        let m = parse_ip(&p).unwrap();
        assert_eq!((m.l4_offset, m.icmp_id()), (24, Some(0xbeef)));
        p[21] = 5; // option length past the header
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        assert_eq!(parse_ip(&p), Err(Error::Malformed));
    }

    #[test]
    fn parse_later_fragment_has_no_ports() {
        let mut p = ping();
        // offset 1 (8 bytes), MF clear: the last fragment of a datagram.
        p[6] = 0x00;
        p[7] = 0x01;
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        let m = parse_ip(&p).unwrap();
        assert!(m.is_fragment);
        assert!(m.is_later_fragment());
        assert_eq!(m.frag_offset, 8);
        assert_eq!(m.l4, L4Info::None);
    }

    #[test]
    fn parse_ipv6_udp() {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[1] = 0xb0; // traffic class 0x0b: DSCP 2, ECN ECT(1)... (0x0b = 0b0000_1011)
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = ip_proto::UDP;
        p[7] = 63;
        p[8..24].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets());
        p[24..40].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets());
        p[40..42].copy_from_slice(&5353u16.to_be_bytes());
        p[42..44].copy_from_slice(&53u16.to_be_bytes());
        p[44..46].copy_from_slice(&8u16.to_be_bytes());
        let m = parse_ip(&p).unwrap();
        assert_eq!(m.protocol, ip_proto::UDP);
        assert_eq!(m.ports(), Some((5353, 53)));
        assert_eq!(m.ttl, 63);
        assert_eq!(m.total_len, 48);
        assert_eq!(m.dscp, 0x0b >> 2);
        assert_eq!(m.ecn, 0x0b & 3);
    }
}
