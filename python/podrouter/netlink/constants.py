"""Numbers podrouter stamps on the kernel objects it creates, so that they can be found again.

Every route podrouter installs carries routing protocol `RTPROT_PODROUTER` (`ip route` shows
`proto 77`): `podrouter cleanup` can remove a crashed daemon's routes even without its state file, and
nothing another routing daemon installed is ever touched. 77 is unassigned in iproute2's rt_protos
(which reserves 0-18, 42, 99, 186-192).
"""

RTPROT_PODROUTER = 77

# Masquerade egress steering (docs/design.md §3): traffic from local pods whose only route in `main` is the
# default route goes to the TUN instead. Rule SUPPRESS_RULE_PRIORITY consults `main` but ignores
# prefix length 0 (`suppress_prefixlength 0`, the wg-quick trick), so anything more specific (pod
# /32s, peer pod CIDRs on podr0, node subnets) still routes as usual; only what would have taken the
# default route falls through to rule MASQ_RULE_PRIORITY, which sends pod sources to table MASQ_TABLE
# (a default route on the TUN). Other sources fall through to the normal `main` lookup at 32766.
MASQ_TABLE = 77
SUPPRESS_RULE_PRIORITY = 7700
MASQ_RULE_PRIORITY = 7701

TUN_NAME = "podr0"

# IPv6 (dual stack): the minimum link MTU (RFC 8200 §5), and the pods' link-local default gateway. The
# node's end of each dual-stack pod's veth holds POD_GATEWAY6/64 (nodad), the IPv6 twin of the proxy
# ARP answer for 169.254.1.1 (docs/architecture.md, "Pod attachment").
IPV6_MIN_MTU = 1280
# The IPv4 pods' default gateway (docs/design.md §4b), answered by proxy ARP on each pod's veth.
POD_GATEWAY4 = "169.254.1.1"
POD_GATEWAY6 = "fe80::1"
IFF_MULTICAST = 0x1000
IFA_F_NODAD = 0x02
