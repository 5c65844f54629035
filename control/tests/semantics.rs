//! kube-proxy's Service semantics as clustergate-control applies them
//! (docs/semantics.md): the fixture manifests with their exact `show` JSON, and
//! one targeted test per rule.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::TableBuild;
use clustergate_control::model::{build_model, default_node_port_addresses, Model, ModelOptions};
use clustergate_control::{
    load_manifest_file, load_manifest_file_strict, parse_manifest, ControlError,
};
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::table::{BackendState, FrontendKind, ReturnPath, Table};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap()
}

fn model_with(yaml: &str, options: &ModelOptions) -> Model {
    build_model(&parse_manifest(yaml).unwrap(), options)
}

fn model(yaml: &str) -> Model {
    model_with(yaml, &ModelOptions::default())
}

/// The model with `--return-path` set to `return_path`.
fn model_returning(yaml: &str, return_path: ReturnPath) -> Model {
    model_with(
        yaml,
        &ModelOptions {
            return_path,
            ..ModelOptions::default()
        },
    )
}

/// The error text of a manifest that is refused, by the parser or (as
/// `--strict` refuses it) the model.
fn refused(yaml: &str) -> String {
    match parse_manifest(yaml) {
        Err(e) => e.to_string(),
        Ok(objects) => build_model(&objects, &ModelOptions::default())
            .strict()
            .map(|m| panic!("accepted: {}", m.to_json()))
            .unwrap_err()
            .to_string(),
    }
}

/// A Service document in namespace `default`; `spec` is indented two spaces.
fn service(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    )
}

/// An EndpointSlice document in namespace `default` labelled for `svc`; `body`
/// holds addressType, ports and endpoints at the top level.
fn slice(name: &str, svc: &str, body: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\n{body}"
    )
}

fn be(address: &str, port: u16, state: &str) -> Value {
    json!({"address": address, "port": port, "state": state, "node": null})
}

fn ready(address: &str, port: u16) -> Value {
    be(address, port, "ready")
}

#[allow(clippy::too_many_arguments)]
fn fe(
    service: &str,
    port_name: &str,
    kind: &str,
    address: &str,
    port: u16,
    protocol: &str,
    affinity: Option<u32>,
    backends: Vec<Value>,
) -> Value {
    json!({
        "service": service,
        "port_name": port_name,
        "kind": kind,
        "address": address,
        "port": port,
        "protocol": protocol,
        "affinity_timeout_s": affinity,
        "return_path": "snat",
        "source_ranges": null,
        "node_local": false,
        "backends": backends,
    })
}

/// ClusterIP, TCP, no affinity.
fn cip(service: &str, port_name: &str, address: &str, port: u16, backends: Vec<Value>) -> Value {
    fe(
        service,
        port_name,
        "ClusterIP",
        address,
        port,
        "TCP",
        None,
        backends,
    )
}

