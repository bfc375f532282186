//! The rulesets kube-proxy writes for ClusterIP Services, as text: the
//! baselines of `cargo xtask bench`, loaded with `iptables-restore` and
//! `nft -f` into the benchmark's node namespace.
//!
//! - [`iptables_restore`] follows kube-proxy's iptables mode
//!   (pkg/proxy/iptables/proxier.go): `KUBE-SERVICES` jumps per ClusterIP
//!   to a `KUBE-SVC-*` chain, which picks an endpoint with `-m statistic
//!   --mode random --probability 1/(n-i)` and jumps to its `KUBE-SEP-*`
//!   chain (hairpin mark, then DNAT); `KUBE-POSTROUTING` masquerades marked
//!   packets.
//! - [`nftables`] follows kube-proxy's nftables mode
//!   (pkg/proxy/nftables/proxier.go): one `ip kube-proxy` table, a
//!   `service-ips` verdict map keyed by address . protocol . port, one
//!   chain per service port picking an endpoint with `numgen random mod N`,
//!   one chain per endpoint (hairpin mark, then `dnat to`).
//!
//! Both rulesets are written for the family of the Services' ClusterIPs,
//! the way kube-proxy runs one proxier per family: for IPv6 the iptables
//! text is `ip6tables-restore` input (`/128` host matches, `[addr]:port`
//! DNAT targets) and the nftables one an `ip6 kube-proxy` table
//! (`ipv6_addr` map keys, `ip6 saddr`/`ip6 daddr`). The caller loads it with
//! the family's tool ([`iptables_restore_tool`]).
//!
//! Chain names have kube-proxy's shape: the iptables ones carry 16
//! characters of base32(SHA-256(`namespace/name:port` + protocol)) as
//! kube-proxy computes them; the nftables ones 8 characters of the same
//! hash and the readable `namespace/name/protocol/port` part, an IPv6
//! endpoint's colons written as dots as kube-proxy does (unquoted, as
//! knftables writes them: nft's identifiers may hold `/`, `.`, `-`; nft
//! 1.0.6 rejects a double-quoted chain name with a syntax error). Services
//! without endpoints are left out (kube-proxy only adds REJECT rules in the
//! filter table for them, which the benchmark does not exercise).
//!
//! Left out of both rulesets, as the benchmark does not exercise them: the
//! filter table chains, NodePorts (only the `KUBE-NODEPORTS` jump and an
//! empty chain remain in iptables mode), external IPs, load balancers, the
//! masquerade-all / cluster-CIDR marking of the service chains, and
//! session affinity.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use crate::netns::Family;

/// One ClusterIP Service port.
#[derive(Clone, Debug)]
pub struct RuleService {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// Of the ClusterIP's family.
    pub endpoints: Vec<(IpAddr, u16)>,
}

