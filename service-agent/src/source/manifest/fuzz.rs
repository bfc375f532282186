//! Property tests of the manifest reader, and of the model behind it: random
//! YAML/JSON documents, mutated golden manifests, and random Services and
//! EndpointSlices written as YAML, through [`parse`] and `model::desired`:
//! no panic, no hang, every error naming its file. `FUZZ_CASES`,
//! `FUZZ_SEED` and `FUZZ_CASE` as in `model::fuzz`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use super::parse;
use crate::model::{
    NodeContext, desired,
    fuzz::{self, Plan, Rng},
};

/// Scalars and fragments that tend to break readers: wrong types, huge and
/// odd numbers, YAML specials, anchors and aliases, tags, deep nesting.
const TOKENS: [&str; 40] = [
    "0",
    "-1",
    "65536",
    "99999999999999999999999999",
    "-99999999999999999999999999",
    "1e400",
    "-.inf",
    ".nan",
    "0x1F",
    "0o17",
    "~",
    "null",
    "true",
    "\"\"",
    "''",
    "[]",
    "{}",
    "[1, [2, [3]]]",
    "{a: {b: {c: d}}}",
    "&a [x, y]",
    "*a",
    "&b {k: v}",
    "*b",
    "*undefined",
    "!!binary aGVsbG8=",
    "!!str 80",
    "!custom x",
    "|\n  block\n  text\n",
    ">-\n  folded\n",
    "\"\\u0000\\x00\\uD800\"",
    "'it''s'",
    "? complex key\n: value",
    "<<: *b",
    "---",
    "...",
    "%YAML 1.2\n---",
    "\t",
    "10.96.0.300",
    "::1",
    "é\u{200b}\u{feff}",
];

const KEYS: [&str; 25] = [
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "spec",
    "ports",
    "port",
    "targetPort",
    "nodePort",
    "protocol",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "cidrs",
    "type",
    "endpoints",
    "addresses",
    "addressType",
    "conditions",
    "items",
    "subsets",
    "status",
    "kubernetes.io/service-name",
];

fn scalar(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => (*rng.pick(&TOKENS)).to_owned(),
        1 => rng.int().to_string(),
        2 => rng.ip(),
        3 => (*rng.pick(&[
            "Service",
            "EndpointSlice",
            "Endpoints",
            "ServiceCIDR",
            "List",
            "v1",
            "discovery.k8s.io/v1",
            "networking.k8s.io/v1",
        ]))
        .to_owned(),
        4 => format!("{:?}", rng.text()),
        _ => rng
            .text()
            .replace(['\n', ':', '#', '{', '}', '[', ']', ',', '&', '*', '!', '|', '>', '\'', '"', '%', '@', '`'], ""),
    }
}

/// A random YAML value, block or flow style, `depth` levels at most.
fn yaml_value(rng: &mut Rng, depth: usize, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match if depth == 0 { 0 } else { rng.below(4) } {
        0 => {
            out.push(' ');
            out.push_str(&scalar(rng));
            out.push('\n');
        }
        1 => {
            out.push_str(" [");
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&scalar(rng).replace('\n', " "));
            }
            out.push_str("]\n");
        }
        2 => {
            out.push('\n');
            for _ in 0..=rng.below(3) {
                out.push_str(&pad);
                out.push_str("- x:");
                yaml_value(rng, depth - 1, indent + 4, out);
            }
        }
        _ => {
            out.push('\n');
            for _ in 0..=rng.below(4) {
                out.push_str(&pad);
                out.push_str(rng.pick::<&str>(&KEYS));
                out.push(':');
                yaml_value(rng, depth - 1, indent + 2, out);
            }
        }
    }
}

/// A random multi-document YAML file, shaped like manifests.
fn random_yaml(rng: &mut Rng) -> String {
    let mut out = String::new();
    for d in 0..=rng.below(3) {
        if d > 0 {
            out.push_str("---\n");
        }
        out.push_str("apiVersion: ");
        out.push_str(rng.pick::<&str>(&["v1", "discovery.k8s.io/v1", "networking.k8s.io/v1", "apps/v1"]));
        out.push_str("\nkind: ");
        out.push_str(rng.pick::<&str>(&[
            "Service",
            "EndpointSlice",
            "Endpoints",
            "ServiceCIDR",
            "List",
            "ServiceList",
        ]));
        out.push('\n');
        for _ in 0..rng.below(5) {
            out.push_str(rng.pick::<&str>(&KEYS));
            out.push(':');
            yaml_value(rng, 4, 2, &mut out);
        }
    }
    out
}