/// The `show` JSON frontends of one service.
fn frontends_of(m: &Model, service: &str) -> Value {
    Value::Array(
        m.to_json()["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["service"] == service)
            .cloned()
            .collect(),
    )
}

fn skipped_of(m: &Model) -> Vec<(String, String)> {
    m.skipped
        .iter()
        .map(|s| (s.object.clone(), s.reason.clone()))
        .collect()
}

fn is_skipped(m: &Model, object: &str) -> bool {
    m.skipped.iter().any(|s| s.object == object)
}

// ---------------------------------------------------------------- fixtures

fn expected_fixture_frontends() -> Value {
    let exposed = |kind, address, port| {
        fe(
            "default/exposed",
            "http",
            kind,
            address,
            port,
            "TCP",
            None,
            vec![ready("198.18.6.1", 8080)],
        )
    };
    json!([
        cip("default/down", "http", "198.19.0.31", 80, vec![]),
        cip(
            "default/draining",
            "http",
            "198.19.0.30",
            80,
            vec![be("198.18.4.1", 8080, "terminating")]
        ),
        cip(
            "default/dual",
            "",
            "198.19.0.20",
            80,
            vec![ready("198.18.3.1", 8080), ready("198.18.3.2", 8080)]
        ),
        cip(
            "default/dual",
            "",
            "2001:db8:ffff::20",
            80,
            vec![ready("2001:db8:1::1", 8080), ready("2001:db8:1::2", 8080)]
        ),
        cip("default/empty", "http", "198.19.0.32", 80, vec![]),
        exposed("NodePort", "0.0.0.0", 30080),
        exposed("ExternalIP", "198.18.200.1", 80),
        exposed("LoadBalancer", "198.18.201.1", 80),
        exposed("ClusterIP", "198.19.0.50", 80),
        cip(
            "default/ours",
            "",
            "198.19.0.60",
            80,
            vec![ready("198.18.7.1", 80)]
        ),
        fe(
            "default/sticky",
            "http",
            "ClusterIP",
            "198.19.0.40",
            80,
            "TCP",
            Some(10800),
            vec![ready("198.18.5.1", 8080)]
        ),
        fe(
            "default/sticky-short",
            "http",
            "ClusterIP",
            "198.19.0.41",
            80,
            "TCP",
            Some(600),
            vec![ready("198.18.5.2", 8080)]
        ),
        cip(
            "default/web",
            "http",
            "198.19.0.10",
            80,
            vec![
                ready("198.18.1.1", 8080),
                ready("198.18.1.2", 8080),
                ready("198.18.1.4", 8081),
                ready("198.18.1.5", 8081),
                ready("198.18.1.6", 8080),
            ]
        ),
        cip(
            "default/web",
            "metrics",
            "198.19.0.10",
            9100,
            vec![
                ready("198.18.1.1", 9100),
                ready("198.18.1.2", 9100),
                ready("198.18.1.6", 9100),
            ]
        ),
        fe(
            "kube-system/dns",
            "dns",
            "ClusterIP",
            "198.19.0.53",
            53,
            "UDP",
            None,
            vec![ready("198.18.2.1", 53), ready("198.18.2.2", 53)]
        ),
        fe(
            "kube-system/dns",
            "dns-tcp",
            "ClusterIP",
            "198.19.0.53",
            53,
            "TCP",
            None,
            vec![ready("198.18.2.1", 53), ready("198.18.2.2", 53)]
        ),
    ])
}

fn expected_fixture_skipped() -> Value {
    let not_read = |kind: &str| {
        format!("kind {kind} (v1) is not read (clustergate reads Service, EndpointSlice, Node, Pod, Namespace and NetworkPolicy)")
    };
    json!([
        {"object": "ConfigMap default/settings", "reason": not_read("ConfigMap"), "label": "unsupported"},
        {"object": "EndpointSlice default/dual-fqdn",
         "reason": "addressType FQDN: no semantics for proxies (kube-proxy ignores it too)",
         "label": "not_proxied"},
        {"object": "EndpointSlice default/ghost-1", "reason": "no Service default/ghost in the manifest",
         "label": "no_service"},
        {"object": "EndpointSlice default/headless-1",
         "reason": "labelled service.kubernetes.io/headless (endpoints of a headless Service)",
         "label": "not_proxied"},
        {"object": "EndpointSlice default/orphan-1",
         "reason": "no kubernetes.io/service-name label: it belongs to no Service",
         "label": "no_service"},
        {"object": "EndpointSlice default/theirs-1", "reason": "its Service default/theirs is skipped",
         "label": "no_service"},
        {"object": "Endpoints default/web", "reason": not_read("Endpoints"), "label": "unsupported"},
        {"object": "Service default/alias", "reason": "type ExternalName: a DNS alias, not proxied",
         "label": "not_proxied"},
        {"object": "Service default/headless", "reason": "headless (clusterIP None): not proxied",
         "label": "not_proxied"},
        {"object": "Service default/theirs",
         "reason": "service.kubernetes.io/service-proxy-name is \"other-proxy\", not \"clustergate\": another proxy serves it",
         "label": "other_proxy"},
        {"object": "Service default/unallocated", "reason": "no clusterIP", "label": "not_proxied"},
    ])
}

#[test]
fn list_fixture_show_json_is_exact() {
    let m = model(&fixture("cluster.yaml"));
    let got = m.to_json();
    assert_eq!(
        got,
        json!({
            "frontends": expected_fixture_frontends(),
            "skipped": expected_fixture_skipped(),
            "notes": [],
            "nodes": [],
            "node_port_addresses": ["0.0.0.0/0", "::/0"],
            "health_checks": [],
        }),
        "{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}

#[test]
fn key_services_of_the_fixture_one_by_one() {
    // The same facts as above, per service, so a failure points at one rule.
    let m = model(&fixture("cluster.yaml"));
    let all = expected_fixture_frontends();
    for svc in [
        "default/web",
        "kube-system/dns",
        "default/dual",
        "default/draining",
        "default/down",
        "default/empty",
        "default/sticky",
        "default/sticky-short",
        "default/exposed",
        "default/ours",
    ] {
        let want: Vec<Value> = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["service"] == svc)
            .cloned()
            .collect();
        assert_eq!(frontends_of(&m, svc), Value::Array(want), "{svc}");
    }
    for svc in [
        "default/theirs",
        "default/headless",
        "default/alias",
        "default/unallocated",
    ] {
        assert_eq!(frontends_of(&m, svc), json!([]), "{svc} is skipped");
    }
}

#[test]
fn documents_fixture_gives_the_same_model_as_the_list() {
    let list = model(&fixture("cluster.yaml"));
    let docs = model(&fixture("cluster-docs.yaml"));
    assert_eq!(docs, list);
    assert_eq!(docs.to_json()["frontends"], expected_fixture_frontends());
}

#[test]
fn fixture_feeds_the_dataplane_table_with_every_frontend() {
    let m = model(&fixture("cluster.yaml"));
    let specs = m.service_specs();
    assert_eq!(m.frontends.len(), 16);
    assert_eq!(specs.len(), 16, "every frontend is served");
    assert_eq!(
        specs
            .iter()
            .filter(|s| s.kind == FrontendKind::ClusterIp)
            .count(),
        13
    );
    assert!(specs.iter().all(|s| s.return_path == ReturnPath::Snat));
    assert!(specs
        .iter()
        .flat_map(|s| &s.backends)
        .all(|b| b.weight == 1));
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    assert_eq!(table.frontends().len(), 16);
    // Each frontend carries its ServicePortName, `ns/name[:port]`, for
    // `clustergate inspect`.
    for (i, f) in m.frontends.iter().enumerate() {
        let want = if f.port_name.is_empty() {
            f.service.clone()
        } else {
            format!("{}:{}", f.service, f.port_name)
        };
        assert_eq!(specs[i].name.as_deref(), Some(want.as_str()));
        assert_eq!(table.frontend_name(i as u32), Some(want.as_str()));
    }
    assert!(m.frontends.iter().any(|f| f.port_name.is_empty()));
    assert!(m.frontends.iter().any(|f| !f.port_name.is_empty()));

    let ip = |s: &str| addr16(s.parse::<IpAddr>().unwrap());
    let web = table.frontend(&ip("198.19.0.10"), 80, Proto::Tcp).unwrap();
    let web = table.frontend_record(web).unwrap();
    assert_eq!(table.backends_of(web).len(), 5);
    assert!(table.frontend(&ip("198.19.0.53"), 53, Proto::Udp).is_some());
    assert!(table.frontend(&ip("198.19.0.53"), 53, Proto::Tcp).is_some());
    assert!(table
        .frontend(&ip("2001:db8:ffff::20"), 80, Proto::Tcp)
        .is_some());
    // Served: node port, external IP, load-balancer IP.
    assert!(table.frontend(&ip("0.0.0.0"), 30080, Proto::Tcp).is_some());
    assert!(table
        .frontend(&ip("198.18.200.1"), 80, Proto::Tcp)
        .is_some());
    assert!(table
        .frontend(&ip("198.18.201.1"), 80, Proto::Tcp)
        .is_some());
    assert!(table.frontend(&ip("198.19.0.50"), 80, Proto::Tcp).is_some());
    // Empty frontends exist (so traffic is rejected), with no ring.
    let empty = table.frontend(&ip("198.19.0.32"), 80, Proto::Tcp).unwrap();
    assert_eq!(table.frontend_record(empty).unwrap().ring_len, 0);
    // A terminating fallback backend keeps weight 1 and its state.
    let draining = specs
        .iter()
        .find(|s| s.addr == "198.19.0.30".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(draining.backends.len(), 1);
    assert_eq!(draining.backends[0].state, BackendState::Terminating);
    assert_eq!(draining.backends[0].weight, 1);
    let sticky = specs
        .iter()
        .find(|s| s.addr == "198.19.0.40".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(sticky.affinity_timeout_s, Some(10800));
}

#[test]
fn table_view_lists_every_kind_as_served() {
    let t = model(&fixture("cluster.yaml")).to_table();
    let line = |needle: &str| {
        t.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{t}"))
            .to_owned()
    };
    assert!(line("0.0.0.0:30080 NodePort default/exposed:http")
        .ends_with(" on node addresses in 0.0.0.0/0"));
    assert_eq!(
        line("198.18.200.1:80 ExternalIP"),
        "TCP  198.18.200.1:80 ExternalIP default/exposed:http snat"
    );
    assert_eq!(
        line("198.18.201.1:80 LoadBalancer"),
        "TCP  198.18.201.1:80 LoadBalancer default/exposed:http snat"
    );
    assert!(!t.contains("not served"));
    assert!(line("198.19.0.40:80 ClusterIP default/sticky:http").contains("persistent 10800"));
    assert!(t.contains("[2001:db8:ffff::20]:80 ClusterIP default/dual snat\n"));
    assert!(t.contains("  -> [2001:db8:1::1]:8080"));
    assert!(line("-> 198.18.4.1:8080").ends_with("terminating"));
    assert!(t.contains("(no endpoints: connections are rejected)"));
    assert!(t.contains("\nSkipped:\n  ConfigMap default/settings: kind ConfigMap"));
    assert!(!t.contains("Notes:"), "the fixture has no notes:\n{t}");
}

#[test]
fn load_manifest_file_reads_and_names_the_file_on_error() {
    let m = load_manifest_file(&fixture_path("cluster.yaml"), &ModelOptions::default()).unwrap();
    assert_eq!(m, model(&fixture("cluster.yaml")));

    let missing = fixture_path("no-such-file.yaml");
    let e = load_manifest_file(&missing, &ModelOptions::default()).unwrap_err();
    assert!(matches!(e, ControlError::Read { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: ", missing.display())),
        "{e}"
    );

    let dir = std::env::temp_dir().join(format!("clustergate-control-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_yaml = dir.join("bad.yaml");
    std::fs::write(&bad_yaml, "kind: List\nitems: [\n").unwrap();
    let e = load_manifest_file(&bad_yaml, &ModelOptions::default()).unwrap_err();
    assert!(matches!(e, ControlError::Manifest { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: not valid YAML", bad_yaml.display())),
        "{e}"
    );

    let bad_port = dir.join("bad-port.yaml");
    std::fs::write(
        &bad_port,
        service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 0}]\n"),
    )
    .unwrap();
    let m = load_manifest_file(&bad_port, &ModelOptions::default()).unwrap();
    assert!(m.frontends.is_empty(), "{:?}", m.frontends);
    assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    let e = load_manifest_file_strict(&bad_port, &ModelOptions::default()).unwrap_err();
    assert!(matches!(e, ControlError::Model { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: Service default/web: spec.ports[0].port: 0 is not a valid port",
            bad_port.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The model does not depend on the order of objects in the manifest.
    #[test]
    fn model_does_not_depend_on_object_order(
        docs in Just(split_documents(&fixture("cluster-docs.yaml"))).prop_shuffle()
    ) {
        let shuffled = model(&docs.join("\n---\n"));
        prop_assert_eq!(shuffled, model(&fixture("cluster.yaml")));
    }
}

fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line == "..." {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

// ---------------------------------------------------------------- skipping

#[test]
fn headless_service_is_skipped() {
    let m = model(&service(
        "db",
        "  clusterIP: None\n  ports: [{name: pg, port: 5432}]\n",
    ));
    assert!(m.frontends.is_empty());
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/db".to_owned(),
            "headless (clusterIP None): not proxied".to_owned()
        )]
    );
    // clusterIPs [None] without clusterIP means the same.
    let m = model(&service(
        "db",
        "  clusterIPs: [None]\n  ports: [{port: 5432}]\n",
    ));
    assert!(m.frontends.is_empty() && is_skipped(&m, "Service default/db"));
}

#[test]
fn external_name_service_is_skipped() {
    // Even with a cluster IP (kube-proxy's ShouldSkipService checks the type).
    let m = model(&service(
        "alias",
        "  type: ExternalName\n  externalName: db.example.invalid\n  clusterIP: 198.19.0.9\n  ports: [{port: 80}]\n",
    ));
    assert!(m.frontends.is_empty());
    assert_eq!(
        m.skipped[0].reason,
        "type ExternalName: a DNS alias, not proxied"
    );
}

#[test]
fn service_without_cluster_ip_is_skipped() {
    for spec in [
        "  ports: [{port: 80}]\n",
        "  clusterIP: \"\"\n  ports: [{port: 80}]\n",
        "  clusterIPs: []\n  ports: [{port: 80}]\n",
    ] {
        let m = model(&service("pending", spec));
        assert!(m.frontends.is_empty(), "{spec}");
        assert_eq!(
            skipped_of(&m),
            [(
                "Service default/pending".to_owned(),
                "no clusterIP".to_owned()
            )]
        );
    }
    // No spec at all.
    let m = model("apiVersion: v1\nkind: Service\nmetadata: {name: bare}\n");
    assert!(m.frontends.is_empty() && is_skipped(&m, "Service default/bare"));
}

#[test]
fn proxy_name_label_selects_services() {
    let with_label = |name: &str, label: Option<&str>, ip: &str| {
        let labels = label
            .map(|l| format!("  labels:\n    service.kubernetes.io/service-proxy-name: {l}\n"))
            .unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{labels}spec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    };
    let yaml = [
        with_label("ours", Some("clustergate"), "198.19.0.1"),
        with_label("theirs", Some("other-proxy"), "198.19.0.2"),
        with_label("anyone", None, "198.19.0.3"),
    ]
    .concat();
    let served =
        |m: &Model| -> Vec<String> { m.frontends.iter().map(|f| f.service.clone()).collect() };

    let m = model(&yaml);
    assert_eq!(served(&m), ["default/anyone", "default/ours"]);
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/theirs".to_owned(),
            "service.kubernetes.io/service-proxy-name is \"other-proxy\", not \"clustergate\": another proxy serves it".to_owned()
        )]
    );

    // The proxy name is a parameter.
    let m = model_with(
        &yaml,
        &ModelOptions {
            proxy_name: "other-proxy".to_owned(),
            ..ModelOptions::default()
        },
    );
    assert_eq!(served(&m), ["default/anyone", "default/theirs"]);
    assert!(is_skipped(&m, "Service default/ours"));
}

#[test]
fn slice_without_service_name_label_is_skipped_and_listed() {
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n")
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-loose\n  namespace: default\n  labels: {app: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n";
    let m = model(&yaml);
    assert_eq!(
        frontends_of(&m, "default/web"),
        json!([cip("default/web", "http", "198.19.0.10", 80, vec![])])
    );
    assert_eq!(
        skipped_of(&m),
        [(
            "EndpointSlice default/web-loose".to_owned(),
            "no kubernetes.io/service-name label: it belongs to no Service".to_owned()
        )]
    );
}

#[test]
fn slices_join_their_service_in_their_own_namespace() {
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n")
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-x\n  namespace: other\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n";
    let m = model(&yaml);
    assert_eq!(m.frontends[0].backends, []);
    assert_eq!(
        skipped_of(&m),
        [(
            "EndpointSlice other/web-x".to_owned(),
            "no Service other/web in the manifest".to_owned()
        )]
    );
}

#[test]
fn unknown_kinds_and_versions_are_skipped() {
    let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec: {replicas: 3}\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old, namespace: shop}\naddressType: IPv4\nendpoints: []\n---\napiVersion: v1\nkind: PersistentVolume\nmetadata: {name: node-a}\n";
    let m = model(yaml);
    assert!(m.frontends.is_empty());
    assert_eq!(
        skipped_of(&m),
        [
            (
                "Deployment shop/web".to_owned(),
                "kind Deployment (apps/v1) is not read (clustergate reads Service, EndpointSlice, Node, Pod, Namespace and NetworkPolicy)".to_owned()
            ),
            (
                "EndpointSlice shop/old".to_owned(),
                "apiVersion discovery.k8s.io/v1beta1 is not read (clustergate reads EndpointSlice discovery.k8s.io/v1)".to_owned()
            ),
            (
                "PersistentVolume node-a".to_owned(),
                "kind PersistentVolume (v1) is not read (clustergate reads Service, EndpointSlice, Node, Pod, Namespace and NetworkPolicy)".to_owned()
            ),
        ]
    );
}

#[test]
fn empty_manifests_give_an_empty_model() {
    for text in [
        "",
        "\n",
        "# nothing here\n",
        "---\n",
        "---\n---\n...\n",
        "apiVersion: v1\nkind: List\nitems: []\n",
        "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\n",
    ] {
        let m = model(text);
        assert_eq!(
            m,
            Model {
                node_port_addresses: default_node_port_addresses(),
                ..Model::default()
            },
            "{text:?}"
        );
        assert_eq!(
            m.to_json(),
            json!({"frontends": [], "skipped": [], "notes": [], "nodes": [],
                "node_port_addresses": ["0.0.0.0/0", "::/0"], "health_checks": []})
        );
    }
}

#[test]
fn a_single_object_is_a_manifest() {
    let m = model("apiVersion: v1\nkind: Service\nmetadata:\n  name: one\nspec:\n  clusterIP: 198.19.0.1\n  ports:\n  - port: 80\n");
    assert_eq!(
        m.to_json()["frontends"],
        json!([cip("default/one", "", "198.19.0.1", 80, vec![])]),
        "namespace defaults to default"
    );
}

#[test]
fn fqdn_slices_are_ignored() {
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice("web-dns", "web", "addressType: FQDN\nports: [{port: 80}]\nendpoints:\n- addresses: [backend.example.invalid]\n");
    let m = model(&yaml);
    assert_eq!(m.frontends[0].backends, []);
    assert!(is_skipped(&m, "EndpointSlice default/web-dns"));
}

// ---------------------------------------------------------------- endpoints

#[test]
fn slices_are_merged_and_endpoints_deduplicated() {
    let eps = |ips: &[&str]| -> String {
        ips.iter()
            .map(|ip| format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n"))
            .collect()
    };
    let yaml = service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n",
    ) + &slice(
        "web-a",
        "web",
        &format!(
            "addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}",
            eps(&["198.18.1.2", "198.18.1.1", "198.18.1.1"])
        ),
    ) + &slice(
        "web-b",
        "web",
        &format!(
            "addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}",
            eps(&["198.18.1.1", "198.18.1.3"])
        ),
    );
    let m = model(&yaml);
    assert_eq!(
        frontends_of(&m, "default/web"),
        json!([cip(
            "default/web",
            "http",
            "198.19.0.10",
            80,
            vec![
                ready("198.18.1.1", 8080),
                ready("198.18.1.2", 8080),
                ready("198.18.1.3", 8080)
            ]
        )])
    );
}

#[test]
fn a_duplicate_endpoint_keeps_its_best_condition() {
    // The same endpoint in two slices (say, while it moves between them): ready
    // in one, not ready in the other. It counts as ready.
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice("web-a", "web", "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: false}\n")
        + &slice("web-b", "web", "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n  conditions: {ready: true}\n");
    assert_eq!(model(&yaml).frontends[0].backends.len(), 1);
    assert_eq!(
        model(&yaml).frontends[0].backends[0].state,
        BackendState::Ready
    );
}

#[test]
fn named_ports_resolve_per_slice() {
    // targetPort "http" is 8080 in the pods of web-old and 9090 in those of
    // web-new: each slice says which number the name has for its endpoints.
    let yaml = service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: admin, port: 81, targetPort: admin}\n",
    ) + &slice("web-old", "web", "addressType: IPv4\nports:\n- {name: admin, port: 7000, protocol: TCP}\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n- addresses: [198.18.1.1]\n")
        + &slice("web-new", "web", "addressType: IPv4\nports:\n- {name: http, port: 9090, protocol: TCP}\nendpoints:\n- addresses: [198.18.1.2]\n");
    let m = model(&yaml);
    assert_eq!(
        frontends_of(&m, "default/web"),
        json!([
            // Sorted by port name: "admin" < "http".
            cip(
                "default/web",
                "admin",
                "198.19.0.10",
                81,
                vec![ready("198.18.1.1", 7000)]
            ),
            cip(
                "default/web",
                "http",
                "198.19.0.10",
                80,
                vec![ready("198.18.1.1", 8080), ready("198.18.1.2", 9090)]
            ),
        ]),
        "web-new has no admin port, so it adds nothing to admin"
    );
}

#[test]
fn slice_ports_match_by_name_and_protocol() {
    // A slice port of another protocol, or another name, contributes nothing.
    let yaml = service("dns", "  clusterIP: 198.19.0.53\n  ports: [{name: dns, port: 53, protocol: UDP}]\n")
        + &slice("dns-a", "dns", "addressType: IPv4\nports:\n- {name: dns, port: 53, protocol: TCP}\n- {name: domain, port: 53, protocol: UDP}\nendpoints:\n- addresses: [198.18.2.1]\n");
    assert_eq!(model(&yaml).frontends[0].backends, []);
    // An unnamed service port matches a slice port with an empty or absent name.
    let yaml = service("u", "  clusterIP: 198.19.0.54\n  ports: [{port: 80}]\n")
        + &slice("u-a", "u", "addressType: IPv4\nports: [{name: \"\", port: 8080}]\nendpoints:\n- addresses: [198.18.2.2]\n")
        + &slice("u-b", "u", "addressType: IPv4\nports: [{port: 8081}]\nendpoints:\n- addresses: [198.18.2.3]\n");
    assert_eq!(
        frontends_of(&model(&yaml), "default/u"),
        json!([cip(
            "default/u",
            "",
            "198.19.0.54",
            80,
            vec![ready("198.18.2.2", 8080), ready("198.18.2.3", 8081)]
        )])
    );
}

#[test]
fn slice_port_without_number_is_ignored_and_listed() {
    let yaml = service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}]\n",
    ) + &slice(
        "web-a",
        "web",
        "addressType: IPv4\nports: [{name: http}]\nendpoints:\n- addresses: [198.18.1.1]\n",
    );
    let m = model(&yaml);
    assert_eq!(m.frontends[0].backends, []);
    assert_eq!(
        skipped_of(&m),
        [(
            "EndpointSlice default/web-a".to_owned(),
            "ports[0]: no port number; ignored".to_owned()
        )]
    );
}

#[test]
fn dual_stack_gives_one_frontend_per_family_with_its_own_endpoints() {
    let yaml = service(
        "dual",
        "  clusterIP: 198.19.0.20\n  clusterIPs: [198.19.0.20, \"2001:db8:ffff::20\"]\n  ipFamilies: [IPv4, IPv6]\n  ports: [{name: http, port: 80}]\n",
    ) + &slice("dual-6", "dual", "addressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"2001:db8:1::1\"]\n")
        + &slice("dual-4", "dual", "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [198.18.3.1]\n");
    assert_eq!(
        frontends_of(&model(&yaml), "default/dual"),
        json!([
            cip(
                "default/dual",
                "http",
                "198.19.0.20",
                80,
                vec![ready("198.18.3.1", 8080)]
            ),
            cip(
                "default/dual",
                "http",
                "2001:db8:ffff::20",
                80,
                vec![ready("2001:db8:1::1", 8080)]
            ),
        ])
    );
    // An IPv6-only service ignores IPv4 slices.
    let yaml = service(
        "six",
        "  clusterIP: \"2001:db8:ffff::21\"\n  ports: [{port: 80}]\n",
    ) + &slice(
        "six-4",
        "six",
        "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.3.2]\n",
    );
    assert_eq!(model(&yaml).frontends[0].backends, []);
}

#[test]
fn same_port_with_tcp_and_udp_gives_two_frontends() {
    let yaml = service(
        "dns",
        "  clusterIP: 198.19.0.53\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n",
    ) + &slice("dns-a", "dns", "addressType: IPv4\nports:\n- {name: dns, port: 53, protocol: UDP}\n- {name: dns-tcp, port: 5353, protocol: TCP}\nendpoints:\n- addresses: [198.18.2.1]\n");
    assert_eq!(
        frontends_of(&model(&yaml), "default/dns"),
        json!([
            fe(
                "default/dns",
                "dns",
                "ClusterIP",
                "198.19.0.53",
                53,
                "UDP",
                None,
                vec![ready("198.18.2.1", 53)]
            ),
            fe(
                "default/dns",
                "dns-tcp",
                "ClusterIP",
                "198.19.0.53",
                53,
                "TCP",
                None,
                vec![ready("198.18.2.1", 5353)]
            ),
        ])
    );
}

/// A one-port service whose single slice has the given endpoints.
fn service_with_endpoints(endpoints: &str) -> Model {
    model(
        &(service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
            + &slice(
                "web-a",
                "web",
                &format!("addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"),
            )),
    )
}

fn backends(m: &Model) -> Value {
    m.to_json()["frontends"][0]["backends"].clone()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The (address, weight) of each backend of the frontend at `vip`:80/TCP
/// in the dataplane specs.
fn weights(m: &Model, vip: &str) -> Vec<(String, u32)> {
    let specs = m.service_specs();
    let s = specs
        .iter()
        .find(|s| s.addr == vip.parse::<IpAddr>().unwrap() && s.port == 80)
        .unwrap_or_else(|| panic!("no frontend {vip}:80"));
    s.backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect()
}

fn w(list: &[(&str, u32)]) -> Vec<(String, u32)> {
    list.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect()
}

/// The backends a table built from `m` picks for `n` new connections from
/// `client` (ports 1..=n) to `vip`:80/TCP.
fn picks(m: &Model, client: &str, vip: &str, n: u16) -> BTreeSet<String> {
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    let fi = table.frontend(&addr16(ip(vip)), 80, Proto::Tcp).unwrap();
    let fe = table.frontend_record(fi).unwrap();
    (1..=n)
        .filter_map(|port| {
            let t = clustergate_dataplane::flow::FlowTuple {
                src_addr: addr16(ip(client)),
                dst_addr: addr16(ip(vip)),
                src_port: port,
                dst_port: 80,
                proto: Proto::Tcp,
            };
            table
                .pick(fe, &t)
                .map(|b| clustergate_dataplane::flow::ip_from16(b.addr).to_string())
        })
        .collect()
}

#[test]
fn serving_terminating_endpoints_drain_while_some_are_ready() {
    let m = service_with_endpoints(
        "- addresses: [198.18.1.1]\n  conditions: {ready: true, serving: true, terminating: false}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [198.18.1.3]\n  conditions: {ready: false, serving: false, terminating: false}\n\
         - addresses: [198.18.1.4]\n  conditions: {ready: false, serving: false, terminating: true}\n",
    );
    // The terminating one still serving is kept, draining; not serving: out.
    assert_eq!(
        backends(&m),
        json!([
            ready("198.18.1.1", 8080),
            be("198.18.1.2", 8080, "draining")
        ])
    );
    assert_eq!(
        weights(&m, "198.19.0.10"),
        w(&[("198.18.1.1", 1), ("198.18.1.2", 0)])
    );
    let spec = &m.service_specs()[0];
    assert_eq!(spec.backends[1].state, BackendState::Terminating);
    assert!(m
        .to_table()
        .contains("  -> 198.18.1.2:8080              draining\n"));
    // The dataplane keeps it in the frontend (its flows stay) but never
    // picks it for a new one.
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    let fe = table
        .frontend_record(
            table
                .frontend(&addr16(ip("198.19.0.10")), 80, Proto::Tcp)
                .unwrap(),
        )
        .unwrap();
    assert!(table.has_backend(fe, &addr16(ip("198.18.1.2")), 8080));
    assert_eq!(
        picks(&m, "198.18.0.1", "198.19.0.10", 500),
        BTreeSet::from(["198.18.1.1".to_owned()])
    );
    // Several ready, several draining: the same rule for each.
    let m = service_with_endpoints(
        "- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: true}\n\
         - addresses: [198.18.1.3]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [198.18.1.4]\n  conditions: {}\n",
    );
    assert_eq!(
        weights(&m, "198.19.0.10"),
        w(&[
            ("198.18.1.1", 0),
            ("198.18.1.2", 1),
            ("198.18.1.3", 0),
            ("198.18.1.4", 1)
        ])
    );
    assert_eq!(
        picks(&m, "198.18.0.1", "198.19.0.10", 500),
        BTreeSet::from(["198.18.1.2".to_owned(), "198.18.1.4".to_owned()])
    );
}

/// A LoadBalancer Service `default/edge2` with `externalTrafficPolicy` Local
/// (node port, external IP, LB IP, health check node port) and the given
/// endpoints.
fn local_edge(endpoints: &str) -> Model {
    model(
        &(service(
            "edge2",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.60\n  externalIPs: [198.18.200.60]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 31060\n  ports: [{port: 80, nodePort: 30060}]\n",
        ) + "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.201.60}]\n"
            + &slice(
                "edge2-a",
                "edge2",
                &format!("addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"),
            )),
    )
}

#[test]
fn external_traffic_policy_local_drains_on_every_frontend_and_counts_what_takes_new_flows() {
    let m = local_edge(
        "- addresses: [198.18.1.1]\n  conditions: {ready: true}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n",
    );
    let specs = m.service_specs();
    assert_eq!(
        specs.len(),
        4,
        "ClusterIP, NodePort, ExternalIP, LoadBalancer"
    );
    for s in &specs {
        let got: Vec<(String, u32)> = s
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        assert_eq!(
            got,
            w(&[("198.18.1.1", 1), ("198.18.1.2", 0)]),
            "{:?} {}",
            s.kind,
            s.addr
        );
    }
    assert_eq!(
        picks(&m, "198.18.0.1", "198.18.201.60", 300),
        BTreeSet::from(["198.18.1.1".to_owned()])
    );
    // The health check counts the endpoints that take new flows.
    assert_eq!(m.health_checks.len(), 1);
    assert_eq!(m.health_checks[0].endpoints, 1);

    // Nothing ready: the serving-and-terminating ones take new flows
    // everywhere, and count.
    let m = local_edge(
        "- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: false, terminating: true}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [198.18.1.3]\n  conditions: {ready: false, serving: true, terminating: true}\n",
    );
    for s in m.service_specs() {
        let got: Vec<(String, u32)> = s
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        assert_eq!(
            got,
            w(&[("198.18.1.2", 1), ("198.18.1.3", 1)]),
            "{:?}",
            s.kind
        );
        assert!(s
            .backends
            .iter()
            .all(|b| b.state == BackendState::Terminating));
    }
    assert_eq!(m.health_checks[0].endpoints, 2);
    assert_eq!(
        picks(&m, "198.18.0.1", "198.18.201.60", 300),
        BTreeSet::from(["198.18.1.2".to_owned(), "198.18.1.3".to_owned()])
    );
}

#[test]
fn internal_traffic_policy_local_falls_back_to_terminating_endpoints_per_node() {
    // node-a: one ready, one terminating. node-b: terminating only.
    let yaml = node("node-a", &["10.244.1.0/24"], &[])
        + &node("node-b", &["10.244.2.0/24"], &[])
        + &service(
            "local",
            "  clusterIP: 198.19.0.90\n  internalTrafficPolicy: Local\n  externalIPs: [198.18.200.90]\n  ports: [{port: 80}]\n",
        )
        + &slice(
            "local-1",
            "local",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: true}}\n\
             - {addresses: [10.244.1.6], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}\n",
        );
    let m = model(&yaml);
    // The node-local ClusterIP frontend: node-b has nothing ready, so its
    // terminating endpoint takes its clients' new flows (kube-proxy's local
    // category); node-a's drains.
    assert_eq!(
        weights(&m, "198.19.0.90"),
        w(&[("10.244.1.5", 1), ("10.244.1.6", 0), ("10.244.2.6", 1)])
    );
    // The external IP (not node-local): one endpoint is ready, both
    // terminating ones drain.
    assert_eq!(
        weights(&m, "198.18.200.90"),
        w(&[("10.244.1.5", 1), ("10.244.1.6", 0), ("10.244.2.6", 0)])
    );
    let t = m.to_table();
    assert!(
        t.contains("  -> 10.244.1.6:8080              draining node node-a\n"),
        "{t}"
    );
    assert!(
        t.contains("  -> 10.244.2.6:8080              terminating node node-b\n"),
        "{t}"
    );
    // In the dataplane: clients on node-a reach only its ready endpoint,
    // clients on node-b its terminating one.
    assert_eq!(
        picks(&m, "10.244.1.77", "198.19.0.90", 300),
        BTreeSet::from(["10.244.1.5".to_owned()])
    );
    assert_eq!(
        picks(&m, "10.244.2.77", "198.19.0.90", 300),
        BTreeSet::from(["10.244.2.6".to_owned()])
    );
    assert_eq!(
        picks(&m, "10.244.2.77", "198.18.200.90", 300),
        BTreeSet::from(["10.244.1.5".to_owned()])
    );
}

