//! The incremental model ([`IncrementalModel`]) against the full rebuild
//! ([`build_model`]): after every step of a random sequence of changes to the
//! files of a manifest directory (Services, EndpointSlices and Nodes added,
//! modified, removed, duplicated, invalid; files that fail to read), the
//! model kept up to date equals `build_model` of all files merged as `run`
//! merges them: the same frontends and table, skipped list, notes, errors
//! in the same order, health checks and nodes.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use clustergate_control::incremental::IncrementalModel;
use clustergate_control::manifest::{parse_manifest_cached, DocumentCache};
use clustergate_control::manifest_dir::merge_files;
use clustergate_control::model::{build_model, Model, ModelOptions};
use clustergate_control::{parse_manifest, Objects};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{json, Value};

const FILES: [&str; 3] = ["a.yaml", "b.yaml", "c.yaml"];

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &[T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items.to_vec())
}

fn opt<T: Clone + std::fmt::Debug + 'static>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::weighted(0.5, s)
}

/// Names from a small pool, so that objects collide, duplicate and join.
fn name() -> impl Strategy<Value = (String, String)> {
    (pick(&["a", "b"]), pick(&["s0", "s1", "s2", "s3"]))
        .prop_map(|(ns, n)| (ns.to_owned(), n.to_owned()))
}

fn service() -> impl Strategy<Value = Value> {
    let ip = || {
        pick(&[
            "198.18.0.1",
            "198.18.0.2",
            "198.18.0.3",
            "2001:2::1",
            "x",
            "198.18.0.9",
        ])
    };
    let port = (
        opt(pick(&["http", "dns", ""])),
        pick(&[80, 53, 0, 443]),
        opt(pick(&["TCP", "UDP", "BOGUS"])),
        opt(pick(&[30080, 30081, 1])),
        opt(pick(&[8080, 5353])),
    )
        .prop_map(|(name, port, protocol, node_port, target)| {
            let mut p = json!({ "port": port });
            if let Some(n) = name {
                p["name"] = json!(n);
            }
            if let Some(pr) = protocol {
                p["protocol"] = json!(pr);
            }
            if let Some(np) = node_port {
                p["nodePort"] = json!(np);
            }
            if let Some(t) = target {
                p["targetPort"] = json!(t);
            }
            p
        });
    (
        name(),
        proptest::collection::vec(ip(), 0..3),
        proptest::collection::vec(port, 0..3),
        opt(pick(&[
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "Weird",
        ])),
        proptest::collection::vec(ip(), 0..2),
        proptest::collection::vec(ip(), 0..2),
        opt(pick(&["Local", "Cluster"])),
        opt(pick(&["Local", "Cluster"])),
        opt(pick(&["dsr", "snat", "routed", "bad"])),
        opt(pick(&[31000, 31001])),
        opt(pick(&["clustergate", "other"])),
    )
        .prop_map(
            |(
                (ns, name),
                cluster_ips,
                ports,
                type_,
                external,
                lb,
                etp,
                itp,
                return_path,
                health,
                proxy,
            )| {
                let mut spec = json!({ "ports": ports, "externalIPs": external });
                if !cluster_ips.is_empty() {
                    spec["clusterIP"] = json!(cluster_ips[0]);
                    spec["clusterIPs"] = json!(cluster_ips);
                }
                if let Some(t) = type_ {
                    spec["type"] = json!(t);
                }
                if let Some(p) = etp {
                    spec["externalTrafficPolicy"] = json!(p);
                }
                if let Some(p) = itp {
                    spec["internalTrafficPolicy"] = json!(p);
                }
                if let Some(h) = health {
                    spec["healthCheckNodePort"] = json!(h);
                }
                let mut meta = json!({ "namespace": ns, "name": name });
                if let Some(r) = return_path {
                    meta["annotations"] = json!({ "clustergate.io/return-path": r });
                }
                if let Some(p) = proxy {
                    meta["labels"] = json!({ "service.kubernetes.io/service-proxy-name": p });
                }
                let ingress: Vec<Value> = lb.iter().map(|ip| json!({ "ip": ip })).collect();
                json!({
                    "apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec,
                    "status": { "loadBalancer": { "ingress": ingress } },
                })
            },
        )
}

