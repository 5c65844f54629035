//! A minimal HTTP/1.1 responder for `--metrics`, `--health` and the
//! health-check node ports: GET (and HEAD) only, one request per connection,
//! `Connection: close`. It runs on a thread of its own with a single-threaded
//! tokio runtime, so it answers in both `run` modes and whatever the main loop
//! is doing. [`spawn`] serves a fixed set of listeners; [`Dynamic`] opens and
//! closes listeners while running (kube-proxy's service health server).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{error, info, warn};

/// The most bytes of a request head read.
const MAX_HEAD: usize = 8192;
/// The longest a connection may take to send its request and get the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// More header fields, after `Content-Type`.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    #[must_use]
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// Maps a request path to its answer.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Binds `addr`, given as `flag`, for [`spawn`].
pub fn bind(flag: &str, addr: SocketAddr) -> Result<StdListener> {
    let listener = StdListener::bind(addr).with_context(|| format!("cannot bind {flag} {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{flag} {addr}: non-blocking mode"))?;
    Ok(listener)
}

/// Serves every listener with its handler on a thread of its own.
pub fn spawn(servers: Vec<(StdListener, Handler)>) -> Result<()> {
    if servers.is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    std::thread::Builder::new()
        .name("http".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, handler) in servers {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => tasks.push(tokio::spawn(accept(listener, handler))),
                        Err(e) => error!("HTTP listener: {e}"),
                    }
                }
                for task in tasks {
                    if let Err(e) = task.await {
                        error!("HTTP listener ended: {e}");
                    }
                }
            });
        })
        .context("starting the HTTP thread")?;
    Ok(())
}

/// Listeners opened and closed while running, by port, each served on a
/// runtime thread of its own.
#[derive(Debug)]
pub struct Dynamic {
    handle: tokio::runtime::Handle,
    open: Mutex<BTreeMap<u16, Vec<tokio::task::AbortHandle>>>,
}

impl Dynamic {
    /// Starts the thread that serves the listeners (none yet).
    pub fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the health-check HTTP runtime")?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("http-dynamic".to_owned())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .context("starting the health-check HTTP thread")?;
        Ok(Self {
            handle,
            open: Mutex::new(BTreeMap::new()),
        })
    }

    /// Listens on `port` of every address, IPv6 and IPv4, and answers with
    /// `handler`. An IPv6 socket that also takes IPv4 (the Linux default) is
    /// enough; a host without IPv6 gets the IPv4 one alone.
    ///
    /// # Errors
    /// Neither family could be bound (the port is taken, say).
    pub fn open(&self, port: u16, handler: &Handler) -> Result<()> {
        self.close(port);
        let mut listeners = Vec::new();
        let v6 = StdListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
        let v6_taken = matches!(&v6, Err(e) if e.kind() == ErrorKind::AddrInUse);
        let v6_err = v6.as_ref().err().map(ToString::to_string);
        if let Ok(l) = v6 {
            listeners.push(l);
        }
        if v6_taken {
            anyhow::bail!("cannot bind [::]:{port}: {}", v6_err.unwrap_or_default());
        }
        match StdListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
            Ok(l) => listeners.push(l),
            // The IPv6 socket takes IPv4 too.
            Err(e) if e.kind() == ErrorKind::AddrInUse && !listeners.is_empty() => {}
            Err(e) if listeners.is_empty() => {
                anyhow::bail!(
                    "cannot bind [::]:{port} ({}) or 0.0.0.0:{port} ({e})",
                    v6_err.unwrap_or_default()
                );
            }
            Err(e) => warn!(port, "IPv4 listener: {e}; serving IPv6 only"),
        }
        let mut tasks = Vec::new();
        for listener in listeners {
            listener
                .set_nonblocking(true)
                .with_context(|| format!("port {port}: non-blocking mode"))?;
            let handler = Arc::clone(handler);
            let _guard = self.handle.enter();
            let listener = TcpListener::from_std(listener)
                .with_context(|| format!("port {port}: registering the listener"))?;
            tasks.push(self.handle.spawn(accept(listener, handler)).abort_handle());
        }
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port, tasks);
        Ok(())
    }

    /// Stops listening on `port` (nothing if it is not open).
    pub fn close(&self, port: u16) {
        let tasks = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port);
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    }
}

async fn accept(listener: TcpListener, handler: Handler) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving HTTP");
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &handler)).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, mostly: wait a little.
                warn!("accepting an HTTP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn answer(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next());
    let response = match (method, target) {
        ("GET" | "HEAD", Some(target)) => handler(target.split('?').next().unwrap_or_default()),
        (_, Some(_)) => Response::text(405, "method not allowed\n"),
        _ => Response::text(400, "bad request\n"),
    };
    let mut extra = String::new();
    for (name, value) in &response.headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let header = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.shutdown().await
}