#[test]
fn serving_terminating_endpoints_are_the_fallback() {
    let m = service_with_endpoints(
        "- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: false, terminating: true}\n\
         - addresses: [198.18.1.3]\n  conditions: {ready: false, serving: true, terminating: false}\n\
         - addresses: [198.18.1.4]\n  conditions: {ready: false, serving: true, terminating: true}\n",
    );
    assert_eq!(
        backends(&m),
        json!([
            be("198.18.1.1", 8080, "terminating"),
            be("198.18.1.4", 8080, "terminating")
        ])
    );
    // Nothing is ready: they take new flows (weight 1).
    assert_eq!(
        weights(&m, "198.19.0.10"),
        w(&[("198.18.1.1", 1), ("198.18.1.4", 1)])
    );
    assert_eq!(
        picks(&m, "198.18.0.1", "198.19.0.10", 300),
        BTreeSet::from(["198.18.1.1".to_owned(), "198.18.1.4".to_owned()])
    );
}

#[test]
fn no_usable_endpoints_leaves_the_frontend_without_backends() {
    let m = service_with_endpoints(
        "- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: false, terminating: true}\n\
         - addresses: [198.18.1.2]\n  conditions: {ready: false}\n",
    );
    assert_eq!(backends(&m), json!([]));
    assert_eq!(m.service_specs().len(), 1, "the frontend stays, to reject");
    assert!(m
        .to_table()
        .contains("(no endpoints: connections are rejected)"));
    // A slice with no endpoints at all (`endpoints: null`, as the API prints it).
    let m = model(
        &(service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
            + &slice(
                "web-a",
                "web",
                "addressType: IPv4\nports: [{port: 8080}]\nendpoints: null\n",
            )),
    );
    assert_eq!(backends(&m), json!([]));
}

