//! NetworkPolicy semantics, as a table of cases from the API reference
//! (networking.k8s.io/v1 NetworkPolicy) and the upstream e2e suite
//! (`test/e2e/network/netpol`, whose model this world copies: namespaces
//! x, y, z, each with pods a, b, c, every pod serving TCP, UDP and SCTP on
//! ports 80 and 81, named `serve-80-tcp` and so on).
//!
//! Each case gives the policies, a client address, a protocol and the
//! backend port of Service x/web (whose backends are x/a, x/b, x/c), and the
//! verdict expected for each backend, in that order: `+` allowed, `-`
//! denied. The clients: the pods, and 198.18.200.5, an address outside the
//! pods (a client of a NodePort or LoadBalancer IP, say).

use std::net::IpAddr;

use clustergate_builder::TableBuild;
use clustergate_control::policy::{PolicySet, Side};
use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::policy::PolicyTable;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

const EXTERNAL: &str = "198.18.200.5";

/// The pod's address: x/a 198.18.10.1, y/b 198.18.11.2, z/c 198.18.12.3
/// (and 2001:2:10::1 and so on, dual stack).
fn pod_ip(ns: &str, pod: &str) -> String {
    let n = ["x", "y", "z"].iter().position(|&x| x == ns).expect("ns") + 10;
    let p = ["a", "b", "c"].iter().position(|&x| x == pod).expect("pod") + 1;
    format!("198.18.{n}.{p}")
}

fn pod_ip6(ns: &str, pod: &str) -> String {
    let n = ["x", "y", "z"].iter().position(|&x| x == ns).expect("ns") + 10;
    let p = ["a", "b", "c"].iter().position(|&x| x == pod).expect("pod") + 1;
    format!("2001:2:{n}::{p}")
}

fn world_pods() -> Vec<Pod> {
    let mut out = Vec::new();
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            let mut ports = String::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    ports.push_str(&format!(
                        "    - {{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}\n",
                        proto.to_lowercase()
                    ));
                }
            }
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  \
                 labels: {{pod: {pod}}}\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    \
                 image: agnhost\n    ports:\n{ports}status:\n  phase: Running\n  podIP: {ip}\n  \
                 podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]\n",
                ip = pod_ip(ns, pod),
                ip6 = pod_ip6(ns, pod),
            );
            out.push(serde_norway::from_str(&yaml).expect("pod yaml"));
        }
    }
    out
}

fn world_namespaces() -> Vec<Namespace> {
    ["x", "y", "z"]
        .iter()
        .map(|ns| {
            serde_norway::from_str(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
            ))
            .expect("namespace yaml")
        })
        .collect()
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let full = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{d}");
            serde_norway::from_str(&full).unwrap_or_else(|e| panic!("{e}:\n{full}"))
        })
        .collect()
}

fn set(yaml: &str) -> PolicySet {
    PolicySet::new(&world_pods(), &world_namespaces(), &policies(yaml))
}

/// `client`: "x/b" (a pod of the world) or an address.
fn client_addr(client: &str) -> IpAddr {
    match client.split_once('/') {
        Some((ns, pod)) => pod_ip(ns, pod).parse().expect("ip"),
        None => client.parse().expect("client address"),
    }
}

#[track_caller]
fn case(name: &str, yaml: &str, client: &str, proto: Proto, port: u16, expect: &str) {
    let s = set(yaml);
    assert!(s.problems.is_empty(), "{name}: problems {:?}", s.problems);
    check(name, &s, client, proto, port, expect);
    agree(name, &s);
}

