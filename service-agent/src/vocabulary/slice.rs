//! An EndpointSlice as the agent keeps it ([`Slice`]): the fields the
//! model and the metrics read, each endpoint in 48 bytes where
//! k8s-openapi's `Endpoint` takes 352 before its strings (a cluster of
//! 10,000 Services of 10 endpoints held 40 MB of them). The manifest source converts what it parsed (`From`); the
//! Kubernetes source deserializes the API server's objects straight into
//! it, so no full object is kept.

use std::sync::Arc;

use super::{LABEL_SERVICE_NAME, TRIGGER_TIME_ANNOTATION};
use k8s_openapi::{
    Metadata, Resource,
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// An EndpointSlice (`discovery.k8s.io/v1`): its metadata, `addressType`,
/// `ports` and `endpoints` as the API has them, each endpoint slimmed
/// ([`SliceEndpoint`]); of its labels and annotations only the two the
/// agent reads, taken out of the metadata (a map of one label costs a
/// B-tree node of eleven: half a kilobyte per slice).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(from = "WireSlice", into = "WireSlice")]
pub struct Slice {
    /// Without `labels`, `annotations` and `managedFields`.
    pub metadata: ObjectMeta,
    /// The `kubernetes.io/service-name` label: the Service it belongs to
    /// (shared: the model's references to that Service reuse it).
    pub service_name: Option<Arc<str>>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation
    /// (kube-proxy's network programming latency starts there).
    pub trigger_time: Option<String>,
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Option<Vec<SliceEndpoint>>,
}

/// A slice as the API sends it (the fields the agent reads).
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct WireSlice {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<EndpointPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoints: Option<Vec<SliceEndpoint>>,
}

impl From<WireSlice> for Slice {
    fn from(mut s: WireSlice) -> Self {
        let service_name = s.metadata.labels.take().and_then(|mut l| l.remove(LABEL_SERVICE_NAME)).map(Arc::from);
        let trigger_time = s.metadata.annotations.take().and_then(|mut a| a.remove(TRIGGER_TIME_ANNOTATION));
        s.metadata.managed_fields = None;
        Self {
            metadata: s.metadata,
            service_name,
            trigger_time,
            address_type: s.address_type,
            ports: s.ports,
            endpoints: s.endpoints,
        }
    }
}

impl From<Slice> for WireSlice {
    fn from(s: Slice) -> Self {
        let mut metadata = s.metadata;
        if let Some(name) = s.service_name {
            metadata.labels.get_or_insert_default().insert(LABEL_SERVICE_NAME.to_owned(), name.to_string());
        }
        if let Some(at) = s.trigger_time {
            metadata.annotations.get_or_insert_default().insert(TRIGGER_TIME_ANNOTATION.to_owned(), at);
        }
        Self { metadata, address_type: s.address_type, ports: s.ports, endpoints: s.endpoints }
    }
}

/// One endpoint of a [`Slice`]: what selecting backends reads.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(from = "WireEndpoint", into = "WireEndpoint")]
pub struct SliceEndpoint {
    /// `addresses[0]`: the addresses of an endpoint are fungible, and
    /// Kubernetes and kube-proxy use the first (`None`: the list is empty).
    pub address: Option<Box<str>>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<Box<str>>,
    /// `hints` (boxed: most endpoints have none).
    pub hints: Option<Box<EndpointHints>>,
}

/// The fields of an endpoint as the API sends them (the others are
/// skipped), turned into a [`SliceEndpoint`] as each is read.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conditions: Option<EndpointConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hints: Option<EndpointHints>,
}

impl From<SliceEndpoint> for WireEndpoint {
    fn from(e: SliceEndpoint) -> Self {
        Self {
            addresses: e.address.map(String::from).into_iter().collect(),
            conditions: e.conditions,
            node_name: e.node_name.map(String::from),
            hints: e.hints.map(|h| *h),
        }
    }
}