#[test]
fn nil_conditions_follow_the_api_documentation() {
    // ready nil: ready. serving nil: ready's value. terminating nil: false.
    let one = |conditions: &str| {
        backends(&service_with_endpoints(&format!(
            "- addresses: [198.18.1.1]\n{conditions}"
        )))
    };
    assert_eq!(
        one(""),
        json!([ready("198.18.1.1", 8080)]),
        "no conditions at all"
    );
    assert_eq!(
        one("  conditions: {}\n"),
        json!([ready("198.18.1.1", 8080)]),
        "all nil"
    );
    assert_eq!(
        one("  conditions: {serving: true, terminating: true}\n"),
        json!([ready("198.18.1.1", 8080)]),
        "ready nil is ready, even when terminating"
    );
    assert_eq!(
        one("  conditions: {ready: false, terminating: true}\n"),
        json!([]),
        "serving nil takes ready's value (false): not a fallback"
    );
    assert_eq!(
        one("  conditions: {ready: false, serving: true}\n"),
        json!([]),
        "terminating nil is false: serving but not terminating is no fallback"
    );
}

#[test]
fn endpoint_without_addresses_is_ignored_and_listed() {
    let m = service_with_endpoints("- addresses: []\n- addresses: [198.18.1.2]\n");
    assert_eq!(backends(&m), json!([ready("198.18.1.2", 8080)]));
    assert_eq!(
        skipped_of(&m),
        [(
            "EndpointSlice default/web-a".to_owned(),
            "endpoints[0]: no addresses; ignored".to_owned()
        )]
    );
}

// ---------------------------------------------------------------- affinity

#[test]
fn client_ip_affinity_defaults_to_10800_seconds() {
    let m = model(&service(
        "sticky",
        "  clusterIP: 198.19.0.40\n  sessionAffinity: ClientIP\n  ports: [{port: 80}, {name: b, port: 81}]\n",
    ));
    assert!(m
        .frontends
        .iter()
        .all(|f| f.affinity_timeout_s == Some(10_800)));
    let specs = m.service_specs();
    assert!(specs.iter().all(|s| s.affinity_timeout_s == Some(10_800)));
    // Without affinity: null.
    let m = model(&service(
        "plain",
        "  clusterIP: 198.19.0.41\n  sessionAffinity: None\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(
        m.to_json()["frontends"][0]["affinity_timeout_s"],
        Value::Null
    );
}

#[test]
fn client_ip_affinity_takes_an_explicit_timeout() {
    for t in [1u32, 600, 86_400] {
        let m = model(&service(
            "sticky",
            &format!("  clusterIP: 198.19.0.40\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n  ports: [{{port: 80}}]\n"),
        ));
        assert_eq!(m.to_json()["frontends"][0]["affinity_timeout_s"], json!(t));
    }
}

#[test]
fn affinity_timeout_out_of_range_is_refused() {
    for t in [0i64, -5, 86_401] {
        let e = refused(&service(
            "sticky",
            &format!("  clusterIP: 198.19.0.40\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n  ports: [{{port: 80}}]\n"),
        ));
        assert_eq!(
            e,
            format!("Service default/sticky: spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is not in 1..=86400")
        );
    }
    assert_eq!(
        refused(&service(
            "s",
            "  clusterIP: 198.19.0.40\n  sessionAffinity: Cookie\n  ports: [{port: 80}]\n"
        )),
        "Service default/s: spec.sessionAffinity: \"Cookie\" is not None or ClientIP"
    );
}

// ---------------------------------------------------------------- exposure kinds

#[test]
fn node_ports_external_ips_and_load_balancers_are_served() {
    let yaml = service(
        "edge",
        "  type: LoadBalancer\n  clusterIP: 198.19.0.50\n  clusterIPs: [198.19.0.50, \"2001:db8:ffff::50\"]\n  externalIPs: [198.18.200.1, \"2001:db8:200::1\"]\n  ports: [{name: https, port: 443, nodePort: 30443}]\n",
    ) + "status:\n  loadBalancer:\n    ingress:\n    - {ip: 198.18.201.1}\n    - {ip: 198.18.201.2, ipMode: Proxy}\n    - {hostname: lb.example.invalid}\n"
        + &slice("edge-4", "edge", "addressType: IPv4\nports: [{name: https, port: 8443}]\nendpoints:\n- addresses: [198.18.6.1]\n")
        + &slice("edge-6", "edge", "addressType: IPv6\nports: [{name: https, port: 8443}]\nendpoints:\n- addresses: [\"2001:db8:6::1\"]\n");
    let m = model(&yaml);
    let v4 = || vec![ready("198.18.6.1", 8443)];
    let v6 = || vec![ready("2001:db8:6::1", 8443)];
    let f =
        |kind, address, port, b| fe("default/edge", "https", kind, address, port, "TCP", None, b);
    assert_eq!(
        frontends_of(&m, "default/edge"),
        json!([
            f("NodePort", "0.0.0.0", 30443, v4()),
            f("ExternalIP", "198.18.200.1", 443, v4()),
            f("LoadBalancer", "198.18.201.1", 443, v4()),
            f("ClusterIP", "198.19.0.50", 443, v4()),
            f("NodePort", "::", 30443, v6()),
            f("ExternalIP", "2001:db8:200::1", 443, v6()),
            f("ClusterIP", "2001:db8:ffff::50", 443, v6()),
        ])
    );
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/edge".to_owned(),
            "status.loadBalancer.ingress[1]: ipMode Proxy: the load balancer proxies to nodes itself; 198.18.201.2 ignored".to_owned()
        )]
    );
    let specs = m.service_specs();
    assert_eq!(specs.len(), 7, "every frontend is served");
    let kinds = |k| specs.iter().filter(|s| s.kind == k).count();
    assert_eq!(kinds(FrontendKind::ClusterIp), 2);
    assert_eq!(kinds(FrontendKind::NodePort), 2);
    assert_eq!(kinds(FrontendKind::ExternalIp), 2);
    assert_eq!(kinds(FrontendKind::LoadBalancer), 1);
    assert!(specs
        .iter()
        .all(|s| s.source_ranges.is_none() && !s.node_local));
    assert!(!m.to_table().contains("not served"));
    // The dataplane takes them all: node ports on the unspecified address.
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    assert_eq!(table.frontends().len(), 7);
    let ip = |s: &str| addr16(s.parse::<IpAddr>().unwrap());
    for (addr, port) in [
        ("0.0.0.0", 30443),
        ("::", 30443),
        ("198.18.200.1", 443),
        ("2001:db8:200::1", 443),
        ("198.18.201.1", 443),
    ] {
        assert!(
            table.frontend(&ip(addr), port, Proto::Tcp).is_some(),
            "{addr}:{port}"
        );
    }
}

#[test]
fn external_ip_of_a_family_without_cluster_ip_is_ignored() {
    let m = model(&service(
        "edge",
        "  clusterIP: 198.19.0.50\n  externalIPs: [\"2001:db8:200::1\"]\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(m.frontends.len(), 1);
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/edge".to_owned(),
            "spec.externalIPs[0]: 2001:db8:200::1 is IPv6, and the Service has no IPv6 cluster IP; ignored".to_owned()
        )]
    );
}

#[test]
fn an_external_ip_on_another_services_cluster_ip_is_ignored() {
    // The cluster IP frontend wins; the external IP is listed as ignored.
    let yaml = service("a", "  clusterIP: 198.19.0.1\n  ports: [{port: 80}]\n")
        + &service(
            "b",
            "  clusterIP: 198.19.0.2\n  externalIPs: [198.19.0.1]\n  ports: [{port: 80}]\n",
        );
    let m = model(&yaml);
    assert_eq!(m.frontends.len(), 2);
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/b".to_owned(),
            "spec.externalIPs[0]: 198.19.0.1 is the cluster IP of Service default/a; not served"
                .to_owned()
        )]
    );
}

// ---------------------------------------------------------------- refusals

#[test]
fn invalid_service_port_names_object_and_field() {
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports:\n  - {name: http, port: 80}\n  - {name: big, port: 70000}\n",
    ));
    assert_eq!(
        e,
        "Service default/web: spec.ports[1].port: 70000 is not a valid port"
    );
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports: [{port: 80, protocol: ICMP}]\n",
    ));
    assert_eq!(
        e,
        "Service default/web: spec.ports[0].protocol: \"ICMP\" is not TCP, UDP or SCTP"
    );
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports: [{name: a, port: 80}, {name: a, port: 81}]\n",
    ));
    assert_eq!(
        e,
        "Service default/web: spec.ports[1].name: \"a\" is also the name of spec.ports[0]"
    );
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports: [{name: a, port: 80}, {name: b, port: 80}]\n",
    ));
    assert_eq!(
        e,
        "Service default/web: spec.ports[1].port: 80/TCP is also spec.ports[0]"
    );
}

