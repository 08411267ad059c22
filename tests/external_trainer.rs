//! The scale-out path: the Python client of `examples/grpo` (what a verl tool or a TRL reward
//! function calls) against a real `mrrec serve` — memory tool, reward, a refused target, the verl
//! tool through verl 0.9's call sequence and the TRL environment through GRPOTrainer's.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::json;

#[test]
fn the_python_client_gets_memories_and_rewards_from_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, key) = common::key_file(dir.path());
    let (mut server, base) = common::serve(dir.path(), &keys, None);
    let item = common::reviewed_items(1).remove(0);
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/v1/users/trainee/interactions"))
        .bearer_auth(&key)
        .json(&json!({"interactions": [{"parent_asin": item, "rating": 5, "text": "bought before", "timestamp": 1}]}))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grpo/mrrec_client.py");
    let out = Command::new(std::env::var("MRREC_PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(&script)
        .args(["--selftest", &base, &key, "trainee", &item])
        .output()
        .unwrap();
    server.kill().unwrap();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["memories"], 1);
    assert_eq!(v["reward"]["mem"], 1.0);
    // The verl tool (as verl 0.9's agent loop calls it) and the TRL environment (as GRPOTrainer
    // finds and calls its tools) gave the same memories and reward.
    assert_eq!(v["verl"], true);
    assert_eq!(v["trl"], true);
}
