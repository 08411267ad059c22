//! `mrrec bench --parts hostile`: the service under a hostile load, on loopback with the
//! instant `echo` model.
//!
//! 1. **Stalled connections under load**: `stalled` clients from five loopback addresses
//!    (127.0.0.2–6) each keep a connection open that sends half a request header and stops,
//!    reconnecting whenever the server closes it (a slowloris), while an open loop sends
//!    `rate` searches per second from 127.0.0.1. Reports the load's statuses and latency beside
//!    the same load without the stalled clients (the baseline of the same run), and how many
//!    stalled connections the server closed.
//! 2. **SIGTERM under that load**: the same, then the shutdown signal; reports how long the
//!    server took to stop (against its grace period) and what the requests in flight got.
//! 3. **Fuzz over HTTP**: `fuzz_cases` seeded, mutated bodies against the interactions, recommend,
//!    memory-tool and reward endpoints (and mangled paths and credentials); every answer must be
//!    a 4xx or a 2xx — a 5xx, a dropped connection or a non-JSON error counts as a failure.
//!    Then the same number of cases straight into the request parsers (no HTTP).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::load::{run, LoadOptions, MakeRequest};
use crate::{bench_keys, BENCH_KEY};
use mrrec_agent::Workspace;
use mrrec_server::{ConnLimits, Service, ServiceConfig};

/// Keeps `n` half-sent requests open against `addr` from 127.0.0.2–6 until `stop`; counts the
/// connections the server closed.
fn slowloris(
    addr: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (stop, closed) = (stop.clone(), closed.clone());
            tokio::spawn(async move {
                let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 5) as u8));
                while !stop.load(Ordering::SeqCst) {
                    let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                        return;
                    };
                    if sock.bind(SocketAddr::new(src, 0)).is_err() {
                        return;
                    }
                    let Ok(mut c) = sock.connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    let mut buf = [0u8; 512];
                    // Wait for the server to close it, checking `stop` now and then.
                    loop {
                        match tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf))
                            .await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            Ok(Ok(_)) => {}
                            Err(_) if stop.load(Ordering::SeqCst) => return,
                            Err(_) => {}
                        }
                    }
                }
            })
        })
        .collect()
}