#[test]
fn invalid_cluster_ips_name_object_and_field() {
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.300\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(
        e,
        "Service default/web: spec.clusterIP: \"198.19.0.300\" is not an IP address"
    );
    let e = refused(&service("web", "  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, 198.19.0.11]\n  ports: [{port: 80}]\n"));
    assert_eq!(
        e,
        "Service default/web: spec.clusterIPs[1]: a second IPv4 address"
    );
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.11]\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(e, "Service default/web: spec.clusterIPs[0]: \"198.19.0.11\" differs from spec.clusterIP \"198.19.0.10\"");
    let e = refused(&service(
        "web",
        "  clusterIP: \"::ffff:198.19.0.10\"\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(e, "Service default/web: spec.clusterIP: \"::ffff:198.19.0.10\" is an IPv4-mapped IPv6 address");
    let e = refused(&service(
        "web",
        "  type: Ingress\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(e, "Service default/web: spec.type: \"Ingress\" is not ClusterIP, NodePort, LoadBalancer or ExternalName");
}

#[test]
fn bad_slice_address_names_object_and_field() {
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice(
            "web-abc",
            "web",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n- addresses: [198.18.1.2]\n- addresses: [198.18.0.x]\n",
        );
    assert_eq!(
        refused(&yaml),
        "EndpointSlice default/web-abc: endpoints[2].addresses[0]: \"198.18.0.x\" is not an IPv4 address"
    );
    // kube-proxy uses an endpoint's first address only: the others are not read.
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice("web-abc", "web", "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1, \"2001:db8::1\"]\n");
    let m = model(&yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(backends(&m), json!([ready("198.18.1.1", 8080)]));
    let yaml = service(
        "web",
        "  clusterIP: \"2001:db8:ffff::10\"\n  ports: [{port: 80}]\n",
    ) + &slice(
        "web-6",
        "web",
        "addressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n",
    );
    assert_eq!(
        refused(&yaml),
        "EndpointSlice default/web-6: endpoints[0].addresses[0]: \"198.18.1.1\" is not an IPv6 address"
    );
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice("web-abc", "web", "addressType: ipv4\nendpoints: []\n");
    assert_eq!(
        refused(&yaml),
        "EndpointSlice default/web-abc: addressType: \"ipv4\" is not IPv4, IPv6 or FQDN"
    );
    let yaml = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")
        + &slice(
            "web-abc",
            "web",
            "addressType: IPv4\nports: [{port: 80800}]\nendpoints: []\n",
        );
    assert_eq!(
        refused(&yaml),
        "EndpointSlice default/web-abc: ports[0].port: 80800 is not a valid port"
    );
}

#[test]
fn invalid_values_in_skipped_objects_are_not_errors() {
    // A headless service's ports and an unserved service's slices are not read.
    let yaml = service("db", "  clusterIP: None\n  ports: [{port: 70000}]\n")
        + &slice(
            "db-a",
            "db",
            "addressType: IPv4\nendpoints:\n- addresses: [not-an-ip]\n",
        )
        + &slice(
            "nobody-a",
            "nobody",
            "addressType: IPv4\nendpoints:\n- addresses: [not-an-ip]\n",
        );
    let m = model(&yaml);
    assert!(m.frontends.is_empty());
    assert_eq!(m.skipped.len(), 3);
}

#[test]
fn bad_yaml_is_refused_with_its_position() {
    let e = parse_manifest(
        "apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  metadata: {name: web\n",
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with("not valid YAML: "), "{s}");
    assert!(s.contains("line"), "{s}");
    assert!(
        matches!(
            e,
            clustergate_control::ManifestError::Syntax { line: Some(_), .. }
        ),
        "{e:?}"
    );
    // A tab where YAML wants spaces, in a later document.
    let e = refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Service\n\tmetadata: {}\n");
    assert!(e.starts_with("not valid YAML: "), "{e}");
}

#[test]
fn wrongly_typed_fields_name_object_and_field() {
    let e = refused(&service(
        "web",
        "  clusterIP: 198.19.0.10\n  ports:\n  - port: 80\n  - port: eighty\n",
    ));
    assert!(
        e.starts_with("Service default/web: spec.ports[1].port: invalid type: string \"eighty\""),
        "{e}"
    );
    let e = refused(&slice(
        "web-a",
        "web",
        "addressType: IPv4\nendpoints:\n- addresses: 198.18.1.1\n",
    ));
    assert!(
        e.starts_with("EndpointSlice default/web-a: endpoints[0].addresses: invalid type"),
        "{e}"
    );
    let e = refused("apiVersion: v1\nkind: List\nitems:\n- 42\n");
    assert_eq!(
        e,
        "document 1, items[0]: expected a Kubernetes object (a mapping), found a number"
    );
    let e = refused("metadata: {name: x}\n");
    assert_eq!(e, "document 1: kind: missing");
    let e = refused("---\n---\nkind: Service\nmetadata: {name: x, namespace: y}\n");
    assert_eq!(e, "Service y/x: apiVersion: missing");
}

#[test]
fn duplicates_and_conflicts_are_refused() {
    let one = service("web", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n");
    assert_eq!(
        refused(&(one.clone() + &one)),
        "Service default/web: appears more than once"
    );
    let yaml = one + &service("web2", "  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n");
    assert_eq!(
        refused(&yaml),
        "Service default/web2: frontend 198.19.0.10:80/TCP is already a frontend of Service default/web"
    );
}

#[test]
fn a_service_without_ports_serves_nothing_and_says_so() {
    let m = model(&service("web", "  clusterIP: 198.19.0.10\n"));
    assert!(m.frontends.is_empty());
    assert_eq!(
        skipped_of(&m),
        [("Service default/web".to_owned(), "no ports".to_owned())]
    );
}

// ---------------------------------------------------------------- return paths

/// A Service document in `default` with `annotations` (`key: value` lines,
/// indented four spaces) and `spec` (indented two).
fn annotated(name: &str, annotations: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n{annotations}spec:\n{spec}"
    )
}

fn return_path_annotation(value: &str) -> String {
    format!("    clustergate.io/return-path: {value}\n")
}

/// `default/edge`: a LoadBalancer with a node port, an external IP and an
/// ingress IP; its pods listen on the service port (443), so only the node
/// port differs from the backends' port. `extra_spec` goes into the spec,
/// `annotation` (a value, or none) onto the Service.
fn edge(annotation: Option<&str>, extra_spec: &str) -> String {
    let spec = format!(
        "  type: LoadBalancer\n  clusterIP: 198.19.0.50\n  externalIPs: [198.18.200.1]\n  ports: [{{name: https, port: 443, nodePort: 30443}}]\n{extra_spec}"
    );
    let svc = match annotation {
        Some(v) => annotated("edge", &return_path_annotation(v), &spec),
        None => service("edge", &spec),
    };
    svc + "status:\n  loadBalancer:\n    ingress:\n    - {ip: 198.18.201.1}\n"
        + &slice(
            "edge-1",
            "edge",
            "addressType: IPv4\nports: [{name: https, port: 443}]\nendpoints:\n- addresses: [198.18.6.1]\n",
        )
}

/// `default/<name>` on `ip`:80 (`http`), with one backend on `target`.
fn plain(name: &str, annotation: Option<&str>, ip: &str, target: u16) -> String {
    let spec = format!("  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n");
    let svc = match annotation {
        Some(v) => annotated(name, &return_path_annotation(v), &spec),
        None => service(name, &spec),
    };
    svc + &slice(
        &format!("{name}-1"),
        name,
        &format!(
            "addressType: IPv4\nports: [{{name: http, port: {target}}}]\nendpoints:\n- addresses: [198.18.1.1]\n"
        ),
    )
}

/// `(kind, address:port, return path)` of each frontend of `service`, in model order.
fn return_paths(m: &Model, service: &str) -> Vec<(String, String, String)> {
    m.to_json()["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["service"] == service)
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                format!("{}:{}", f["address"].as_str().unwrap(), f["port"]),
                f["return_path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The edge Service's frontends with their return paths: node port, external
/// IP, load balancer, cluster IP (the model's order).
fn edge_paths(
    node_port: &str,
    external: &str,
    lb: &str,
    cluster: &str,
) -> Vec<(String, String, String)> {
    [
        ("NodePort", "0.0.0.0:30443", node_port),
        ("ExternalIP", "198.18.200.1:443", external),
        ("LoadBalancer", "198.18.201.1:443", lb),
        ("ClusterIP", "198.19.0.50:443", cluster),
    ]
    .iter()
    .map(|(k, a, p)| ((*k).to_owned(), (*a).to_owned(), (*p).to_owned()))
    .collect()
}

fn notes_of(m: &Model) -> Vec<(String, String)> {
    m.notes
        .iter()
        .map(|s| (s.object.clone(), s.reason.clone()))
        .collect()
}

const NODE_PORT_DSR_NOTE: &str = "dsr: NodePort frontend 0.0.0.0:30443/TCP delivers the client's packets unchanged, to port 30443, but backends listen on port 443: they must also accept port 30443";

#[test]
fn return_path_defaults_to_snat_on_every_frontend() {
    let yaml = plain("web", None, "198.19.0.10", 8080) + &edge(None, "");
    let m = model(&yaml);
    assert_eq!(
        return_paths(&m, "default/web"),
        [(
            "ClusterIP".to_owned(),
            "198.19.0.10:80".to_owned(),
            "snat".to_owned()
        )]
    );
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("snat", "snat", "snat", "snat")
    );
    assert!(m
        .frontends
        .iter()
        .all(|f| f.return_path == ReturnPath::Snat));
    assert!(m.notes.is_empty(), "{:?}", m.notes);
    assert_eq!(
        m,
        model_returning(&yaml, ReturnPath::Snat),
        "snat is the default"
    );
}

#[test]
fn the_flag_sets_the_return_path_of_services_without_the_annotation() {
    let yaml = plain("web", None, "198.19.0.10", 80) + &edge(None, "");
    for (flag, name) in [(ReturnPath::Routed, "routed"), (ReturnPath::Dsr, "dsr")] {
        let m = model_returning(&yaml, flag);
        assert_eq!(
            return_paths(&m, "default/web"),
            [(
                "ClusterIP".to_owned(),
                "198.19.0.10:80".to_owned(),
                name.to_owned()
            )]
        );
        assert_eq!(
            return_paths(&m, "default/edge"),
            edge_paths(name, name, name, name),
            "{flag}"
        );
        assert!(m.service_specs().iter().all(|s| s.return_path == flag));
    }
}

#[test]
fn the_annotation_overrides_the_flag_for_its_service_only() {
    let yaml = plain("a-dsr", Some("dsr"), "198.19.0.1", 80)
        + &plain("b-routed", Some("routed"), "198.19.0.2", 80)
        + &plain("c-snat", Some("snat"), "198.19.0.3", 80)
        + &plain("d-none", None, "198.19.0.4", 80)
        + &edge(Some("routed"), "");
    let path = |m: &Model, svc: &str| -> Vec<String> {
        return_paths(m, svc)
            .into_iter()
            .map(|(_, _, p)| p)
            .collect()
    };
    for (flag, unannotated) in [
        (ReturnPath::Snat, "snat"),
        (ReturnPath::Routed, "routed"),
        (ReturnPath::Dsr, "dsr"),
    ] {
        let m = model_returning(&yaml, flag);
        assert_eq!(path(&m, "default/a-dsr"), ["dsr"], "{flag}");
        assert_eq!(path(&m, "default/b-routed"), ["routed"], "{flag}");
        assert_eq!(path(&m, "default/c-snat"), ["snat"], "{flag}");
        assert_eq!(path(&m, "default/d-none"), [unannotated], "{flag}");
        // Every frontend of the annotated Service, whatever its kind.
        assert_eq!(
            return_paths(&m, "default/edge"),
            edge_paths("routed", "routed", "routed", "routed"),
            "{flag}"
        );
    }
}

#[test]
fn an_invalid_return_path_annotation_is_refused() {
    for value in ["direct", "SNAT", "\"\"", "ipvs-dr"] {
        let yaml = plain("web", Some(value), "198.19.0.10", 80);
        let shown = value.trim_matches('"');
        assert_eq!(
            refused(&yaml),
            format!(
                "Service default/web: metadata.annotations[\"clustergate.io/return-path\"]: {shown:?} is not snat, dsr or routed"
            )
        );
    }
    // Objects that are skipped are not read, their annotations included.
    let theirs = "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: theirs\n  namespace: default\n  labels: {service.kubernetes.io/service-proxy-name: other-proxy}\n  annotations: {clustergate.io/return-path: direct}\nspec:\n  clusterIP: 198.19.0.2\n  ports: [{port: 80}]\n";
    let m = model(theirs);
    assert!(m.frontends.is_empty() && is_skipped(&m, "Service default/theirs"));
}

#[test]
fn external_traffic_policy_local_never_gets_snat_on_external_frontends() {
    let yaml =
        edge(None, "  externalTrafficPolicy: Local\n") + &plain("web", None, "198.19.0.10", 80);
    let m = model(&yaml);
    // The client's address is kept on the node port, external and
    // load-balancer frontends; the cluster IP keeps the Service's choice.
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("routed", "routed", "routed", "snat")
    );
    assert_eq!(
        return_paths(&m, "default/web")[0].2,
        "snat",
        "other Services are unaffected"
    );
    assert!(
        m.notes.is_empty(),
        "the default is not the user's choice: {:?}",
        m.notes
    );
    let specs = m.service_specs();
    let edge_spec = specs
        .iter()
        .find(|s| s.addr == "198.19.0.50".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(edge_spec.return_path, ReturnPath::Snat);

    // `Cluster`, absent or empty: the Service's choice everywhere.
    for policy in [
        "  externalTrafficPolicy: Cluster\n",
        "",
        "  externalTrafficPolicy: \"\"\n",
    ] {
        let m = model(&edge(None, policy));
        assert_eq!(
            return_paths(&m, "default/edge"),
            edge_paths("snat", "snat", "snat", "snat"),
            "{policy:?}"
        );
    }
    // A flag default that keeps the client's address stays.
    let m = model_returning(
        &edge(None, "  externalTrafficPolicy: Local\n"),
        ReturnPath::Dsr,
    );
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("dsr", "dsr", "dsr", "dsr")
    );
    let m = model_returning(
        &edge(None, "  externalTrafficPolicy: Local\n"),
        ReturnPath::Routed,
    );
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("routed", "routed", "routed", "routed")
    );
}

#[test]
fn external_traffic_policy_local_applies_to_externally_accessible_services_only() {
    // kube-proxy's ExternalPolicyLocal: NodePort, LoadBalancer, or ClusterIP
    // with external IPs. A ClusterIP Service with a node port (which the API
    // would not accept) is not externally accessible: Local does nothing.
    let spec = |extra: &str| {
        format!("  type: ClusterIP\n  clusterIP: 198.19.0.70\n  externalTrafficPolicy: Local\n  ports: [{{port: 80, nodePort: 30070}}]\n{extra}")
    };
    let m = model(&service("odd", &spec("")));
    assert_eq!(
        return_paths(&m, "default/odd"),
        [
            (
                "NodePort".to_owned(),
                "0.0.0.0:30070".to_owned(),
                "snat".to_owned()
            ),
            (
                "ClusterIP".to_owned(),
                "198.19.0.70:80".to_owned(),
                "snat".to_owned()
            ),
        ]
    );
    let m = model(&service("odd", &spec("  externalIPs: [198.18.200.7]\n")));
    assert_eq!(
        return_paths(&m, "default/odd"),
        [
            (
                "NodePort".to_owned(),
                "0.0.0.0:30070".to_owned(),
                "routed".to_owned()
            ),
            (
                "ExternalIP".to_owned(),
                "198.18.200.7:80".to_owned(),
                "routed".to_owned()
            ),
            (
                "ClusterIP".to_owned(),
                "198.19.0.70:80".to_owned(),
                "snat".to_owned()
            ),
        ]
    );
}

#[test]
fn external_traffic_policy_local_with_dsr_is_dsr_everywhere() {
    let m = model(&edge(Some("dsr"), "  externalTrafficPolicy: Local\n"));
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("dsr", "dsr", "dsr", "dsr")
    );
    // The node port is not the backends' port: that is worth a note.
    assert_eq!(
        notes_of(&m),
        [(
            "Service default/edge".to_owned(),
            NODE_PORT_DSR_NOTE.to_owned()
        )]
    );
}

#[test]
fn external_traffic_policy_local_overrides_an_annotated_snat_with_a_note() {
    let m = model_returning(
        &edge(Some("snat"), "  externalTrafficPolicy: Local\n"),
        ReturnPath::Dsr,
    );
    assert_eq!(
        return_paths(&m, "default/edge"),
        edge_paths("routed", "routed", "routed", "snat")
    );
    assert_eq!(
        notes_of(&m),
        [(
            "Service default/edge".to_owned(),
            "clustergate.io/return-path is snat, but spec.externalTrafficPolicy is Local, which keeps the client's address: its NodePort, ExternalIP, LoadBalancer frontends use routed".to_owned()
        )]
    );
    // A Service with nothing external has nothing to override and no note.
    let m = model(&annotated(
        "inside",
        &return_path_annotation("snat"),
        "  type: ClusterIP\n  clusterIP: 198.19.0.71\n  externalTrafficPolicy: Local\n  ports: [{port: 80}]\n",
    ));
    assert_eq!(return_paths(&m, "default/inside")[0].2, "snat");
    assert!(m.notes.is_empty(), "{:?}", m.notes);
}

#[test]
fn an_invalid_external_traffic_policy_is_refused() {
    for policy in ["Global", "local", "OnlyLocal"] {
        assert_eq!(
            refused(&edge(None, &format!("  externalTrafficPolicy: {policy}\n"))),
            format!("Service default/edge: spec.externalTrafficPolicy: {policy:?} is not Cluster or Local")
        );
    }
}

#[test]
fn dsr_to_another_port_gives_a_note() {
    // web: 80 -> 8080 gets a note; same: 80 -> 80 does not.
    let yaml = plain("web", Some("dsr"), "198.19.0.10", 8080)
        + &plain("same", Some("dsr"), "198.19.0.11", 80);
    let m = model(&yaml);
    assert_eq!(
        notes_of(&m),
        [(
            "Service default/web".to_owned(),
            "dsr: ClusterIP frontend 198.19.0.10:80/TCP delivers the client's packets unchanged, to port 80, but backends listen on port 8080: they must also accept port 80".to_owned()
        )]
    );
    assert_eq!(
        return_paths(&m, "default/web")[0].2,
        "dsr",
        "noted, not refused"
    );
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);

    // The same ports with snat or routed: nothing to note.
    for flag in [ReturnPath::Snat, ReturnPath::Routed] {
        let m = model_returning(&plain("web", None, "198.19.0.10", 8080), flag);
        assert!(m.notes.is_empty(), "{flag}: {:?}", m.notes);
    }

    // Named ports resolve per slice: only the numbers that differ are listed.
    let yaml = annotated("mixed", &return_path_annotation("dsr"), "  clusterIP: 198.19.0.12\n  ports: [{name: http, port: 80, targetPort: http}]\n")
        + &slice("mixed-a", "mixed", "addressType: IPv4\nports: [{name: http, port: 80}]\nendpoints:\n- addresses: [198.18.2.1]\n")
        + &slice("mixed-b", "mixed", "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [198.18.2.2]\n")
        + &slice("mixed-c", "mixed", "addressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints:\n- addresses: [198.18.2.3]\n");
    let m = model(&yaml);
    assert_eq!(
        notes_of(&m),
        [(
            "Service default/mixed".to_owned(),
            "dsr: ClusterIP frontend 198.19.0.12:80/TCP delivers the client's packets unchanged, to port 80, but backends listen on ports 8080, 9090: they must also accept port 80".to_owned()
        )]
    );

    // No backends, nothing to note.
    let m = model(&annotated(
        "lonely",
        &return_path_annotation("dsr"),
        "  clusterIP: 198.19.0.13\n  ports: [{port: 80}]\n",
    ));
    assert!(m.notes.is_empty(), "{:?}", m.notes);
}

