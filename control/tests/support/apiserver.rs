//! A small in-memory Kubernetes API server for tests, over HTTP/1.1 on loopback.
//!
//! It serves what `kube_source` uses, and only that: list and watch of
//! `/api/v1/services` and `/apis/discovery.k8s.io/v1/endpointslices` across
//! all namespaces, of `/api/v1/nodes` (cluster-scoped), and, for
//! NetworkPolicy, of `/api/v1/pods`, `/api/v1/namespaces` (cluster-scoped)
//! and `/apis/networking.k8s.io/v1/networkpolicies`, with
//!
//! - one global resourceVersion, bumped by every write, set on the object;
//! - lists that return the current objects and the current resourceVersion;
//! - watches from a resourceVersion: the changes after it from a history, then
//!   live changes; `410 Gone` (an `ERROR` event, as the real server sends it)
//!   when the history no longer reaches back that far;
//! - field selectors (`path=value`, `path!=value`) and label selectors (`key`,
//!   `!key`, `key=value`, `key!=value`), with the real server's rule that an
//!   object leaving a watch's selection is sent as `DELETED` and one entering
//!   it as `ADDED`;
//! - `BOOKMARK` events on request ([`ApiServer::bookmark`]) for watches that
//!   asked for them;
//! - test controls: end every watch ([`ApiServer::end_watches`]), expire them
//!   with 410 ([`ApiServer::expire_watches`]), write without telling watchers
//!   ([`ApiServer::apply_unseen`]), and stop and restart on the same port.
//!
//! Every response closes its connection (`Connection: close`); a watch body is
//! chunked. Requests are logged for assertions ([`ApiServer::requests`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// The kinds served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Node (cluster-scoped: its namespace is `""`).
    Node,
    /// `v1` Pod.
    Pod,
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
}

impl Kind {
    fn of(object: &Value) -> Self {
        match object["kind"].as_str() {
            Some("Service") => Self::Service,
            Some("EndpointSlice") => Self::EndpointSlice,
            Some("Node") => Self::Node,
            Some("Pod") => Self::Pod,
            Some("Namespace") => Self::Namespace,
            Some("NetworkPolicy") => Self::NetworkPolicy,
            other => panic!("the test API server has no kind {other:?}"),
        }
    }

    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlice),
            "/api/v1/nodes" => Some(Self::Node),
            "/api/v1/pods" => Some(Self::Pod),
            "/api/v1/namespaces" => Some(Self::Namespace),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Self::NetworkPolicy),
            _ => None,
        }
    }

    fn list_header(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("v1", "ServiceList"),
            Self::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Self::Node => ("v1", "NodeList"),
            Self::Pod => ("v1", "PodList"),
            Self::Namespace => ("v1", "NamespaceList"),
            Self::NetworkPolicy => ("networking.k8s.io/v1", "NetworkPolicyList"),
        }
    }

    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("v1", "Service"),
            Self::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Self::Node => ("v1", "Node"),
            Self::Pod => ("v1", "Pod"),
            Self::Namespace => ("v1", "Namespace"),
            Self::NetworkPolicy => ("networking.k8s.io/v1", "NetworkPolicy"),
        }
    }
}

/// One request, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What was asked for.
    pub kind: Kind,
    /// A watch (else a list).
    pub watch: bool,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `fieldSelector`.
    pub field_selector: Option<String>,
    /// `labelSelector`.
    pub label_selector: Option<String>,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
}

type Key = (Kind, String, String);

/// One write: the object before and after (`None`: absent).
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    before: Option<Value>,
    after: Option<Value>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    oldest_watchable: u64,
    requests: Vec<Request>,
}

/// What live watches are told.
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// New changes in the history.
    Changed,
    /// Send a bookmark with the current resourceVersion.
    Bookmark,
    /// End the watch normally (as its timeout would).
    End,
    /// Send 410 Gone and end the watch.
    Expire,
}

/// The test API server. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    /// The accept loop, and how to tell it to stop.
    accept: Option<(JoinHandle<()>, oneshot::Sender<()>)>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some((task, _)) = self.accept.take() {
            task.abort(); // its connections go with it
        }
    }
}

