//! The Kubernetes manifests in `deploy/`: every object parses into its
//! `k8s-openapi` type without losing a field (a misspelled field would be
//! dropped silently by the API server too), RBAC is the minimum control needs,
//! and the DaemonSet has the shape `docs/operations.md` describes, with the
//! gateway's capabilities read from that document so the two cannot drift.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "clustergate-system";
const SHM_DIR: &str = "/dev/shm/clustergate";
const CONTROL_HEALTH_PORT: i32 = 10256;
const GATEWAY_PORT: i32 = 10257;

// ---------------------------------------------------------------- loading

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// One YAML document of a file in `deploy/`.
struct Doc {
    /// `file` or `file#n` for the n-th document of a multi-document file.
    origin: String,
    yaml: serde_norway::Value,
}

impl Doc {
    fn kind(&self) -> (String, String) {
        let field = |name: &str| {
            self.yaml
                .get(name)
                .and_then(serde_norway::Value::as_str)
                .unwrap_or_else(|| panic!("{}: no {name}", self.origin))
                .to_owned()
        };
        (field("apiVersion"), field("kind"))
    }
}

/// Every document of every `*.yaml`/`*.yml` file in `deploy/`, in file-name
/// order; empty documents (a trailing `---`) are skipped.
fn documents() -> Vec<Doc> {
    let dir = repo_path("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifest in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let yaml = serde_norway::Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{name}: document {}: {e}", i + 1));
            if yaml.is_null() {
                continue;
            }
            let origin = if i == 0 {
                name.clone()
            } else {
                format!("{name}#{}", i + 1)
            };
            docs.push(Doc { origin, yaml });
        }
    }
    docs
}

/// Differences between what the manifest says (`want`) and what came back
/// from the typed object (`got`), as `path: what` lines.
fn differences(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    None => out.push(format!("{p}: dropped (misspelled or misplaced field?)")),
                    Some(gv) => differences(&p, wv, gv, out),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the round trip"));
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                differences(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: {want} became {got}")),
    }
}

/// Parses a document into `T` (from the YAML, as the API's strict decoding
/// would read it), serializes it back and requires the very same tree:
/// k8s-openapi ignores unknown fields, so a field that disappears here was
/// misspelled or put at the wrong level.
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let object: T = serde_norway::from_value(doc.yaml.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {:?}: {e}", doc.origin, doc.kind()));
    let want = serde_json::to_value(&doc.yaml).unwrap();
    let got = serde_json::to_value(&object).unwrap();
    let mut diffs = Vec::new();
    differences("", &want, &got, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{}: the round trip through k8s-openapi changed the object:\n  {}",
        doc.origin,
        diffs.join("\n  ")
    );
    object
}

/// The objects of `deploy/`, one of each kind.
struct Deploy {
    namespace: Namespace,
    config_map: ConfigMap,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    daemon_set: DaemonSet,
}

fn deploy() -> Deploy {
    let mut namespace = Vec::new();
    let mut config_map = Vec::new();
    let mut service_account = Vec::new();
    let mut cluster_role = Vec::new();
    let mut binding = Vec::new();
    let mut daemon_set = Vec::new();
    for doc in documents() {
        let (api_version, kind) = doc.kind();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => namespace.push(typed(&doc)),
            ("v1", "ConfigMap") => config_map.push(typed(&doc)),
            ("v1", "ServiceAccount") => service_account.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => cluster_role.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => binding.push(typed(&doc)),
            ("apps/v1", "DaemonSet") => daemon_set.push(typed(&doc)),
            other => panic!(
                "{}: {other:?} is not expected in deploy/ (add it to this test)",
                doc.origin
            ),
        }
    }
    fn one<T>(mut v: Vec<T>, what: &str) -> T {
        assert_eq!(v.len(), 1, "deploy/ must hold exactly one {what}");
        v.pop().unwrap()
    }
    Deploy {
        namespace: one(namespace, "Namespace"),
        config_map: one(config_map, "ConfigMap"),
        service_account: one(service_account, "ServiceAccount"),
        cluster_role: one(cluster_role, "ClusterRole"),
        binding: one(binding, "ClusterRoleBinding"),
        daemon_set: one(daemon_set, "DaemonSet"),
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .expect("the DaemonSet has a pod template spec")
}

fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?} in the DaemonSet"))
}

