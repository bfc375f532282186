//! `service_pod_ingress`, on the ingress of the host side of pod
//! interfaces: every packet a pod sends passes here before the node routes
//! it. New flows match ClusterIP frontends (`SCOPE_INTERNAL`); replies of
//! local backends are reverse-translated; a pod that reaches its own
//! Service and lands on itself is SNATed to the hairpin address so the
//! reply comes back through the node.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{
    flow::{ETH_HLEN, NO_L2},
    ingress,
    nat::Side,
};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_pod_ingress(ctx: TcContext) -> i32 {
    ingress::run::<ETH_HLEN>(&ctx, Side::Pod)
}

/// The same program for L3 pod interfaces (WireGuard, IPIP, tun: no
/// Ethernet header, the packet starts at the IP header).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_pod_ingress_l3(ctx: TcContext) -> i32 {
    ingress::run::<NO_L2>(&ctx, Side::Pod)
}
