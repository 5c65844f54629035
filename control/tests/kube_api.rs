//! The API source (`kube_source::follow`) against a scripted API server.
//!
//! No kube-apiserver runs here: `support/apiserver.rs` is a small in-memory one
//! on 127.0.0.1 speaking list and watch over real HTTP, with resourceVersions,
//! selectors, bookmarks and 410 Gone. Each test starts its own server and
//! follower, waits for models with a timeout of a few seconds, and stops both
//! when it ends (they are dropped). Objects use 198.18.0.0/15 and 2001:db8::/32.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use other parts
mod support;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use clustergate_builder::TableBuild;
use clustergate_control::kube_source::{
    follow, FollowConfig, SERVICE_FIELD_SELECTOR, SLICE_LABEL_SELECTOR,
};
use clustergate_control::model::{endpoint_string, PROXY_NAME_LABEL, RETURN_PATH_ANNOTATION};
use clustergate_control::{Model, ModelOptions};
use clustergate_dataplane::table::{FrontendKind, ReturnPath, Table};
use serde_json::{json, Value};
use support::apiserver::{ApiServer, Kind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// The most a test waits for an expected model. Typical waits are milliseconds;
/// reconnecting after an outage takes up to two backoffs (0.8 s doubling, with
/// jitter) of kube-rs's default policy.
const WAIT: Duration = Duration::from_secs(10);

// ---- objects ----

fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, u16, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ports": ports},
    })
}

fn labelled(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}

fn ready(address: &str) -> Value {
    endpoint(address, true, true, false)
}

fn endpoint(address: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [address],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
    })
}

fn slice(ns: &str, name: &str, svc: &str, port: (&str, u16, &str), endpoints: &[Value]) -> Value {
    let v6 = endpoints
        .first()
        .and_then(|e| e["addresses"][0].as_str())
        .is_some_and(|a| a.contains(':'));
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": port.0, "port": port.1, "protocol": port.2}],
        "endpoints": endpoints,
    })
}

/// `shop/web` on 198.19.0.10:80 (`http`), and its slice `web-1` with two
/// ready endpoints on 8080.
fn web(server: &ApiServer) {
    server.apply(service(
        "shop",
        "web",
        &["198.19.0.10"],
        &[("http", 80, "TCP")],
    ));
    server.apply(slice(
        "shop",
        "web-1",
        "web",
        ("http", 8080, "TCP"),
        &[ready("198.18.1.1"), ready("198.18.1.2")],
    ));
}

const WEB: &str = "shop/web 198.19.0.10:80/TCP -> 198.18.1.1:8080 ready, 198.18.1.2:8080 ready";

// ---- the follower ----

/// `follow` in a task, handing its models to the test. Dropping it stops it.
struct Follower {
    models: mpsc::UnboundedReceiver<Model>,
    task: JoinHandle<()>,
    last: Option<Model>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    fn start(server: &ApiServer, min_sync: Duration) -> Self {
        Self::start_with(
            server,
            FollowConfig {
                min_sync,
                ..FollowConfig::default()
            },
        )
    }

    fn start_with(server: &ApiServer, config: FollowConfig) -> Self {
        // `RUST_LOG=clustergate_control=debug,kube_runtime=debug` shows what the
        // follower does (with `--nocapture`).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let client = server.client();
        let (tx, models) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            follow(client, &config, |m| {
                if tx.send(m.clone()).is_ok() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })
            .await;
        });
        Self {
            models,
            task,
            last: None,
        }
    }

    /// Waits until a model whose served frontends read `want` (see
    /// [`summary`]) arrives; models on the way are skipped.
    async fn wait_for(&mut self, want: &[&str]) -> Model {
        self.wait_until(&format!("{want:#?}"), |m| summary(m) == want)
            .await
    }

    /// Waits until a model for which `pred` holds arrives.
    async fn wait_until(&mut self, what: &str, pred: impl Fn(&Model) -> bool) -> Model {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.models.recv()).await {
                Ok(Some(m)) => {
                    self.last = Some(m.clone());
                    if pred(&m) {
                        return m;
                    }
                }
                Ok(None) => panic!("the follower stopped"),
                Err(_) => panic!(
                    "no model {what} within {WAIT:?}; the last was {:#?}",
                    self.last.as_ref().map(|m| (summary(m), skipped(m)))
                ),
            }
        }
    }

    /// Asserts that no model arrives for `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(m) = timeout(d, self.models.recv()).await {
            panic!("unexpected model {:#?}", m.as_ref().map(summary));
        }
    }

    /// The models that arrive within `d`.
    async fn collect(&mut self, d: Duration) -> Vec<Model> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.models.recv()).await {
            out.push(m);
        }
        out
    }
}

