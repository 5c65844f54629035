//! The fuzz targets' seed inputs: real frames built by the testkit,
//! scenarios for the pipeline target, valid and edited snapshots, and the
//! repository's manifests split into their objects.
//!
//! The pipeline target writes them, and exits, when `CLUSTERGATE_FUZZ_SEEDS`
//! names a directory (so no second build is needed):
//! ```sh
//! CLUSTERGATE_FUZZ_SEEDS=/tmp/seeds cargo +nightly fuzz run -s none pipeline
//! ```
//! writes `/tmp/seeds/TARGET/*`. `docs/fuzzing.md` says how they become the
//! committed corpora (`cargo fuzz cmin`).

use std::net::IpAddr;
use std::path::Path;

use crate::pipeline::{encode, Op, BATCHED, NODE_ADDRS, ROOM, SMALL_MTU};
use crate::snapshot::{self, EDIT, EDIT_SEALED, RAW, RAW_SEALED};
use clustergate_dataplane::flow::{addr16, Addr16};
use clustergate_dataplane::snapshot::HEADER_LEN;
use clustergate_dataplane::testkit::{self, L4Spec, Tcp, CLIENT_MAC, GATEWAY_MAC};

fn a(s: &str) -> Addr16 {
    addr16(s.parse::<IpAddr>().expect("seed address"))
}

fn write(dir: &Path, target: &str, n: &mut usize, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("seed directory");
    std::fs::write(d.join(format!("seed-{n:04}")), bytes).expect("seed file");
    *n += 1;
}

/// Frames of every shape the parser knows, and truncations of some.
fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let pairs = [
        (a("198.18.0.5"), a("198.19.0.10")),
        (a("2001:db8:5::5"), a("2001:db8::10")),
    ];
    for (src, dst) in pairs {
        for l4 in [
            L4Spec::Tcp(Tcp::syn(1)),
            L4Spec::Tcp(Tcp::ack(2, 3)),
            L4Spec::Tcp(Tcp {
                fin: true,
                ..Tcp::ack(4, 5)
            }),
            L4Spec::Tcp(Tcp {
                rst: true,
                ..Tcp::default()
            }),
            L4Spec::Udp,
            L4Spec::Sctp,
        ] {
            for vlan in [None, Some(100)] {
                out.push(testkit::frame(
                    CLIENT_MAC,
                    GATEWAY_MAC,
                    vlan,
                    src,
                    40_000,
                    dst,
                    80,
                    l4,
                    64,
                    b"GET / HTTP/1.1\r\n\r\n",
                ));
            }
        }
        let f = testkit::client_frame(src, 40_001, dst, 53, L4Spec::Udp, b"q");
        let v4 = dst[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let icmps: &[(u8, u8, [u8; 4])] = if v4 {
            &[(3, 3, [0; 4]), (3, 4, [0, 0, 5, 0xdc]), (11, 0, [0; 4])]
        } else {
            &[(1, 4, [0; 4]), (2, 0, [0, 0, 5, 0]), (3, 0, [0; 4])]
        };
        for &icmp in icmps {
            out.push(testkit::icmp_error(dst, src, icmp, &f, 64));
            out.push(testkit::icmp_error(dst, src, icmp, &f, 28));
        }
        let d = testkit::udp_datagram(src, dst, 40_002, 53, 64);
        if v4 {
            out.push(testkit::ipv4_raw(src, dst, 17, 7, (0, true), &d[..32]));
            out.push(testkit::ipv4_raw(src, dst, 17, 7, (4, false), &d[32..]));
        } else {
            out.push(testkit::ipv6_fragment(src, dst, 17, 7, (0, true), &d[..32]));
            out.push(testkit::ipv6_fragment(
                src,
                dst,
                17,
                7,
                (4, false),
                &d[32..],
            ));
        }
    }
    // Truncations of a TCP frame of each family.
    let cut: Vec<Vec<u8>> = out
        .iter()
        .take(1)
        .chain(out.iter().skip(out.len() / 2).take(1))
        .flat_map(|f| [14, 20, 34, 40, 54].map(|n| f[..n.min(f.len())].to_vec()))
        .collect();
    out.extend(cut);
    out
}

