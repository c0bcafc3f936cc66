//! The HTTP endpoint of `metrics_addr=`: `GET /metrics` (Prometheus text format) and `GET /health`.
//!
//! A tiny HTTP/1.1 server on the daemon's tokio runtime: one request per connection (`Connection: close`), GET
//! only, a request head of at most 8 KiB read within 5 s. That is all a Prometheus scraper or a load balancer's
//! health check sends, and it keeps an HTTP framework out of the daemon.
//!
//! `/health` answers 200 `ok` while the FUSE session answers (a `stat` of the mount point returns, within 2 s,
//! this mount's device) and the store answers (a one-key listing of the volume's prefix, within 3 s, without
//! retries and without counting in the request metrics); otherwise 503 with the reason.
use super::{Metrics, CONTENT_TYPE};
use crate::store::ObjectStore;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 8 * 1024;
const READ_LIMIT: Duration = Duration::from_secs(5);
const FUSE_LIMIT: Duration = Duration::from_secs(2);
const STORE_LIMIT: Duration = Duration::from_secs(3);

/// What `/health` checks.
pub struct Health {
    /// A store with no retries and no counting, for the probe.
    pub probe: Arc<dyn ObjectStore>,
    /// The volume's key prefix ("" or "a/b/").
    pub prefix: String,
    pub mountpoint: PathBuf,
    /// The mount's device number (`st_dev` of the mount point once mounted).
    pub dev: u64,
}

impl Health {
    /// `Ok` if the FUSE session and the store answer, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        self.check_fuse().await?;
        self.check_store().await
    }

    async fn check_fuse(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let mnt = self.mountpoint.clone();
        let stat = tokio::task::spawn_blocking(move || std::fs::metadata(mnt).map(|m| m.dev()));
        match tokio::time::timeout(FUSE_LIMIT, stat).await {
            Ok(Ok(Ok(dev))) if dev == self.dev => Ok(()),
            Ok(Ok(Ok(_))) => Err("the file system is no longer mounted".into()),
            Ok(Ok(Err(e))) => Err(format!("the mount point does not answer: {e}")),
            Ok(Err(e)) => Err(format!("the mount point check failed: {e}")),
            Err(_) => Err(format!("the mount point did not answer within {FUSE_LIMIT:?}")),
        }
    }

    async fn check_store(&self) -> Result<(), String> {
        let list = self.probe.list(&self.prefix, Some("/"), None, Some(1));
        match tokio::time::timeout(STORE_LIMIT, list).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("S3 does not answer: {e}")),
            Err(_) => Err(format!("S3 did not answer within {STORE_LIMIT:?}")),
        }
    }
}

/// The running endpoint; dropping it stops accepting connections.
pub struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address it listens on (the actual port if `:0` was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `addr` (the bind happens now, so a taken port is an error of the mount) and serves on `rt`.
pub fn start(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<Server> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let task = rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let (m, h) = (metrics.clone(), health.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve(conn, &m, &h).await {
                            log::debug!("metrics endpoint: {e}");
                        }
                    });
                }
                Err(e) => {
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    log::info!("serving Prometheus metrics at http://{addr}/metrics and health at http://{addr}/health");
    Ok(Server { addr, task })
}

/// Reads one request head and answers it.
async fn serve(mut conn: TcpStream, metrics: &Arc<Metrics>, health: &Health) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_LIMIT, read_head(&mut conn)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let line = head.lines().next().unwrap_or("");
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => {
            let m = metrics.clone();
            match tokio::task::spawn_blocking(move || m.encode()).await {
                Ok(text) => ("200 OK", CONTENT_TYPE, text),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        ("GET", "/health") => match health.check().await {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(reason) => {
                log::debug!("health check: {reason}");
                ("503 Service Unavailable", "text/plain", format!("{reason}\n"))
            }
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics or /health\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

/// The request line and headers (up to the blank line, at most [`MAX_HEAD`] bytes).
async fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