/// A random JSON text (sometimes not valid JSON).
fn random_json(rng: &mut Rng, depth: usize) -> String {
    match if depth == 0 { 0 } else { rng.below(3) } {
        0 => match rng.below(5) {
            0 => rng.int().to_string(),
            1 => format!("{:?}", rng.text()),
            2 => (*rng.pick(&["null", "true", "1e999", "-0", "18446744073709551616", "\"\\ud800\""])).to_owned(),
            3 => format!("{:?}", rng.ip()),
            _ => format!("{:?}", rng.pick(&KEYS)),
        },
        1 => format!("[{}]", (0..rng.below(4)).map(|_| random_json(rng, depth - 1)).collect::<Vec<_>>().join(",")),
        _ => format!(
            "{{{}}}",
            (0..rng.below(5))
                .map(|_| format!("{:?}:{}", rng.pick(&KEYS), random_json(rng, depth - 1)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

fn golden_manifests() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out = Vec::new();
    for case in std::fs::read_dir(&root).expect("tests/golden").filter_map(Result::ok) {
        if !case.path().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(case.path()).expect("case").filter_map(Result::ok) {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "json") {
                out.push((path.clone(), std::fs::read_to_string(&path).expect("read")));
            }
        }
    }
    out.sort();
    assert!(out.len() >= 10, "golden manifests found: {}", out.len());
    out
}

/// The byte offset of a random char boundary of `s`.
fn boundary(rng: &mut Rng, s: &str) -> usize {
    let mut at = rng.below(s.len() + 1);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// One to four mutations of `text`.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut s = text.to_owned();
    for _ in 0..=rng.below(4) {
        let at = boundary(rng, &s);
        match rng.below(8) {
            // A flipped bit (kept valid UTF-8: the reader takes text).
            0 => {
                let mut bytes = s.into_bytes();
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    bytes[i] ^= 1 << rng.below(8);
                }
                s = String::from_utf8_lossy(&bytes).into_owned();
            }
            1 => s.truncate(at),
            2 => {
                let end = boundary(rng, &s).max(at);
                s.replace_range(at..end, "");
            }
            3 => {
                let end = boundary(rng, &s).max(at);
                let piece = s[at..end].to_owned();
                s.insert_str(end, &piece);
            }
            4 => s.insert_str(at, rng.pick::<&str>(&TOKENS)),
            // A scalar value swapped for another (any type).
            5 => {
                let values: Vec<usize> = s.match_indices(": ").map(|(i, _)| i + 2).collect();
                if !values.is_empty() {
                    let start = *rng.pick(&values);
                    let end = s[start..].find(['\n', ',', '}']).map_or(s.len(), |n| start + n);
                    let with = scalar(rng).replace('\n', " ");
                    s.replace_range(start..end, &with);
                }
            }
            // Deep nesting, flow or block.
            6 => {
                let n = 1 + rng.below(300);
                let nest = if rng.one_in(2) {
                    format!("{}{}", "[".repeat(n), "]".repeat(n))
                } else {
                    (0..n.min(60)).fold(String::new(), |mut out, i| {
                        let _ = write!(out, "\n{}k{i}:", " ".repeat(i + 1));
                        out
                    })
                };
                s.insert_str(at, &nest);
            }
            // A document separator in the middle.
            _ => s.insert_str(at, "\n---\n"),
        }
    }
    s
}

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".into(),
        zone: Some("zone-a".into()),
        nodeport_addresses: vec![std::net::IpAddr::from([10, 0, 0, 11])],
        ..NodeContext::default()
    }
}

/// Parses `text` as `file`, runs the model on what loads, checks both.
fn check(file: &Path, text: &str) -> super::Snapshot {
    let snapshot = parse(file, text);
    for e in &snapshot.errors {
        assert_eq!(e.file, file, "{e}");
    }
    let d = desired(&snapshot.objects, &node());
    fuzz::check_invariants(&snapshot.objects, &d);
    snapshot
}

#[test]
fn random_and_mutated_manifests_never_panic() {
    let plan = Plan::from_env(fuzz::DEFAULT_CASES);
    let golden = golden_manifests();
    let (mut loaded, mut errors) = (0u64, 0u64);
    plan.run("manifest::fuzz", |i, rng| {
        let (file, text) = match i % 10 {
            0..=2 => (PathBuf::from("random.yaml"), random_yaml(rng)),
            3 => (PathBuf::from("random.json"), random_json(rng, 5)),
            4..=7 => {
                let (path, text) = rng.pick(&golden);
                (path.clone(), mutate(rng, text))
            }
            // Random objects as YAML, as a user could write them.
            _ => {
                let objects = fuzz::objects(rng);
                let mut text = String::new();
                for svc in objects.services.values() {
                    text.push_str("---\napiVersion: v1\nkind: Service\n");
                    text.push_str(&serde_norway::to_string(svc.as_ref()).expect("to yaml"));
                }
                for slice in objects.endpoint_slices.values() {
                    text.push_str("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n");
                    text.push_str(&serde_norway::to_string(slice.as_ref()).expect("to yaml"));
                }
                for cidr in objects.service_cidrs.values() {
                    text.push_str("---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\n");
                    text.push_str(&serde_norway::to_string(cidr).expect("to yaml"));
                }
                let snapshot = check(Path::new("objects.yaml"), &text);
                // What serialized reads back the same.
                assert_eq!(snapshot.objects.services, objects.services, "{text}");
                assert_eq!(snapshot.objects.endpoint_slices, objects.endpoint_slices, "{text}");
                assert_eq!(snapshot.objects.service_cidrs, objects.service_cidrs, "{text}");
                (PathBuf::from("objects.yaml"), mutate(rng, &text))
            }
        };
        let snapshot = check(&file, &text);
        loaded += (snapshot.objects.services.len() + snapshot.objects.endpoint_slices.len()) as u64;
        errors += snapshot.errors.len() as u64;
    });
    eprintln!(
        "manifest::fuzz: {} cases (FUZZ_SEED={}): {loaded} objects loaded, {errors} errors",
        plan.cases, plan.seed
    );
    assert!(plan.only.is_some() || loaded > 0 && errors > 0);
}