/// The ClusterIP frontends, one line each:
/// `ns/name addr:port/PROTO -> backend state, …` (`-> none` without backends).
fn summary(model: &Model) -> Vec<String> {
    model
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
        .map(|f| {
            let backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let e = endpoint_string(b.address, b.port, f.protocol);
                    let hp = e.rsplit_once('/').map_or(e.as_str(), |(hp, _)| hp);
                    format!("{hp} {}", b.state_name())
                })
                .collect();
            let backends = if backends.is_empty() {
                "none".to_owned()
            } else {
                backends.join(", ")
            };
            format!(
                "{} {} -> {backends}",
                f.service,
                endpoint_string(f.address, f.port, f.protocol)
            )
        })
        .collect()
}

fn skipped(model: &Model) -> Vec<String> {
    model.skipped.iter().map(|s| s.object.clone()).collect()
}

// ---- tests ----

/// 1. The initial list of the three kinds, with kube-proxy's selectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_gives_the_model() {
    let server = ApiServer::start().await;
    web(&server);
    // Dual-stack DNS: one frontend per family, each with its family's slice.
    server.apply(service(
        "kube-system",
        "dns",
        &["198.19.0.53", "2001:db8:5::53"],
        &[("dns", 53, "UDP")],
    ));
    server.apply(slice(
        "kube-system",
        "dns-v4",
        "dns",
        ("dns", 5353, "UDP"),
        &[ready("198.18.2.1")],
    ));
    server.apply(slice(
        "kube-system",
        "dns-v6",
        "dns",
        ("dns", 5353, "UDP"),
        &[ready("2001:db8:2::1")],
    ));
    // Headless: its Service and slice are not even listed (the selectors).
    server.apply(service("shop", "db", &["None"], &[("pg", 5432, "TCP")]));
    server.apply(labelled(
        slice(
            "shop",
            "db-1",
            "db",
            ("pg", 5432, "TCP"),
            &[ready("198.18.3.1")],
        ),
        "service.kubernetes.io/headless",
        "",
    ));
    // Another proxy's Service: listed, and skipped by the model.
    server.apply(labelled(
        service("shop", "other", &["198.19.0.11"], &[("http", 80, "TCP")]),
        PROXY_NAME_LABEL,
        "someone-else",
    ));

    let mut f = Follower::start(&server, Duration::ZERO);
    let m = f
        .wait_for(&[
            "kube-system/dns 198.19.0.53:53/UDP -> 198.18.2.1:5353 ready",
            "kube-system/dns [2001:db8:5::53]:53/UDP -> [2001:db8:2::1]:5353 ready",
            WEB,
        ])
        .await;
    let skipped = skipped(&m);
    assert!(
        skipped.contains(&"Service shop/other".to_owned()),
        "{skipped:?}"
    );
    assert!(
        !skipped.iter().any(|s| s.contains("shop/db")),
        "{skipped:?}"
    );
    assert_eq!(m.service_specs().len(), 3);

    let requests = server.requests();
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
        let of_kind: Vec<_> = requests.iter().filter(|r| r.kind == kind).collect();
        assert!(
            of_kind.iter().any(|r| !r.watch),
            "no list of {kind:?}: {requests:#?}"
        );
        for r in &of_kind {
            match kind {
                Kind::Service => {
                    assert_eq!(r.field_selector.as_deref(), Some(SERVICE_FIELD_SELECTOR));
                    assert_eq!(
                        r.label_selector, None,
                        "the proxy name is filtered client-side"
                    );
                }
                Kind::EndpointSlice => {
                    assert_eq!(r.label_selector.as_deref(), Some(SLICE_LABEL_SELECTOR));
                    assert_eq!(r.field_selector, None);
                }
                Kind::Node => {
                    assert_eq!(r.label_selector, None, "every Node");
                    assert_eq!(r.field_selector, None);
                }
                Kind::Pod | Kind::Namespace | Kind::NetworkPolicy => {
                    unreachable!("only the three kinds above are looked at here")
                }
            }
            if r.watch {
                assert!(r.bookmarks, "{r:?}");
                assert!(r.resource_version.is_some(), "{r:?}");
            }
        }
    }
}

