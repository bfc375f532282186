//! Tier 2 (root): an agent started over pins of another layout or size.
//!
//! Pins outlive the agent, so an upgrade meets maps an older agent made:
//! here faked with `bpftool map create` in the layout of the agent before
//! `services` got 32-bit slots, `conntrack` entries grew from 40 to 56
//! bytes and `source_ranges` got per-protocol keys. On the old code the
//! loader reused such pins as they were and the verifier rejected the new
//! programs (a crash loop); `--map-size-*` was ignored for an existing pin.

use std::{os::fd::AsFd as _, path::Path, process::Command};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapInfo},
    programs::SchedClassifier,
};
use service_agent::{
    maps::{
        self, MapSizes, PinnedMaps,
        layout::{self, Change, Migration},
    },
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{AffinityKey, AffinityValue, CtKey, CtValue, addr_v4, capacity, map_names};
use service_tests::{fixture::ManifestDir, netns::BpffsMount, packet};

const MANIFESTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.11]
";

fn bpftool_create(pin: &Path, args: &str) {
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "create"]).arg(pin).args(args.split_whitespace());
    let out = cmd.output().expect("bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool map create {args}: {}", String::from_utf8_lossy(&out.stderr));
}

fn hash_map<K: aya::Pod, V: aya::Pod>(pin: &Path) -> HashMap<MapData, K, V> {
    HashMap::try_from(Map::HashMap(MapData::from_pin(pin).expect("pin"))).expect("a hash map")
}

fn migration<'a>(migrations: &'a [Migration], name: &str) -> &'a Migration {
    migrations.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not migrated: {migrations:?}"))
}

/// Loads both programs: the verifier checks them against the maps they got.
fn programs_accept_the_maps(ebpf: &mut Ebpf) {
    for name in [service_common::PROG_POD_INGRESS, service_common::PROG_EXTERNAL_INGRESS] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().expect("classifier");
        prog.load().unwrap_or_else(|e| panic!("the verifier rejects {name} over the migrated maps: {e}"));
    }
}

fn ct_key(i: u8) -> CtKey {
    CtKey {
        saddr: addr_v4([10, 244, 1, i]),
        daddr: addr_v4([10, 96, 0, 10]),
        sport: [0x9c, i],
        dport: [0, 80],
        proto: service_common::PROTO_TCP,
        family: service_common::FAMILY_IPV4,
        _pad: [0; 2],
    }
}