impl RuleService {
    fn port_name_full(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// The family of `addr`.
const fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The family of `services`' ClusterIPs (IPv4 when there are none).
///
/// # Panics
/// When the Services mix families: kube-proxy keeps one ruleset per family,
/// and so must the caller.
#[must_use]
pub fn family(services: &[RuleService]) -> Family {
    let family = services.first().map_or(Family::V4, |s| family_of(s.cluster_ip));
    assert!(
        services
            .iter()
            .all(|s| family_of(s.cluster_ip) == family && s.endpoints.iter().all(|e| family_of(e.0) == family)),
        "one ruleset holds one address family"
    );
    family
}

/// The tool that loads [`iptables_restore`]'s text in `family`.
#[must_use]
pub const fn iptables_restore_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

/// nftables' name of `family` (the table's family, the address matches'
/// prefix) and its address type.
const fn nft_family(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("ip", "ipv4_addr"),
        Family::V6 => ("ip6", "ipv6_addr"),
    }
}

/// SHA-256 (FIPS 180-4), for kube-proxy's chain names. The standard's
/// variable names, one round per loop iteration.
#[expect(clippy::many_single_char_names, clippy::too_many_lines, reason = "FIPS 180-4's own notation")]
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a_2f98,
        0x7137_4491,
        0xb5c0_fbcf,
        0xe9b5_dba5,
        0x3956_c25b,
        0x59f1_11f1,
        0x923f_82a4,
        0xab1c_5ed5,
        0xd807_aa98,
        0x1283_5b01,
        0x2431_85be,
        0x550c_7dc3,
        0x72be_5d74,
        0x80de_b1fe,
        0x9bdc_06a7,
        0xc19b_f174,
        0xe49b_69c1,
        0xefbe_4786,
        0x0fc1_9dc6,
        0x240c_a1cc,
        0x2de9_2c6f,
        0x4a74_84aa,
        0x5cb0_a9dc,
        0x76f9_88da,
        0x983e_5152,
        0xa831_c66d,
        0xb003_27c8,
        0xbf59_7fc7,
        0xc6e0_0bf3,
        0xd5a7_9147,
        0x06ca_6351,
        0x1429_2967,
        0x27b7_0a85,
        0x2e1b_2138,
        0x4d2c_6dfc,
        0x5338_0d13,
        0x650a_7354,
        0x766a_0abb,
        0x81c2_c92e,
        0x9272_2c85,
        0xa2bf_e8a1,
        0xa81a_664b,
        0xc24b_8b70,
        0xc76c_51a3,
        0xd192_e819,
        0xd699_0624,
        0xf40e_3585,
        0x106a_a070,
        0x19a4_c116,
        0x1e37_6c08,
        0x2748_774c,
        0x34b0_bcb5,
        0x391c_0cb3,
        0x4ed8_aa4a,
        0x5b9c_ca4f,
        0x682e_6ff3,
        0x748f_82ee,
        0x78a5_636f,
        0x84c8_7814,
        0x8cc7_0208,
        0x90be_fffa,
        0xa450_6ceb,
        0xbef9_a3f7,
        0xc671_78f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 (upper case, no padding needed for the prefix).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in data {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// kube-proxy's hash part of a chain name.
fn hash(text: &str, len: usize) -> String {
    base32(&sha256(text.as_bytes()))[..len].to_owned()
}

/// `KUBE-SVC-…` of a Service port (kube-proxy: servicePortChainName).
#[must_use]
pub fn svc_chain(s: &RuleService) -> String {
    format!("KUBE-SVC-{}", hash(&format!("{}{}", s.port_name_full(), s.protocol), 16))
}

/// `KUBE-SEP-…` of an endpoint (kube-proxy: servicePortEndpointChainName).
/// The endpoint part is Go's `net.JoinHostPort`: `[addr]:port` for IPv6.
#[must_use]
pub fn sep_chain(s: &RuleService, ep: (IpAddr, u16)) -> String {
    format!("KUBE-SEP-{}", hash(&format!("{}{}{}", s.port_name_full(), s.protocol, SocketAddr::from(ep)), 16))
}

/// kube-proxy's iptables-mode `nat` table for `services`, as
/// `iptables-restore` (IPv4) or `ip6tables-restore` (IPv6) input.
///
/// # Panics
/// When the Services mix families ([`family`]).
#[must_use]
pub fn iptables_restore(services: &[RuleService]) -> String {
    let host = family(services).host_prefix();
    let live: Vec<&RuleService> = services.iter().filter(|s| !s.endpoints.is_empty()).collect();
    let mut out = String::from("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(out, ":{builtin} ACCEPT [0:0]");
    }
    for chain in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for s in &live {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
        for ep in &s.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ep));
        }
    }
    out.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    out.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for s in &live {
        let p = s.protocol;
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/{host} --dport {} -j {}",
            s.port_name_full(),
            s.cluster_ip,
            s.port,
            svc_chain(s)
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for s in &live {
        let svc = svc_chain(s);
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let comment = format!("-m comment --comment \"{} -> {}\"", s.port_name_full(), SocketAddr::from(*ep));
            if i + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "endpoint counts")]
                let probability = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    out,
                    "-A {svc} {comment} -m statistic --mode random --probability {probability:.10} -j {}",
                    sep_chain(s, *ep)
                );
            } else {
                let _ = writeln!(out, "-A {svc} {comment} -j {}", sep_chain(s, *ep));
            }
        }
        for ep in &s.endpoints {
            let sep = sep_chain(s, *ep);
            let p = s.protocol;
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{}\" -s {}/{host} -j KUBE-MARK-MASQ",
                s.port_name_full(),
                ep.0
            );
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{}\" -m {p} -p {p} -j DNAT --to-destination {}",
                s.port_name_full(),
                SocketAddr::from(*ep)
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The readable part of kube-proxy's nftables chain names.
fn nft_base(s: &RuleService) -> String {
    format!("{}/{}/{}/{}", s.namespace, s.name, s.protocol, s.port_name)
}