/// The value following `flag` in a container's args.
fn flag<'a>(c: &'a Container, flag: &str) -> &'a str {
    let args = c.args.as_deref().unwrap_or_default();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("container {}: no {flag} in {args:?}", c.name));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("container {}: {flag} without a value", c.name))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The capabilities listed in `docs/operations.md` between the
/// `<!-- capabilities -->` and `<!-- /capabilities -->` markers: the first
/// `code span` of each `- ` list item.
fn documented_capabilities() -> BTreeSet<String> {
    let path = repo_path("docs/operations.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find("<!-- capabilities -->")
        .expect("docs/operations.md has no <!-- capabilities --> marker");
    let end = text[start..]
        .find("<!-- /capabilities -->")
        .expect("docs/operations.md has no <!-- /capabilities --> marker")
        + start;
    let mut caps = BTreeSet::new();
    for line in text[start..end].lines() {
        let Some(item) = line.trim_start().strip_prefix("- ") else {
            continue;
        };
        let cap = item
            .strip_prefix('`')
            .and_then(|rest| rest.split('`').next())
            .unwrap_or_else(|| panic!("capability item without a `NAME` first: {line:?}"));
        assert!(
            !cap.is_empty() && cap.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{cap:?} is not a capability name as Kubernetes spells it (no CAP_ prefix)"
        );
        assert!(caps.insert(cap.to_owned()), "{cap} listed twice");
    }
    assert!(!caps.is_empty(), "no capability in the marked section");
    caps
}

fn http_get_port(probe: Option<&Probe>, what: &str) -> (String, i32) {
    let action = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: no httpGet probe"));
    let port = match &action.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(s) => panic!("{what}: named port {s:?}; use the number"),
    };
    (action.path.clone().unwrap_or_default(), port)
}

// ---------------------------------------------------------------- tests

#[test]
fn every_manifest_parses_into_k8s_openapi_without_losing_a_field() {
    // `deploy()` round-trips every document through its type, refuses kinds
    // it does not know and wants exactly one object of each kind.
    let _ = deploy();
    assert_eq!(
        documents().len(),
        6,
        "one Namespace, ConfigMap, ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet"
    );
}

#[test]
fn the_round_trip_catches_a_misspelled_field() {
    let yaml = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  namepsace: y\n";
    let doc = Doc {
        origin: "inline".into(),
        yaml: serde_norway::from_str(yaml).unwrap(),
    };
    let caught = std::panic::catch_unwind(|| typed::<ServiceAccount>(&doc));
    let message = caught
        .expect_err("a misspelled field went through")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains(".metadata.namepsace: dropped"),
        "{message}"
    );
}

#[test]
fn namespaced_objects_live_in_clustergate_system() {
    let d = deploy();
    assert_eq!(d.namespace.metadata.name.as_deref(), Some(NAMESPACE));
    assert_eq!(
        d.service_account.metadata.namespace.as_deref(),
        Some(NAMESPACE)
    );
    assert_eq!(d.daemon_set.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(d.config_map.metadata.namespace.as_deref(), Some(NAMESPACE));
    // Cluster-scoped objects carry no namespace.
    assert_eq!(d.cluster_role.metadata.namespace, None);
    assert_eq!(d.binding.metadata.namespace, None);
}

#[test]
fn cluster_role_grants_only_get_list_watch_on_what_control_reads() {
    let role = deploy().cluster_role;
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role could grow"
    );
    let rules = role.rules.expect("the role has rules");
    let mut seen = BTreeSet::new();
    for rule in &rules {
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        assert_eq!(groups.len(), 1, "one API group per rule: {rule:?}");
        assert_eq!(resources.len(), 1, "one resource per rule: {rule:?}");
        assert!(
            rule.resource_names
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "no resourceNames: {rule:?}"
        );
        assert!(
            rule.non_resource_urls.is_none(),
            "no nonResourceURLs: {rule:?}"
        );
        let verbs: Vec<&str> = rule.verbs.iter().map(String::as_str).collect();
        let mut sorted = verbs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), verbs.len(), "a verb listed twice: {rule:?}");
        assert_eq!(
            sorted,
            ["get", "list", "watch"],
            "read-only verbs: {rule:?}"
        );
        assert!(
            seen.insert((groups[0].clone(), resources[0].clone())),
            "rule repeated: {rule:?}"
        );
    }
    let expected: BTreeSet<(String, String)> = [
        (String::new(), "services".to_owned()),
        ("discovery.k8s.io".to_owned(), "endpointslices".to_owned()),
        (String::new(), "nodes".to_owned()),
        (String::new(), "pods".to_owned()),
        (String::new(), "namespaces".to_owned()),
        ("networking.k8s.io".to_owned(), "networkpolicies".to_owned()),
    ]
    .into();
    assert_eq!(seen, expected);
    assert_eq!(rules.len(), 6);
}

