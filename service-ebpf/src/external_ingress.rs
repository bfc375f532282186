//! `service_external_ingress`, on the ingress of the node's external
//! interfaces (`--external-interfaces`) and of its overlay and tunnel
//! devices (`--tunnel-interfaces`): traffic from outside the node.
//! New flows match NodePort, LoadBalancer-ingress and externalIP frontends
//! (`SCOPE_EXTERNAL`); a backend on another node also gets SNAT to this
//! node's address on the interface so the reply returns here. Replies that
//! come back over the uplink (from SNATed flows, and from backends on other
//! nodes serving a local pod's ClusterIP flow) are reverse-translated.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{
    flow::{ETH_HLEN, NO_L2},
    ingress,
    nat::Side,
};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_external_ingress(ctx: TcContext) -> i32 {
    ingress::run::<ETH_HLEN>(&ctx, Side::External)
}

/// The same program for L3 external and tunnel interfaces (WireGuard,
/// IPIP, tun: no Ethernet header, the packet starts at the IP header).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_external_ingress_l3(ctx: TcContext) -> i32 {
    ingress::run::<NO_L2>(&ctx, Side::External)
}