/// 2. Services and slices added, modified and deleted through watch events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_modify_and_delete() {
    let server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[WEB]).await;

    // Add a Service, then its slice.
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    f.wait_for(&["shop/api 198.19.0.20:9000/TCP -> none", WEB])
        .await;
    server.apply(slice(
        "shop",
        "api-1",
        "api",
        ("grpc", 9090, "TCP"),
        &[ready("198.18.4.1")],
    ));
    f.wait_for(&[
        "shop/api 198.19.0.20:9000/TCP -> 198.18.4.1:9090 ready",
        WEB,
    ])
    .await;

    // Modify: the slice's port number, then the Service's port.
    server.apply(slice(
        "shop",
        "api-1",
        "api",
        ("grpc", 9091, "TCP"),
        &[ready("198.18.4.1")],
    ));
    f.wait_for(&[
        "shop/api 198.19.0.20:9000/TCP -> 198.18.4.1:9091 ready",
        WEB,
    ])
    .await;
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9001, "TCP")],
    ));
    f.wait_for(&[
        "shop/api 198.19.0.20:9001/TCP -> 198.18.4.1:9091 ready",
        WEB,
    ])
    .await;

    // Delete the slice, then the Service.
    server.delete(Kind::EndpointSlice, "shop", "api-1");
    f.wait_for(&["shop/api 198.19.0.20:9001/TCP -> none", WEB])
        .await;
    server.delete(Kind::Service, "shop", "api");
    f.wait_for(&[WEB]).await;

    // A Service turned headless leaves the field selector: a DELETED event.
    server.apply(service("shop", "web", &["None"], &[("http", 80, "TCP")]));
    f.wait_for(&[]).await;
}

/// 3. A slice moving from one Service to another (its service-name label changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_moves_between_services() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "canary",
        &["198.19.0.30"],
        &[("http", 80, "TCP")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&["shop/canary 198.19.0.30:80/TCP -> none", WEB])
        .await;

    let moved = labelled(
        slice(
            "shop",
            "web-1",
            "web",
            ("http", 8080, "TCP"),
            &[ready("198.18.1.1"), ready("198.18.1.2")],
        ),
        "kubernetes.io/service-name",
        "canary",
    );
    server.apply(moved);
    f.wait_for(&[
        "shop/canary 198.19.0.30:80/TCP -> 198.18.1.1:8080 ready, 198.18.1.2:8080 ready",
        "shop/web 198.19.0.10:80/TCP -> none",
    ])
    .await;

    // And back.
    web(&server);
    f.wait_for(&["shop/canary 198.19.0.30:80/TCP -> none", WEB])
        .await;
}

/// 4. Endpoint conditions: ready, not ready, and the terminating fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_conditions_change() {
    let server = ApiServer::start().await;
    server.apply(service(
        "shop",
        "web",
        &["198.19.0.10"],
        &[("http", 80, "TCP")],
    ));
    let put = |endpoints: &[Value]| {
        server.apply(slice(
            "shop",
            "web-1",
            "web",
            ("http", 8080, "TCP"),
            endpoints,
        ));
    };
    put(&[ready("198.18.1.1"), ready("198.18.1.2")]);
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[WEB]).await;

    // One not ready: only the other is used.
    put(&[
        endpoint("198.18.1.1", false, false, false),
        ready("198.18.1.2"),
    ]);
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.2:8080 ready"])
        .await;

    // The ready one terminates (still serving), the other is not ready: the
    // serving-and-terminating one is the fallback.
    put(&[
        endpoint("198.18.1.1", false, false, false),
        endpoint("198.18.1.2", false, true, true),
    ]);
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.2:8080 terminating"])
        .await;

    // A ready one comes back: the terminating one drains (weight 0: it
    // keeps its flows and gets no new ones).
    put(&[
        endpoint("198.18.1.1", true, true, false),
        endpoint("198.18.1.2", false, true, true),
    ]);
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.1:8080 ready, 198.18.1.2:8080 draining"])
        .await;

    // Terminating and no longer serving: nothing usable, no backends.
    put(&[
        endpoint("198.18.1.1", false, false, true),
        endpoint("198.18.1.2", false, false, true),
    ]);
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> none"]).await;
}

/// 5. A watch that expires (410 Gone) relists; what was deleted meanwhile is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_and_keeps_nothing_stale() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    server.apply(slice(
        "shop",
        "api-1",
        "api",
        ("grpc", 9090, "TCP"),
        &[ready("198.18.4.1")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[
        "shop/api 198.19.0.20:9000/TCP -> 198.18.4.1:9090 ready",
        WEB,
    ])
    .await;
    let lists_before = server.requests().iter().filter(|r| !r.watch).count();

    // Changes the watches never see, then their history is compacted away.
    server.delete_unseen(Kind::Service, "shop", "api");
    server.delete_unseen(Kind::EndpointSlice, "shop", "api-1");
    server.apply_unseen(service(
        "shop",
        "new",
        &["198.19.0.40"],
        &[("http", 80, "TCP")],
    ));
    server.expire_watches();

    // Both kinds relist; the model is exactly what the server holds now: the
    // deleted Service and slice leave no trace (not even in `skipped`).
    let want = ["shop/new 198.19.0.40:80/TCP -> none", WEB];
    f.wait_until("with new, without api", |m| {
        summary(m) == want && m.skipped.is_empty()
    })
    .await;
    let lists_after = server.requests().iter().filter(|r| !r.watch).count();
    assert!(
        lists_after >= lists_before + 2,
        "both kinds relist: {lists_before} lists before, {lists_after} after"
    );
}