fn slice() -> impl Strategy<Value = Value> {
    let endpoint = (
        pick(&[
            "198.18.1.1",
            "198.18.1.2",
            "198.18.1.3",
            "2001:2::10",
            "bad",
        ]),
        opt(any::<bool>()),
        opt(any::<bool>()),
        opt(any::<bool>()),
        opt(pick(&["n0", "n1", "n2"])),
    )
        .prop_map(|(address, ready, serving, terminating, node)| {
            let mut c = json!({});
            if let Some(r) = ready {
                c["ready"] = json!(r);
            }
            if let Some(s) = serving {
                c["serving"] = json!(s);
            }
            if let Some(t) = terminating {
                c["terminating"] = json!(t);
            }
            let mut e = json!({ "addresses": [address], "conditions": c });
            if let Some(n) = node {
                e["nodeName"] = json!(n);
            }
            e
        });
    let port = (
        opt(pick(&["http", "dns", ""])),
        opt(pick(&[8080, 5353, 0, 80])),
        opt(pick(&["TCP", "UDP", "BAD"])),
    )
        .prop_map(|(name, port, protocol)| {
            let mut p = json!({});
            if let Some(n) = name {
                p["name"] = json!(n);
            }
            if let Some(n) = port {
                p["port"] = json!(n);
            }
            if let Some(pr) = protocol {
                p["protocol"] = json!(pr);
            }
            p
        });
    (
        pick(&["a", "b"]),
        pick(&["e0", "e1", "e2", "e3", "e4"]),
        opt(pick(&["s0", "s1", "s2", "s3", ""])),
        any::<bool>(),
        pick(&["IPv4", "IPv4", "IPv6", "FQDN", "IPX"]),
        proptest::collection::vec(endpoint, 0..4),
        proptest::collection::vec(port, 0..3),
    )
        .prop_map(|(ns, name, svc, headless, family, endpoints, ports)| {
            let mut labels = json!({});
            if let Some(s) = svc {
                labels["kubernetes.io/service-name"] = json!(s);
            }
            if headless {
                labels["service.kubernetes.io/headless"] = json!("");
            }
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "namespace": ns, "name": name, "labels": labels },
                "addressType": family, "endpoints": endpoints, "ports": ports,
            })
        })
}

fn node() -> impl Strategy<Value = Value> {
    (
        pick(&["n0", "n1", "n2"]),
        opt(pick(&["198.18.1.0/30", "198.18.1.0/24", "nope"])),
        opt(pick(&["198.18.2.1", "198.18.2.2"])),
    )
        .prop_map(|(name, cidr, address)| {
            let mut n = json!({
                "apiVersion": "v1", "kind": "Node", "metadata": { "name": name }, "spec": {},
            });
            if let Some(c) = cidr {
                n["spec"]["podCIDR"] = json!(c);
            }
            if let Some(a) = address {
                n["status"] = json!({ "addresses": [{ "type": "InternalIP", "address": a }] });
            }
            n
        })
}

/// One change to one file.
#[derive(Debug, Clone)]
enum Change {
    /// Puts a Service at an index (appends past the end).
    Service(usize, Value),
    Slice(usize, Value),
    Node(usize, Value),
    /// Removes the object of a kind (0: Service, 1: slice, 2: node) at an index.
    Remove(u8, usize),
    /// The file fails to read now (its objects stay), or reads again.
    Error(bool),
    /// The file is gone.
    Gone,
}

fn change() -> impl Strategy<Value = (usize, Change)> {
    let c = prop_oneof![
        4 => (0..4usize, service()).prop_map(|(i, v)| Change::Service(i, v)),
        5 => (0..5usize, slice()).prop_map(|(i, v)| Change::Slice(i, v)),
        1 => (0..2usize, node()).prop_map(|(i, v)| Change::Node(i, v)),
        3 => (0..3u8, 0..5usize).prop_map(|(k, i)| Change::Remove(k, i)),
        1 => any::<bool>().prop_map(Change::Error),
        1 => Just(Change::Gone),
    ];
    (0..FILES.len(), c)
}

fn put<T: serde::de::DeserializeOwned>(list: &mut Vec<T>, i: usize, v: &Value) {
    let o: T = serde_json::from_value(v.clone()).unwrap();
    if i < list.len() {
        list[i] = o;
    } else {
        list.push(o);
    }
}

fn remove<T>(list: &mut Vec<T>, i: usize) {
    if i < list.len() {
        list.remove(i);
    }
}

/// The files: present or not, objects, and the error of the last read.
type Files = Vec<Option<(Objects, Option<String>)>>;

fn apply(files: &mut Files, file: usize, change: &Change) {
    if matches!(change, Change::Gone) {
        files[file] = None;
        return;
    }
    let (o, error) = files[file].get_or_insert_with(|| (Objects::default(), None));
    match change {
        Change::Service(i, v) => put::<Service>(&mut o.services, *i, v),
        Change::Slice(i, v) => put::<EndpointSlice>(&mut o.slices, *i, v),
        Change::Node(i, v) => put::<Node>(&mut o.nodes, *i, v),
        Change::Remove(0, i) => remove(&mut o.services, *i),
        Change::Remove(1, i) => remove(&mut o.slices, *i),
        Change::Remove(_, i) => remove(&mut o.nodes, *i),
        Change::Error(true) => *error = Some("not valid YAML: line 1".to_owned()),
        Change::Error(false) => *error = None,
        Change::Gone => {}
    }
}

fn full_rebuild(dir: &Path, files: &Files, options: &ModelOptions) -> Model {
    let merged = merge_files(
        dir,
        files
            .iter()
            .zip(FILES)
            .filter_map(|(f, name)| f.as_ref().map(|(o, e)| (name, o, e.as_deref()))),
    );
    build_model(&merged, options)
}

