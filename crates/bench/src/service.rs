//! The HTTP service under load (open loop), and its LLM slots.

use crate::*;

/// The benchmarks' API key, of tenant "bench".
pub(crate) const BENCH_KEY: &str = "bench-key";

/// A key ring holding [`BENCH_KEY`].
pub(crate) fn bench_keys() -> Result<mrrec_server::auth::KeyRing> {
    use mrrec_server::auth::{hash_key, KeyRecord, KeyRing};
    Ok(KeyRing::from_records(&[KeyRecord {
        name: "b".into(),
        tenant: "bench".into(),
        sha256: hash_key(BENCH_KEY),
    }])?)
}

/// Serves `svc` on a free loopback port; returns its base URL and the sender that stops it.
pub(crate) async fn serve_loopback(
    svc: std::sync::Arc<mrrec_server::Service>,
) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", l.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mrrec_server::serve(l, svc, async {
        let _ = rx.await;
    }));
    Ok((base, tx))
}

/// A fresh SQLite store (in a temporary folder, kept alive by the returned guard) holding the
/// record memory of the first `users` dataset users, for tenant `bench`.
pub(crate) fn record_store(
    ws: &Workspace,
    users: usize,
) -> Result<(
    tempfile::TempDir,
    std::sync::Arc<mrrec_memory::SqliteStore>,
    Vec<String>,
)> {
    let dir = tempfile::tempdir()?;
    let store = std::sync::Arc::new(mrrec_memory::SqliteStore::open(
        &dir.path().join("m.sqlite"),
    )?);
    let all: Vec<&str> = ws
        .dataset
        .histories
        .user_ids()
        .into_iter()
        .take(users)
        .collect();
    let b = mrrec_agent::memory::MemoryBuilder {
        progress: true,
        ..mrrec_agent::memory::MemoryBuilder::new(ws, &*store, "bench")
    };
    b.build_records(&all, &mut mrrec_agent::memory::BuildReport::default())?;
    let users = all.iter().map(|u| u.to_string()).collect();
    Ok((dir, store, users))
}

/// The service with a real local model: `clients` closed-loop clients send `requests`
/// recommendations, first with one LLM slot (answers one after another: the baseline), then with
/// `clients` slots whose model calls are decoded together (`batch_llm`). A fresh model each time
/// (no response cache, no remembered prompts). Answers/min, latency, and the ratio.
pub fn service_llm(
    ws: std::sync::Arc<Workspace>,
    model: &str,
    clients: usize,
    requests: usize,
) -> Result<Value> {
    use crate::load::{run, LoadOptions, MakeRequest};
    use mrrec_server::{Service, ServiceConfig};
    use std::sync::Arc;
    use std::time::Duration;

    let dir = tempfile::tempdir()?;
    let store = Arc::new(mrrec_memory::SqliteStore::open(
        &dir.path().join("m.sqlite"),
    )?);
    let queries: Vec<(String, String)> = ws
        .dataset
        .queries
        .all()
        .iter()
        .map(|q| q.query())
        .filter(|q| q.split == Some(mrrec_data::Split::Val))
        .take(requests)
        .map(|q| {
            let text = q.simple_query.clone().unwrap_or_else(|| q.query.clone());
            (q.user_id.clone(), text)
        })
        .collect();
    let users: Vec<&str> = queries.iter().map(|(u, _)| u.as_str()).collect();
    let mut report = mrrec_agent::memory::BuildReport::default();
    mrrec_agent::memory::MemoryBuilder::new(&ws, &*store, "bench")
        .build_records(&users, &mut report)?;
    let queries = Arc::new(queries);
    let make: MakeRequest = {
        let q = queries.clone();
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            let (user, text) = &q[i % q.len()];
            c.post(format!("{base}/v1/recommend"))
                .bearer_auth(BENCH_KEY)
                .json(&json!({"user": user, "request": text, "k": 10}))
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = serde_json::Map::new();
    for slots in [1, clients] {
        let llm: Arc<dyn mrrec_llm::ChatModel> = Arc::from(mrrec_agent::backend::chat_model(
            model,
            None,
            &Default::default(),
        )?);
        let svc = Service::new(
            ws.clone(),
            store.clone(),
            llm.into(),
            None,
            bench_keys()?,
            ServiceConfig {
                rate_per_key: 0.0,
                llm_slots: slots,
                llm_queue: 256,
                batch_llm: true,
                answer_timeout: Duration::from_secs(3600),
                queue_timeout: Duration::from_secs(3600),
                ..Default::default()
            },
        );
        eprintln!("service with {model}: {slots} slot(s), {clients} clients, {requests} answers…");
        let r = rt.block_on(async {
            let (base, stop) = serve_loopback(svc).await?;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(3600))
                .build()?;
            let r = run(
                client,
                &base,
                make.clone(),
                &LoadOptions {
                    concurrency: clients,
                    rate: None,
                    duration: Duration::from_secs(3600),
                    max_requests: requests,
                },
            )
            .await;
            let _ = stop.send(());
            anyhow::Ok(r)
        })?;
        out.insert(
            format!("slots_{slots}"),
            json!({
                "answers": r.count(200), "seconds": r.seconds,
                "answers_per_min": r.count(200) as f64 * 60.0 / r.seconds,
                "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "max_ms": r.max_ms,
            }),
        );
    }
    let apm = |k: &str| out[k]["answers_per_min"].as_f64().unwrap_or(0.0);
    let ratio = apm(&format!("slots_{clients}")) / apm("slots_1").max(1e-9);
    out.insert("batched_vs_one_slot".into(), json!(ratio));
    out.insert("model".into(), json!(model));
    Ok(Value::Object(out))
}