#[test]
fn show_prints_return_paths_and_notes() {
    let yaml = plain("web", Some("dsr"), "198.19.0.10", 8080)
        + &edge(None, "  externalTrafficPolicy: Local\n");
    let m = model(&yaml);

    let json = m.to_json();
    let web = &frontends_of(&m, "default/web")[0];
    assert_eq!(web["return_path"], "dsr");
    assert_eq!(
        json["notes"],
        json!([{
            "object": "Service default/web",
            "reason": "dsr: ClusterIP frontend 198.19.0.10:80/TCP delivers the client's packets unchanged, to port 80, but backends listen on port 8080: they must also accept port 80",
        }])
    );

    let t = m.to_table();
    let line = |needle: &str| {
        t.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{t}"))
            .to_owned()
    };
    assert!(
        t.starts_with("Prot LocalAddress:Port Kind Service ReturnPath\n"),
        "{t}"
    );
    assert_eq!(
        line("198.19.0.10:80"),
        "TCP  198.19.0.10:80 ClusterIP default/web:http dsr"
    );
    assert_eq!(
        line("198.19.0.50:443"),
        "TCP  198.19.0.50:443 ClusterIP default/edge:https snat"
    );
    assert_eq!(
        line("0.0.0.0:30443"),
        "TCP  0.0.0.0:30443 NodePort default/edge:https routed on node addresses in 0.0.0.0/0"
    );
    assert!(
        t.ends_with("\nNotes:\n  Service default/web: dsr: ClusterIP frontend 198.19.0.10:80/TCP delivers the client's packets unchanged, to port 80, but backends listen on port 8080: they must also accept port 80\n"),
        "{t}"
    );
}

#[test]
fn the_dataplane_table_carries_each_frontends_return_path() {
    let yaml = plain("a", Some("dsr"), "198.19.0.1", 80)
        + &plain("b", Some("routed"), "198.19.0.2", 80)
        + &plain("c", None, "198.19.0.3", 80);
    let table = Table::build(1, 0, &model(&yaml).service_specs()).unwrap();
    let ip = |s: &str| addr16(s.parse::<IpAddr>().unwrap());
    for (addr, want) in [
        ("198.19.0.1", ReturnPath::Dsr),
        ("198.19.0.2", ReturnPath::Routed),
        ("198.19.0.3", ReturnPath::Snat),
    ] {
        let f = table.frontend(&ip(addr), 80, Proto::Tcp).unwrap();
        let record = table.frontend_record(f).unwrap();
        assert_eq!(Table::return_path(record), want, "{addr}");
        assert_eq!(record.return_path, want as u8, "{addr}");
    }
}

// ---------------------------------------------------------------- every way in (issue 11)

/// A Node document: `pod_cidrs` and `addresses` (type, address) as given.
fn node(name: &str, pod_cidrs: &[&str], addresses: &[(&str, &str)]) -> String {
    let cidrs: Vec<String> = pod_cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    let addrs: Vec<String> = addresses
        .iter()
        .map(|(t, a)| format!("{{type: {t}, address: \"{a}\"}}"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDRs: [{}]\nstatus:\n  addresses: [{}]\n",
        cidrs.join(", "),
        addrs.join(", ")
    )
}

/// A dual-stack LoadBalancer Service `default/lb` on 80 (node port 30080),
/// with `extra` spec lines and LB ingress IPs `ingress`, and a ready
/// endpoint per family.
fn lb(extra: &str, ingress: &[&str]) -> String {
    let ing: Vec<String> = ingress.iter().map(|i| format!("{{ip: \"{i}\"}}")).collect();
    service(
        "lb",
        &format!("  type: LoadBalancer\n  clusterIPs: [198.19.0.80, \"2001:db8:ffff::80\"]\n  ports: [{{port: 80, nodePort: 30080}}]\n{extra}"),
    ) + &format!("status:\n  loadBalancer:\n    ingress: [{}]\n", ing.join(", "))
        + &slice("lb-4", "lb", "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.8.1]\n")
        + &slice("lb-6", "lb", "addressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- addresses: [\"2001:db8:8::1\"]\n")
}

/// (kind, address, port, source ranges, node-local) of each frontend of `svc`.
fn shapes(m: &Model, svc: &str) -> Vec<(String, String, u64, Value, bool)> {
    frontends_of(m, svc)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["address"].as_str().unwrap().to_owned(),
                f["port"].as_u64().unwrap(),
                f["source_ranges"].clone(),
                f["node_local"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn shape(
    kind: &str,
    address: &str,
    port: u64,
    ranges: Value,
    local: bool,
) -> (String, String, u64, Value, bool) {
    (kind.to_owned(), address.to_owned(), port, ranges, local)
}

#[test]
fn node_ports_are_served_per_family_on_the_unspecified_address() {
    let m = model(&lb("", &[]));
    let nodeports: Vec<_> = shapes(&m, "default/lb")
        .into_iter()
        .filter(|s| s.0 == "NodePort")
        .collect();
    assert_eq!(
        nodeports,
        [
            shape("NodePort", "0.0.0.0", 30080, Value::Null, false),
            shape("NodePort", "::", 30080, Value::Null, false),
        ]
    );
    // Default --nodeport-addresses: every address of the node.
    let spec = m.table_spec();
    assert_eq!(
        spec.node_port_addresses,
        ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()] as [ipnet::IpNet; 2]
    );
}

#[test]
fn nodeport_addresses_reach_the_table_spec() {
    let options = ModelOptions {
        node_port_addresses: vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8:1::/64".parse().unwrap(),
        ],
        ..ModelOptions::default()
    };
    let m = model_with(&lb("", &[]), &options);
    assert_eq!(
        m.table_spec().node_port_addresses,
        options.node_port_addresses
    );
    assert_eq!(
        m.to_json()["node_port_addresses"],
        json!(["10.0.0.0/8", "2001:db8:1::/64"])
    );
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    assert_eq!(
        table.frontends().len(),
        4,
        "a ClusterIP and a NodePort per family"
    );
}

#[test]
fn a_node_port_outside_the_range_is_skipped_with_its_field() {
    for (node_port, range, served) in [
        (30080, 30000..=32767, true),
        (30000, 30000..=32767, true),
        (32767, 30000..=32767, true),
        (29999, 30000..=32767, false),
        (32768, 30000..=32767, false),
        (65536, 30000..=32767, false),
        (8080, 30000..=32767, false),
        (8080, 8000..=9000, true),
    ] {
        let yaml = service(
            "np",
            &format!("  type: NodePort\n  clusterIP: 198.19.0.81\n  ports: [{{port: 80, nodePort: {node_port}}}]\n"),
        );
        let m = model_with(
            &yaml,
            &ModelOptions {
                node_port_range: range.clone(),
                ..ModelOptions::default()
            },
        );
        let kinds: Vec<_> = m.frontends.iter().map(|f| (f.kind, f.port)).collect();
        if served {
            assert_eq!(
                kinds,
                [
                    (FrontendKind::NodePort, node_port as u16),
                    (FrontendKind::ClusterIp, 80)
                ],
                "{node_port} in {range:?}"
            );
            assert!(m.skipped.is_empty(), "{:?}", m.skipped);
        } else {
            assert_eq!(
                kinds,
                [(FrontendKind::ClusterIp, 80)],
                "{node_port} in {range:?}"
            );
            assert_eq!(
                skipped_of(&m),
                [(
                    "Service default/np".to_owned(),
                    format!(
                        "spec.ports[0].nodePort: {node_port} is outside the node port range {}-{} (--service-node-port-range); its NodePort frontends are not served",
                        range.start(),
                        range.end()
                    )
                )]
            );
        }
    }
}

#[test]
fn two_services_on_one_node_port_the_second_is_skipped() {
    let yaml = service(
        "a",
        "  type: NodePort\n  clusterIP: 198.19.0.1\n  ports: [{port: 80, nodePort: 30001}]\n",
    ) + &service(
        "b",
        "  type: NodePort\n  clusterIP: 198.19.0.2\n  ports: [{port: 80, nodePort: 30001}, {name: dns, port: 53, protocol: UDP, nodePort: 30001}]\n",
    );
    let m = model(&yaml);
    let np: Vec<_> = m
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort)
        .map(|f| (f.service.as_str(), f.port, f.protocol))
        .collect();
    // The same number with another protocol is another frontend.
    assert_eq!(
        np,
        [
            ("default/a", 30001, Proto::Tcp),
            ("default/b", 30001, Proto::Udp)
        ]
    );
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/b".to_owned(),
            "spec.ports[].nodePort: NodePort frontend 0.0.0.0:30001/TCP is already a NodePort frontend of default/a; ignored".to_owned()
        )]
    );
}