#[test]
fn binding_gives_the_role_to_the_service_account_the_pods_use() {
    let d = deploy();
    let role_ref = &d.binding.role_ref;
    assert_eq!(role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(role_ref.kind, "ClusterRole");
    assert_eq!(Some(&role_ref.name), d.cluster_role.metadata.name.as_ref());
    let subjects = d.binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        d.service_account.metadata.name.as_ref()
    );
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        pod_spec(&d.daemon_set).service_account_name,
        d.service_account.metadata.name,
        "the pods run as the bound ServiceAccount"
    );
}

#[test]
fn daemon_set_runs_on_gateway_nodes_in_the_host_network() {
    let ds = deploy().daemon_set;
    let spec = ds.spec.as_ref().unwrap();
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let expected: BTreeMap<String, String> =
        [("clustergate.io/gateway".to_owned(), "true".to_owned())].into();
    assert_eq!(pod.node_selector.as_ref(), Some(&expected));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(pod.termination_grace_period_seconds.is_some_and(|s| s > 0));
    assert_ne!(pod.host_pid, Some(true), "no host PID namespace");
    assert_ne!(pod.host_ipc, Some(true), "no host IPC namespace");

    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    // The selector picks the template's pods.
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "template label {k}");
    }

    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["control", "gateway"]);
    assert!(pod.init_containers.is_none());
}

#[test]
fn control_runs_as_non_root_without_any_capability() {
    let ds = deploy().daemon_set;
    let control = container(&ds, "control");
    assert_eq!(
        control.command.as_deref(),
        Some(&["clustergate-control".to_owned()][..])
    );
    let args = control.args.as_deref().unwrap();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--in-cluster"), "{args:?}");
    let sc = control.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(sc.run_as_user.is_some_and(|uid| uid != 0));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(
        caps.add.as_deref().unwrap_or_default().is_empty(),
        "control adds no capability"
    );
}

#[test]
fn gateway_capabilities_are_exactly_those_documented() {
    let ds = deploy().daemon_set;
    let gateway = container(&ds, "gateway");
    assert_eq!(
        gateway.command.as_deref(),
        Some(&["clustergate".to_owned()][..])
    );
    assert_eq!(
        gateway.args.as_deref().unwrap().first().map(String::as_str),
        Some("run")
    );
    // The interface is the operator's: a ConfigMap key, through an
    // environment variable the kubelet expands in the args.
    assert_eq!(flag(gateway, "--interface"), "$(CLUSTERGATE_INTERFACE)");
    let d = deploy();
    let env = gateway
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "CLUSTERGATE_INTERFACE")
        .expect("the gateway's CLUSTERGATE_INTERFACE variable");
    let key = env
        .value_from
        .as_ref()
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("CLUSTERGATE_INTERFACE comes from a ConfigMap");
    assert_eq!(key.name, d.config_map.metadata.name.clone().unwrap());
    assert_ne!(key.optional, Some(true), "no interface, no gateway");
    let value = d
        .config_map
        .data
        .as_ref()
        .and_then(|m| m.get(&key.key))
        .unwrap_or_else(|| panic!("the ConfigMap has no key {:?}", key.key));
    assert!(!value.trim().is_empty(), "an empty interface");
    let sc = gateway.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "the gateway is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added = caps.add.as_deref().unwrap_or_default();
    let added_set: BTreeSet<String> = added.iter().cloned().collect();
    assert_eq!(
        added_set.len(),
        added.len(),
        "a capability added twice: {added:?}"
    );
    assert_eq!(
        added_set,
        documented_capabilities(),
        "the DaemonSet and docs/operations.md (\"Capabilities\") disagree"
    );
    assert!(
        !added_set.contains("SYS_ADMIN"),
        "SYS_ADMIN is what BPF and PERFMON replace"
    );
    // The brief's list, as a second guard against both drifting together.
    assert_eq!(
        added_set,
        set(&[
            "NET_ADMIN",
            "NET_RAW",
            "BPF",
            "PERFMON",
            "IPC_LOCK",
            "SYS_RESOURCE"
        ])
    );
}