/// 6. The API goes away and comes back on the same port; the follower keeps
/// its last model meanwhile and reconnects (with backoff), resuming its watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_goes_away_and_comes_back() {
    let mut server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[WEB]).await;

    server.stop().await;
    // Changes while the follower cannot see them (the history is kept).
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    server.delete(Kind::EndpointSlice, "shop", "web-1");
    f.quiet(Duration::from_millis(500)).await;
    let lists_before = server.requests().iter().filter(|r| !r.watch).count();

    server.restart().await;
    f.wait_for(&[
        "shop/api 198.19.0.20:9000/TCP -> none",
        "shop/web 198.19.0.10:80/TCP -> none",
    ])
    .await;
    // Resumed from the resourceVersions it had: no relist was needed.
    let lists_after = server.requests().iter().filter(|r| !r.watch).count();
    assert_eq!(lists_before, lists_after, "{:#?}", server.requests());
}

/// 6b. Down, and the history compacted while down: the resumed watches get
/// 410 and relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_comes_back_compacted() {
    let mut server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&["shop/api 198.19.0.20:9000/TCP -> none", WEB])
        .await;

    server.stop().await;
    server.delete(Kind::Service, "shop", "api");
    server.compact();
    server.restart().await;
    f.wait_for(&[WEB]).await;
}

/// 7. The service-proxy-name label added and removed (kube-proxy's e2e
/// "should implement service.kubernetes.io/service-proxy-name").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_name_label_is_followed() {
    let server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[WEB]).await;

    let web_svc = || service("shop", "web", &["198.19.0.10"], &[("http", 80, "TCP")]);
    server.apply(labelled(web_svc(), PROXY_NAME_LABEL, "someone-else"));
    let m = f.wait_for(&[]).await;
    assert!(skipped(&m).contains(&"Service shop/web".to_owned()));

    server.apply(labelled(web_svc(), PROXY_NAME_LABEL, "clustergate"));
    f.wait_for(&[WEB]).await;
    server.apply(labelled(web_svc(), PROXY_NAME_LABEL, "someone-else"));
    f.wait_for(&[]).await;
    server.apply(web_svc());
    f.wait_for(&[WEB]).await;
}

/// The return-path annotation is followed, over the default of the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_return_path_annotation_is_followed() {
    let server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start_with(
        &server,
        FollowConfig {
            model: ModelOptions {
                return_path: ReturnPath::Routed,
                ..ModelOptions::default()
            },
            ..FollowConfig::default()
        },
    );
    let paths =
        |m: &Model| -> Vec<ReturnPath> { m.frontends.iter().map(|f| f.return_path).collect() };
    let m = f.wait_for(&[WEB]).await;
    assert_eq!(paths(&m), [ReturnPath::Routed]);

    let mut annotated = service("shop", "web", &["198.19.0.10"], &[("http", 80, "TCP")]);
    annotated["metadata"]["annotations"][RETURN_PATH_ANNOTATION] = json!("dsr");
    server.apply(annotated.clone());
    let m = f
        .wait_until("with dsr", |m| paths(m) == [ReturnPath::Dsr])
        .await;
    // 80 -> 8080 with dsr: noted.
    assert_eq!(m.notes.len(), 1, "{:?}", m.notes);
    assert_eq!(m.notes[0].object, "Service shop/web");

    // An invalid value skips the Service (no return path is guessed for it).
    annotated["metadata"]["annotations"][RETURN_PATH_ANNOTATION] = json!("direct");
    server.apply(annotated);
    let m = f.wait_for(&[]).await;
    assert_eq!(
        problems(&m),
        [(
            "Service shop/web".to_owned(),
            "invalid_value".to_owned(),
            "metadata.annotations[\"clustergate.io/return-path\"]: \"direct\" is not snat, dsr or routed; the Service is skipped".to_owned()
        )]
    );

    server.apply(service(
        "shop",
        "web",
        &["198.19.0.10"],
        &[("http", 80, "TCP")],
    ));
    f.wait_until("back to the default", |m| paths(m) == [ReturnPath::Routed])
        .await;
}