impl ApiServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let (signals, _) = broadcast::channel(1024);
        let mut server = Self {
            addr,
            state: Arc::default(),
            signals,
            accept: None,
        };
        server.serve(listener);
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (no TLS, no credentials).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = Arc::clone(&self.state);
        let signals = self.signals.clone();
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => {
                        drop(listener);
                        connections.shutdown().await;
                        return;
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (state, signals) = (Arc::clone(&state), signals.clone());
                        connections.spawn(async move {
                            // A client that goes away mid-response is not an error here.
                            let _ = handle(stream, &state, &signals).await;
                        });
                    }
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        self.accept = Some((task, stop_tx));
    }

    /// Stops listening and closes every connection: the API is unreachable.
    /// When this returns, no connection writes anything any more.
    pub async fn stop(&mut self) {
        if let Some((task, stop)) = self.accept.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same port, with the same objects and history.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        self.serve(listener);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    /// Creates or replaces an object (by kind, namespace and name).
    pub fn apply(&self, object: Value) {
        self.apply_unseen(object);
        let _ = self.signals.send(Signal::Changed);
    }

    /// Deletes an object; absent objects are fine.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.delete_unseen(kind, namespace, name);
        let _ = self.signals.send(Signal::Changed);
    }

    /// [`Self::apply`], without telling live watches (they see it when they
    /// next resume, unless the history is gone by then).
    pub fn apply_unseen(&self, mut object: Value) {
        let kind = Kind::of(&object);
        let key = key_of(kind, &object);
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{}-{}-{:?}", key.1, key.2, kind));
        let before = st.objects.insert(key, object.clone());
        st.history.push(Change {
            rv,
            kind,
            before,
            after: Some(object),
        });
    }

    /// [`Self::delete`], without telling live watches.
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.lock();
        let Some(before) = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        st.history.push(Change {
            rv,
            kind,
            before: Some(before),
            after: None,
        });
    }

    /// Forgets the history: watches from any earlier resourceVersion get 410.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.oldest_watchable = st.rv;
    }

    /// Compacts, then sends 410 Gone to every live watch and ends it.
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.signals.send(Signal::Expire);
    }

    /// Ends every live watch normally, as a watch timeout does.
    pub fn end_watches(&self) {
        let _ = self.signals.send(Signal::End);
    }

    /// Sends a bookmark with the current resourceVersion to every live watch that allows them.
    pub fn bookmark(&self) -> u64 {
        let rv = self.lock().rv;
        let _ = self.signals.send(Signal::Bookmark);
        rv
    }

    /// Waits (up to 10 s) until a request for which `pred` holds has come.
    pub async fn wait_request(&self, what: &str, pred: impl Fn(&Request) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.lock().requests.iter().any(&pred) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no request {what}: {:#?}",
                self.requests()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let ns = if matches!(kind, Kind::Node | Kind::Namespace) {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_owned()
    };
    let name = meta["name"].as_str().expect("metadata.name").to_owned();
    (kind, ns, name)
}

// ---- selectors ----

fn field_value<'a>(object: &'a Value, path: &str) -> &'a str {
    let mut v = object;
    for part in path.split('.') {
        v = &v[part];
    }
    v.as_str().unwrap_or("")
}

fn label<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["labels"][key].as_str()
}

/// Does `object` match both selectors (comma-separated requirements)?
fn selected(object: &Value, fields: Option<&str>, labels: Option<&str>) -> bool {
    let fields_ok = fields.into_iter().flat_map(|s| s.split(',')).all(|req| {
        if let Some((path, value)) = req.split_once("!=") {
            field_value(object, path) != value
        } else if let Some((path, value)) = req.split_once('=') {
            field_value(object, path.trim_end_matches('=')) == value
        } else {
            panic!("unsupported field selector {req:?}")
        }
    });
    let labels_ok = labels
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
        .all(|req| {
            if let Some(key) = req.strip_prefix('!') {
                label(object, key).is_none()
            } else if let Some((key, value)) = req.split_once("!=") {
                label(object, key) != Some(value)
            } else if let Some((key, value)) = req.split_once('=') {
                label(object, key.trim_end_matches('=')) == Some(value)
            } else {
                label(object, req).is_some()
            }
        });
    fields_ok && labels_ok
}