/// The compiled table (what the dataplane looks up) gives the rules'
/// answer for every client (each pod over IPv4 and IPv6, addresses outside
/// the pods, at the edges of the blocks the cases use), every backend (the
/// nine pods and an address that is no pod), protocol and a spread of ports.
#[track_caller]
fn agree(name: &str, s: &PolicySet) {
    let mut clients: Vec<IpAddr> = Vec::new();
    let mut backends: Vec<IpAddr> = Vec::new();
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            for ip in [pod_ip(ns, pod), pod_ip6(ns, pod)] {
                clients.push(ip.parse().expect("ip"));
                backends.push(ip.parse().expect("ip"));
            }
        }
    }
    for a in [
        EXTERNAL,
        "198.18.200.0",
        "198.18.11.9",
        "198.18.10.2",
        "198.18.250.1",
        "203.0.113.9",
        "198.19.255.255",
        "2001:2:11::99",
        "2001:2:12::2",
    ] {
        clients.push(a.parse().expect("ip"));
    }
    backends.push("198.18.250.1".parse().expect("ip"));
    let table = PolicyTable::assemble(s.compile(&backends))
        .unwrap_or_else(|e| panic!("{name}: compiled policy refused: {e}"));
    for c in &clients {
        for b in &backends {
            if c.is_ipv4() != b.is_ipv4() {
                continue;
            }
            for proto in [Proto::Tcp, Proto::Udp, Proto::Sctp] {
                for port in [0, 1, 79, 80, 81, 82, 9000, 65535] {
                    let want = s.decide(*c, *b, proto, port);
                    let got = table.allows(&addr16(*c), &addr16(*b), proto, port);
                    assert_eq!(
                        got,
                        want.allowed(),
                        "{name}: compiled table says {got} from {c} to {b} {proto:?}/{port}; \
                         the rules say {want}"
                    );
                }
            }
        }
    }
}

#[track_caller]
fn check(name: &str, s: &PolicySet, client: &str, proto: Proto, port: u16, expect: &str) {
    let got: String = ["a", "b", "c"]
        .iter()
        .map(|pod| {
            let backend: IpAddr = pod_ip("x", pod).parse().expect("ip");
            let v = s.decide(client_addr(client), backend, proto, port);
            if v.allowed() {
                '+'
            } else {
                '-'
            }
        })
        .collect();
    assert_eq!(
        got, expect,
        "{name}: from {client} {proto:?}/{port} to x/a, x/b, x/c"
    );
}

const DENY_ALL_INGRESS_X: &str =
    "metadata: {name: deny-all, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

#[test]
fn no_policy_is_open() {
    case("no policy", "", "y/b", Proto::Tcp, 80, "+++");
    case("no policy, external", "", EXTERNAL, Proto::Udp, 81, "+++");
}

#[test]
fn default_deny_ingress() {
    case("deny all", DENY_ALL_INGRESS_X, "y/b", Proto::Tcp, 80, "---");
    case(
        "deny all, same ns",
        DENY_ALL_INGRESS_X,
        "x/b",
        Proto::Tcp,
        80,
        "---",
    );
    case(
        "deny all, external",
        DENY_ALL_INGRESS_X,
        EXTERNAL,
        Proto::Tcp,
        80,
        "---",
    );
    // policyTypes omitted and no rules: Ingress, nothing admitted.
    let implicit = "metadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n";
    case(
        "deny all, implicit type",
        implicit,
        "z/a",
        Proto::Udp,
        80,
        "---",
    );
    // A policy in another namespace does not isolate x.
    let elsewhere = "metadata: {name: deny, namespace: y}\nspec:\n  podSelector: {}\n";
    case("deny in y only", elsewhere, "z/a", Proto::Tcp, 80, "+++");
}

#[test]
fn allow_all_ingress() {
    let p =
        "metadata: {name: allow-all, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";
    case("allow all", p, "z/c", Proto::Sctp, 81, "+++");
    case("allow all, external", p, EXTERNAL, Proto::Tcp, 80, "+++");
    // Deny-all plus allow-all: a union, so allowed.
    let both = format!("{DENY_ALL_INGRESS_X}---\n{p}");
    case("deny + allow", &both, "y/a", Proto::Tcp, 80, "+++");
}