/// The service under load on loopback, with the instant `echo` model (so the service is
/// measured, not the LLM): a real store holding the record memory of `users` dataset users,
/// the real catalogue, MiniLM with a warm embedding cache. Closed loop (capacity) and open loop
/// at `rate` requests/s (latency at that load) for `/v1/items/search` and `/v1/recommend`, then
/// overload: the LLM queue and a per-key rate limit, which must answer only 200/503 and 200/429.
/// Client and server share the machine's cores.
pub fn service(
    ws: std::sync::Arc<Workspace>,
    users: usize,
    rate: f64,
    seconds: f64,
) -> Result<Value> {
    use crate::load::{run, LoadOptions, LoadReport, MakeRequest};
    use mrrec_server::{Service, ServiceConfig};
    use std::sync::Arc;
    use std::time::Duration;

    let (_dir, store, users) = record_store(&ws, users)?;
    let texts: Vec<String> = ws
        .dataset
        .queries
        .all()
        .iter()
        .take(200)
        .map(|q| q.query().query.clone())
        .collect();
    // Baseline in the same run: the same work called directly (no HTTP, no auth, one thread),
    // after one warming pass; the service's closed-loop throughput is reported against it.
    let echo = mrrec_llm::EchoModel::from_id("echo").expect("echo");
    let direct = {
        let a = mrrec_agent::assistant::Assistant {
            shop: ws.shop(),
            store: &*store,
            tenant: "bench",
            llm: &echo,
            cfg: mrrec_agent::assistant::AssistantConfig::default(),
            observer: None,
        };
        for (i, t) in texts.iter().enumerate() {
            ws.search_dense(t, 10)?;
            a.answer(&users[i % users.len()], t, None, 10)?;
        }
        let n = 2000;
        let t0 = Instant::now();
        for i in 0..n {
            ws.search_dense(&texts[i % texts.len()], 10)?;
        }
        let search_ops = n as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for i in 0..n {
            a.answer(&users[i % users.len()], &texts[i % texts.len()], None, 10)?;
        }
        let answer_ops = n as f64 / t0.elapsed().as_secs_f64();
        (search_ops, answer_ops)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let texts = Arc::new(texts);
    let users = Arc::new(users);
    let search: MakeRequest = {
        let texts = texts.clone();
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            c.get(format!("{base}/v1/items/search"))
                .query(&[("q", texts[i % texts.len()].as_str()), ("k", "10")])
                .bearer_auth(BENCH_KEY)
        })
    };
    let recommend = |key: &'static str| -> MakeRequest {
        let (texts, users) = (texts.clone(), users.clone());
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            c.post(format!("{base}/v1/recommend"))
                .bearer_auth(key)
                .json(&json!({
                    "user": users[i % users.len()], "request": texts[i % texts.len()], "k": 10
                }))
        })
    };
    let json_of = |r: &LoadReport| serde_json::to_value(r).unwrap_or(Value::Null);
    let out = rt.block_on(async {
        let start = |cfg: ServiceConfig| {
            let svc = Service::new(
                ws.clone(),
                store.clone(),
                (Arc::new(mrrec_llm::EchoModel::from_id("echo").expect("echo"))
                    as Arc<dyn mrrec_llm::ChatModel>)
                    .into(),
                None,
                bench_keys().expect("keys"),
                cfg,
            );
            serve_loopback(svc)
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(30))
            .build()?;
        let base_cfg = ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 8,
            llm_queue: 256,
            cpu_slots: 4,
            cpu_queue: 1024,
            ..Default::default()
        };
        let (base, stop) = start(base_cfg.clone()).await?;
        let (s, r) = (search.clone(), recommend(BENCH_KEY));
        // Warm the embedding cache with every text (cold MiniLM is ~10 ms a text).
        let n = texts.len();
        let warm = LoadOptions {
            concurrency: 4,
            rate: None,
            duration: Duration::from_secs(600),
            max_requests: n,
        };
        run(client.clone(), &base, s.clone(), &warm).await;
        run(client.clone(), &base, r.clone(), &warm).await;
        let secs = Duration::from_secs_f64(seconds);
        let closed = LoadOptions {
            concurrency: 32,
            rate: None,
            duration: secs,
            max_requests: usize::MAX,
        };
        let open = LoadOptions {
            concurrency: 512,
            rate: Some(rate),
            duration: secs,
            max_requests: usize::MAX,
        };
        let mut res = serde_json::Map::new();
        eprintln!("service: closed loop, search…");
        res.insert(
            "search_closed_c32".into(),
            json_of(&run(client.clone(), &base, s.clone(), &closed).await),
        );
        eprintln!("service: closed loop, recommend…");
        let cap = run(client.clone(), &base, r.clone(), &closed).await;
        res.insert("recommend_closed_c32".into(), json_of(&cap));
        // Open loop: a sweep up to `rate` (latency at a given load, no coordinated omission).
        for r_s in [100.0, 250.0, rate] {
            let open = LoadOptions {
                rate: Some(r_s),
                ..open.clone()
            };
            eprintln!("service: open loop at {r_s}/s…");
            res.insert(
                format!("search_open_{r_s}"),
                json_of(&run(client.clone(), &base, s.clone(), &open).await),
            );
            res.insert(
                format!("recommend_open_{r_s}"),
                json_of(&run(client.clone(), &base, r.clone(), &open).await),
            );
        }
        let _ = stop.send(());
        // Overload 1: the LLM gate (2 slots, 8 waiting, 250 ms at most in the queue) at twice
        // the measured capacity.
        let (base, stop) = start(ServiceConfig {
            llm_slots: 2,
            llm_queue: 8,
            queue_timeout: Duration::from_millis(250),
            ..base_cfg.clone()
        })
        .await?;
        let over = LoadOptions {
            concurrency: 512,
            rate: Some((cap.rps * 2.0).max(50.0)),
            duration: secs,
            max_requests: usize::MAX,
        };
        eprintln!("service: overload, LLM queue…");
        res.insert(
            "recommend_overload_llm_queue".into(),
            json_of(&run(client.clone(), &base, recommend(BENCH_KEY), &over).await),
        );
        let _ = stop.send(());
        // Overload 2: 100 requests/s per key, sent at 300/s.
        let (base, stop) = start(ServiceConfig {
            rate_per_key: 100.0,
            burst: 100.0,
            ..base_cfg
        })
        .await?;
        let over = LoadOptions {
            concurrency: 512,
            rate: Some(300.0),
            duration: secs,
            max_requests: usize::MAX,
        };
        eprintln!("service: overload, rate limit…");
        res.insert(
            "search_overload_rate_limit".into(),
            json_of(&run(client.clone(), &base, search.clone(), &over).await),
        );
        let _ = stop.send(());
        let rps = |k: &str| res.get(k).and_then(|v| v["rps"].as_f64()).unwrap_or(0.0);
        let ratios = json!({
            "direct_search_per_s_one_thread": direct.0,
            "direct_answer_per_s_one_thread": direct.1,
            "search_service_vs_direct": rps("search_closed_c32") / direct.0,
            "recommend_service_vs_direct": rps("recommend_closed_c32") / direct.1,
        });
        res.insert("baseline".into(), ratios);
        anyhow::Ok(Value::Object(res))
    })?;
    Ok(
        json!({"users": users.len(), "items": ws.catalogue().len(), "texts": texts.len(), "rate": rate, "seconds": seconds, "results": out}),
    )
}