/// Bookmarks move the resourceVersion a resumed watch starts from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_are_where_watches_resume() {
    let server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&[WEB]).await;

    server
        .wait_request("services watch", |r| r.kind == Kind::Service && r.watch)
        .await;
    // Slices change, services do not: only a bookmark tells the services
    // watch how far the resourceVersion has gone.
    for port in [8081, 8082, 8083] {
        server.apply(slice(
            "shop",
            "web-1",
            "web",
            ("http", port, "TCP"),
            &[ready("198.18.1.1")],
        ));
    }
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.1:8083 ready"])
        .await;
    let rv = server.bookmark();
    // Give the bookmark time to arrive before the watches end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.end_watches();

    let want = rv.to_string();
    server
        .wait_request(&format!("services watch from {rv}"), |r| {
            r.kind == Kind::Service && r.watch && r.resource_version.as_deref() == Some(&want)
        })
        .await;
    // And the follower still follows.
    server.delete(Kind::EndpointSlice, "shop", "web-1");
    f.wait_for(&["shop/web 198.19.0.10:80/TCP -> none"]).await;
}

/// A burst of changes within `--min-sync-period` makes one model, not one per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_coalesced() {
    let server = ApiServer::start().await;
    web(&server);
    let mut f = Follower::start(&server, Duration::from_millis(300));
    f.wait_for(&[WEB]).await;

    for port in 9001..=9010 {
        server.apply(slice(
            "shop",
            "web-1",
            "web",
            ("http", port, "TCP"),
            &[ready("198.18.1.1")],
        ));
    }
    let models = f.collect(Duration::from_millis(900)).await;
    assert!(
        (1..=2).contains(&models.len()),
        "{} models: {:#?}",
        models.len(),
        models.iter().map(summary).collect::<Vec<_>>()
    );
    assert_eq!(
        models.last().map(summary),
        Some(vec![
            "shop/web 198.19.0.10:80/TCP -> 198.18.1.1:9010 ready".to_owned()
        ])
    );
    // Nothing changes: nothing more is handed over.
    server.bookmark();
    f.quiet(Duration::from_millis(200)).await;
}

/// `(object, label, reason)` of each skipped entry that is an error.
fn problems(model: &Model) -> Vec<(String, String, String)> {
    model
        .skipped
        .iter()
        .filter(|s| clustergate_control::model::is_problem(s.label))
        .map(|s| (s.object.clone(), s.label.to_owned(), s.reason.clone()))
        .collect()
}