#[test]
fn pod_selector_peers() {
    let p = "metadata: {name: allow-b, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  \
             ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n";
    // Only x/a is selected: x/b and x/c stay open.
    case("from pod b", p, "x/b", Proto::Tcp, 80, "+++");
    case("from pod c", p, "x/c", Proto::Tcp, 80, "-++");
    // A podSelector alone means the policy's own namespace.
    case("from y/b", p, "y/b", Proto::Tcp, 80, "-++");
    case("external", p, EXTERNAL, Proto::Tcp, 80, "-++");
    // matchExpressions.
    let inx =
        "metadata: {name: in, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
               - podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}\n";
    case("In [b, c], from b", inx, "x/b", Proto::Tcp, 80, "+++");
    case("In [b, c], from a", inx, "x/a", Proto::Tcp, 80, "---");
    let notin = "metadata: {name: notin, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
                 - podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [b]}]}\n";
    case("NotIn [b], from b", notin, "x/b", Proto::Tcp, 80, "---");
    case("NotIn [b], from c", notin, "x/c", Proto::Tcp, 80, "+++");
    let exists =
        "metadata: {name: ex, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
                  - podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n";
    case("Exists pod", exists, "x/a", Proto::Tcp, 80, "+++");
    let dne = "metadata: {name: dne, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
               - podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}\n";
    case("DoesNotExist pod", dne, "x/a", Proto::Tcp, 80, "---");
    // The policy's own podSelector by expression: only b is isolated.
    let sel = "metadata: {name: sel, namespace: x}\nspec:\n  podSelector: {matchExpressions: \
               [{key: pod, operator: In, values: [b]}]}\n  policyTypes: [Ingress]\n";
    case("isolate b only", sel, "y/a", Proto::Tcp, 80, "+-+");
    // A podSelector that selects nothing isolates nothing.
    let none =
        "metadata: {name: none, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: q}}\n  \
                policyTypes: [Ingress]\n";
    case("selects nothing", none, "y/a", Proto::Tcp, 80, "+++");
}

#[test]
fn namespace_selector_peers() {
    let p = "metadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n";
    case("from ns y", p, "y/c", Proto::Tcp, 80, "+++");
    case("from ns x", p, "x/b", Proto::Tcp, 80, "---");
    case("from ns z", p, "z/b", Proto::Tcp, 80, "---");
    // The name label every namespace carries.
    let by_name = "metadata: {name: from-z, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                   - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]\n";
    case(
        "from kubernetes.io/metadata.name z",
        by_name,
        "z/a",
        Proto::Tcp,
        80,
        "+++",
    );
    case(
        "from kubernetes.io/metadata.name z, y",
        by_name,
        "y/a",
        Proto::Tcp,
        80,
        "---",
    );
    // {} is every namespace: every pod, but not an address outside them.
    let all = "metadata: {name: all-ns, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
               - from: [{namespaceSelector: {}}]\n";
    case("all namespaces, a pod", all, "z/c", Proto::Tcp, 80, "+++");
    case(
        "all namespaces, external",
        all,
        EXTERNAL,
        Proto::Tcp,
        80,
        "---",
    );
    // Both in one peer: AND.
    let and = "metadata: {name: and, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
               - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n";
    case("ns y AND pod b: y/b", and, "y/b", Proto::Tcp, 80, "+++");
    case("ns y AND pod b: y/a", and, "y/a", Proto::Tcp, 80, "---");
    case("ns y AND pod b: z/b", and, "z/b", Proto::Tcp, 80, "---");
    case("ns y AND pod b: x/b", and, "x/b", Proto::Tcp, 80, "---");
    // Two peers: OR.
    let or = "metadata: {name: or, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
              - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n";
    case("ns y OR pod b: y/a", or, "y/a", Proto::Tcp, 80, "+++");
    case("ns y OR pod b: x/b", or, "x/b", Proto::Tcp, 80, "+++");
    case("ns y OR pod b: z/b", or, "z/b", Proto::Tcp, 80, "---");
}

