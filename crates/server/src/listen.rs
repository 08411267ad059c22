//! The accept loop: HTTP/1.1 connections on hyper with the limits a slow or hostile client
//! meets before any route runs.
//!
//! - A request's headers must arrive within `header_timeout` of the connection's start or of
//!   the previous response (hyper's header-read timer, which runs while a keep-alive
//!   connection idles too): partial headers and idle connections are closed.
//! - At most `max_connections` open connections, and `max_connections_per_client` per client
//!   address: a connection beyond either gets a JSON 503 with `Retry-After` and is closed.
//! - On the shutdown signal: stop accepting, close every connection that is answering nothing
//!   (idle, or still sending its headers), let the others finish the request they are answering
//!   (its response body included), and after `shutdown_grace` drop whatever is left.
//!
//! (The body timeout, the per-key cap and the request id are the router's `edge` middleware.)

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::ConnLimits;

/// Open connections, in total and per client address.
#[derive(Default)]
struct Counts {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; gives its place back when dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Slot {
    /// A place for a connection from `ip`, or why there is none.
    fn take(counts: &Arc<Counts>, ip: IpAddr, limits: &ConnLimits) -> Result<Slot, &'static str> {
        let mut per = counts.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per.entry(ip).or_insert(0);
        if *mine >= limits.max_connections_per_client {
            return Err("too many open connections from this address");
        }
        if counts.total.load(Ordering::SeqCst) >= limits.max_connections {
            return Err("too many open connections");
        }
        *mine += 1;
        counts.total.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::SeqCst);
        let mut per = self
            .counts
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// One request being answered on a connection; counted down when its response body is done.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a connection that cannot be admitted with a JSON 503, then closes it.
async fn refuse(mut stream: TcpStream, why: &'static str) {
    let body =
        serde_json::json!({"error": {"code": "too_many_connections", "message": why}}).to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Whether an accept error concerns one connection only (the loop goes on) rather than the
/// listener.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Serves `app` on `listener` under `limits` until `shutdown` resolves, then drains as
/// described in the module documentation. `on_refused` counts refused connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    on_refused: impl Fn(&'static str) + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let counts = Arc::new(Counts::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr): (TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match Slot::take(&counts, addr.ip(), &limits) {
            Ok(s) => s,
            Err(why) => {
                on_refused("too_many_connections");
                tokio::spawn(refuse(stream, why));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _slot = slot;
            // Requests of this connection being answered (until their response body ends).
            let active = Arc::new(AtomicUsize::new(0));
            let serving = active.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                let app = app.clone();
                let busy = Busy::new(&serving);
                async move {
                    let resp = app.oneshot(req.map(Body::new)).await?;
                    Ok::<_, Infallible>(resp.map(|b| {
                        Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                            let _ = &busy;
                            f
                        }))
                    }))
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // A connection answering nothing (idle, or still sending its headers) is
                    // closed now; one answering a request finishes it, then closes.
                    if active.load(Ordering::SeqCst) > 0 {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                    }
                }
            }
            Ok::<(), Infallible>(())
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(limits.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            r = conns.join_next() => if r.is_none() { break },
            _ = &mut grace => {
                eprintln!(
                    "shutdown grace period ({:.0?}) over: dropping {} connection(s) still open",
                    limits.shutdown_grace,
                    conns.len()
                );
                conns.abort_all();
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
    Ok(())
}