fn assert_same(incremental: &Model, full: &Model, step: usize) {
    assert_eq!(
        incremental.frontends, full.frontends,
        "frontends after step {step}"
    );
    assert_eq!(
        incremental.skipped, full.skipped,
        "skipped after step {step}"
    );
    assert_eq!(incremental.notes, full.notes, "notes after step {step}");
    assert_eq!(incremental.errors, full.errors, "errors after step {step}");
    assert_eq!(
        incremental.health_checks, full.health_checks,
        "health checks after step {step}"
    );
    assert_eq!(incremental.nodes, full.nodes, "nodes after step {step}");
    assert_eq!(
        incremental.table_spec(),
        full.table_spec(),
        "table after step {step}"
    );
    assert_eq!(incremental, full, "model after step {step}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any sequence of changes, applied one file at a time, gives the model
    /// of a full rebuild after every step.
    #[test]
    fn incremental_model_equals_a_full_rebuild_after_every_change(
        changes in proptest::collection::vec(change(), 1..40),
        batch in 1..4usize,
    ) {
        let dir = Path::new("/etc/clustergate/manifests");
        let options = ModelOptions::default();
        let mut inc = IncrementalModel::new(options.clone(), dir);
        let mut files: Files = vec![None; FILES.len()];
        // Some steps take up several changes at once, as a burst does.
        for (step, chunk) in changes.chunks(batch).enumerate() {
            let mut touched = Vec::new();
            for (file, change) in chunk {
                apply(&mut files, *file, change);
                touched.push(*file);
            }
            touched.sort_unstable();
            touched.dedup();
            for file in touched {
                match &files[file] {
                    Some((o, e)) => inc.set_source(FILES[file], Some(o), e.as_deref()),
                    None => inc.set_source(FILES[file], None, None),
                };
            }
            let full = full_rebuild(dir, &files, &options);
            assert_same(inc.model(), &full, step);
        }
    }
}

/// A Service moving from one file to another, an EndpointSlice naming
/// another Service, and a cluster IP taken over: the cases the random
/// sequences may rarely hit, spelled out.
#[test]
fn moved_and_relabelled_objects_follow() {
    let dir = Path::new("/m");
    let options = ModelOptions::default();
    let doc = |text: &str| parse_manifest(text).unwrap();
    let svc = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: a, name: {name}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}], externalIPs: [198.18.0.2]}}\n"
        )
    };
    let slice = |svc: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{namespace: a, name: e, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.1.1]}}]\n"
        )
    };
    let steps = [
        (
            "a.yaml",
            format!("{}---\n{}", svc("web", "198.18.0.1"), slice("web")),
        ),
        ("b.yaml", svc("api", "198.18.0.2")),
        (
            "a.yaml",
            format!("{}---\n{}", svc("web", "198.18.0.1"), slice("api")),
        ),
        (
            "b.yaml",
            format!(
                "{}---\n{}",
                svc("web", "198.18.0.3"),
                svc("api", "198.18.0.4")
            ),
        ),
        ("a.yaml", slice("web")),
    ];
    let mut inc = IncrementalModel::new(options.clone(), dir);
    let mut files: Files = vec![None; FILES.len()];
    for (step, (file, text)) in steps.iter().enumerate() {
        let i = FILES.iter().position(|f| f == file).unwrap();
        files[i] = Some((doc(text), None));
        inc.set_source(file, files[i].as_ref().map(|(o, _)| o), None);
        let full = full_rebuild(dir, &files, &options);
        assert!(!full.frontends.is_empty(), "step {step} serves something");
        assert_same(inc.model(), &full, step);
    }
}

/// Documents and separators that a manifest file may hold, the awkward ones
/// included.
const DOCUMENTS: [&str; 11] = [
    "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80}]}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 198.18.0.2, ports: [{port: 81}]}\n",
    "{apiVersion: v1, kind: Node, metadata: {name: n1}}\n",
    "",
    "# nothing here\n",
    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  a: |\n    x\n    ---\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: oops}\n",
    "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n2}\n",
    "a: [\n",
    "x: &a {k: 1}\ny: *a\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 80}]}\n...\n",
];
const SEPARATORS: [&str; 4] = ["---\n", "--- \n", "---\n# between\n", "--- "];

fn manifest_text() -> impl Strategy<Value = String> {
    proptest::collection::vec((0..SEPARATORS.len(), 0..DOCUMENTS.len()), 0..6).prop_map(|docs| {
        docs.iter()
            .enumerate()
            .map(|(i, (sep, doc))| {
                if i == 0 && *sep == 0 {
                    DOCUMENTS[*doc].to_owned()
                } else {
                    format!("{}{}", SEPARATORS[*sep], DOCUMENTS[*doc])
                }
            })
            .collect()
    })
}

proptest! {
    /// Reading a file again parses only its changed documents, and gives
    /// what parsing it whole gives: objects, skipped entries and errors, or
    /// the same syntax error.
    #[test]
    fn a_file_read_again_parses_as_a_whole_file(
        texts in proptest::collection::vec(manifest_text(), 1..5),
    ) {
        let mut cache = DocumentCache::default();
        for text in &texts {
            let cached = parse_manifest_cached(text, &mut cache);
            let whole = parse_manifest(text);
            prop_assert_eq!(cached, whole, "{}", text);
        }
    }
}