#[test]
fn ip_block_peers() {
    let p = "metadata: {name: block, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
             - ipBlock: {cidr: 198.18.0.0/15, except: [198.18.11.0/24]}\n";
    case("ipBlock: z/a inside", p, "z/a", Proto::Tcp, 80, "+++");
    case("ipBlock: y/a in except", p, "y/a", Proto::Tcp, 80, "---");
    case(
        "ipBlock: external inside",
        p,
        EXTERNAL,
        Proto::Tcp,
        80,
        "+++",
    );
    case("ipBlock: outside", p, "203.0.113.9", Proto::Tcp, 80, "---");
    let ext = "metadata: {name: ext, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
               - ipBlock: {cidr: 198.18.200.0/24}\n";
    case(
        "external block, external",
        ext,
        EXTERNAL,
        Proto::Tcp,
        80,
        "+++",
    );
    case("external block, a pod", ext, "x/b", Proto::Tcp, 80, "---");
    // IPv6: the pods' second address, and a block of that family.
    let v6 =
        "metadata: {name: v6, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
              - ipBlock: {cidr: \"2001:2:11::/64\"}\n";
    case(
        "v6 block, y/b over IPv6",
        v6,
        "2001:2:11::2",
        Proto::Tcp,
        80,
        "+++",
    );
    case(
        "v6 block, z/b over IPv6",
        v6,
        "2001:2:12::2",
        Proto::Tcp,
        80,
        "---",
    );
    case("v6 block, y/b over IPv4", v6, "y/b", Proto::Tcp, 80, "---");
}

#[test]
fn ports() {
    let p80 = "metadata: {name: p80, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
               - ports: [{port: 80}]\n";
    case(
        "port 80 (TCP by default), TCP 80",
        p80,
        "y/a",
        Proto::Tcp,
        80,
        "+++",
    );
    case("port 80, TCP 81", p80, "y/a", Proto::Tcp, 81, "---");
    case("port 80, UDP 80", p80, "y/a", Proto::Udp, 80, "---");
    let udp = "metadata: {name: udp, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
               - ports: [{protocol: UDP, port: 81}]\n";
    case("UDP 81, UDP 81", udp, "y/a", Proto::Udp, 81, "+++");
    case("UDP 81, TCP 81", udp, "y/a", Proto::Tcp, 81, "---");
    let sctp = "metadata: {name: sctp, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                - ports: [{protocol: SCTP, port: 80}]\n";
    case("SCTP 80", sctp, "y/a", Proto::Sctp, 80, "+++");
    case("SCTP 80, TCP 80", sctp, "y/a", Proto::Tcp, 80, "---");
    let named = "metadata: {name: named, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                 - ports: [{port: serve-81-tcp}]\n";
    case(
        "named serve-81-tcp, TCP 81",
        named,
        "y/a",
        Proto::Tcp,
        81,
        "+++",
    );
    case(
        "named serve-81-tcp, TCP 80",
        named,
        "y/a",
        Proto::Tcp,
        80,
        "---",
    );
    let named_udp = "metadata: {name: nu, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                     - ports: [{protocol: UDP, port: serve-80-udp}]\n";
    case(
        "named serve-80-udp, UDP 80",
        named_udp,
        "y/a",
        Proto::Udp,
        80,
        "+++",
    );
    // A name with the wrong protocol names no port.
    let wrong = "metadata: {name: w, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                 - ports: [{protocol: UDP, port: serve-80-tcp}]\n";
    case(
        "named serve-80-tcp as UDP",
        wrong,
        "y/a",
        Proto::Udp,
        80,
        "---",
    );
    let range = "metadata: {name: r, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                 - ports: [{port: 80, endPort: 81}]\n";
    case("80-81, TCP 81", range, "y/a", Proto::Tcp, 81, "+++");
    case("80-81, TCP 82", range, "y/a", Proto::Tcp, 82, "---");
    let any_tcp = "metadata: {name: t, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                   - ports: [{protocol: TCP}]\n";
    case(
        "every TCP port, TCP 9000",
        any_tcp,
        "y/a",
        Proto::Tcp,
        9000,
        "+++",
    );
    case(
        "every TCP port, UDP 80",
        any_tcp,
        "y/a",
        Proto::Udp,
        80,
        "---",
    );
    // Peers and ports together: both must match.
    let both = "metadata: {name: pb, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
                - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n";
    case("pod b on 80", both, "x/b", Proto::Tcp, 80, "+++");
    case("pod b on 81", both, "x/b", Proto::Tcp, 81, "---");
    case("pod c on 80", both, "x/c", Proto::Tcp, 80, "---");
}

#[test]
fn policies_are_a_union() {
    let p = "metadata: {name: from-b, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - from: [{podSelector: {matchLabels: {pod: b}}}]\n---\n\
             metadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  \
             ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n";
    case("union: x/b", p, "x/b", Proto::Tcp, 80, "+++");
    // y/c reaches a through the second policy only.
    case("union: y/c", p, "y/c", Proto::Tcp, 80, "+--");
    case("union: z/c", p, "z/c", Proto::Tcp, 80, "---");
}

#[test]
fn egress_of_the_client_pod() {
    let deny = "metadata: {name: deny-egress, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n";
    case("egress deny in y: y/a", deny, "y/a", Proto::Tcp, 80, "---");
    case("egress deny in y: z/a", deny, "z/a", Proto::Tcp, 80, "+++");
    // An address that is no pod has no egress policy.
    case(
        "egress deny in y: external",
        deny,
        EXTERNAL,
        Proto::Tcp,
        80,
        "+++",
    );
    // Egress is checked against the backend pod (after DNAT).
    let to_a = "metadata: {name: to-a, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  \
                egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: x}}\n      \
                podSelector: {matchLabels: {pod: a}}\n";
    case("egress to x/a", to_a, "y/b", Proto::Tcp, 80, "+--");
    let to_block = "metadata: {name: to-block, namespace: y}\nspec:\n  podSelector: {}\n  \
                    policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 198.18.10.2/32}}]\n";
    case(
        "egress to the address of x/b",
        to_block,
        "y/b",
        Proto::Tcp,
        80,
        "-+-",
    );
    let to_port = "metadata: {name: to-81, namespace: y}\nspec:\n  podSelector: {}\n  \
                   egress:\n  - ports: [{port: serve-81-tcp}]\n  policyTypes: [Egress]\n";
    case(
        "egress to named port 81, 81",
        to_port,
        "y/b",
        Proto::Tcp,
        81,
        "+++",
    );
    case(
        "egress to named port 81, 80",
        to_port,
        "y/b",
        Proto::Tcp,
        80,
        "---",
    );
    // Egress rules without policyTypes: Ingress AND Egress, so y's pods are
    // isolated for ingress as well (x/b → y/… is not this Service, but the
    // egress side still admits y/a → x/a only).
    let implicit =
        "metadata: {name: implicit, namespace: y}\nspec:\n  podSelector: {}\n  egress:\n  \
                    - to: [{podSelector: {matchLabels: {pod: a}}, namespaceSelector: {}}]\n";
    case(
        "egress rules, no policyTypes",
        implicit,
        "y/c",
        Proto::Tcp,
        80,
        "+--",
    );
    // Both types listed, no rules at all: nothing out.
    let both =
        "metadata: {name: both, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  \
                policyTypes: [Ingress, Egress]\n";
    case(
        "both types, no rules: y/c",
        both,
        "y/c",
        Proto::Tcp,
        80,
        "---",
    );
    case(
        "both types, no rules: y/a",
        both,
        "y/a",
        Proto::Tcp,
        80,
        "+++",
    );
}

#[test]
fn ingress_and_egress_must_both_allow() {
    let p = "metadata: {name: in, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n---\n\
             metadata: {name: out, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  \
             policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: c}}, \
             namespaceSelector: {}}]\n";
    // y/a: ingress allows, no egress policy.
    case("y/a", p, "y/a", Proto::Tcp, 80, "+++");
    // y/b: ingress allows, egress only to pods c.
    case("y/b", p, "y/b", Proto::Tcp, 80, "--+");
    // z/a: egress open, ingress denies.
    case("z/a", p, "z/a", Proto::Tcp, 80, "---");
}

#[test]
fn the_reason_is_named() {
    let p =
        "metadata: {name: allow-frontend, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - from: [{podSelector: {matchLabels: {pod: q}}}]\n  \
             - from: [{podSelector: {matchLabels: {pod: b}}}]\n";
    let s = set(p);
    agree("p", &s);
    let b = client_addr("x/b");
    let a: IpAddr = pod_ip("x", "a").parse().expect("ip");
    let v = s.decide(b, a, Proto::Tcp, 80);
    assert_eq!(v.ingress, Side::Allowed("x/allow-frontend".into(), 1));
    assert_eq!(v.egress, Side::Open);
    assert_eq!(v.client_pod.as_deref(), Some("x/b"));
    assert_eq!(
        v.to_string(),
        "allowed (ingress: allowed by x/allow-frontend rule 1; egress: no policy)"
    );
    let v = s.decide(client_addr("x/c"), a, Proto::Tcp, 80);
    assert_eq!(v.ingress, Side::Denied(vec!["x/allow-frontend".into()]));
    assert_eq!(
        v.to_string(),
        "denied (ingress: denied (isolated by x/allow-frontend); egress: no policy)"
    );
}

#[test]
fn pods_that_are_no_identity() {
    // A finished pod's address, and a hostNetwork pod's, are not that pod:
    // a client there is an address outside the pods.
    let extra: Vec<Pod> = [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: y, labels: {pod: b}}\n\
         spec: {containers: [{name: c}]}\nstatus: {phase: Succeeded, podIP: 198.18.11.9}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: y, labels: {pod: b}}\n\
         spec: {hostNetwork: true, containers: [{name: c}]}\nstatus: {phase: Running, podIP: 198.18.11.8}\n",
    ]
    .iter()
    .map(|y| serde_norway::from_str(y).expect("pod"))
    .collect();
    let mut pods = world_pods();
    pods.extend(extra);
    let p = "metadata: {name: from-b, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}]\n";
    let s = PolicySet::new(&pods, &world_namespaces(), &policies(p));
    agree("extra pods", &s);
    check("y/b itself", &s, "y/b", Proto::Tcp, 80, "+++");
    check(
        "finished pod's address",
        &s,
        "198.18.11.9",
        Proto::Tcp,
        80,
        "---",
    );
    check(
        "hostNetwork pod's address",
        &s,
        "198.18.11.8",
        Proto::Tcp,
        80,
        "---",
    );
}