#[test]
fn probes_use_the_health_ports_the_flags_open() {
    let ds = deploy().daemon_set;
    let control = container(&ds, "control");
    let gateway = container(&ds, "gateway");
    assert_eq!(
        flag(control, "--health"),
        format!("0.0.0.0:{CONTROL_HEALTH_PORT}")
    );
    assert_eq!(flag(control, "--metrics"), "127.0.0.1:10249");
    assert_eq!(
        flag(gateway, "--metrics"),
        format!("0.0.0.0:{GATEWAY_PORT}")
    );

    for (c, port) in [(control, CONTROL_HEALTH_PORT), (gateway, GATEWAY_PORT)] {
        let live = http_get_port(c.liveness_probe.as_ref(), &format!("{} liveness", c.name));
        let ready = http_get_port(c.readiness_probe.as_ref(), &format!("{} readiness", c.name));
        assert_eq!(live, ("/livez".to_owned(), port), "{} liveness", c.name);
        assert_eq!(ready, ("/healthz".to_owned(), port), "{} readiness", c.name);
        let declared: Vec<i32> = c
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert!(
            declared.contains(&port),
            "{}: port {port} not declared",
            c.name
        );
    }
}

#[test]
fn snapshot_directory_is_a_shared_memory_volume() {
    let ds = deploy().daemon_set;
    let pod = pod_spec(&ds);
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let find_mount = |c: &Container, path: &str| {
        c.volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|m| m.mount_path == path)
            .cloned()
            .unwrap_or_else(|| panic!("container {}: nothing mounted at {path}", c.name))
    };

    let control = container(&ds, "control");
    let gateway = container(&ds, "gateway");
    let control_mount = find_mount(control, SHM_DIR);
    let gateway_mount = find_mount(gateway, SHM_DIR);
    assert_eq!(
        control_mount.name, gateway_mount.name,
        "one volume shared by both"
    );
    assert_ne!(
        control_mount.read_only,
        Some(true),
        "control writes the snapshots"
    );
    assert_eq!(
        gateway_mount.read_only,
        Some(true),
        "the gateway only maps them"
    );
    assert_eq!(flag(control, "--shm-dir"), SHM_DIR);
    assert_eq!(flag(gateway, "--shm-dir"), SHM_DIR);

    let shm = volumes
        .iter()
        .find(|v| v.name == control_mount.name)
        .expect("the snapshot volume is declared");
    let empty_dir = shm.empty_dir.as_ref().expect("an emptyDir");
    assert_eq!(empty_dir.medium.as_deref(), Some("Memory"), "tmpfs");

    // No bpffs: the gateway pins nothing (its XDP attachment is a bpf_link
    // that ends with the process), so no container gets the host's bpffs.
    for c in [control, gateway] {
        assert!(
            c.volume_mounts
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|m| m.mount_path != "/sys/fs/bpf"),
            "{} mounts bpffs, which nothing uses",
            c.name
        );
    }
    assert!(
        volumes
            .iter()
            .all(|v| v.host_path.as_ref().is_none_or(|h| h.path != "/sys/fs/bpf")),
        "a bpffs hostPath volume nothing uses"
    );
}

#[test]
fn containers_request_resources_and_limit_memory() {
    let ds = deploy().daemon_set;
    for c in &pod_spec(&ds).containers {
        let resources = c
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no resources", c.name));
        let requests = resources.requests.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert!(requests.contains_key("cpu"), "{}: cpu request", c.name);
        assert!(
            requests.contains_key("memory"),
            "{}: memory request",
            c.name
        );
        assert!(limits.contains_key("memory"), "{}: memory limit", c.name);
        assert!(
            !limits.contains_key("cpu") || c.name == "control",
            "{}: a CPU limit would throttle the poll-mode workers",
            c.name
        );
        assert!(c.image.is_some(), "{}: image", c.name);
    }
}

/// Every flag the DaemonSet gives control is one `clustergate-control run`
/// knows, so the manifest cannot drift from the binary; both daemons log
/// JSON for the cluster's log collector.
#[test]
fn control_flags_are_those_of_the_binary_and_logs_are_json() {
    let ds = deploy().daemon_set;
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let control = container(&ds, "control");
    for a in control.args.as_deref().unwrap_or_default() {
        if a.starts_with("--") && a != "--log-format" {
            assert!(
                help.contains(a.as_str()),
                "control's DaemonSet flag {a} is not in `clustergate-control run --help`"
            );
        }
    }
    for name in ["control", "gateway"] {
        assert_eq!(flag(container(&ds, name), "--log-format"), "json", "{name}");
    }
}