/// A mutated request body: valid ones broken in seeded ways (bytes flipped, cut, values
/// swapped for hostile ones, fields added, deep nesting, NULs, huge strings).
fn mutate(rng: &mut ChaCha8Rng, valid: &Value) -> Vec<u8> {
    let hostile = || -> Vec<Value> {
        vec![
            json!(null),
            json!(-1),
            json!(1e308),
            json!(-9_223_372_036_854_775_808i64),
            json!(""),
            json!(" "),
            json!("\u{0}\u{0}\u{0}"),
            json!("\u{202e}\u{200b}"),
            json!("x".repeat(70_000)),
            json!([1, [2, [3, [4]]]]),
            json!({"$ne": null}),
            json!(true),
            json!("../../etc/passwd"),
            json!("'; DROP TABLE entries; --"),
        ]
    };
    match rng.gen_range(0..7) {
        0 => {
            // Flip bytes.
            let mut b = serde_json::to_vec(valid).unwrap_or_default();
            for _ in 0..rng.gen_range(1..8) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            b
        }
        1 => {
            // Cut.
            let b = serde_json::to_vec(valid).unwrap_or_default();
            let n = rng.gen_range(0..=b.len());
            b[..n].to_vec()
        }
        2 | 3 => {
            // Replace a field (at the top, or inside the first array element) with a hostile value.
            let mut v = valid.clone();
            let h = hostile();
            let pick = h[rng.gen_range(0..h.len())].clone();
            if let Some(o) = v.as_object_mut() {
                let keys: Vec<String> = o.keys().cloned().collect();
                let k = &keys[rng.gen_range(0..keys.len())];
                let inner = o
                    .get_mut(k)
                    .and_then(|x| x.as_array_mut())
                    .and_then(|a| a.first_mut())
                    .and_then(|x| x.as_object_mut());
                match inner {
                    Some(io) if rng.gen_bool(0.6) => {
                        let ik: Vec<String> = io.keys().cloned().collect();
                        let kk = ik[rng.gen_range(0..ik.len())].clone();
                        io.insert(kk, pick);
                    }
                    _ => {
                        o.insert(k.clone(), pick);
                    }
                }
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        4 => {
            // An unknown field.
            let mut v = valid.clone();
            if let Some(o) = v.as_object_mut() {
                o.insert(format!("x{}", rng.gen::<u16>()), json!(1));
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        5 => {
            // Deep nesting.
            let depth = rng.gen_range(10..3000);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(depth));
            s.into_bytes()
        }
        _ => {
            // Noise.
            let n = rng.gen_range(0..300);
            (0..n).map(|_| rng.gen()).collect()
        }
    }
}

/// The endpoints fuzzed and a valid body for each.
fn targets(item: &str, user: &str) -> Vec<(&'static str, String, Value)> {
    vec![
        (
            "POST",
            format!("/v1/users/{user}/interactions"),
            json!({"interactions": [{"parent_asin": item, "rating": 5, "title": "t", "text": "fine", "timestamp": 5}]}),
        ),
        (
            "POST",
            "/v1/recommend".into(),
            json!({"user": user, "request": "a plush toy", "k": 5}),
        ),
        (
            "POST",
            "/tools/memory_retrieve".into(),
            json!({"user": user, "query": "toys", "aspects": ["size"], "k": 3}),
        ),
        (
            "POST",
            "/reward".into(),
            json!({"target": item, "profile": "a toy"}),
        ),
    ]
}

/// Runs the three scenarios (see the module documentation).
pub fn hostile(
    ws: Arc<Workspace>,
    stalled: usize,
    rate: f64,
    seconds: f64,
    fuzz_cases: usize,
) -> Result<Value> {
    let (_dir, store, users) = crate::record_store(&ws, 1)?;
    let user = users.first().cloned().unwrap_or_default();
    let item = ws
        .dataset
        .histories
        .of(&user)
        .first()
        .map(|r| r.parent_asin.clone())
        .unwrap_or_default();
    let cfg = ServiceConfig {
        rate_per_key: 0.0,
        // The fuzz sends bad credentials on purpose; their per-address limit would turn the
        // rest of its cases into 429s (the limit itself is tested in service_limits).
        auth_failures_per_second: 0.0,
        conn: ConnLimits {
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let search: MakeRequest = Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
        c.get(format!("{base}/v1/items/search"))
            .query(&[
                ("q", format!("a plush toy number {}", i % 50)),
                ("k", "10".into()),
            ])
            .bearer_auth(BENCH_KEY)
    });
    rt.block_on(async move {
        let start = |cfg: ServiceConfig| -> Result<(Arc<Service>, tokio::net::TcpListener)> {
            let svc = Service::new(
                ws.clone(),
                store.clone(),
                (Arc::new(mrrec_llm::EchoModel::from_id("echo").expect("echo"))
                    as Arc<dyn mrrec_llm::ChatModel>)
                    .into(),
                None,
                bench_keys()?,
                cfg,
            );
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok((svc, tokio::net::TcpListener::from_std(l)?))
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()?;
        let load = LoadOptions {
            concurrency: 256,
            rate: Some(rate),
            duration: Duration::from_secs_f64(seconds),
            max_requests: usize::MAX,
        };
        let mut res = serde_json::Map::new();

        // 1. Baseline, then the same load beside the stalled clients.
        let (svc, l) = start(cfg.clone())?;
        let addr = l.local_addr()?;
        let base = format!("http://{addr}");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(mrrec_server::serve(l, svc.clone(), async {
            let _ = rx.await;
        }));
        let warm = LoadOptions {
            concurrency: 4,
            rate: None,
            duration: Duration::from_secs(60),
            max_requests: 50,
        };
        run(client.clone(), &base, search.clone(), &warm).await;
        eprintln!("hostile: baseline load at {rate}/s…");
        let baseline = run(client.clone(), &base, search.clone(), &load).await;
        let stop = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicUsize::new(0));
        let loris = slowloris(addr, stalled, stop.clone(), closed.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!("hostile: the same load beside {stalled} stalled connections…");
        let under = run(client.clone(), &base, search.clone(), &load).await;
        res.insert(
            "stalled".into(),
            json!({
                "stalled_clients": stalled,
                "closed_by_server": closed.load(Ordering::SeqCst),
                "header_timeout_s": cfg.conn.header_timeout.as_secs_f64(),
                "baseline": serde_json::to_value(&baseline)?,
                "with_stalled": serde_json::to_value(&under)?,
                "p50_ratio": under.p50_ms / baseline.p50_ms.max(1e-9),
                "p99_ratio": under.p99_ms / baseline.p99_ms.max(1e-9),
            }),
        );

        // 2. SIGTERM (the shutdown signal) under the load and the stalled clients.
        eprintln!("hostile: shutdown under load…");
        let in_load = {
            let (client, base, search) = (client.clone(), base.clone(), search.clone());
            let load = LoadOptions {
                duration: Duration::from_secs(4),
                ..load.clone()
            };
            tokio::spawn(async move { run(client, &base, search, &load).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        let _ = tx.send(());
        let stopped = tokio::time::timeout(Duration::from_secs(30), server).await;
        let stop_s = t.elapsed().as_secs_f64();
        let during = in_load.await?;
        stop.store(true, Ordering::SeqCst);
        for h in loris {
            let _ = h.await;
        }
        res.insert(
            "shutdown".into(),
            json!({
                "seconds_to_stop": stop_s,
                "grace_s": cfg.conn.shutdown_grace.as_secs_f64(),
                "stopped": stopped.is_ok(),
                "load_during": serde_json::to_value(&during)?,
            }),
        );

        // 3. Fuzz over HTTP.
        let (svc, l) = start(cfg.clone())?;
        let base = format!("http://{}", l.local_addr()?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(mrrec_server::serve(l, svc.clone(), async {
            let _ = rx.await;
        }));
        eprintln!("hostile: {fuzz_cases} fuzz cases over HTTP…");
        let targets = Arc::new(targets(&item, &user));
        let statuses: Arc<std::sync::Mutex<BTreeMap<u16, usize>>> = Default::default();
        let failures: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let transport = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let workers = 16;
        let mut hs = Vec::new();
        for w in 0..workers {
            let (client, base, targets) = (client.clone(), base.clone(), targets.clone());
            let (statuses, failures, transport) =
                (statuses.clone(), failures.clone(), transport.clone());
            hs.push(tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(0xF022 + w as u64);
                for _ in (w..fuzz_cases).step_by(workers) {
                    let (method, path, valid) = &targets[rng.gen_range(0..targets.len())];
                    let body = mutate(&mut rng, valid);
                    let mut path = path.clone();
                    if rng.gen_bool(0.05) {
                        path.push_str(["%", "%ZZ", "/..", "?k=-1", "%00"][rng.gen_range(0..5)]);
                    }
                    let mut rb = client
                        .request(
                            method.parse().unwrap_or(reqwest::Method::POST),
                            format!("{base}{path}"),
                        )
                        .header("content-type", "application/json")
                        .body(body.clone());
                    rb = match rng.gen_range(0..20) {
                        0 => rb,
                        1 => rb.header("authorization", "Basic Zm9vOmJhcg=="),
                        2 => rb.header(
                            "x-api-key",
                            reqwest::header::HeaderValue::from_bytes(b"k\xffey")
                                .unwrap_or(reqwest::header::HeaderValue::from_static("k")),
                        ),
                        _ => rb.bearer_auth(BENCH_KEY),
                    };
                    match rb.send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let is_json = r
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|v| v.starts_with("application/json"));
                            *statuses
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(s)
                                .or_default() += 1;
                            if s >= 500 || (s >= 400 && !is_json) {
                                let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                                if f.len() < 20 {
                                    f.push(format!(
                                        "{s} {path}: {}",
                                        String::from_utf8_lossy(&body[..body.len().min(200)])
                                    ));
                                }
                            }
                        }
                        Err(_) => {
                            transport.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
        for h in hs {
            h.await?;
        }
        let http_s = t0.elapsed().as_secs_f64();
        let _ = tx.send(());
        let _ = server.await;
        // The same number of cases straight into the parsers.
        let t1 = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(0xBAD);
        let mut accepted = 0usize;
        for _ in 0..fuzz_cases {
            let (_, _, valid) = &targets[rng.gen_range(0..targets.len())];
            let body = mutate(&mut rng, valid);
            let ok = match rng.gen_range(0..4) {
                0 => mrrec_server::parse_interactions(&body, &user, &cfg).is_ok(),
                1 => mrrec_server::parse_recommend(&body, &cfg).is_ok(),
                2 => mrrec_server::parse_tool(&body, &cfg).is_ok(),
                _ => mrrec_server::parse_reward(&body, &cfg).is_ok(),
            };
            accepted += ok as usize;
        }
        let statuses = statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let fails = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let five_xx: usize = statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum();
        res.insert(
            "fuzz".into(),
            json!({
                "http_cases": fuzz_cases,
                "http_seconds": http_s,
                "statuses": statuses,
                "five_xx": five_xx,
                "transport_errors": transport.load(Ordering::SeqCst),
                "failures": fails,
                "parser_cases": fuzz_cases,
                "parser_seconds": t1.elapsed().as_secs_f64(),
                "parser_accepted": accepted,
            }),
        );
        anyhow::Ok(Value::Object(res))
    })
}