/// Issue 18: a bad object among good ones is skipped (with its reason); an
/// unrelated change made while it is there is published; deleting it takes
/// it off the skipped list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_object_is_skipped_and_changes_keep_flowing() {
    let server = ApiServer::start().await;
    web(&server);
    // A Service whose clusterIP does not parse, and a slice of `web` with a
    // bad address next to a good one.
    server.apply(service("shop", "bad", &["198.19.0.x"], &[("", 81, "TCP")]));
    server.apply(slice(
        "shop",
        "web-2",
        "web",
        ("http", 8080, "TCP"),
        &[ready("198.18.1.3"), ready("198.18.1.x")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    let m = f
        .wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.1:8080 ready, 198.18.1.2:8080 ready, 198.18.1.3:8080 ready"])
        .await;
    let bad_service = (
        "Service shop/bad".to_owned(),
        "invalid_address".to_owned(),
        "spec.clusterIPs[0]: \"198.19.0.x\" is not an IP address; the Service is skipped"
            .to_owned(),
    );
    let bad_endpoint = (
        "EndpointSlice shop/web-2".to_owned(),
        "invalid_address".to_owned(),
        "endpoints[1].addresses[0]: \"198.18.1.x\" is not an IPv4 address; the endpoint is skipped"
            .to_owned(),
    );
    assert_eq!(problems(&m), [bad_endpoint.clone(), bad_service.clone()]);
    assert_eq!(m.errors.len(), 2);

    // An unrelated change while they are there: published.
    server.apply(slice(
        "shop",
        "web-1",
        "web",
        ("http", 8080, "TCP"),
        &[ready("198.18.1.9")],
    ));
    let m = f
        .wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.3:8080 ready, 198.18.1.9:8080 ready"])
        .await;
    assert_eq!(problems(&m), [bad_endpoint, bad_service.clone()]);

    // The slice fixed (with a legacy leading-zero address, served as
    // kube-proxy serves it), the bad Service deleted: nothing is skipped.
    server.apply(slice(
        "shop",
        "web-2",
        "web",
        ("http", 8080, "TCP"),
        &[ready("198.18.1.3"), ready("198.18.002.7")],
    ));
    let m = f
        .wait_for(&["shop/web 198.19.0.10:80/TCP -> 198.18.1.3:8080 ready, 198.18.1.9:8080 ready, 198.18.2.7:8080 ready"])
        .await;
    assert_eq!(problems(&m), [bad_service]);
    server.delete(Kind::Service, "shop", "bad");
    let m = f
        .wait_until("without skipped objects", |m| m.skipped.is_empty())
        .await;
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(summary(&m).len(), 1);
}

/// An invalid Service is skipped alone (the others stay); fixing it serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_object_is_served_at_the_next_publish() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&["shop/api 198.19.0.20:9000/TCP -> none", WEB])
        .await;

    let mut bad = service("shop", "web", &["198.19.0.10"], &[("http", 80, "TCP")]);
    bad["spec"]["sessionAffinity"] = json!("Sometimes");
    server.apply(bad);
    let m = f.wait_for(&["shop/api 198.19.0.20:9000/TCP -> none"]).await;
    assert_eq!(
        problems(&m),
        [(
            "Service shop/web".to_owned(),
            "invalid_value".to_owned(),
            "spec.sessionAffinity: \"Sometimes\" is not None or ClientIP; the Service is skipped"
                .to_owned()
        )]
    );

    server.apply(service(
        "shop",
        "web",
        &["198.19.0.10"],
        &[("http", 81, "TCP")],
    ));
    let m = f
        .wait_for(&[
            "shop/api 198.19.0.20:9000/TCP -> none",
            "shop/web 198.19.0.10:81/TCP -> 198.18.1.1:8080 ready, 198.18.1.2:8080 ready",
        ])
        .await;
    assert!(problems(&m).is_empty());
}

/// Time to converge after an API-server restart that lost the watch history:
/// down for `OUTAGE` (refused connections escalate the backoff), back with
/// the history compacted, so the resumed watches get 410 and relist. The
/// 410 resets the backoff, so the relist does not wait out another
/// escalated step. `--nocapture` prints the time (docs/operations.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_soon_after_an_api_server_restart() {
    const OUTAGE: Duration = Duration::from_secs(5);
    let mut server = ApiServer::start().await;
    web(&server);
    server.apply(service(
        "shop",
        "api",
        &["198.19.0.20"],
        &[("grpc", 9000, "TCP")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    f.wait_for(&["shop/api 198.19.0.20:9000/TCP -> none", WEB])
        .await;

    server.stop().await;
    tokio::time::sleep(OUTAGE).await;
    server.delete(Kind::Service, "shop", "api");
    server.compact();
    let before = server.requests().len();
    server.restart().await;
    let back = Instant::now();
    // When the Services watcher's backoff step ends and it asks again.
    let mut asked = None;
    let mut converged = None;
    let deadline = back + WAIT;
    while converged.is_none() {
        if asked.is_none()
            && server.requests()[before..]
                .iter()
                .any(|r| r.kind == Kind::Service)
        {
            asked = Some(back.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(5), f.models.recv()).await {
            Ok(Some(m)) if summary(&m) == [WEB] => converged = Some(back.elapsed()),
            Ok(Some(_)) | Err(_) => assert!(Instant::now() < deadline, "no convergence"),
            Ok(None) => panic!("the follower stopped"),
        }
    }
    let took = converged.unwrap_or_default();
    // Not seen yet: it came within the last 5 ms wait.
    let asked = asked.unwrap_or(took);
    // The first Service request after the restart is the resumed watch (410).
    let first = server.requests()[before..]
        .iter()
        .find(|r| r.kind == Kind::Service)
        .cloned()
        .expect("a Service request");
    assert!(first.watch, "{first:?}");
    println!(
        "converged {took:?} after the API server came back ({OUTAGE:?} outage): \
         {asked:?} waiting out the backoff step in flight, then {:?} to relist and build",
        took.saturating_sub(asked)
    );
    // The relist follows the 410 at once (kube-rs's default policy backed off
    // another escalated step here, 6.4 s or more).
    assert!(
        took.saturating_sub(asked) < Duration::from_secs(2),
        "{took:?} in all, {asked:?} before the first request"
    );
}

/// The binary: `run --kubeconfig … --once` publishes one snapshot from the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_kubeconfig_publishes() {
    let server = ApiServer::start().await;
    web(&server);
    let dir = std::env::temp_dir().join(format!("clustergate-kube-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            server.url()
        ),
    )
    .unwrap();
    let shm: PathBuf = dir.join("shm");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--shm-dir")
        .arg(&shm)
        .arg("--once")
        .args(["--return-path", "routed"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("run --once did not exit within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(
        clustergate_dataplane::snapshot::read_current(&shm).unwrap(),
        Some(1),
        "{stderr}"
    );
    let table = clustergate_dataplane::snapshot::load_current(&shm)
        .unwrap()
        .unwrap();
    let paths: Vec<ReturnPath> = table
        .frontends()
        .iter()
        .map(|f| Table::return_path(f))
        .collect();
    assert_eq!(
        paths,
        [ReturnPath::Routed],
        "--return-path reaches the snapshot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- every way in (issue 11): Nodes and the new fields through watch events ----

fn node(name: &str, pod_cidr: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name},
        ]},
    })
}

/// The node the dataplane table of `model` puts client `ip` on, by name.
fn client_node(model: &Model, ip: &str) -> Option<String> {
    let table = Table::build_full(
        1,
        0,
        &model.table_spec(),
        clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE,
    )
    .unwrap();
    let n = table.client_node(&clustergate_dataplane::flow::addr16(ip.parse().unwrap()))?;
    model
        .nodes
        .iter()
        .find(|x| x.number == n)
        .map(|x| x.name.clone())
}

/// 14. A Node's pod CIDR change moves its clients; endpoints follow their
/// `nodeName` onto node-local frontends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_followed_through_watch_events() {
    let server = ApiServer::start().await;
    server.apply(node("node-a", "10.244.1.0/24", "192.168.0.1"));
    server.apply(node("node-b", "10.244.2.0/24", "192.168.0.2"));
    let mut svc = service("shop", "local", &["198.19.0.90"], &[("http", 80, "TCP")]);
    svc["spec"]["internalTrafficPolicy"] = json!("Local");
    server.apply(svc);
    let mut ep = ready("10.244.1.5");
    ep["nodeName"] = json!("node-a");
    server.apply(slice(
        "shop",
        "local-1",
        "local",
        ("http", 8080, "TCP"),
        &[ep],
    ));

    let mut f = Follower::start(&server, Duration::ZERO);
    let m = f
        .wait_until("two nodes and a node-local frontend", |m| {
            m.nodes.len() == 2 && m.frontends.iter().any(|f| f.node_local)
        })
        .await;
    let fe = m.frontends.iter().find(|f| f.node_local).unwrap();
    assert_eq!(fe.backends[0].node, Some(1), "node-a is node 1");
    assert_eq!(client_node(&m, "10.244.1.7").as_deref(), Some("node-a"));
    assert_eq!(client_node(&m, "192.168.0.2").as_deref(), Some("node-b"));
    assert_eq!(client_node(&m, "10.244.9.7"), None);

    // node-a's pod CIDR moves: its clients move with it.
    server.apply(node("node-a", "10.244.9.0/24", "192.168.0.1"));
    let m = f
        .wait_until("node-a on 10.244.9.0/24", |m| {
            client_node(m, "10.244.9.7").as_deref() == Some("node-a")
        })
        .await;
    assert_eq!(client_node(&m, "10.244.1.7"), None);

    // node-a goes: its endpoint is on no known node.
    server.delete(Kind::Node, "", "node-a");
    let m = f.wait_until("node-a gone", |m| m.nodes.len() == 1).await;
    let fe = m.frontends.iter().find(|f| f.node_local).unwrap();
    assert_eq!(fe.backends[0].node, None);
    assert_eq!(
        client_node(&m, "192.168.0.2").as_deref(),
        Some("node-b"),
        "renumbered"
    );
}

/// 15. A load-balancer IP appearing in status adds a frontend; `ipMode:
/// Proxy` and a change of source ranges are followed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_status_and_source_ranges_are_followed() {
    let server = ApiServer::start().await;
    let mut svc = service("shop", "edge", &["198.19.0.50"], &[("http", 80, "TCP")]);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    server.apply(svc.clone());
    server.apply(slice(
        "shop",
        "edge-1",
        "edge",
        ("http", 8080, "TCP"),
        &[ready("198.18.6.1")],
    ));
    let mut f = Follower::start(&server, Duration::ZERO);
    let kinds = |m: &Model| -> Vec<(FrontendKind, String)> {
        m.frontends
            .iter()
            .map(|f| (f.kind, f.address.to_string()))
            .collect()
    };
    f.wait_until("ClusterIP and NodePort", |m| {
        kinds(m)
            == [
                (FrontendKind::NodePort, "0.0.0.0".to_owned()),
                (FrontendKind::ClusterIp, "198.19.0.50".to_owned()),
            ]
    })
    .await;

    // The load balancer controller writes status: a LoadBalancer frontend.
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.201.1"}]}});
    server.apply(svc.clone());
    let m = f
        .wait_until("the LB IP", |m| {
            kinds(m).contains(&(FrontendKind::LoadBalancer, "198.18.201.1".to_owned()))
        })
        .await;
    let lb = m
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::LoadBalancer)
        .unwrap();
    assert_eq!(lb.source_ranges, None);
    assert_eq!(lb.backends.len(), 1);

    // Source ranges: only the LB frontend is restricted.
    svc["spec"]["loadBalancerSourceRanges"] = json!(["203.0.113.0/24"]);
    server.apply(svc.clone());
    let m = f
        .wait_until("source ranges", |m| {
            m.frontends.iter().any(|f| f.source_ranges.is_some())
        })
        .await;
    for fe in &m.frontends {
        let want = (fe.kind == FrontendKind::LoadBalancer)
            .then(|| vec!["203.0.113.0/24".parse().unwrap()]);
        assert_eq!(fe.source_ranges, want, "{:?}", fe.kind);
    }

    // ipMode Proxy: the load balancer proxies itself; the frontend goes.
    svc["status"]["loadBalancer"]["ingress"][0]["ipMode"] = json!("Proxy");
    server.apply(svc);
    f.wait_until("no LB frontend", |m| {
        !m.frontends
            .iter()
            .any(|f| f.kind == FrontendKind::LoadBalancer)
    })
    .await;
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// May `client` open a connection to backend 198.18.1.1:8080 of shop/web?
fn allowed(model: &Model, client: &str) -> bool {
    model
        .policy
        .decide(
            client.parse().expect("ip"),
            "198.18.1.1".parse().expect("ip"),
            clustergate_dataplane::flow::Proto::Tcp,
            8080,
        )
        .allowed()
}