#[test]
fn two_services_on_one_load_balancer_ip_the_second_is_skipped() {
    let yaml = lb("", &["198.18.210.1"])
        + &service(
            "other",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.82\n  ports: [{port: 80, nodePort: 30082}]\n",
        )
        + "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.210.1}]\n";
    let m = model(&yaml);
    let lbs: Vec<_> = m
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::LoadBalancer)
        .map(|f| f.service.as_str())
        .collect();
    assert_eq!(lbs, ["default/lb"]);
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/other".to_owned(),
            "status.loadBalancer.ingress[].ip: LoadBalancer frontend 198.18.210.1:80/TCP is already a LoadBalancer frontend of default/lb; ignored".to_owned()
        )]
    );
}

#[test]
fn an_external_ip_that_is_a_cluster_ip_on_another_port_is_skipped_too() {
    let yaml = service("a", "  clusterIP: 198.19.0.1\n  ports: [{port: 443}]\n")
        + &service(
            "b",
            "  clusterIP: 198.19.0.2\n  externalIPs: [198.19.0.1, 198.18.200.9]\n  ports: [{port: 80}]\n",
        );
    let m = model(&yaml);
    let ext: Vec<_> = m
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ExternalIp)
        .map(|f| f.address.to_string())
        .collect();
    assert_eq!(ext, ["198.18.200.9"], "the other external IP is served");
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/b".to_owned(),
            "spec.externalIPs[0]: 198.19.0.1 is the cluster IP of Service default/a; not served"
                .to_owned()
        )]
    );
}

#[test]
fn external_and_load_balancer_ips_are_served_per_family() {
    let m = model(&lb(
        "  externalIPs: [198.18.200.8, \"2001:db8:200::8\"]\n",
        &["198.18.210.8", "2001:db8:210::8"],
    ));
    let got: Vec<_> = shapes(&m, "default/lb")
        .into_iter()
        .map(|s| (s.0, s.1))
        .collect();
    let want: Vec<(String, String)> = [
        ("NodePort", "0.0.0.0"),
        ("ExternalIP", "198.18.200.8"),
        ("LoadBalancer", "198.18.210.8"),
        ("ClusterIP", "198.19.0.80"),
        ("NodePort", "::"),
        ("ExternalIP", "2001:db8:200::8"),
        ("LoadBalancer", "2001:db8:210::8"),
        ("ClusterIP", "2001:db8:ffff::80"),
    ]
    .iter()
    .map(|(k, a)| ((*k).to_owned(), (*a).to_owned()))
    .collect();
    assert_eq!(got, want);
    // Each with the endpoints of its own family.
    for f in &m.frontends {
        assert!(f
            .backends
            .iter()
            .all(|b| b.address.is_ipv4() == f.address.is_ipv4()));
        assert_eq!(f.backends.len(), 1);
    }
    let table = Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    assert_eq!(table.frontends().len(), 8);
}

#[test]
fn load_balancer_source_ranges_close_only_the_load_balancer_frontends() {
    // Dual-stack Service, IPv4 ranges only (one padded, one with host bits).
    let m = model(&lb(
        "  externalIPs: [198.18.200.8]\n  loadBalancerSourceRanges: [\" 203.0.113.0/24 \", 198.51.100.7/16]\n",
        &["198.18.210.8", "2001:db8:210::8"],
    ));
    let got = shapes(&m, "default/lb");
    let ranges = |kind: &str, addr: &str| {
        got.iter()
            .find(|s| s.0 == kind && s.1 == addr)
            .unwrap_or_else(|| panic!("no {kind} {addr} in {got:?}"))
            .3
            .clone()
    };
    assert_eq!(
        ranges("LoadBalancer", "198.18.210.8"),
        json!(["203.0.113.0/24", "198.51.0.0/16"])
    );
    // No IPv6 range: the IPv6 LB IP takes no source (deviation: kube-proxy
    // leaves it open).
    assert_eq!(ranges("LoadBalancer", "2001:db8:210::8"), json!([]));
    // ClusterIP, NodePort and external IPs stay open, as in kube-proxy.
    for (k, a) in [
        ("ClusterIP", "198.19.0.80"),
        ("ClusterIP", "2001:db8:ffff::80"),
        ("NodePort", "0.0.0.0"),
        ("NodePort", "::"),
        ("ExternalIP", "198.18.200.8"),
    ] {
        assert_eq!(ranges(k, a), Value::Null, "{k} {a}");
    }
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    // The dataplane takes them (ranges of the frontend's family only).
    Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
    let t = m.to_table();
    assert!(
        t.contains(
            "198.18.210.8:80 LoadBalancer default/lb snat from 203.0.113.0/24,198.51.0.0/16\n"
        ),
        "{t}"
    );
    assert!(
        t.contains("[2001:db8:210::8]:80 LoadBalancer default/lb snat from nowhere\n"),
        "{t}"
    );
}

#[test]
fn a_source_range_that_is_not_a_cidr_closes_the_load_balancer_frontends() {
    let m = model(&lb(
        "  loadBalancerSourceRanges: [203.0.113.0/24, 203.0.113.300/24]\n",
        &["198.18.210.8"],
    ));
    let kinds: BTreeSet<String> = shapes(&m, "default/lb").into_iter().map(|s| s.0).collect();
    assert_eq!(
        kinds,
        ["ClusterIP", "NodePort"].map(str::to_owned).into(),
        "fail closed: no LoadBalancer frontend, the rest served"
    );
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/lb".to_owned(),
            "spec.loadBalancerSourceRanges[1]: \"203.0.113.300/24\" is not a CIDR; its LoadBalancer frontends are not served (fail closed)".to_owned()
        )]
    );
}

/// Two nodes (dual-stack pod CIDRs and addresses) and a Service with
/// `internalTrafficPolicy: Local` whose endpoints are on node-a, node-b, an
/// unknown node and no node.
fn node_local_manifest(policy: &str) -> String {
    node(
        "node-a",
        &["10.244.1.0/24", "fd00:1::/64"],
        &[("InternalIP", "192.168.0.1"), ("ExternalIP", "203.0.113.1"), ("Hostname", "node-a")],
    ) + &node(
        "node-b",
        &["10.244.2.0/24"],
        &[("InternalIP", "192.168.0.2"), ("InternalIP", "2001:db8:99::2")],
    ) + &service(
        "local",
        &format!("  clusterIP: 198.19.0.90\n  internalTrafficPolicy: {policy}\n  externalIPs: [198.18.200.90]\n  ports: [{{port: 80}}]\n"),
    ) + &slice(
        "local-1",
        "local",
        "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [10.244.1.5], nodeName: node-a}\n- {addresses: [10.244.2.5], nodeName: node-b}\n- {addresses: [10.244.3.5], nodeName: node-gone}\n- {addresses: [10.244.4.5]}\n",
    )
}

#[test]
fn internal_traffic_policy_local_makes_cluster_ip_frontends_node_local() {
    let m = model(&node_local_manifest("Local"));
    let got = shapes(&m, "default/local");
    assert_eq!(
        got,
        [
            shape("ExternalIP", "198.18.200.90", 80, Value::Null, false),
            shape("ClusterIP", "198.19.0.90", 80, Value::Null, true),
        ],
        "only the ClusterIP frontend is internal traffic"
    );
    let cip = m
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .unwrap();
    let nodes: Vec<_> = cip
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.node))
        .collect();
    assert_eq!(
        nodes,
        [
            ("10.244.1.5".to_owned(), Some(1)),
            ("10.244.2.5".to_owned(), Some(2)),
            ("10.244.3.5".to_owned(), None),
            ("10.244.4.5".to_owned(), None),
        ],
        "unknown node and no nodeName: never local"
    );
    assert_eq!(
        m.to_json()["nodes"],
        json!([
            {"name": "node-a", "number": 1,
             "prefixes": ["10.244.1.0/24", "fd00:1::/64", "192.168.0.1/32", "203.0.113.1/32"]},
            {"name": "node-b", "number": 2,
             "prefixes": ["10.244.2.0/24", "192.168.0.2/32", "2001:db8:99::2/128"]},
        ])
    );
    let spec = m.table_spec();
    assert_eq!(spec.nodes.len(), 7);
    let cip_spec = spec.services.iter().find(|s| s.node_local).unwrap();
    assert_eq!(
        cip_spec.backends.iter().map(|b| b.node).collect::<Vec<_>>(),
        [Some(1), Some(2), None, None]
    );
    assert!(
        spec.services
            .iter()
            .filter(|s| !s.node_local)
            .all(|s| s.backends.iter().all(|b| b.node.is_none())),
        "nodes only where they are used"
    );
    // The dataplane builds a ring per node.
    let table = Table::build_full(1, 0, &spec, DEFAULT_MAX_RING_SIZE).unwrap();
    assert_eq!(table.frontends().len(), 2);
    assert!(m
        .to_table()
        .contains("198.19.0.90:80 ClusterIP default/local snat node-local\n"));
    assert!(
        m.to_table()
            .contains("  -> 10.244.1.5:8080              ready node node-a\n"),
        "{}",
        m.to_table()
    );

    // Cluster (and the default): no node-local frontend.
    for policy in ["Cluster", "\"\""] {
        let m = model(&node_local_manifest(policy));
        assert!(m.frontends.iter().all(|f| !f.node_local), "{policy}");
    }
}

#[test]
fn an_invalid_internal_traffic_policy_skips_the_service() {
    let m = model(&node_local_manifest("Nearby"));
    assert!(frontends_of(&m, "default/local")
        .as_array()
        .unwrap()
        .is_empty());
    assert!(skipped_of(&m).contains(&(
        "Service default/local".to_owned(),
        "spec.internalTrafficPolicy: \"Nearby\" is not Cluster or Local; not served".to_owned()
    )));
}

