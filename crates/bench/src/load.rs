//! A load generator for the service (used by `mrrec bench --parts service`, `mrrec loadtest`
//! and the tests): closed loop (a fixed number of clients, each sending as soon as its last
//! answer arrived — measures capacity) or open loop (requests started at a fixed rate whatever
//! the answers do — measures latency at a given load without coordinated omission). Bounded in
//! count and time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Builds the `i`-th request against the base URL (`http://host:port`).
pub type MakeRequest =
    Arc<dyn Fn(&reqwest::Client, &str, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Clients (closed loop) or most requests in flight (open loop).
    pub concurrency: usize,
    /// Requests per second (open loop); `None` for a closed loop.
    pub rate: Option<f64>,
    /// Stop after this long.
    pub duration: Duration,
    /// Stop after this many requests.
    pub max_requests: usize,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests sent.
    pub requests: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Answers per second.
    pub rps: f64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection errors, client timeouts).
    pub transport_errors: usize,
    /// Open loop: requests not started because `concurrency` were already in flight.
    pub not_started: usize,
    /// Latency percentiles of answered requests, milliseconds: p50, p90, p99, max.
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Time inside the service (its `Server-Timing` header), milliseconds: p50.
    pub server_p50_ms: f64,
    /// p99 of the time inside the service.
    pub server_p99_ms: f64,
}

impl LoadReport {
    /// Answers with this status.
    pub fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// The `q`-quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

type Outcome = (Option<u16>, f64, Option<f64>);

async fn one(client: &reqwest::Client, base: &str, make: &MakeRequest, i: usize) -> Outcome {
    let t = Instant::now();
    let r = make(client, base, i).send().await;
    let mut server = None;
    let status = match r {
        Ok(resp) => {
            let s = resp.status().as_u16();
            server = resp
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split("dur=").nth(1))
                .and_then(|v| v.parse::<f64>().ok());
            // Read the whole body: the answer is not complete before.
            match resp.bytes().await {
                Ok(_) => Some(s),
                Err(_) => None,
            }
        }
        Err(_) => None,
    };
    (status, t.elapsed().as_secs_f64() * 1e3, server)
}

/// Runs the load.
pub async fn run(
    client: reqwest::Client,
    base: &str,
    make: MakeRequest,
    opts: &LoadOptions,
) -> LoadReport {
    let base: Arc<str> = Arc::from(base);
    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut not_started = 0;
    match opts.rate {
        None => {
            let mut workers = Vec::new();
            for _ in 0..opts.concurrency.max(1) {
                let (client, make, tx, counter, base) = (
                    client.clone(),
                    make.clone(),
                    tx.clone(),
                    counter.clone(),
                    base.clone(),
                );
                let max = opts.max_requests;
                workers.push(tokio::spawn(async move {
                    loop {
                        let i = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= max || Instant::now() >= deadline {
                            break;
                        }
                        let r = one(&client, &base, &make, i).await;
                        let _ = tx.send(r);
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
        Some(rate) => {
            let gate = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
            let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut handles = Vec::new();
            for i in 0..opts.max_requests {
                tick.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let Ok(permit) = gate.clone().try_acquire_owned() else {
                    not_started += 1;
                    continue;
                };
                let (client, make, tx, base) =
                    (client.clone(), make.clone(), tx.clone(), base.clone());
                handles.push(tokio::spawn(async move {
                    let r = one(&client, &base, &make, i).await;
                    drop(permit);
                    let _ = tx.send(r);
                }));
            }
            for h in handles {
                let _ = h.await;
            }
        }
    }
    drop(tx);
    let seconds = t0.elapsed().as_secs_f64();
    let mut statuses = BTreeMap::new();
    let mut lat = Vec::new();
    let mut transport_errors = 0;
    let mut requests = 0;
    let mut server = Vec::new();
    while let Some((s, ms, srv)) = rx.recv().await {
        requests += 1;
        server.extend(srv);
        match s {
            Some(s) => {
                *statuses.entry(s).or_default() += 1;
                lat.push(ms);
            }
            None => transport_errors += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    server.sort_by(f64::total_cmp);
    LoadReport {
        server_p50_ms: quantile(&server, 0.5),
        server_p99_ms: quantile(&server, 0.99),
        requests,
        seconds,
        rps: lat.len() as f64 / seconds.max(1e-9),
        statuses,
        transport_errors,
        not_started,
        p50_ms: quantile(&lat, 0.5),
        p90_ms: quantile(&lat, 0.9),
        p99_ms: quantile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
    }
}