#[test]
fn a_backend_that_is_no_pod() {
    // Endpoints outside the pods (a VM, a manual EndpointSlice): no ingress
    // policy; the client pod's egress sees only the address.
    let deny = "metadata: {name: deny-egress, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n";
    let s = set(deny);
    agree("deny", &s);
    let vm: IpAddr = "198.18.250.1".parse().expect("ip");
    assert!(!s.decide(client_addr("y/a"), vm, Proto::Tcp, 80).allowed());
    assert!(s.decide(client_addr("z/a"), vm, Proto::Tcp, 80).allowed());
    let block = "metadata: {name: to-vms, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  \
                 egress:\n  - to: [{ipBlock: {cidr: 198.18.250.0/24}}]\n";
    let s = set(block);
    agree("block", &s);
    assert!(s.decide(client_addr("y/a"), vm, Proto::Tcp, 80).allowed());
}

#[test]
fn bad_policies_fail_closed_and_are_named() {
    // A bad selector operator in spec.podSelector: the policy applies to
    // every pod of its namespace (not to none).
    let p = "metadata: {name: bad-sel, namespace: x}\nspec:\n  podSelector: {matchExpressions: \
             [{key: pod, operator: Like, values: [a]}]}\n  ingress:\n  \
             - from: [{podSelector: {matchLabels: {pod: b}}}]\n";
    let s = set(p);
    agree("p", &s);
    assert_eq!(s.problems.len(), 2, "{:?}", s.problems);
    assert!(s.problems[0].contains("NetworkPolicy x/bad-sel: spec.podSelector.matchExpressions[0]"));
    assert!(s.problems[0].contains("\"Like\""), "{:?}", s.problems);
    check("bad podSelector: x/b", &s, "x/b", Proto::Tcp, 80, "+++");
    check("bad podSelector: y/b", &s, "y/b", Proto::Tcp, 80, "---");

    // A bad CIDR: that peer admits nothing, the others still do.
    let p = "metadata: {name: bad-cidr, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
             - ipBlock: {cidr: 198.18.300.0/24}\n    - podSelector: {matchLabels: {pod: b}}\n";
    let s = set(p);
    agree("p", &s);
    assert_eq!(
        s.problems,
        vec![
            "NetworkPolicy x/bad-cidr: spec.ingress[0].from[0].ipBlock.cidr: \"198.18.300.0/24\" \
             is not a CIDR; the peer matches nothing"
                .to_owned()
        ]
    );
    check("bad cidr, pod b", &s, "x/b", Proto::Tcp, 80, "+++");
    check("bad cidr, external", &s, EXTERNAL, Proto::Tcp, 80, "---");

    // Bad ports: 0, a backwards range, endPort with a name: each entry
    // admits nothing (the pods stay isolated).
    let p = "metadata: {name: bad-ports, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  \
             - ports: [{port: 0}, {port: 90, endPort: 85}, {port: serve-80-tcp, endPort: 90}, \
             {protocol: ICMP, port: 80}]\n";
    let s = set(p);
    agree("p", &s);
    assert_eq!(s.problems.len(), 4, "{:?}", s.problems);
    for want in [
        "ports[0]",
        "ports[1]",
        "ports[2].endPort",
        "ports[3].protocol",
    ] {
        assert!(
            s.problems.iter().any(|m| m.contains(want)),
            "{want} in {:?}",
            s.problems
        );
    }
    check("bad ports", &s, "y/a", Proto::Tcp, 80, "---");

    // An unknown policy type isolates both ways.
    let p = "metadata: {name: bad-type, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Sideways]\n";
    let s = set(p);
    agree("p", &s);
    assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
    check("unknown type, from y", &s, "y/a", Proto::Tcp, 80, "---");

    // ipBlock with a selector, and an empty peer: each matches nothing.
    let p = "metadata: {name: bad-peers, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    \
             - {ipBlock: {cidr: 198.18.0.0/15}, podSelector: {}}\n    - {}\n";
    let s = set(p);
    agree("p", &s);
    assert_eq!(s.problems.len(), 2, "{:?}", s.problems);
    check("bad peers", &s, "x/b", Proto::Tcp, 80, "---");
}