impl From<WireEndpoint> for SliceEndpoint {
    fn from(e: WireEndpoint) -> Self {
        Self {
            address: e.addresses.into_iter().next().map(String::into_boxed_str),
            conditions: e.conditions,
            node_name: e.node_name.map(String::into_boxed_str),
            hints: e.hints.map(Box::new),
        }
    }
}

impl From<Endpoint> for SliceEndpoint {
    fn from(e: Endpoint) -> Self {
        WireEndpoint { addresses: e.addresses, conditions: e.conditions, node_name: e.node_name, hints: e.hints }.into()
    }
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        WireSlice {
            metadata: s.metadata,
            address_type: s.address_type,
            ports: s.ports,
            // Into a new vector: a plain `collect` would reuse the full
            // endpoints' allocation in place, keeping all its bytes.
            endpoints: s.endpoints.map(|e| {
                let mut slim = Vec::with_capacity(e.len());
                slim.extend(e.into_iter().map(SliceEndpoint::from));
                slim
            }),
        }
        .into()
    }
}

/// The API type's identity, so the Kubernetes source watches
/// `endpointslices` into this type directly (kube's `Resource` follows).
impl Resource for Slice {
    const API_VERSION: &'static str = EndpointSlice::API_VERSION;
    const GROUP: &'static str = EndpointSlice::GROUP;
    const KIND: &'static str = EndpointSlice::KIND;
    const VERSION: &'static str = EndpointSlice::VERSION;
    const URL_PATH_SEGMENT: &'static str = EndpointSlice::URL_PATH_SEGMENT;
    type Scope = <EndpointSlice as Resource>::Scope;
}

impl Metadata for Slice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLICE: &str = r#"{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web", "team": "shop"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-30T10:00:00Z"},
                     "managedFields": [{"manager": "kube-controller-manager"}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.0.1", "10.0.0.9"], "conditions": {"ready": true}, "nodeName": "node-a",
             "targetRef": {"kind": "Pod", "name": "web-1"}, "zone": "z1",
             "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]}},
            {"addresses": [], "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]
    }"#;

    #[test]
    fn deserializing_keeps_what_the_model_reads_and_equals_the_conversion_of_the_full_object() {
        let slim: Slice = serde_json::from_str(SLICE).expect("slim");
        let full: EndpointSlice = serde_json::from_str(SLICE).expect("full");
        assert_eq!(slim, Slice::from(full), "both ways in agree");
        let eps = slim.endpoints.as_deref().expect("endpoints");
        assert_eq!(eps[0].address.as_deref(), Some("10.0.0.1"), "the first address");
        assert_eq!(eps[0].node_name.as_deref(), Some("node-a"));
        let hints = eps[0].hints.as_deref().expect("hints");
        assert_eq!(hints.for_zones.as_ref().map(|z| z[0].name.as_str()), Some("z1"));
        assert_eq!(hints.for_nodes.as_ref().map(|n| n[0].name.as_str()), Some("node-a"));
        assert_eq!(eps[1].address, None, "no address");
        assert_eq!(eps[1].conditions.as_ref().and_then(|c| c.terminating), Some(true));
        assert_eq!(slim.ports.as_ref().map(|p| p[0].port), Some(Some(8080)));
        assert_eq!(slim.service_name.as_deref(), Some("web"), "the service-name label");
        assert_eq!(slim.metadata.labels, None, "no other label kept");
        assert_eq!(slim.metadata.managed_fields, None);
        assert_eq!(slim.trigger_time.as_deref(), Some("2026-11-30T10:00:00Z"));
        assert_eq!(slim.metadata.annotations, None);
        // Written back out, it reads the same.
        let again: Slice = serde_json::from_value(serde_json::to_value(&slim).expect("out")).expect("in");
        assert_eq!(again, slim);
    }

    #[test]
    fn an_endpoint_takes_a_seventh_of_the_full_one() {
        assert_eq!((size_of::<SliceEndpoint>(), size_of::<Endpoint>()), (48, 352));
    }
}