fn ct_value() -> CtValue {
    CtValue {
        nat_addr: addr_v4([10, 244, 1, 11]),
        snat_addr: [0; 16],
        nat_port: [0x1f, 0x90],
        snat_port: [0; 2],
        flags: service_common::ct_flags::DNAT,
        state: 0,
        _pad: [0; 2],
        backend_id: 1,
        rev_nat_id: 1,
        last_seen_ns: 1,
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pins_of_an_older_layout_are_replaced_and_same_layout_rows_kept() {
    let bpffs = BpffsMount::new().expect("bpffs");
    let root = bpffs.path().join("node");
    std::fs::create_dir_all(&root).expect("mkdir");
    // Layouts before this version: 28-byte service keys (slot rows), 40-byte
    // conntrack values, 20-byte source-range keys (+4 prefix length).
    bpftool_create(&root.join(map_names::SERVICES), "type hash key 28 value 24 entries 1024 name services");
    // Same layout, preallocated (before `BPF_F_NO_PREALLOC`): its rows
    // survive the new flags.
    bpftool_create(
        &root.join(map_names::BACKENDS),
        &format!("type hash key 4 value 24 entries {} name backends", capacity::BACKENDS),
    );
    let backend = service_common::BackendValue {
        addr: addr_v4([10, 244, 1, 11]),
        port: [0x1f, 0x90],
        proto: 6,
        family: service_common::FAMILY_IPV4,
        flags: 0,
        state: 0,
        _pad: [0; 2],
    };
    hash_map::<u32, service_common::BackendValue>(&root.join(map_names::BACKENDS)).insert(5, backend, 0).expect("row");
    bpftool_create(&root.join(map_names::CONNTRACK), "type lru_hash key 40 value 40 entries 1024 name conntrack");
    bpftool_create(
        &root.join(map_names::SOURCE_RANGES),
        "type lpm_trie key 24 value 1 entries 16384 name source_ranges flags 1",
    );
    // Same layout, smaller: its rows survive the resize.
    bpftool_create(&root.join(map_names::AFFINITY), "type lru_hash key 24 value 16 entries 128 name affinity");
    let sticky = AffinityKey { client: addr_v4([10, 244, 9, 9]), scope: 7, proto: 6, _pad: [0; 3] };
    let entry = AffinityValue { backend_id: 3, _pad: 0, last_used_ns: 42 };
    hash_map::<AffinityKey, AffinityValue>(&root.join(map_names::AFFINITY)).insert(sticky, entry, 0).expect("row");

    let (mut ebpf, migrations) = maps::load_migrating(&root, MapSizes::default()).expect("load over old pins");
    programs_accept_the_maps(&mut ebpf);
    for name in [map_names::SERVICES, map_names::CONNTRACK, map_names::SOURCE_RANGES] {
        assert_eq!(migration(&migrations, name).change, Change::Recreated, "{name}");
    }
    let affinity = migration(&migrations, map_names::AFFINITY);
    assert_eq!((affinity.change, affinity.rows_copied, affinity.rows_dropped), (Change::Resized, 1, 0));
    let backends = migration(&migrations, map_names::BACKENDS);
    assert_eq!((backends.change, backends.rows_copied, backends.rows_dropped), (Change::Resized, 1, 0));
    assert_eq!(backends.to.map_flags, 1, "BPF_F_NO_PREALLOC");
    // The pins now hold the new maps; nothing is left aside.
    let info = |name: &str| MapInfo::from_pin(root.join(name)).expect("info");
    assert_eq!(info(map_names::SERVICES).key_size(), 24);
    assert_eq!(info(map_names::BACKENDS).map_flags(), 1, "BPF_F_NO_PREALLOC");
    assert_eq!(
        hash_map::<u32, service_common::BackendValue>(&root.join(map_names::BACKENDS)).get(&5, 0).expect("kept"),
        backend
    );
    assert_eq!(info(map_names::CONNTRACK).value_size(), 56);
    assert_eq!(info(map_names::SOURCE_RANGES).key_size(), 28);
    assert_eq!(info(map_names::AFFINITY).max_entries(), capacity::AFFINITY);
    assert_eq!(
        hash_map::<AffinityKey, AffinityValue>(&root.join(map_names::AFFINITY)).get(&sticky, 0).expect("kept"),
        entry
    );
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("migrating-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The agent programs the new maps and translates through them.
    let manifests = ManifestDir::new();
    manifests.write("web.yaml", MANIFESTS);
    let snapshot = manifest::load_dir(manifests.path()).expect("manifests");
    let mut reconciler =
        Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
    let node = NodeContext { node_name: "node-a".into(), ..NodeContext::default() };
    assert!(reconciler.reconcile(&model::desired(&snapshot.objects, &node)).errors.is_empty());
    let prog: &SchedClassifier =
        ebpf.program(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
    let syn = packet::tcp_v4([10, 244, 1, 10].into(), 40000, [10, 96, 0, 10].into(), 80, 0x02, b"");
    let out = packet::prog_test_run(prog.fd().expect("fd").as_fd(), &syn, 1).expect("test run");
    assert_eq!(out.data_out, packet::tcp_v4([10, 244, 1, 10].into(), 40000, [10, 244, 1, 11].into(), 8080, 0x02, b""));
    drop(reconciler);
    drop(ebpf);

    // The next start finds everything in its own layout: nothing to do.
    let (_ebpf, migrations) = maps::load_migrating(&root, MapSizes::default()).expect("reload");
    assert!(migrations.is_empty(), "{migrations:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_changed_map_size_flag_takes_effect_on_restart_keeping_the_rows() {
    let bpffs = BpffsMount::new().expect("bpffs");
    let root = bpffs.path().join("node");
    let small = MapSizes { conntrack: 1024, ..MapSizes::default() };
    let (ebpf, migrations) = maps::load_migrating(&root, small).expect("first load");
    assert!(migrations.is_empty());
    let mut ct = hash_map::<CtKey, CtValue>(&root.join(map_names::CONNTRACK));
    for i in 1..=10 {
        ct.insert(ct_key(i), ct_value(), 0).expect("row");
    }
    drop((ct, ebpf));

    // The old code reused the pin: still 1024 entries, whatever the flag.
    let large = MapSizes { conntrack: 4096, ..MapSizes::default() };
    let (mut ebpf, migrations) = maps::load_migrating(&root, large).expect("restart with a larger size");
    programs_accept_the_maps(&mut ebpf);
    let m = migration(&migrations, map_names::CONNTRACK);
    assert_eq!((m.change, m.from.max_entries, m.to.max_entries, m.rows_copied), (Change::Resized, 1024, 4096, 10));
    assert_eq!(MapInfo::from_pin(root.join(map_names::CONNTRACK)).expect("info").max_entries(), 4096);
    let ct = hash_map::<CtKey, CtValue>(&root.join(map_names::CONNTRACK));
    assert!((1..=10).all(|i| ct.get(&ct_key(i), 0).is_ok()), "a flow lost in the resize");
    drop((ct, ebpf));

    // A crash right after the old pin was moved aside: the next start
    // resumes from it.
    std::fs::rename(root.join(map_names::CONNTRACK), layout::migrating_pin(&root, map_names::CONNTRACK))
        .expect("rename");
    let sizes = MapSizes { conntrack: 2048, ..MapSizes::default() };
    let (_ebpf, migrations) = maps::load_migrating(&root, sizes).expect("resume");
    assert_eq!(migration(&migrations, map_names::CONNTRACK).rows_copied, 10);
    let ct = hash_map::<CtKey, CtValue>(&root.join(map_names::CONNTRACK));
    assert!((1..=10).all(|i| ct.get(&ct_key(i), 0).is_ok()));
    assert!(!layout::migrating_pin(&root, map_names::CONNTRACK).exists());
}