#[test]
fn a_bad_node_is_skipped_and_its_endpoints_are_never_local() {
    let yaml = node_local_manifest("Local").replace("\"10.244.2.0/24\"", "\"10.244.2.0/33\"");
    let m = model(&yaml);
    assert_eq!(
        skipped_of(&m),
        [(
            "Node node-b".to_owned(),
            "spec.podCIDRs[0]: \"10.244.2.0/33\" is not a CIDR; the Node is ignored (its endpoints are never node-local)".to_owned()
        )]
    );
    assert_eq!(m.nodes.len(), 1);
    let cip = m
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .unwrap();
    assert_eq!(
        cip.backends.iter().map(|b| b.node).collect::<Vec<_>>(),
        [Some(1), None, None, None]
    );
    Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
}

#[test]
fn a_prefix_of_two_nodes_stays_with_the_first() {
    let yaml = node(
        "node-a",
        &["10.244.1.0/24"],
        &[("InternalIP", "192.168.0.1")],
    ) + &node("node-b", &["10.244.1.0/24", "10.244.2.0/24"], &[]);
    let m = model(&yaml);
    assert_eq!(
        m.to_json()["nodes"],
        json!([
            {"name": "node-a", "number": 1, "prefixes": ["10.244.1.0/24", "192.168.0.1/32"]},
            {"name": "node-b", "number": 2, "prefixes": ["10.244.2.0/24"]},
        ])
    );
    assert_eq!(
        skipped_of(&m),
        [(
            "Node node-b".to_owned(),
            "10.244.1.0/24 is already a prefix of Node node-a; left out".to_owned()
        )]
    );
    Table::build_full(1, 0, &m.table_spec(), DEFAULT_MAX_RING_SIZE).unwrap();
}

#[test]
fn health_checks_of_local_load_balancers() {
    // Dual-stack: one endpoint per family, two endpoints in all.
    let m = model(&lb(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n",
        &["198.18.210.8"],
    ));
    assert_eq!(
        m.to_json()["health_checks"],
        json!([{"service": "default/lb", "port": 31000, "endpoints": 2}])
    );
    // externalTrafficPolicy Local keeps the client's address on the external
    // frontends, and uses every ready endpoint.
    for f in &m.frontends {
        let want = if f.kind == FrontendKind::ClusterIp {
            ReturnPath::Snat
        } else {
            ReturnPath::Routed
        };
        assert_eq!(f.return_path, want, "{:?}", f.kind);
        assert_eq!(f.backends.len(), 1);
    }

    // No endpoints: a health check with none (it answers 503).
    let yaml = service(
        "lb",
        "  type: LoadBalancer\n  clusterIP: 198.19.0.80\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n  ports: [{port: 80, nodePort: 30080}]\n",
    );
    assert_eq!(
        model(&yaml).to_json()["health_checks"],
        json!([{"service": "default/lb", "port": 31000, "endpoints": 0}])
    );
    // Cluster policy: no health check (the API allocates none either).
    let m = model(&lb(
        "  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 31000\n",
        &[],
    ));
    assert_eq!(m.to_json()["health_checks"], json!([]));
    // Outside the range: skipped, the frontends still served.
    let m = model(&lb(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 1000\n",
        &[],
    ));
    assert_eq!(m.to_json()["health_checks"], json!([]));
    assert_eq!(m.frontends.len(), 4);
    assert_eq!(
        skipped_of(&m),
        [(
            "Service default/lb".to_owned(),
            "spec.healthCheckNodePort: 1000 is outside the node port range 30000-32767 (--service-node-port-range); no health check is answered".to_owned()
        )]
    );
}

#[test]
fn nodes_in_a_list_manifest_are_read() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n  spec: {podCIDR: 10.244.7.0/24}\n";
    let m = model(yaml);
    assert_eq!(
        m.to_json()["nodes"],
        json!([{"name": "n1", "number": 1, "prefixes": ["10.244.7.0/24"]}])
    );
    assert!(m.skipped.is_empty());
    // A Node with a wrongly typed field is refused, naming it.
    let e = refused("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: 5}\n");
    assert!(e.starts_with("Node n1: spec.podCIDRs: invalid type"), "{e}");
}

// ---------------------------------------------------------------- one bad object (issue 18)

/// The served frontends, one line each: `service kind addr:port/PROTO -> backends`.
fn served(m: &Model) -> Vec<String> {
    m.frontends
        .iter()
        .map(|f| {
            let backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.address, b.port))
                .collect();
            format!(
                "{} {} {}:{}/{} -> {}",
                f.service,
                clustergate_control::model::kind_name(f.kind),
                f.address,
                f.port,
                f.protocol.as_str(),
                backends.join(",")
            )
        })
        .collect()
}

/// `(object, label, reason)` of each skipped entry.
fn skipped_with_labels(m: &Model) -> Vec<(String, String, String)> {
    m.skipped
        .iter()
        .map(|s| (s.object.clone(), s.label.to_owned(), s.reason.clone()))
        .collect()
}

/// A good Service `ok` with one backend, then `bad`: the good one is always
/// served, the bad object or field is skipped with its label and reason, and
/// it is one error for `--strict`, which names it.
#[test]
fn one_bad_object_or_field_is_skipped_and_the_rest_served() {
    let good = service("ok", "  clusterIP: 198.19.0.1\n  ports: [{port: 80}]\n")
        + &slice(
            "ok-a",
            "ok",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.9.1]\n",
        );
    let ok = "default/ok ClusterIP 198.19.0.1:80/TCP -> 198.18.9.1:8080";
    let bad_slice = |body: &str| slice("bad-a", "bad", body);
    let bad_svc = |spec: &str| service("bad", spec);
    let ep = "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n";
    // (case, bad objects, what of them is still served, skipped entry (object, label, reason))
    type Case<'a> = (&'a str, String, Vec<&'a str>, (&'a str, &'a str, &'a str));
    let cases: Vec<Case> = vec![
        (
            "an unparsable clusterIP skips the Service (and so its slices)",
            bad_svc("  clusterIP: 198.19.0.x\n  ports: [{port: 80}]\n") + &bad_slice(ep),
            vec![],
            ("Service default/bad", "invalid_address",
             "spec.clusterIP: \"198.19.0.x\" is not an IP address; the Service is skipped"),
        ),
        (
            "an invalid port skips that port",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{name: a, port: 80}, {name: b, port: 70000}]\n")
                + &slice("bad-a", "bad", "addressType: IPv4\nports: [{name: a, port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n"),
            vec!["default/bad ClusterIP 198.19.0.2:80/TCP -> 198.18.1.1:8080"],
            ("Service default/bad", "invalid_value",
             "spec.ports[1].port: 70000 is not a valid port; the port is skipped"),
        ),
        (
            "a second port of the same name skips the second",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{name: a, port: 80}, {name: a, port: 81}]\n"),
            vec!["default/bad ClusterIP 198.19.0.2:80/TCP -> "],
            ("Service default/bad", "invalid_value",
             "spec.ports[1].name: \"a\" is also the name of spec.ports[0]; the port is skipped"),
        ),
        (
            "an invalid affinity skips the Service",
            bad_svc("  clusterIP: 198.19.0.2\n  sessionAffinity: Sometimes\n  ports: [{port: 80}]\n"),
            vec![],
            ("Service default/bad", "invalid_value",
             "spec.sessionAffinity: \"Sometimes\" is not None or ClientIP; the Service is skipped"),
        ),
        (
            "an invalid external IP skips that address",
            bad_svc("  clusterIP: 198.19.0.2\n  externalIPs: [198.19.9.x, 198.19.9.2]\n  ports: [{port: 80}]\n"),
            vec![
                "default/bad ClusterIP 198.19.0.2:80/TCP -> ",
                "default/bad ExternalIP 198.19.9.2:80/TCP -> ",
            ],
            ("Service default/bad", "invalid_address",
             "spec.externalIPs[0]: \"198.19.9.x\" is not an IP address; that external IP is not served"),
        ),
        (
            "an invalid endpoint address skips that endpoint",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{port: 80}]\n")
                + &bad_slice("addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n- addresses: [198.18.1.x]\n"),
            vec!["default/bad ClusterIP 198.19.0.2:80/TCP -> 198.18.1.1:8080"],
            ("EndpointSlice default/bad-a", "invalid_address",
             "endpoints[1].addresses[0]: \"198.18.1.x\" is not an IPv4 address; the endpoint is skipped"),
        ),
        (
            "an invalid address type skips the slice",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{port: 80}]\n")
                + &bad_slice("addressType: ipv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n"),
            vec!["default/bad ClusterIP 198.19.0.2:80/TCP -> "],
            ("EndpointSlice default/bad-a", "invalid_value",
             "addressType: \"ipv4\" is not IPv4, IPv6 or FQDN; the EndpointSlice is skipped"),
        ),
        (
            "a duplicate keeps the first copy",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{port: 80}]\n")
                + &bad_svc("  clusterIP: 198.19.0.3\n  ports: [{port: 80}]\n"),
            vec!["default/bad ClusterIP 198.19.0.2:80/TCP -> "],
            ("Service default/bad", "duplicate",
             "appears more than once; this copy is ignored (the first is used)"),
        ),
        (
            "a second Service on a cluster IP frontend loses that frontend",
            service("zz", "  clusterIP: 198.19.0.1\n  ports: [{port: 80}, {name: b, port: 81}]\n"),
            vec!["default/zz ClusterIP 198.19.0.1:81/TCP -> "],
            ("Service default/zz", "conflict",
             "spec.clusterIPs: frontend 198.19.0.1:80/TCP is already a frontend of Service default/ok; that frontend is not served"),
        ),
        (
            "a wrongly typed field skips the object",
            bad_svc("  clusterIP: 198.19.0.2\n  ports: [{port: eighty}]\n"),
            vec![],
            ("Service default/bad", "invalid_value",
             "spec.ports[0].port: invalid type: string \"eighty\", expected i32; the object is skipped"),
        ),
    ];
    for (case, bad, still, (object, label, reason)) in cases {
        let yaml = good.clone() + &bad;
        let m = model(&yaml);
        let mut want: Vec<String> = still.iter().map(|s| (*s).to_owned()).collect();
        want.push(ok.to_owned());
        want.sort();
        let mut got = served(&m);
        got.sort();
        assert_eq!(got, want, "{case}");
        let entry = (object.to_owned(), label.to_owned(), reason.to_owned());
        assert!(
            skipped_with_labels(&m).contains(&entry),
            "{case}: {entry:?} not in {:#?}",
            skipped_with_labels(&m)
        );
        assert_eq!(m.errors.len(), 1, "{case}: {:?}", m.errors);
        // --strict refuses the whole set, naming the object.
        let e = refused(&yaml);
        assert!(e.starts_with(object), "{case}: {e}");
        // Fixing it (dropping the bad part) clears the skip.
        let fixed = model(&good);
        assert!(
            fixed.errors.is_empty() && fixed.skipped.is_empty(),
            "{case}"
        );
    }
}

/// Addresses with leading zeros (legacy values the API server still stores)
/// are read as kube-proxy reads them: decimal.
#[test]
fn legacy_leading_zero_addresses_are_served_as_kube_proxy_serves_them() {
    let yaml = service(
        "web",
        "  type: LoadBalancer\n  clusterIP: 198.019.000.010\n  externalIPs: [198.019.9.001]\n  \
         loadBalancerSourceRanges: [010.0.0.0/08]\n  ports: [{port: 80}]\n",
    ) + "status:\n  loadBalancer:\n    ingress: [{ip: 198.018.200.01}]\n"
        + &slice(
            "web-a",
            "web",
            "addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.002.7]\n",
        )
        + "---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.244.001.0/24]}\n\
           status: {addresses: [{type: InternalIP, address: 192.168.000.011}]}\n";
    let m = model(&yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let mut got = served(&m);
    got.sort();
    assert_eq!(
        got,
        [
            "default/web ClusterIP 198.19.0.10:80/TCP -> 198.18.2.7:8080",
            "default/web ExternalIP 198.19.9.1:80/TCP -> 198.18.2.7:8080",
            "default/web LoadBalancer 198.18.200.1:80/TCP -> 198.18.2.7:8080",
        ]
    );
    let lb = m
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::LoadBalancer)
        .unwrap();
    assert_eq!(lb.source_ranges, Some(vec!["10.0.0.0/8".parse().unwrap()]));
    assert_eq!(m.nodes.len(), 1);
    let prefixes: Vec<String> = m.nodes[0]
        .prefixes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(prefixes, ["10.244.1.0/24", "192.168.0.11/32"]);
}
