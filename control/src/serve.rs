//! A minimal HTTP/1.1 responder for `--metrics` and `--health`: GET (and
//! HEAD) only, one request per connection, `Connection: close`. It runs on a
//! thread of its own with a single-threaded tokio runtime, so it answers in
//! both `run` modes and whatever the main loop is doing.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
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
    pub body: String,
}

impl Response {
    #[must_use]
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
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
    let header = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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