/// Scenarios for the pipeline target: connections opened, answered and
/// closed, on each table and worker variant.
fn pipeline_inputs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let syn = |frontend, client, sport| Op::Client {
        frontend,
        client,
        sport,
        flags: 0x04,
        payload: 0,
    };
    let ack = |frontend, client, sport| Op::Client {
        frontend,
        client,
        sport,
        flags: 0x08,
        payload: 32,
    };
    for table in 0..8u8 {
        for extra in [0, ROOM, ROOM | NODE_ADDRS, ROOM | BATCHED, ROOM | SMALL_MTU] {
            let variant = table | extra;
            // A connection to each of the first frontends, its reply and ACK.
            for frontend in 0..18u8 {
                out.push(encode(
                    variant,
                    &[
                        syn(frontend, frontend % 3, frontend),
                        Op::Reply {
                            back: 0,
                            flags: 3,
                            payload: 0,
                        },
                        ack(frontend, frontend % 3, frontend),
                        Op::Reply {
                            back: 0,
                            flags: 2,
                            payload: 64,
                        },
                        Op::Icmp {
                            back: 1,
                            kind: frontend,
                            quote: 4,
                        },
                    ],
                ));
            }
        }
        // Mid-stream pickup, expiry, a new generation, fragments, raw bytes.
        out.push(encode(
            table | ROOM,
            &[
                ack(0, 0, 1),
                Op::Reply {
                    back: 0,
                    flags: 2,
                    payload: 10,
                },
                Op::Advance(3),
                Op::Switch,
                ack(0, 0, 1),
                Op::Reply {
                    back: 0,
                    flags: 4,
                    payload: 0,
                },
                Op::Fragments {
                    frontend: 1,
                    client: 1,
                    split: 0x23,
                    order: 1,
                },
                Op::Mutate { at: 23, xor: 0x40 },
                Op::Raw(frames()[0].clone()),
            ],
        ));
        // A flood of SYNs from one client's ports, then replies to early ones.
        let mut flood: Vec<Op> = (0..40u8).map(|p| syn(0, p % 2, p)).collect();
        flood.push(Op::Reply {
            back: 7,
            flags: 3,
            payload: 0,
        });
        out.push(encode(table | ROOM | BATCHED, &flood));
    }
    out
}

fn snapshot_inputs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, v) in snapshot::valid().iter().enumerate() {
        if i % 2 == 0 {
            out.push([&[RAW][..], v].concat());
            out.push([&[RAW_SEALED][..], &v[..HEADER_LEN]].concat());
        }
        let base = i as u8;
        // Edits across the header and the first records.
        for at in [8u32, 12, 16, 24, 40, 64, 96, 128, 200, 230, 260, 300, 400] {
            out.push(snapshot::encode_edits(EDIT_SEALED, base, &[(at, 0x01)]));
        }
        out.push(snapshot::encode_edits(EDIT, base, &[(300, 0x80)]));
        // A cut snapshot (a 3-byte edit is a cut).
        let mut cut = snapshot::encode_edits(EDIT_SEALED, base, &[]);
        cut.extend_from_slice(&(v.len() as u32 - 8).to_le_bytes()[..3]);
        out.push(cut);
    }
    out
}

/// The repository's manifests, whole and split into documents, and a few
/// small ones for the kinds and fields the fixtures lack.
fn manifests(repo: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in ["cluster.yaml", "cluster-docs.yaml"] {
        let text = std::fs::read_to_string(repo.join("control/tests/fixtures").join(f))
            .expect("manifest fixture");
        out.push(text.clone().into_bytes());
        for doc in text.split("\n---\n") {
            out.push(doc.as_bytes().to_vec());
        }
    }
    let small = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: default, annotations: {clustergate.io/return-path: snat}}\nspec: {type: NodePort, clusterIP: 198.19.0.30, ports: [{port: 80, nodePort: 30080, targetPort: 8080}], externalIPs: [198.19.8.1], sessionAffinity: ClientIP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.8.1]\n  conditions: {ready: false, serving: true, terminating: true}\n- addresses: [198.18.8.2]\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: default}\nspec: {type: LoadBalancer, clusterIPs: [198.19.0.80, \"2001:db8:ffff::80\"], ipFamilies: [IPv4, IPv6], ports: [{port: 80, nodePort: 30081, protocol: UDP}], loadBalancerSourceRanges: [198.18.0.0/24], externalTrafficPolicy: Local, healthCheckNodePort: 30999}\nstatus: {loadBalancer: {ingress: [{ip: 198.19.9.1}, {ip: \"2001:db8:9::1\"}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb-6, namespace: default, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv6\nports: [{port: 8080, protocol: UDP}]\nendpoints:\n- addresses: [\"2001:db8:8::1\"]\n  nodeName: n1\n",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n  spec: {podCIDRs: [10.244.7.0/24]}\n  status: {addresses: [{type: InternalIP, address: 198.18.0.11}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: local, namespace: ns}\n  spec: {clusterIP: 198.19.0.20, internalTrafficPolicy: Local, ports: [{name: s, port: 3868, protocol: SCTP}]}\n",
        "kind: Service\napiVersion: v1\nmetadata: &m {name: x}\nspec: {clusterIP: None, ports: [{port: 1}]}\n---\n<<: *m\n",
    ];
    out.extend(small.iter().map(|s| s.as_bytes().to_vec()));
    out
}

/// Writes every target's seeds under `dir/TARGET/`; returns how many.
///
/// # Panics
/// When a file cannot be written or a manifest fixture read.
pub fn write_all(dir: &Path) -> usize {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut n = 0;
    for f in frames() {
        write(dir, "parse", &mut n, &f);
    }
    for i in pipeline_inputs() {
        write(dir, "pipeline", &mut n, &i);
    }
    for i in snapshot_inputs() {
        write(dir, "snapshot", &mut n, &i);
    }
    for m in manifests(&repo) {
        write(dir, "manifest", &mut n, &m);
    }
    n
}
