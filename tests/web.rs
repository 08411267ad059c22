//! The web page in headless Chromium (Debian's `chromium`, driven by Playwright): key, user
//! picker, streamed reasoning, tool calls, cited memories, items, errors; hostile memory text
//! stays text; a retrieval method, and its items re-ranked by a real model (SmolLM2) as judge,
//! its scores shown. Screenshots are kept in `$CARGO_TARGET_TMPDIR/web-screenshots`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::json;

#[test]
fn the_page_streams_an_answer_in_headless_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: install Chromium (`apt-get install chromium`) or set CHROMIUM"
    );
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    if !web.join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&web)
            .status()
            .expect("npm (Node.js 20+) is needed for the web test");
        assert!(ok.success(), "npm ci in tests/web failed");
    }
    let dir = tempfile::tempdir().unwrap();
    let (keys, key) = common::key_file(dir.path());
    let (mut server, base) = common::serve(dir.path(), &keys, None);
    // A second service whose model scores answers, for the judge.
    let judge_store = dir.path().join("judge.sqlite").display().to_string();
    let (mut judge, judge_base) =
        common::serve_with(&judge_store, &keys, None, "smollm2-135m-instruct", &[]);
    let item = common::reviewed_items(1).remove(0);
    for b in [&base, &judge_base] {
        let r = reqwest::blocking::Client::new()
            .post(format!("{b}/v1/users/web-user/interactions"))
            .bearer_auth(&key)
            .json(&json!({"interactions": [
                {"parent_asin": item, "rating": 5, "title": "soft plush bunny", "text": "My toddler loves this plush bunny <b>bold</b><img src=x onerror=alert(1)><script>alert(2)</script>", "timestamp": 1}
            ]}))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    let run = Command::new("node")
        .arg(web.join("check.mjs"))
        .args([&base, &key, "web-user"])
        .arg(&out)
        .arg(&judge_base)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    for s in [&mut server, &mut judge] {
        s.kill().unwrap();
        let _ = s.wait();
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("\"judged\":5"), "{stdout}");
    for shot in [
        "1-empty.png",
        "2-answer.png",
        "3-unknown-user.png",
        "4-judged.png",
    ] {
        assert!(out.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
    eprintln!("screenshots in {}: {stdout}", out.display());
}