#[test]
fn show_explains_each_backend() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/netpol.yaml"
    ))
    .expect("fixture");
    let objects = clustergate_control::parse_manifest(&text).expect("manifest");
    let model =
        clustergate_control::build_model(&objects, &clustergate_control::ModelOptions::default());
    assert!(model.skipped.is_empty(), "{:?}", model.skipped);
    let good: IpAddr = "198.18.65.10".parse().expect("ip");
    assert_eq!(
        model.explain_policy(good, "x/web").expect("explained"),
        "from 198.18.65.10 (pod y/good) to Service x/web port http (80/TCP), backend \
         198.18.64.21:8080 (pod x/web-1): allowed (ingress: allowed by x/allow-frontend rule 0; \
         egress: no policy)\n\
         from 198.18.65.10 (pod y/good) to Service x/web port http (80/TCP), backend \
         198.18.64.22:8080 (pod x/web-2): allowed (ingress: allowed by x/allow-frontend rule 0; \
         egress: no policy)\n"
    );
    let outside: IpAddr = "198.18.200.5".parse().expect("ip");
    assert_eq!(
        model
            .explain_policy(outside, "x/web:80")
            .expect("explained"),
        "from 198.18.200.5 to Service x/web port http (80/TCP), backend 198.18.64.21:8080 \
         (pod x/web-1): denied (ingress: denied (isolated by x/allow-frontend); egress: no \
         policy)\n\
         from 198.18.200.5 to Service x/web port http (80/TCP), backend 198.18.64.22:8080 \
         (pod x/web-2): allowed (ingress: allowed by x/outside-to-web-2 rule 0; egress: no \
         policy)\n"
    );
    assert!(model
        .explain_policy(good, "x/nope")
        .expect_err("no such Service")
        .contains("no served port of Service x/nope"));
    // The compiled table the snapshot carries agrees.
    let table = clustergate_dataplane::table::Table::build_full(
        1,
        0,
        &model.table_spec(),
        clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE,
    )
    .expect("table");
    let p = table.policy();
    let web1 = addr16("198.18.64.21".parse().expect("ip"));
    assert!(p.allows(&addr16(good), &web1, Proto::Tcp, 8080));
    assert!(!p.allows(&addr16(good), &web1, Proto::Tcp, 8081));
    assert!(!p.allows(&addr16(outside), &web1, Proto::Tcp, 8080));
}

#[test]
fn show_says_who_may_reach_each_backend() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/netpol.yaml"
    ))
    .expect("fixture");
    let objects = clustergate_control::parse_manifest(&text).expect("manifest");
    let model =
        clustergate_control::build_model(&objects, &clustergate_control::ModelOptions::default());
    let table = model.to_table();
    assert!(
        table.contains(
            "  -> 198.18.64.21:8080            ready policy: from pods role=frontend in \
             namespaces ns=y on TCP/http (x/allow-frontend rule 0)\n"
        ),
        "{table}"
    );
    assert!(
        table.contains(
            "  -> 198.18.64.22:8080            ready policy: from pods role=frontend in \
             namespaces ns=y on TCP/http (x/allow-frontend rule 0); from 198.18.200.0/24 on \
             any port (x/outside-to-web-2 rule 0)\n"
        ),
        "{table}"
    );
}