/// NetworkPolicy through the watch: policies, pods and namespaces come and
/// change, and each change reaches the model's decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_pods_and_namespaces_are_followed() {
    let server = ApiServer::start().await;
    web(&server);
    server.apply(namespace("shop", json!({"team": "shop"})));
    server.apply(namespace("front", json!({"team": "front"})));
    server.apply(pod("shop", "web-a", json!({"app": "web"}), "198.18.1.1"));
    server.apply(pod("front", "ui", json!({"role": "ui"}), "198.18.9.1"));
    server.apply(pod(
        "front",
        "batch",
        json!({"role": "batch"}),
        "198.18.9.2",
    ));
    let mut f = Follower::start_with(
        &server,
        FollowConfig {
            network_policy: true,
            ..FollowConfig::default()
        },
    );
    let m = f.wait_for(&[WEB]).await;
    assert!(allowed(&m, "198.18.9.2"), "no policy: open");

    // A policy: only role=ui from namespaces labelled team=front.
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "ui-only", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "front"}},
                                        "podSelector": {"matchLabels": {"role": "ui"}}}],
                              "ports": [{"port": "http"}]}]},
    }));
    f.wait_until("batch denied", |m| !allowed(m, "198.18.9.2"))
        .await;
    assert!(allowed(f.last.as_ref().expect("model"), "198.18.9.1"));

    // The batch pod is relabelled: it becomes a ui pod.
    server.apply(pod("front", "batch", json!({"role": "ui"}), "198.18.9.2"));
    f.wait_until("relabelled pod allowed", |m| allowed(m, "198.18.9.2"))
        .await;

    // The namespace loses its label: nothing from it is allowed.
    server.apply(namespace("front", json!({"team": "other"})));
    f.wait_until("namespace relabelled", |m| {
        !allowed(m, "198.18.9.1") && !allowed(m, "198.18.9.2")
    })
    .await;

    // The policy goes: open again.
    server.delete(Kind::NetworkPolicy, "shop", "ui-only");
    f.wait_until("policy deleted", |m| allowed(m, "198.18.9.1"))
        .await;
    // What was asked: the three kinds, besides the others.
    let kinds: std::collections::BTreeSet<Kind> =
        server.requests().iter().map(|r| r.kind).collect();
    for k in [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy] {
        assert!(kinds.contains(&k), "{k:?} was not listed or watched");
    }
    assert!(server
        .requests()
        .iter()
        .filter(|r| r.kind == Kind::Pod)
        .all(
            |r| r.field_selector.as_deref() == Some("status.phase!=Succeeded,status.phase!=Failed")
        ));
}