// ---- HTTP ----

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one request head; `None` when the client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        assert!(buf.len() < 64 * 1024, "request head too large");
    }
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = if code == 200 { "OK" } else { "Error" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    let framed = format!("{:x}\r\n{line}\r\n", line.len());
    stream.write_all(framed.as_bytes()).await?;
    stream.flush().await
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn handle(
    mut stream: TcpStream,
    state: &Mutex<State>,
    signals: &broadcast::Sender<Signal>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("")
        .to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let Some(kind) = Kind::of_path(path) else {
        return respond(&mut stream, 404, &status(404, "NotFound", &target)).await;
    };
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let request = Request {
        kind,
        watch: params.get("watch").is_some_and(|v| v == "true" || v == "1"),
        resource_version: params.get("resourceVersion").cloned(),
        field_selector: params.get("fieldSelector").cloned(),
        label_selector: params.get("labelSelector").cloned(),
        bookmarks: params
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true"),
    };
    // Subscribe before the request is logged (tests wait for watches in the
    // log) and before the history is read, so no signal falls between.
    let mut rx = signals.subscribe();
    state.lock().expect("lock").requests.push(request.clone());
    let fields = request.field_selector.as_deref();
    let labels = request.label_selector.as_deref();

    if !request.watch {
        let body = {
            let st = state.lock().expect("lock");
            let items: Vec<&Value> = st
                .objects
                .iter()
                .filter(|((k, _, _), o)| *k == kind && selected(o, fields, labels))
                .map(|(_, o)| o)
                .collect();
            let (api_version, list_kind) = kind.list_header();
            json!({
                "apiVersion": api_version, "kind": list_kind,
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            })
        };
        return respond(&mut stream, 200, &body).await;
    }

    // A watch.
    let mut sent: u64 = match request.resource_version.as_deref() {
        None | Some("" | "0") => state.lock().expect("lock").rv,
        Some(rv) => rv.parse().unwrap_or(0),
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let too_old = {
        let st = state.lock().expect("lock");
        (sent < st.oldest_watchable).then(|| (sent, st.oldest_watchable))
    };
    if let Some((asked, oldest)) = too_old {
        let message = format!("too old resource version: {asked} ({oldest})");
        chunk(
            &mut stream,
            &json!({"type": "ERROR", "object": status(410, "Expired", &message)}),
        )
        .await?;
        return finish(&mut stream).await;
    }
    loop {
        // Everything in the history after `sent`, through this watch's selectors.
        let events: Vec<Value> = {
            let st = state.lock().expect("lock");
            let events = st
                .history
                .iter()
                .filter(|c| c.kind == kind && c.rv > sent)
                .filter_map(|c| event_of(c, fields, labels))
                .collect();
            sent = sent.max(st.rv);
            events
        };
        for e in &events {
            chunk(&mut stream, e).await?;
        }
        match rx.recv().await {
            Ok(Signal::Changed) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Ok(Signal::Bookmark) => {
                if request.bookmarks {
                    let rv = state.lock().expect("lock").rv;
                    // Only after the changes up to it are sent.
                    if rv == sent {
                        let (api_version, k) = kind.type_meta();
                        chunk(
                            &mut stream,
                            &json!({"type": "BOOKMARK", "object": {
                                "apiVersion": api_version, "kind": k,
                                "metadata": {"resourceVersion": rv.to_string()},
                            }}),
                        )
                        .await?;
                    }
                }
            }
            Ok(Signal::End) | Err(broadcast::error::RecvError::Closed) => {
                return finish(&mut stream).await
            }
            Ok(Signal::Expire) => {
                let message = format!("too old resource version: {sent}");
                chunk(
                    &mut stream,
                    &json!({"type": "ERROR", "object": status(410, "Expired", &message)}),
                )
                .await?;
                return finish(&mut stream).await;
            }
        }
    }
}

/// The last chunk, then close.
async fn finish(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"0\r\n\r\n").await?;
    stream.shutdown().await
}

/// The watch event a change is for a watch with these selectors, if any.
fn event_of(change: &Change, fields: Option<&str>, labels: Option<&str>) -> Option<Value> {
    let was = change
        .before
        .as_ref()
        .filter(|o| selected(o, fields, labels));
    let is = change
        .after
        .as_ref()
        .filter(|o| selected(o, fields, labels));
    let (kind, mut object) = match (was, is) {
        (None, None) => return None,
        (None, Some(o)) => ("ADDED", o.clone()),
        (Some(_), Some(o)) => ("MODIFIED", o.clone()),
        // Gone, or no longer selected: the latter is sent as the new object.
        (Some(b), None) => ("DELETED", change.after.clone().unwrap_or_else(|| b.clone())),
    };
    object["metadata"]["resourceVersion"] = json!(change.rv.to_string());
    Some(json!({"type": kind, "object": object}))
}
