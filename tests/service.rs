//! The HTTP service, on loopback against the real workspace (a slice of the mini catalogue,
//! real MiniLM embeddings, a real SQLite store) with the instant `echo` model: tenancy on every
//! endpoint, answers JSON and streamed, limits (413/429/503), a hanging and a failing LLM
//! backend, graceful shutdown, memory over HTTP, the OpenAPI document, and parser fuzzing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::*;
use mrrec_llm::{ChatModel, EchoModel};
use mrrec_memory::Owner;
use mrrec_server::ServiceConfig;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_lets_a_tenant_reach_another_tenants_users() {
    let s = start().await;
    let c = client();
    let b = &s.base;
    let item = common::reviewed_items(1).remove(0);
    let row = json!({"interactions": [{"parent_asin": item, "rating": 4, "title": "ok", "text": "fine", "timestamp": 1}]});
    // Every protected route, as acme, naming globex's user bob.
    let attempts: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            format!("{b}/v1/recommend"),
            Some(json!({"user": "bob", "request": "a typewriter"})),
        ),
        (
            "POST",
            format!("{b}/v1/recommend"),
            Some(json!({"user": "bob", "request": "a typewriter", "stream": true})),
        ),
        (
            "POST",
            format!("{b}/v1/recommend"),
            Some(json!({"user": "bob", "request": "a typewriter", "method": "dense"})),
        ),
        ("GET", format!("{b}/v1/users/bob/memory"), None),
        ("DELETE", format!("{b}/v1/users/bob"), None),
        (
            "POST",
            format!("{b}/tools/memory_retrieve"),
            Some(json!({"user": "bob", "query": "typewriter"})),
        ),
        ("GET", format!("{b}/v1/users"), None),
        ("GET", format!("{b}/v1/items/search?q=typewriter"), None),
        (
            "POST",
            format!("{b}/reward"),
            Some(json!({"target": item, "profile": "a typewriter"})),
        ),
        // acme's alice: acme's memory only (globex also has an "alice" holding the secret).
        (
            "POST",
            format!("{b}/v1/recommend"),
            Some(json!({"user": "alice", "request": "vintage typewriter", "stream": true})),
        ),
        ("GET", format!("{b}/v1/users/alice/memory"), None),
        (
            "POST",
            format!("{b}/tools/memory_retrieve"),
            Some(json!({"user": "alice", "query": "vintage typewriters"})),
        ),
    ];
    for (m, url, body) in &attempts {
        let (status, text) = call(&c, m, url, Some(KEY_A), body.clone()).await;
        assert!(!text.contains("BOB-SECRET"), "{m} {url} leaked: {text}");
        if url.contains("/bob") || body.as_ref().is_some_and(|b| b["user"] == "bob") {
            assert_eq!(status, 404, "{m} {url}: {text}");
            assert!(text.contains("unknown_user"), "{text}");
        } else {
            assert_eq!(status, 200, "{m} {url}: {text}");
        }
        // Without a key, or with a wrong one: 401 and nothing else.
        for key in [None, Some("mrk_not-a-key")] {
            let (status, text) = call(&c, m, url, key, body.clone()).await;
            assert_eq!(status, 401, "{m} {url} with {key:?}: {text}");
            assert!(!text.contains("BOB-SECRET"));
        }
    }
    let (_, users) = call(&c, "GET", &format!("{b}/v1/users"), Some(KEY_A), None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&users).unwrap()["users"],
        json!(["alice"])
    );
    // Adding "bob" as acme creates acme's bob; globex's bob is untouched.
    let (status, text) = call(
        &c,
        "POST",
        &format!("{b}/v1/users/bob/interactions"),
        Some(KEY_A),
        Some(row),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (_, mem) = call(
        &c,
        "GET",
        &format!("{b}/v1/users/bob/memory"),
        Some(KEY_A),
        None,
    )
    .await;
    assert!(!mem.contains("BOB-SECRET"), "{mem}");
    let (status, _) = call(
        &c,
        "DELETE",
        &format!("{b}/v1/users/bob"),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let globex_bob = s
        .svc
        .store
        .entries(Owner {
            tenant: "globex",
            user: "bob",
        })
        .unwrap();
    assert_eq!(globex_bob.len(), 1);
    assert_eq!(globex_bob[0].text, SECRET);
    // globex sees its own.
    let (status, mem) = call(
        &c,
        "GET",
        &format!("{b}/v1/users/bob/memory"),
        Some(KEY_B),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(mem.contains("BOB-SECRET"));
}

fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for l in block.lines() {
                if let Some(n) = l.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = l.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((name?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_as_json_or_as_a_stream_of_the_same_work() {
    let s = start().await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    for mode in ["guided", "free"] {
        let body = json!({"user": "alice", "request": "a soft plush bunny", "k": 5, "category": "Toys & Games", "mode": mode});
        let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(body.clone())).await;
        assert_eq!(status, 200, "{text}");
        let a: Value = serde_json::from_str(&text).unwrap();
        let items = a["items"].as_array().unwrap();
        assert_eq!(items.len(), 5);
        assert_eq!(items[0]["rank"], 1);
        assert!(items[0]["id"].is_string() && items[0]["title"].is_string());
        assert_eq!(a["trace"]["mode"], mode);
        assert_eq!(
            a["trace"]["tool_calls"][0]["results"][0][0], "r-1",
            "{mode}: {text}"
        );
        assert_eq!(
            a["trace"]["profile"]
                .as_str()
                .unwrap()
                .trim_end_matches('.'),
            "a soft plush bunny"
        );
        assert!(a["timing"]["total_ms"].as_f64().unwrap() > 0.0);
        assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        // Streamed: the model's text, the tool call, the profile, the items, then the answer.
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let resp = c
            .post(&url)
            .bearer_auth(KEY_A)
            .json(&sb)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let ev = sse_events(&resp.text().await.unwrap());
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        let first = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(first("text") < first("tool_call"), "{names:?}");
        assert!(first("tool_call") < first("profile") && first("profile") < first("items"));
        assert_eq!(names.last(), Some(&"done"));
        let done = &ev.last().unwrap().1;
        assert_eq!(done["items"], a["items"], "{mode}");
        let streamed: String = ev
            .iter()
            .filter(|(n, _)| n == "text")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        let outputs: String = a["trace"]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(streamed, outputs);
    }
    // The no-LLM method answers too.
    let (status, text) = call(
        &c,
        "POST",
        &url,
        Some(KEY_A),
        Some(json!({"user": "alice", "request": "plush bunny", "method": "dense"})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Items search, three modes.
    for mode in ["dense", "hybrid", "bm25"] {
        let (status, text) = call(
            &c,
            "GET",
            &format!("{}/v1/items/search?q=plush%20bunny&k=3&mode={mode}", s.base),
            Some(KEY_A),
            None,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["items"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
    // A model that cannot score answers cannot judge: 502 saying so, the slot freed.
    let (status, text) = call(
        &c,
        "POST",
        &url,
        Some(KEY_A),
        Some(json!({"user": "alice", "request": "plush bunny", "method": "hybrid", "rerank": {"depth": 3}})),
    )
    .await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("cannot score answers"), "{text}");
    // Metrics saw it all.
    let (_, m) = call(&c, "GET", &format!("{}/metrics", s.base), None, None).await;
    assert!(
        m.contains("mrrec_http_requests_total{route=\"/v1/recommend\",status=\"200\"} 5"),
        "{m}"
    );
    assert!(m.contains("mrrec_answers_total 4"));
    assert!(
        m.contains("mrrec_http_requests_total{route=\"/v1/recommend\",status=\"502\"} 1"),
        "{m}"
    );
    assert!(m.contains("mrrec_llm_in_flight 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_nothing_else() {
    let s = start().await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"user": "alice"}), "missing field `request`"),
        (
            json!({"user": "alice", "request": "x", "colour": 1}),
            "unknown field `colour`",
        ),
        (
            json!({"user": "alice", "request": "   "}),
            "`request` is empty",
        ),
        (
            json!({"user": "alice", "request": "x".repeat(5000)}),
            "at most 2000",
        ),
        (
            json!({"user": "alice", "request": "x", "k": 0}),
            "`k` must be",
        ),
        (
            json!({"user": "alice", "request": "x", "k": 100000}),
            "`k` must be",
        ),
        (json!({"user": "", "request": "x"}), "user is empty"),
        (
            json!({"user": "a\u{0}b", "request": "x"}),
            "control characters",
        ),
        (
            json!({"user": "alice", "request": "x", "method": "magic"}),
            "unknown method",
        ),
        (
            json!({"user": "alice", "request": "x", "mode": "chaos"}),
            "unknown variant",
        ),
        (json!(["not", "an", "object"]), "recommend body"),
    ];
    for (body, want) in cases {
        let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert!(
            e["error"]["message"].as_str().unwrap().contains(want),
            "{body}: {text}"
        );
    }
    // Not JSON at all: the parser's position is named.
    let r = c
        .post(&url)
        .bearer_auth(KEY_A)
        .body("{\"user\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("line 1 column"));
    // Too large: 413 as JSON.
    let big = json!({"user": "alice", "request": "y".repeat(300 << 10)});
    let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(big)).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("too_large"));
    // Interactions: the bad row is named.
    let item = common::reviewed_items(1).remove(0);
    let (status, text) = call(&c, "POST", &format!("{}/v1/users/alice/interactions", s.base), Some(KEY_A),
        Some(json!({"interactions": [{"parent_asin": item, "rating": 5, "timestamp": 1}, {"parent_asin": item, "rating": 9, "timestamp": 2}]}))).await;
    assert_eq!(status, 400);
    assert!(
        text.contains("interactions[1]") && text.contains("rating 9"),
        "{text}"
    );
    let (status, text) = call(&c, "POST", &format!("{}/v1/users/alice/interactions", s.base), Some(KEY_A),
        Some(json!({"interactions": [{"user_id": "mallory", "parent_asin": item, "rating": 5, "timestamp": 1}]}))).await;
    assert_eq!(status, 400);
    assert!(text.contains("mallory"), "{text}");
    // Nothing of the refused batches landed.
    let n = s
        .svc
        .store
        .entries(Owner {
            tenant: "acme",
            user: "alice",
        })
        .unwrap()
        .len();
    assert_eq!(n, 1);
    // Unknown route, unknown reward target.
    let (status, _) = call(
        &c,
        "GET",
        &format!("{}/v2/nothing", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, text) = call(
        &c,
        "POST",
        &format!("{}/reward", s.base),
        Some(KEY_A),
        Some(json!({"target": "NOPE", "profile": "x"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(text.contains("NOPE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_over_http_adds_once_shows_and_forgets() {
    let s = start().await;
    let c = client();
    let items = common::reviewed_items(3);
    let rows: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, a)| json!({"parent_asin": a, "rating": 5, "title": "great", "text": format!("carol's review number {i}"), "timestamp": 1000 + i}))
        .collect();
    let url = format!("{}/v1/users/carol/interactions", s.base);
    let (status, text) = call(
        &c,
        "POST",
        &url,
        Some(KEY_A),
        Some(json!({"interactions": rows})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["added"], 3);
    let (_, text) = call(
        &c,
        "POST",
        &url,
        Some(KEY_A),
        Some(json!({"interactions": rows})),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["added"],
        0,
        "{text}"
    );
    let (status, text) = call(
        &c,
        "GET",
        &format!("{}/v1/users/carol/memory", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let m: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["entries"].as_array().unwrap().len(), 3);
    // The memory tool finds them; the reward scores a profile.
    let (status, text) = call(
        &c,
        "POST",
        &format!("{}/tools/memory_retrieve", s.base),
        Some(KEY_A),
        Some(json!({"user": "carol", "query": "review number 2", "k": 2})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let t: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(t["results"].as_array().unwrap().len(), 2);
    assert!(t["tool_response"]
        .as_str()
        .unwrap()
        .starts_with("<tool_response>"));
    let title = s.svc.ws.catalogue().by_id(&items[0]).unwrap().title.clone();
    let (status, text) = call(&c, "POST", &format!("{}/reward", s.base), Some(KEY_A),
        Some(json!({"target": items[0], "response": format!("<tool_response>\n<memory id=\"r\">x</memory>\n</tool_response> \\boxed{{\"ideal_item_profile\": {}, \"useful_memory_ids\": []}}", json!(title))}))).await;
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (r["format"].as_f64(), r["mem"].as_f64()),
        (Some(1.0), Some(1.0)),
        "{text}"
    );
    assert!(
        r["rec"].as_f64().unwrap() > 0.5,
        "the item's own title ranks it high: {text}"
    );
    assert_eq!(r["ranking"], "profile/dense", "{text}");
    // The target ranked as the assistant would serve it: beside the request (which must then be
    // given), or by the hybrid index.
    for (extra, want, ranking) in [
        (
            json!({"rank_request": "fuse", "request": "a gift"}),
            200,
            "profile+request/dense",
        ),
        (
            json!({"rank_request": "join", "request": "a gift", "hybrid": true}),
            200,
            "request+profile/hybrid",
        ),
        (json!({"hybrid": true}), 200, "profile/hybrid"),
        (
            json!({"rank_request": "fuse", "request": "a gift", "profile_weight": 0.5}),
            200,
            "profile*0.5+request/dense",
        ),
        (json!({"profile_weight": 0.5}), 400, ""),
        (
            json!({"rank_request": "fuse", "request": "a gift", "profile_weight": -1}),
            400,
            "",
        ),
        (json!({"rank_request": "fuse"}), 400, ""),
        (
            json!({"rank_request": "sideways", "request": "a gift"}),
            400,
            "",
        ),
    ] {
        let mut body = json!({"target": items[0], "profile": title});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, text) = call(
            &c,
            "POST",
            &format!("{}/reward", s.base),
            Some(KEY_A),
            Some(body),
        )
        .await;
        assert_eq!(status, want, "{extra}: {text}");
        if want == 200 {
            let r: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(r["ranking"], ranking, "{text}");
            assert!(r["target_rank"].as_u64().is_some(), "{text}");
        } else {
            assert!(text.contains("request"), "{text}");
        }
    }
    // A deeper R_rec cut is accepted; a cut that would search the catalogue a million deep is not.
    for (cutoffs, want) in [(json!([100, 3000]), 200), (json!([100, 1_000_000]), 400)] {
        let (status, text) = call(
            &c,
            "POST",
            &format!("{}/reward", s.base),
            Some(KEY_A),
            Some(json!({"target": items[0], "profile": title,
                        "weights": {"format": 0.1, "rec": 5, "mem": 0.1, "rec_cutoffs": cutoffs}})),
        )
        .await;
        assert_eq!(status, want, "{text}");
    }
    let (status, text) = call(
        &c,
        "DELETE",
        &format!("{}/v1/users/carol", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["entries"], 3);
    let (status, _) = call(
        &c,
        "GET",
        &format!("{}/v1/users/carol/memory", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_capacity_the_answer_is_a_clean_429_or_503() {
    // Rate: 5 per second, burst 5, for one key; the other key is not affected.
    let s = start_with(
        Arc::new(EchoModel::from_id("echo").unwrap()),
        ServiceConfig {
            rate_per_key: 5.0,
            burst: 5.0,
            ..Default::default()
        },
    )
    .await;
    let c = client();
    let url = format!("{}/v1/items/search?q=kite", s.base);
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = c.get(&url).bearer_auth(KEY_A).send().await.unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
        }
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 3, "{codes:?}");
    let (status, _) = call(&c, "GET", &url, Some(KEY_B), None).await;
    assert_eq!(status, 200);

    // LLM: one slot, one waiting place, 300 ms per model call: of 6 at once, the extra are 503.
    let s = start_with(
        Arc::new(EchoModel::from_id("echo@300").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 1,
            llm_queue: 1,
            ..Default::default()
        },
    )
    .await;
    let url = format!("{}/v1/recommend", s.base);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(&url)
                .bearer_auth(KEY_A)
                .json(&json!({"user": "alice", "request": "a plush bunny"}))
                .send()
                .await
                .unwrap();
            let retry = r.headers().contains_key("retry-after");
            (r.status().as_u16(), retry, r.text().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let (status, retry, text) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert!(retry && text.contains("overloaded"), "{text}");
            }
            o => panic!("unexpected {o}: {text}"),
        }
    }
    assert_eq!(ok, 2, "one running and one queued are served");
    assert_eq!(busy, 4);
    let (_, m) = call(&c, "GET", &format!("{}/metrics", s.base), None, None).await;
    assert!(
        m.contains("mrrec_rejected_total{reason=\"queue_full\"} 4"),
        "{m}"
    );
}

/// An OpenAI-compatible server that answers every chat request with HTTP 500.
async fn failing_server() -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "model crashed",
            )
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_failing_llm_gives_clear_errors_and_frees_its_slot() {
    // Hanging: a server whose model takes 60 s; the client gives up after 1 s.
    let hanging =
        mrrec_server::llm::spawn_loopback(Arc::new(EchoModel::from_id("echo@60000").unwrap()))
            .unwrap();
    let failing = failing_server().await;
    for (url, want) in [(hanging, "timed out"), (failing, "500")] {
        let mut cfg = mrrec_llm::OpenAiConfig::new(&url, "m");
        cfg.timeout = Duration::from_secs(1);
        cfg.max_retries = 1;
        cfg.backoff = Duration::from_millis(50);
        // The blocking client owns a runtime: built outside the async context, as `serve` does.
        let llm: Arc<dyn ChatModel> = Arc::new(
            tokio::task::spawn_blocking(move || mrrec_llm::OpenAiModel::new(cfg).unwrap())
                .await
                .unwrap(),
        );
        let s = start_with(
            llm,
            ServiceConfig {
                rate_per_key: 0.0,
                llm_slots: 1,
                ..Default::default()
            },
        )
        .await;
        let c = client();
        for _ in 0..3 {
            let t = Instant::now();
            let (status, text) = call(
                &c,
                "POST",
                &format!("{}/v1/recommend", s.base),
                Some(KEY_A),
                Some(json!({"user": "alice", "request": "a plush bunny"})),
            )
            .await;
            assert_eq!(status, 502, "{text}");
            assert!(text.contains("llm_error") && text.contains(want), "{text}");
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        }
        // The slot is free again (a stuck worker would hold it): the no-LLM paths and the
        // readiness probe still answer, and nothing is in flight.
        let (status, _) = call(&c, "GET", &format!("{}/readyz", s.base), None, None).await;
        assert_eq!(status, 200);
        let (_, m) = call(&c, "GET", &format!("{}/metrics", s.base), None, None).await;
        assert!(m.contains("mrrec_llm_in_flight 0"), "{m}");
        assert!(m.contains("mrrec_http_requests_total{route=\"/v1/recommend\",status=\"502\"} 3"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_refuses_new_ones() {
    let mut s = start_with(
        Arc::new(EchoModel::from_id("echo@400").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 2,
            ..Default::default()
        },
    )
    .await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let mut flying = Vec::new();
    for stream in [false, true] {
        let (c, url) = (c.clone(), url.clone());
        flying.push(tokio::spawn(async move {
            let r = c
                .post(&url)
                .bearer_auth(KEY_A)
                .json(&json!({"user": "alice", "request": "a plush bunny", "stream": stream}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.stop.take().unwrap().send(()).unwrap();
    for f in flying {
        let (status, text) = f.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            text.contains("a plush bunny") && text.contains("items"),
            "{text}"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), &mut s.done)
        .await
        .expect("the server stops once its requests are done")
        .unwrap()
        .unwrap();
    assert!(c.get(format!("{}/healthz", s.base)).send().await.is_err());
}

#[test]
fn the_openapi_document_lists_every_route() {
    let doc: Value = serde_json::from_str(mrrec_server::OPENAPI).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in mrrec_server::ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    assert_eq!(
        paths
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum::<usize>(),
        mrrec_server::ROUTES.len()
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).to_string()),
            "[{}\\[\\]\":,a-z0-9 \\\\u]{0,80}",
            (any::<String>(), any::<String>(), any::<i64>(), any::<bool>()).prop_map(|(u, r, k, s)| {
                json!({"user": u, "request": r, "k": k, "stream": s, "category": r}).to_string()
            }),
            (any::<String>(), any::<f64>(), any::<i64>()).prop_map(|(a, r, t)| {
                json!({"interactions": [{"parent_asin": a, "rating": r, "timestamp": t, "text": a}], "rebuild": false}).to_string()
            }),
            (any::<String>(), any::<String>()).prop_map(|(t, p)| {
                json!({"target": t, "response": p, "weights": {"format": 1, "rec": 1, "mem": 1}}).to_string()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The request parsers never panic, and whatever they accept respects the limits.
        #[test]
        fn parsers_never_panic(body in json_like(), user in any::<String>()) {
            let cfg = ServiceConfig::default();
            if let Ok(r) = mrrec_server::parse_recommend(body.as_bytes(), &cfg) {
                prop_assert!(!r.request.trim().is_empty() && r.request.chars().count() <= cfg.max_text_chars);
                prop_assert!(r.k.is_none_or(|k| (1..=cfg.max_k).contains(&k)));
                prop_assert!(!r.user.is_empty() && !r.user.chars().any(char::is_control));
            }
            if let Ok(i) = mrrec_server::parse_interactions(body.as_bytes(), &user, &cfg) {
                prop_assert!(i.reviews.iter().all(|r| r.user_id == user && (1.0..=5.0).contains(&r.rating)));
            }
            let _ = mrrec_server::parse_tool(body.as_bytes(), &cfg);
            if let Ok(r) = mrrec_server::parse_reward(body.as_bytes(), &cfg) {
                prop_assert!(r.weights.rec.is_finite());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_load_on_loopback_answers_every_request() {
    use mrrec_bench::load::{run, LoadOptions, MakeRequest};
    let s = start_with(
        Arc::new(EchoModel::from_id("echo").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 8,
            llm_queue: 256,
            ..Default::default()
        },
    )
    .await;
    let texts = [
        "a plush bunny",
        "a red kite",
        "wooden blocks",
        "a board game for two",
    ];
    let search: MakeRequest = Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
        c.get(format!("{base}/v1/items/search"))
            .query(&[("q", texts[i % texts.len()])])
            .bearer_auth(KEY_A)
    });
    let recommend: MakeRequest = Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
        c.post(format!("{base}/v1/recommend"))
            .bearer_auth(KEY_A)
            .json(&json!({"user": "alice", "request": texts[i % texts.len()]}))
    });
    for (name, make) in [("search", search), ("recommend", recommend)] {
        for rate in [None, Some(200.0)] {
            let opts = LoadOptions {
                concurrency: 16,
                rate,
                duration: Duration::from_secs(20),
                max_requests: 300,
            };
            let r = run(client(), &s.base, make.clone(), &opts).await;
            assert_eq!(r.requests, 300, "{name}: {r:?}");
            assert_eq!(r.count(200), 300, "{name} {rate:?}: {r:?}");
            assert_eq!(r.transport_errors, 0);
            assert!(r.server_p50_ms > 0.0 && r.p99_ms >= r.p50_ms);
        }
    }
}

/// Waits until `/metrics` counts `n` cancelled answers and no LLM work in flight: an abandoned
/// answer is cancelled and frees its slot (uncancelled, it is never counted as cancelled and holds
/// the slot for ~9 s). The event is what is asserted; the 8 s bound only keeps a broken build from
/// hanging, generous enough for a loaded 2-core machine.
async fn expect_cancelled(c: &reqwest::Client, base: &str, n: usize) {
    let within = Duration::from_secs(8);
    let want = format!("mrrec_rejected_total{{reason=\"cancelled\"}} {n}");
    let t = Instant::now();
    loop {
        let (_, m) = call(c, "GET", &format!("{base}/metrics"), None, None).await;
        if m.contains(&want) && m.contains("mrrec_llm_in_flight 0") {
            break;
        }
        assert!(t.elapsed() < within, "not cancelled within {within:?}: {m}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_nobody_waits_for_is_cancelled_and_frees_its_slot() {
    // 3 s per model call (a guided answer makes three or more): uncancelled, each abandoned
    // answer would hold the one LLM slot for ~9 s.
    let s = start_with(
        Arc::new(EchoModel::from_id("echo@3000").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 1,
            answer_timeout: Duration::from_millis(600),
            ..Default::default()
        },
    )
    .await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let body = json!({"user": "alice", "request": "a plush bunny"});
    // 1. The client gives up (its own timeout) and closes the connection.
    let gone = c
        .post(&url)
        .bearer_auth(KEY_A)
        .timeout(Duration::from_millis(300))
        .json(&body)
        .send()
        .await;
    assert!(gone.is_err_and(|e| e.is_timeout()));
    expect_cancelled(&c, &s.base, 1).await;
    // 2. A streamed answer whose reader goes away.
    let mut b = body.clone();
    b["stream"] = json!(true);
    let r = c
        .post(&url)
        .bearer_auth(KEY_A)
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(r);
    expect_cancelled(&c, &s.base, 2).await;
    // 3. The server's own answer timeout: 504, and the work stops too.
    let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(body.clone())).await;
    assert_eq!(status, 504, "{text}");
    expect_cancelled(&c, &s.base, 3).await;
}

/// Reads a gauge's value from `/metrics` text.
fn gauge(m: &str, name: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// The service with the real tiny model, its answers in `slots` slots decoded together, and
/// short calls (the tests using it are about the service, not the answers' quality).
async fn start_tiny(slots: usize) -> (Arc<dyn ChatModel>, Server) {
    let llm: Arc<dyn ChatModel> = Arc::new(
        tokio::task::spawn_blocking(|| {
            mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap()
        })
        .await
        .unwrap(),
    );
    let s = start_with(
        llm.clone(),
        ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: slots,
            batch_llm: true,
            assistant: mrrec_agent::assistant::AssistantConfig {
                reasoning_tokens: 12,
                answer_tokens: 40,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    (llm, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_several_slots_are_decoded_together_and_unchanged() {
    let (_, s) = start_tiny(3).await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let requests = [
        "a plush bunny for a toddler",
        "a wooden train set",
        "washable crayons",
    ];
    let profile = |text: &str| -> String {
        let v: Value = serde_json::from_str(text).unwrap();
        v["trace"]["profile"]
            .as_str()
            .or(v["ranked_with"].as_str())
            .unwrap_or_else(|| panic!("{text}"))
            .to_string()
    };
    // Together: three answers at once.
    let mut tasks = Vec::new();
    for r in requests {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            call(
                &c,
                "POST",
                &url,
                Some(KEY_A),
                Some(json!({"user": "alice", "request": r})),
            )
            .await
        }));
    }
    let mut together = Vec::new();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{text}");
        together.push(profile(&text));
    }
    let (_, m) = call(&c, "GET", &format!("{}/metrics", s.base), None, None).await;
    let (batches, calls) = (
        gauge(&m, "mrrec_llm_batches"),
        gauge(&m, "mrrec_llm_batched_calls"),
    );
    assert!(calls >= 9.0, "three calls or more per answer: {m}");
    assert!(
        batches < calls,
        "some calls shared a batch: {batches} for {calls}"
    );
    // Alone, one after another: the same profiles where every matrix runs the packed Q8_0
    // kernel (AVX512-VNNI), which decodes batch-invariantly; candle's kernels (without it)
    // differ in the last bits between a batch and one sequence, so there only the answers count.
    let invariant = mrrec_llm_local::q8::available();
    for (r, want) in requests.iter().zip(&together) {
        let (status, text) = call(
            &c,
            "POST",
            &url,
            Some(KEY_A),
            Some(json!({"user": "alice", "request": r})),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        if invariant {
            assert_eq!(&profile(&text), want, "{r}");
        } else {
            assert!(!profile(&text).is_empty(), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_applies_the_same_input_rules_and_a_changed_repost_is_an_update() {
    let s = start().await;
    let c = client();
    let item = common::reviewed_items(1).remove(0);
    let url = format!("{}/v1/users/dora/interactions", s.base);
    let row = |text: &str, ts: i64| json!({"parent_asin": item, "rating": 5, "text": text, "timestamp": ts});
    // Refused, each with the field named: unknown fields, a timestamp before 1970, invisible text.
    for (body, says) in [
        (
            json!({"interactions": [{"parent_asin": item, "rating": 5, "text": "x", "timestamp": 1, "colour": "red"}]}),
            "unknown field `colour`",
        ),
        (json!({"interactions": [row("fine", -5)]}), "timestamp -5"),
        (
            json!({"interactions": [row("\u{0}\u{0}", 7)]}),
            "`text` has no visible character",
        ),
        (
            json!({"interactions": [row("one", 7), row("two", 7)]}),
            "interactions[1] repeats the item and timestamp of interactions[0]",
        ),
    ] {
        let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(body)).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(says), "{says:?} not in {text}");
    }
    // Ids and requests need a visible character on every endpoint.
    let (status, text) = call(
        &c,
        "POST",
        &format!("{}/v1/users/%20/interactions", s.base),
        Some(KEY_A),
        Some(json!({"interactions": [row("fine", 7)]})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("no visible character"), "{text}");
    for body in [
        json!({"user": "alice", "request": "\u{0}\u{0}\u{0}"}),
        json!({"user": " ", "request": "a plush toy"}),
    ] {
        let (status, text) = call(
            &c,
            "POST",
            &format!("{}/v1/recommend", s.base),
            Some(KEY_A),
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("no visible character"), "{text}");
    }
    // A changed re-post of the same item and moment is an update, counted, never a silent drop;
    // the same post again changes nothing.
    for (text, added, updated) in [
        ("first words", 1, 0),
        ("second words", 0, 1),
        ("second words", 0, 0),
    ] {
        let (status, body) = call(
            &c,
            "POST",
            &url,
            Some(KEY_A),
            Some(json!({"interactions": [row(text, 7)]})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["added"].as_u64(), v["updated"].as_u64()),
            (Some(added), Some(updated)),
            "{text}: {body}"
        );
    }
    let (_, text) = call(
        &c,
        "GET",
        &format!("{}/v1/users/dora/memory", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert!(
        text.contains("second words") && !text.contains("first words"),
        "{text}"
    );
}

/// `rerank` in a recommend body: the service's model (the real tiny one, its calls batched)
/// judges the method's first items yes/no and their order is fused with the method's — for the
/// retrieval methods and for the assistant, as JSON and streamed; the judge reads the user's
/// stored profile in the caller's tenant only; bad settings are refused before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_re_ranks_the_methods_first_items_in_the_callers_tenant() {
    let (llm, s) = start_tiny(2).await;
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let request = "a soft plush bunny for a toddler";
    let ids = |v: &Value, key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|i| {
                i.get("id")
                    .unwrap_or(i)
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_string()
            })
            .collect()
    };
    let ask = |body: Value| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let (status, text) = call(&c, "POST", &url, Some(KEY_A), Some(body)).await;
            assert_eq!(status, 200, "{text}");
            serde_json::from_str::<Value>(&text).unwrap()
        }
    };
    // The retrieval method alone is the items search's hybrid ranking.
    let plain = ask(json!({"user": "alice", "request": request, "k": 8, "method": "hybrid"})).await;
    let h = ids(&plain, "items");
    let (_, text) = call(
        &c,
        "GET",
        &format!(
            "{}/v1/items/search?q={}&k=8&mode=hybrid",
            s.base,
            request.replace(' ', "%20")
        ),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(ids(&serde_json::from_str(&text).unwrap(), "items"), h);
    assert!(plain.get("rerank").is_none());
    // Behind the judge: the first 5 judged, re-ordered by the fusion; the rest unmoved.
    let judged = ask(json!({"user": "alice", "request": request, "k": 8, "method": "hybrid", "rerank": {"depth": 5}})).await;
    let stage = &judged["rerank"];
    assert_eq!(ids(stage, "items"), h[..5], "{stage}");
    assert_eq!(stage["depth"], 5);
    assert_eq!(stage["memory"], "none");
    assert_eq!(stage["judge"], llm.id());
    let scores: Vec<f32> = stage["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let order = mrrec_agent::rerank::fuse_judged(&(0..8).collect::<Vec<u32>>(), &scores, 1.0);
    let expected: Vec<String> = order.iter().map(|&i| h[i as usize].clone()).collect();
    assert_eq!(ids(&judged, "items"), expected);
    assert!(judged["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // Streamed, a retrieval method's answer is the events every answer ends with: the items,
    // then the whole answer (re-ranked or not).
    for (body, answer) in [
        (
            json!({"user": "alice", "request": request, "k": 8, "method": "hybrid", "stream": true}),
            &plain,
        ),
        (
            json!({"user": "alice", "request": request, "k": 8, "method": "hybrid", "rerank": {"depth": 5}, "stream": true}),
            &judged,
        ),
    ] {
        let resp = c
            .post(&url)
            .bearer_auth(KEY_A)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        let ev = sse_events(&resp.text().await.unwrap());
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["items", "done"], "{ev:?}");
        assert_eq!(ev[0].1["items"], answer["items"]);
        assert_eq!(ev[1].1["items"], answer["items"]);
        assert_eq!(ev[1].1["rerank"]["scores"], answer["rerank"]["scores"]);
        assert_eq!(ev[1].1["method"], "hybrid");
    }
    assert_eq!(plain["usage"]["prompt_tokens"], 0);
    // The scores are the model's own judgement of those items (asked directly, unbatched).
    let ws = s.svc.ws.clone();
    let direct = {
        let (llm, h) = (llm.clone(), h.clone());
        tokio::task::spawn_blocking(move || {
            let texts: Vec<String> = h[..5]
                .iter()
                .map(|id| {
                    let p = ws.catalogue().position(id).unwrap();
                    ws.catalogue().get(p).unwrap().text.clone()
                })
                .collect();
            let t: Vec<&str> = texts.iter().map(String::as_str).collect();
            mrrec_agent::rerank::judge(&*llm, request, None, None, &t)
                .unwrap()
                .0
        })
        .await
        .unwrap()
    };
    for (a, b) in scores.iter().zip(&direct) {
        assert!((a - b).abs() < 1e-3, "{scores:?} vs {direct:?}");
    }
    // The judge reads the caller's tenant only: globex's alice has a profile, acme's has none,
    // so acme's judge with `profile` reads nothing and judges as with `none`...
    let profile = |tenant: &'static str, text: &'static str| {
        let svc = s.svc.clone();
        tokio::task::spawn_blocking(move || {
            let mut e = entry(&svc.ws, "p-1", text);
            e.level = mrrec_memory::Level::Profile;
            svc.store
                .put(
                    Owner {
                        tenant,
                        user: "alice",
                    },
                    &[e],
                )
                .unwrap();
        })
    };
    profile("globex", SECRET).await.unwrap();
    let with_profile = json!({"user": "alice", "request": request, "k": 8, "method": "hybrid", "rerank": {"depth": 5, "memory": "profile"}});
    let none_there = ask(with_profile.clone()).await;
    assert_eq!(none_there["rerank"]["memory"], "profile");
    assert_eq!(none_there["rerank"]["scores"], stage["scores"]);
    // ...and once acme's alice has one, it is in the judge's prompt (longer, other scores).
    profile("acme", "Buys soft toys for a baby; dislikes anything loud.")
        .await
        .unwrap();
    let read = ask(with_profile).await;
    assert!(
        read["usage"]["prompt_tokens"].as_u64() > judged["usage"]["prompt_tokens"].as_u64(),
        "{read}"
    );
    assert_ne!(read["rerank"]["scores"], stage["scores"]);
    // The assistant behind the judge: k items out of the judged ones, its cost with the judge's,
    // and the stream ends with the same answer.
    let body = json!({"user": "alice", "request": request, "k": 3, "rerank": {"depth": 5}});
    let a = ask(body.clone()).await;
    let got = ids(&a, "items");
    assert_eq!(got.len(), 3);
    let judged_ids = ids(&a["rerank"], "items");
    assert_eq!(judged_ids.len(), 5);
    assert!(got.iter().all(|i| judged_ids.contains(i)), "{a}");
    assert!(
        a["usage"]["prompt_tokens"].as_u64().unwrap()
            > a["rerank"]["prompt_tokens"].as_u64().unwrap()
    );
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let resp = c
        .post(&url)
        .bearer_auth(KEY_A)
        .json(&sb)
        .send()
        .await
        .unwrap();
    let ev = sse_events(&resp.text().await.unwrap());
    let done = &ev.last().unwrap().1;
    assert_eq!(ev.last().unwrap().0, "done", "{ev:?}");
    assert_eq!(done["items"], a["items"]);
    assert_eq!(done["rerank"]["scores"], a["rerank"]["scores"]);
    let items_ev = ev.iter().find(|(n, _)| n == "items").unwrap();
    assert_eq!(items_ev.1["items"], a["items"]);
    // Bad settings: 400 naming the field, before any work.
    for (rerank, says) in [
        (json!({"depth": 0}), "`rerank.depth` must be 1–50"),
        (json!({"depth": 51}), "`rerank.depth` must be 1–50"),
        (json!({"weight": -1.0}), "`rerank.weight`"),
        (json!({"memory": "recent"}), "use \\\"profile\\\""),
        (json!({"memory": "everything"}), "unknown variant"),
        (json!({"deep": 3}), "unknown field"),
    ] {
        let (status, text) = call(
            &c,
            "POST",
            &url,
            Some(KEY_A),
            Some(
                json!({"user": "alice", "request": request, "method": "hybrid", "rerank": rerank}),
            ),
        )
        .await;
        assert_eq!(status, 400, "{rerank}: {text}");
        assert!(text.contains(says), "{rerank}: {text}");
    }
}