/// `service-XXXXXXXX-ns/name/proto/port`.
#[must_use]
pub fn nft_service_chain(s: &RuleService) -> String {
    let base = nft_base(s);
    format!("service-{}-{base}", hash(&base, 8))
}

/// `endpoint-XXXXXXXX-ns/name/proto/port__ip/port`, an IPv6 address's
/// colons written as dots (nft chain names may not hold `:`).
#[must_use]
pub fn nft_endpoint_chain(s: &RuleService, ep: (IpAddr, u16)) -> String {
    let ip = ep.0.to_string().replace(':', ".");
    let base = format!("{}__{ip}/{}", nft_base(s), ep.1);
    format!("endpoint-{}-{base}", hash(&base, 8))
}

/// kube-proxy's nftables-mode table for `services`, as `nft -f` input:
/// `ip kube-proxy` for IPv4 Services, `ip6 kube-proxy` for IPv6 ones.
///
/// # Panics
/// When the Services mix families ([`family`]).
#[must_use]
pub fn nftables(services: &[RuleService]) -> String {
    let (ipx, addr_type) = nft_family(family(services));
    let live: Vec<&RuleService> = services.iter().filter(|s| !s.endpoints.is_empty()).collect();
    let mut out = format!("table {ipx} kube-proxy {{\n");
    out.push_str("\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}\n");
    out.push_str("\tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n\t\tmeta mark set meta mark ^ 0x4000\n\t\tmasquerade fully-random\n\t}\n");
    for s in &live {
        let n = s.endpoints.len();
        let _ = writeln!(out, "\tchain {} {{", nft_service_chain(s));
        let targets: Vec<String> = s
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(s, *ep)))
            .collect();
        let _ = writeln!(out, "\t\tnumgen random mod {n} vmap {{ {} }}", targets.join(", "));
        out.push_str("\t}\n");
        for ep in &s.endpoints {
            let _ = writeln!(out, "\tchain {} {{", nft_endpoint_chain(s, *ep));
            let _ = writeln!(out, "\t\t{ipx} saddr {} jump mark-for-masquerade", ep.0);
            let _ = writeln!(out, "\t\tmeta l4proto {} dnat to {}", s.protocol, SocketAddr::from(*ep));
            out.push_str("\t}\n");
        }
    }
    let _ = writeln!(out, "\tmap service-ips {{\n\t\ttype {addr_type} . inet_proto . inet_service : verdict");
    if !live.is_empty() {
        let elements: Vec<String> = live
            .iter()
            .map(|s| format!("{} . {} . {} : goto {}", s.cluster_ip, s.protocol, s.port, nft_service_chain(s)))
            .collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(",\n\t\t\t"));
    }
    out.push_str("\t}\n");
    let _ = writeln!(out, "\tchain services {{\n\t\t{ipx} daddr . meta l4proto . th dport vmap @service-ips\n\t}}");
    out.push_str("\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n");
    // `dstnat` is -100; nft before 1.0.7 takes the keyword only on the
    // prerouting hook.
    out.push_str(
        "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n",
    );
    out.push_str("\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}\n");
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn svc(name: &str, endpoints: usize) -> RuleService {
        RuleService {
            namespace: "ns1".into(),
            name: name.into(),
            port_name: "p80".into(),
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41).into(),
            port: 80,
            protocol: "tcp",
            endpoints: (0..endpoints)
                .map(|i| (Ipv4Addr::new(10, 180, 0, u8::try_from(i + 1).unwrap_or(0)).into(), 80))
                .collect(),
        }
    }

    /// `svc` in IPv6, with the addresses of kube-proxy's IPv6 test cases
    /// (ClusterIP fd00:172:30::41, endpoints fd00:10:180::1, ::2, …).
    fn svc6(name: &str, endpoints: usize) -> RuleService {
        RuleService {
            cluster_ip: "fd00:172:30::41".parse::<Ipv6Addr>().unwrap().into(),
            endpoints: (0..endpoints)
                .map(|i| (Ipv6Addr::new(0xfd00, 0x10, 0x180, 0, 0, 0, 0, u16::try_from(i + 1).unwrap_or(0)).into(), 80))
                .collect(),
            ..svc(name, 0)
        }
    }

    #[test]
    fn sha256_and_base32_match_known_values() {
        // FIPS 180-4 example "abc".
        let h = sha256(b"abc");
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
        // RFC 4648 test vector.
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        // The names kube-proxy's own unit tests expect (proxier_test.go:
        // ns1/svc1:p80 tcp, endpoint 10.180.0.1:80).
        let s = svc("svc1", 1);
        assert_eq!(svc_chain(&s), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(sep_chain(&s, s.endpoints[0]), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert_eq!(nft_service_chain(&s), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(nft_endpoint_chain(&s, s.endpoints[0]), "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80");
    }

    #[test]
    fn iptables_has_one_svc_chain_per_port_and_one_sep_per_endpoint() {
        let rules = iptables_restore(&[svc("a", 3), svc("b", 2), svc("empty", 0)]);
        assert_eq!(rules.lines().filter(|l| l.starts_with(":KUBE-SVC-")).count(), 2);
        assert_eq!(rules.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(), 5);
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 5);
        assert!(rules.starts_with("*nat\n"));
        assert!(rules.trim_end().ends_with("COMMIT"));
        // The nodeports jump is the last rule of KUBE-SERVICES.
        let last = rules.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES ")).unwrap_or_default();
        assert!(last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
    }

    #[test]
    fn iptables_probabilities_follow_kube_proxy() {
        let s = svc("a", 3);
        let rules = iptables_restore(std::slice::from_ref(&s));
        let prefix = format!("-A {} ", svc_chain(&s));
        let lines: Vec<&str> = rules.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with(&format!("--probability 0.3333333333 -j {}", sep_chain(&s, s.endpoints[0]))));
        assert!(lines[1].ends_with(&format!("--probability 0.5000000000 -j {}", sep_chain(&s, s.endpoints[1]))));
        assert!(!lines[2].contains("statistic"));
        assert!(lines[2].ends_with(&format!("\" -j {}", sep_chain(&s, s.endpoints[2]))));
    }

    #[test]
    fn iptables_protocol_module_matches_the_protocol() {
        let mut s = svc("dns", 1);
        s.protocol = "udp";
        let rules = iptables_restore(&[s]);
        assert!(rules.contains("-m udp -p udp -d 172.30.0.41/32 --dport 80 -j KUBE-SVC-"));
        assert!(rules.contains("-m udp -p udp -j DNAT --to-destination 10.180.0.1:80"));
        assert!(!rules.contains("-p tcp"));
    }

    #[test]
    fn nftables_has_the_service_ips_map_and_numgen_chains() {
        let services = [svc("a", 3), svc("b", 2), svc("empty", 0)];
        let rules = nftables(&services);
        for s in &services[..2] {
            let element = format!("172.30.0.41 . tcp . 80 : goto {}", nft_service_chain(s));
            assert!(rules.contains(&element), "{element}");
            assert!(rules.contains(&format!("\tchain {} {{", nft_service_chain(s))));
        }
        assert!(!rules.contains(&nft_service_chain(&services[2])));
        assert_eq!(rules.matches("elements = {").count(), 1);
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("numgen random mod 2 vmap"));
        assert_eq!(rules.matches("dnat to").count(), 5);
        assert_eq!(rules.matches("\tchain endpoint-").count(), 5);
        assert!(
            rules.contains("ip saddr 10.180.0.1 jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to 10.180.0.1:80")
        );
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        let (a, b) = (svc("a", 2), svc("b", 2));
        assert_eq!(svc_chain(&a), svc_chain(&a.clone()));
        assert_eq!(nft_service_chain(&a), nft_service_chain(&a.clone()));
        assert_ne!(svc_chain(&a), svc_chain(&b));
        assert_ne!(nft_service_chain(&a), nft_service_chain(&b));
        assert_ne!(sep_chain(&a, a.endpoints[0]), sep_chain(&b, b.endpoints[0]));
        assert_ne!(sep_chain(&a, a.endpoints[0]), sep_chain(&a, a.endpoints[1]));
        assert_ne!(nft_endpoint_chain(&a, a.endpoints[0]), nft_endpoint_chain(&b, b.endpoints[0]));
        let mut udp = a.clone();
        udp.protocol = "udp";
        assert_ne!(svc_chain(&a), svc_chain(&udp));
        assert_ne!(nft_service_chain(&a), nft_service_chain(&udp));
        for name in [svc_chain(&a), sep_chain(&a, a.endpoints[0])] {
            assert_eq!(name.len(), "KUBE-SVC-".len() + 16);
        }
    }

    #[test]
    fn ipv6_endpoint_chain_names_are_kube_proxys() {
        // kube-proxy's nftables proxier_test.go (ipv6 dump of TestNodePorts):
        // ns1/svc1:p80 tcp, endpoints fd00:10:180::1 and fd00:10:180::2:1.
        let mut s = svc6("svc1", 1);
        assert_eq!(nft_service_chain(&s), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(nft_endpoint_chain(&s, s.endpoints[0]), "endpoint-ZVRFLKHO-ns1/svc1/tcp/p80__fd00.10.180..1/80");
        s.endpoints = vec![("fd00:10:180::2:1".parse::<Ipv6Addr>().unwrap().into(), 80)];
        assert_eq!(nft_endpoint_chain(&s, s.endpoints[0]), "endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80");
        // The KUBE-SEP hash covers Go's JoinHostPort form `[addr]:port`:
        // the IPv6 chain differs from one hashed over `addr:port`.
        let ep = s.endpoints[0];
        let unbracketed = format!("KUBE-SEP-{}", hash(&format!("ns1/svc1:p80tcp{}:{}", ep.0, ep.1), 16));
        let bracketed = format!("KUBE-SEP-{}", hash("ns1/svc1:p80tcp[fd00:10:180::2:1]:80", 16));
        assert_eq!(sep_chain(&s, ep), bracketed);
        assert_ne!(sep_chain(&s, ep), unbracketed);
    }

    #[test]
    fn ipv6_iptables_ruleset_is_ip6tables_restore_input() {
        let s = svc6("a", 2);
        let rules = iptables_restore(std::slice::from_ref(&s));
        assert_eq!(iptables_restore_tool(family(std::slice::from_ref(&s))), "ip6tables-restore");
        assert!(rules.contains("-m tcp -p tcp -d fd00:172:30::41/128 --dport 80 -j KUBE-SVC-"), "{rules}");
        assert!(rules.contains("-s fd00:10:180::1/128 -j KUBE-MARK-MASQ"));
        assert!(rules.contains("-m tcp -p tcp -j DNAT --to-destination [fd00:10:180::2]:80"));
        assert!(!rules.contains("/32"));
    }

    #[test]
    fn ipv6_nftables_ruleset_is_an_ip6_table() {
        let rules = nftables(&[svc6("a", 2), svc6("empty", 0)]);
        assert!(rules.starts_with("table ip6 kube-proxy {\n"));
        assert!(rules.contains("type ipv6_addr . inet_proto . inet_service : verdict"));
        assert!(rules.contains("ip6 daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(rules.contains("fd00:172:30::41 . tcp . 80 : goto service-"));
        assert!(rules.contains(
            "ip6 saddr fd00:10:180::1 jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to [fd00:10:180::1]:80"
        ));
        assert!(!rules.contains("ip saddr") && !rules.contains("ipv4_addr"));
    }

    #[test]
    #[should_panic(expected = "one ruleset holds one address family")]
    fn a_ruleset_never_mixes_families() {
        let _ = nftables(&[svc("a", 1), svc6("b", 1)]);
    }
}
