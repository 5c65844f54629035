//! The incremental model ([`IncrementalModel`]) against the full rebuild
//! ([`build_model`]): after every step of a random sequence of changes to the
//! files of a manifest directory (Services, EndpointSlices and Nodes added,
//! modified, removed, duplicated, invalid; files that fail to read), the
//! model kept up to date equals `build_model` of all files merged as `run`
//! merges them: the same frontends and table, skipped list, notes, errors
//! in the same order, health checks and nodes. And the tables a
//! [`Publisher`] publishes from it, built in place from the Services that
//! changed, are byte for byte those of a whole build, on disk too.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::snapshot::encode;
use clustergate_builder::table::{Builder, RingSizes};
use clustergate_control::incremental::IncrementalModel;
use clustergate_control::manifest::{parse_manifest_cached, DocumentCache};
use clustergate_control::manifest_dir::merge_files;
use clustergate_control::model::{build_model, Model, ModelOptions};
use clustergate_control::publish::Publisher;
use clustergate_control::{parse_manifest, Objects};
use clustergate_dataplane::flow::Proto;
use clustergate_dataplane::snapshot;
use clustergate_dataplane::table::Table;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{json, Value};

#[path = "../../dataplane/tests/support/scratch.rs"]
mod scratch;

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

/// Applies `chunk` to the files, then hands each file it touched to `inc`
/// once, as `run` takes up the files of one burst of events.
fn take_up(inc: &mut IncrementalModel, files: &mut Files, chunk: &[(usize, Change)]) {
    let mut touched = Vec::new();
    for (file, change) in chunk {
        apply(files, *file, change);
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
            take_up(&mut inc, &mut files, chunk);
            let full = full_rebuild(dir, &files, &options);
            assert_same(inc.model(), &full, step);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any sequence of changes, published after every step from the
    /// incremental model's table changes (in place when they allow it),
    /// gives byte for byte the table of a whole build from the model, and
    /// the snapshot directory (full snapshots and deltas) loads as that
    /// table.
    #[test]
    fn published_tables_equal_a_whole_build_after_every_change(
        changes in proptest::collection::vec(change(), 1..40),
        batch in 1..4usize,
    ) {
        let dir = Path::new("/etc/clustergate/manifests");
        let options = ModelOptions::default();
        let mut inc = IncrementalModel::new(options, dir);
        let mut files: Files = vec![None; FILES.len()];
        let out = scratch::TestDir::new();
        let mut publisher = Publisher::open(out.path(), 7).unwrap();
        let mut whole = Builder::new(7, DEFAULT_MAX_RING_SIZE, RingSizes::default());
        let mut last_reference = None;
        for (step, chunk) in changes.chunks(batch).enumerate() {
            take_up(&mut inc, &mut files, chunk);
            let changes = inc.take_table_changes();
            let model = inc.model();
            let generation = publisher.next_generation();
            let published = publisher.publish(model, Some(&changes));
            let reference = whole.build(generation, &model.table_spec());
            match (published, reference) {
                (Ok(p), Ok(reference)) => {
                    let last = publisher.last().unwrap();
                    prop_assert_eq!(p.is_some(), last.generation() == generation, "step {}", step);
                    // Published exactly when the whole build differs from
                    // the last one.
                    let same = last_reference.as_ref().is_some_and(|l| reference.same_blocks(l));
                    prop_assert_eq!(p.is_none(), same, "step {}", step);
                    if p.is_some() {
                        prop_assert!(encode(last) == encode(&reference), "table after step {}", step);
                        let loaded = snapshot::load_current(out.path()).unwrap().unwrap();
                        prop_assert!(same_lookups(&loaded, last), "loaded table after step {}", step);
                        last_reference = Some(reference);
                    }
                }
                (Err(_), Err(_)) => {}
                (p, r) => prop_assert!(false, "step {}: publish {:?}, whole build {:?}", step, p.map(|_| ()), r.map(|_| ())),
            }
        }
    }
}

/// The same lookups: the same generation, node prefixes, node-port
/// addresses and policy, and the same frontends, block for block, by key (a
/// delta that adds frontends puts them last: the order may differ; and a
/// full snapshot loads with every frontend's version its generation).
fn same_lookups(a: &Table, b: &Table) -> bool {
    let (pa, pb) = (a.to_parts(), b.to_parts());
    a.generation() == b.generation()
        && pa.node_prefixes == pb.node_prefixes
        && pa.node_port_prefixes == pb.node_port_prefixes
        && pa.policy == pb.policy
        && a.frontends().len() == b.frontends().len()
        && a.frontends().iter().all(|f| {
            Proto::from_ip_number(f.proto)
                .and_then(|p| b.frontend(&f.addr, f.port, p))
                .is_some_and(|i| {
                    let g = &b.frontends()[i as usize];
                    (
                        g.record(),
                        g.ring(),
                        g.backends(),
                        g.ranges(),
                        g.locals(),
                        g.name(),
                    ) == (
                        f.record(),
                        f.ring(),
                        f.backends(),
                        f.ranges(),
                        f.locals(),
                        f.name(),
                    )
                })
        })
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

/// An endpoint moved in one Service of three: published in place, as a
/// delta of that Service's frontend alone, every other block shared; a new
/// port of another Service (a frontend added) builds the whole table; no
/// change publishes nothing.
#[test]
fn an_endpoint_moved_is_published_in_place() {
    use clustergate_builder::snapshot::Written;
    let text = |moved: &str, port2: bool| {
        let mut docs = Vec::new();
        for s in 0..3 {
            let ports = if s == 2 && port2 {
                "[{name: a, port: 80}, {name: b, port: 81}]"
            } else {
                "[{name: a, port: 80}]"
            };
            docs.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{namespace: a, name: s{s}}}\n\
                 spec: {{clusterIP: 198.18.0.{s}, ports: {ports}}}\n"
            ));
            let first = if s == 1 { moved } else { "198.18.1.1" };
            docs.push(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{namespace: a, name: s{s}-x, labels: {{kubernetes.io/service-name: s{s}}}}}\n\
                 addressType: IPv4\nports: [{{name: a, port: 8080}}, {{name: b, port: 8081}}]\n\
                 endpoints: [{{addresses: [{first}]}}, {{addresses: [198.18.1.2]}}]\n"
            ));
        }
        parse_manifest(&docs.join("---\n")).unwrap()
    };
    let out = scratch::TestDir::new();
    let mut publisher = Publisher::open(out.path(), 7).unwrap();
    let mut inc = IncrementalModel::new(ModelOptions::default(), Path::new("/m"));
    let mut publish = |inc: &mut IncrementalModel, objects: &Objects| {
        inc.set_source("a.yaml", Some(objects), None);
        let changes = inc.take_table_changes();
        publisher.publish(inc.model(), Some(&changes)).unwrap()
    };
    let first = publish(&mut inc, &text("198.18.1.1", false)).unwrap();
    assert!(!first.in_place, "the first publish builds the whole table");
    assert!(matches!(first.written, Written::Full(_)));

    let moved = publish(&mut inc, &text("198.18.1.9", false)).unwrap();
    assert!(moved.in_place, "an endpoint moved is built in place");
    match moved.written {
        Written::Delta {
            changed, removed, ..
        } => assert_eq!((changed, removed), (1, 0), "only s1's frontend"),
        Written::Full(p) => panic!("a full snapshot {} for one endpoint moved", p.display()),
    }
    let loaded = snapshot::load_current(out.path()).unwrap().unwrap();
    let s1 = loaded
        .frontends()
        .iter()
        .find(|f| f.addr == clustergate_dataplane::flow::addr16("198.18.0.1".parse().unwrap()))
        .unwrap();
    let backends: Vec<_> = loaded
        .backends_of(s1)
        .iter()
        .map(|b| std::net::IpAddr::from(b.addr).to_canonical())
        .collect();
    assert!(
        backends.contains(&"198.18.1.9".parse().unwrap()),
        "s1 serves the moved endpoint: {backends:?}"
    );

    assert!(
        publish(&mut inc, &text("198.18.1.9", false)).is_none(),
        "nothing changed: no new generation"
    );

    let grown = publish(&mut inc, &text("198.18.1.9", true)).unwrap();
    assert!(!grown.in_place, "a frontend added builds the whole table");
    assert_eq!(grown.frontends, 4);
}
