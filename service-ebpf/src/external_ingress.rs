//! `service_external_ingress`, on the ingress of the node's external
//! interfaces (`--external-interfaces`): traffic from outside the node.
//! New flows match NodePort, LoadBalancer-ingress and externalIP frontends
//! (`SCOPE_EXTERNAL`); a backend on another node also gets SNAT to this
//! node's address on the interface so the reply returns here. Replies that
//! come back over the uplink (from SNATed flows, and from backends on other
//! nodes serving a local pod's ClusterIP flow) are reverse-translated.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{ingress, nat::Side};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_external_ingress(ctx: TcContext) -> i32 {
    ingress::run(&ctx, Side::External)
}
