//! `mrrec memory` end to end on real users of the mini dataset: records, LLM-written patterns and
//! profiles and global aspects with the real tiny model, incremental `add`, crash-and-resume
//! (fault-injected aborts and a real `kill -9`), and `forget` across the store and both caches.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{mini, mrrec, users};

fn data_args(store: &Path) -> Vec<String> {
    vec![
        "--data".into(),
        mini().to_str().unwrap().into(),
        "--max-items".into(),
        "300".into(),
        "--store".into(),
        store.to_str().unwrap().into(),
    ]
}

fn run(
    cmd: &[&str],
    store: &Path,
    home: Option<&Path>,
    failpoint: Option<usize>,
) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mrrec"));
    c.args(cmd).args(data_args(store));
    if let Some(h) = home {
        c.env("MRREC_HOME", h);
    }
    if let Some(n) = failpoint {
        c.env("MRREC_FAILPOINT", n.to_string());
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A private MRREC_HOME sharing the real one's models and item indexes (so nothing is
/// downloaded or rebuilt) but with its own caches, so that forgetting is checked in isolation.
fn private_home(dir: &Path) -> PathBuf {
    let real = std::env::var_os("MRREC_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_home().join(".cache/mrrec"));
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    for sub in ["models", "indexes"] {
        std::fs::create_dir_all(real.join(sub)).unwrap();
        std::os::unix::fs::symlink(real.join(sub), home.join(sub)).unwrap();
    }
    home
}

fn dirs_home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap())
}

const TINY: [&str; 2] = ["--model", "smollm2-135m-instruct"];

#[test]
fn records_build_show_retrieve_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let (ok, out, err) = run(&["memory", "build", "--users", "5"], &store, None, None);
    assert!(ok, "{err}");
    assert!(out.starts_with("5 users: +"), "{out}");
    // A rerun adds nothing.
    let (ok, again, _) = run(&["memory", "build", "--users", "5"], &store, None, None);
    assert!(ok);
    assert!(again.starts_with("5 users: +0 records"), "{again}");
    let (ok, stats, _) = run(&["memory", "stats"], &store, None, None);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["users"], 5);
    let first = &users()[0];
    let (ok, shown, err) = run(&["memory", "show", first], &store, None, None);
    assert!(ok, "{err}");
    let records: Vec<&str> = shown.lines().filter(|l| l.starts_with("[r-")).collect();
    assert!(
        !records.is_empty() && records.iter().all(|l| l.contains(" record ")),
        "{shown}"
    );
    let (ok, got, err) = run(
        &["memory", "retrieve", first, "something I liked", "-k", "2"],
        &store,
        None,
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(got.lines().count(), 2.min(records.len()));
    let (ok, _, err) = run(
        &["memory", "retrieve", first, "x", "--levels", "memes"],
        &store,
        None,
        None,
    );
    assert!(
        !ok && err.contains("invalid value 'memes' for '--levels <LEVELS>'"),
        "{err}"
    );
    let (ok, _, err) = run(
        &["memory", "build", "--levels", "records,vibes"],
        &store,
        None,
        None,
    );
    assert!(
        !ok && err.contains("invalid value 'vibes' for '--levels <LEVELS>'")
            && err.contains("global"),
        "{err}"
    );
    // Another user's id sees nothing of the first user's.
    let (ok, _, err) = run(
        &["memory", "retrieve", "NOBODY", "something I liked"],
        &store,
        None,
        None,
    );
    assert!(!ok);
    assert!(err.contains("no memory for user \"NOBODY\""), "{err}");
    let (ok, _, err) = run(&["memory", "global", "Books"], &store, None, None);
    assert!(
        !ok && err.contains("no global aspects for category \"Books\""),
        "{err}"
    );
    // `add` refuses another user's rows, naming the line.
    let file = dir.path().join("new.jsonl");
    std::fs::write(&file, "{\"user_id\": \"SOMEONE_ELSE\", \"parent_asin\": \"B0\", \"rating\": 5, \"timestamp\": 1}\n").unwrap();
    let (ok, _, err) = run(
        &["memory", "add", first, file.to_str().unwrap(), "--no-llm"],
        &store,
        None,
        None,
    );
    assert!(!ok);
    assert!(
        err.contains("new.jsonl:1: the row is user \"SOMEONE_ELSE\"'s"),
        "{err}"
    );
    std::fs::write(
        &file,
        "{\"parent_asin\": \"B0\", \"rating\": 9, \"timestamp\": 1}\n",
    )
    .unwrap();
    let (ok, _, err) = run(
        &["memory", "add", first, file.to_str().unwrap(), "--no-llm"],
        &store,
        None,
        None,
    );
    assert!(
        !ok && err.contains("new.jsonl:1: rating 9 is not 1–5"),
        "{err}"
    );
}

/// `--tenant` on the memory commands: a tenant's memory is built, shown, counted and forgotten
/// apart from the default tenant's (the tenants the service's keys create are reachable from the
/// CLI), and a malformed tenant id is refused by name.
#[test]
fn memory_commands_act_for_the_tenant_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let first = &users()[0];
    let shop = ["--tenant", "shop"];
    let (ok, out, err) = run(
        &["memory", "build", "--only", first, shop[0], shop[1]],
        &store,
        None,
        None,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("1 users: +"), "{out}");
    let (ok, shown, err) = run(
        &["memory", "show", first, shop[0], shop[1]],
        &store,
        None,
        None,
    );
    assert!(ok, "{err}");
    assert!(shown.lines().any(|l| l.starts_with("[r-")), "{shown}");
    // The default tenant has nothing of tenant "shop"'s.
    let (ok, _, err) = run(&["memory", "show", first], &store, None, None);
    assert!(!ok && err.contains("no memory for user"), "{err}");
    let (ok, stats, _) = run(&["memory", "stats", shop[0], shop[1]], &store, None, None);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["users"], 1, "{stats}");
    let (ok, stats, _) = run(&["memory", "stats"], &store, None, None);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["users"], 0, "{stats}");
    let (ok, _, err) = run(&["memory", "forget", first], &store, None, None);
    assert!(
        !ok && err.contains("no memory in tenant \"default\""),
        "{err}"
    );
    let (ok, _, err) = run(
        &["memory", "forget", first, shop[0], shop[1]],
        &store,
        None,
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, _) = run(
        &["memory", "show", first, shop[0], shop[1]],
        &store,
        None,
        None,
    );
    assert!(!ok);
    let (ok, _, err) = run(&["memory", "stats", "--tenant", ""], &store, None, None);
    assert!(!ok && err.contains("tenant is empty"), "{err}");
}

/// Builds the first user's memory with the tiny model, adds one interaction (only the touched
/// pattern and the profile are rewritten), extracts global aspects from three training queries,
/// then forgets the user and checks that no byte of their reviews is left in the store, the
/// embedding cache or the LLM response cache.
#[test]
fn tiny_model_lifecycle_add_global_and_forget_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let home = private_home(dir.path());
    let store = dir.path().join("mem.sqlite");
    let h = Some(home.as_path());
    let mut build = vec![
        "memory",
        "build",
        "--users",
        "1",
        "--levels",
        "records,patterns,profile",
    ];
    build.extend(TINY);
    let (ok, out, err) = run(&build, &store, h, None);
    assert!(ok, "{err}");
    assert!(out.contains("faithfulness: "), "{out}");
    assert!(out.contains("tokens in"), "{out}");
    assert!(!out.contains(" 0 patterns"), "{out}");
    let (_, stats, _) = run(&["memory", "stats"], &store, h, None);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(v["entries"]["record"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(v["stale"], 0, "{stats}");
    // A rerun rewrites nothing.
    let (ok, again, _) = run(&build, &store, h, None);
    assert!(ok);
    assert!(
        again.contains("+0 records, 0 patterns and 0 profiles"),
        "{again}"
    );

    // One new interaction in one category: that pattern and the profile are rewritten.
    let user = &users()[0];
    let reviews = std::fs::read_to_string(mini().join("reviews.jsonl")).unwrap();
    let mine: Vec<serde_json::Value> = reviews
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["user_id"] == user.as_str())
        .collect();
    let mut new = mine[0].clone();
    new["timestamp"] = (new["timestamp"].as_i64().unwrap() + 1).into();
    new["text"] = "Bought it again for my sister; the colours are just as bright.".into();
    let file = dir.path().join("new.jsonl");
    std::fs::write(&file, format!("{new}\n")).unwrap();
    let mut add = vec!["memory", "add", user, file.to_str().unwrap()];
    add.extend(TINY);
    let (ok, out, err) = run(&add, &store, h, None);
    assert!(ok, "{err}");
    assert!(
        out.contains(": 1 new records, 0 updated (same item and moment, new text), 0 already stored; 1 patterns and 1 profiles rewritten"),
        "{out}"
    );
    let (ok, out, _) = run(&add, &store, h, None);
    assert!(ok);
    assert!(
        out.contains(": 0 new records, 0 updated (same item and moment, new text), 1 already stored; 0 patterns and 0 profiles rewritten"),
        "{out}"
    );
    let (_, shown, _) = run(&["memory", "show", user], &store, h, None);
    assert!(shown.contains("just as bright"), "{shown}");

    // Global memory from three train/aspect queries (step A constrained to the schema, step B).
    let mut global = vec![
        "memory",
        "build",
        "--levels",
        "global",
        "--global-queries",
        "3",
    ];
    global.extend(TINY);
    let (ok, out, err) = run(&global, &store, h, None);
    assert!(ok, "{err}");
    let n: usize = out
        .split("global: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let failed: usize = out
        .split(" queries (")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(n + failed, 3, "{out}");
    let (_, stats, _) = run(&["memory", "stats"], &store, h, None);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    if let Some((cat, _)) = v["global"].as_object().unwrap().iter().next() {
        let (ok, listed, err) = run(
            &["memory", "global", cat, "what matters most", "-n", "2"],
            &store,
            h,
            None,
        );
        assert!(ok, "{err}");
        assert!(
            !listed.is_empty() && listed.lines().count() <= 2,
            "{listed}"
        );
    }
    // A rerun skips the queries already done (failed ones are asked again: cached, so free).
    let (ok, out, _) = run(&global, &store, h, None);
    assert!(ok);
    assert!(
        out.contains(&format!("global: 0 queries ({failed} failed)")),
        "{out}"
    );

    // Forget the user everywhere.
    let (ok, out, err) = run(&["memory", "forget", user], &store, h, None);
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("forgot {user}: ")), "{out}");
    let (ok, _, err) = run(&["memory", "show", user], &store, h, None);
    assert!(!ok && err.contains("no memory for user"), "{err}");
    let snippets: Vec<String> = mine
        .iter()
        .filter_map(|r| r["text"].as_str())
        .filter(|t| t.len() >= 30)
        .map(|t| t.chars().take(30).collect())
        .chain(std::iter::once("just as bright".to_string()))
        .collect();
    assert!(!snippets.is_empty());
    let mut files = vec![store.clone()];
    for f in std::fs::read_dir(home.join("cache")).unwrap().flatten() {
        files.push(f.path());
    }
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let hay = String::from_utf8_lossy(&bytes);
        for s in &snippets {
            assert!(
                !hay.contains(s.as_str()),
                "{s:?} is still in {}",
                f.display()
            );
        }
    }
}

fn dump(store: &Path, users: &[String]) -> String {
    let mut out = String::new();
    for u in users {
        let (ok, shown, err) = run(&["memory", "show", u], store, None, None);
        assert!(ok, "{err}");
        out.push_str(&shown);
    }
    let (_, stats, _) = run(&["memory", "stats"], store, None, None);
    let mut v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["bytes"] = 0.into();
    // Cost accounting is per finished build (a killed build adds none); the memory is compared.
    v["cost"] = serde_json::Value::Null;
    out.push_str(&v.to_string());
    out
}

/// Kill the build at many points (aborts injected right after store writes, and a real
/// `kill -9` at an arbitrary moment), rerun it, and get exactly the store of an uninterrupted
/// build: no duplicate, nothing lost, nothing left stale.
#[test]
fn a_killed_build_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut build = vec![
        "memory",
        "build",
        "--users",
        "2",
        "--levels",
        "records,patterns,profile",
        "--batch",
        "1",
    ];
    build.extend(TINY);
    let who: Vec<String> = users()[..2].to_vec();
    let reference = dir.path().join("reference.sqlite");
    let (ok, _, err) = run(&build, &reference, None, None);
    assert!(ok, "{err}");
    let want = dump(&reference, &who);
    assert!(
        want.contains("pattern") && want.contains("profile"),
        "{want}"
    );

    let crashed = dir.path().join("crashed.sqlite");
    let mut crashes = 0;
    for at in [1, 2, 3, 5, 8] {
        let (ok, _, err) = run(&build, &crashed, None, Some(at));
        if !ok {
            assert!(err.contains("MRREC_FAILPOINT: aborting"), "{err}");
            crashes += 1;
        }
    }
    assert!(crashes >= 3, "only {crashes} runs crashed");
    let (ok, _, err) = run(&build, &crashed, None, None);
    assert!(ok, "{err}");
    assert_eq!(dump(&crashed, &who), want);

    // A real SIGKILL at an arbitrary moment (the build replays cached answers, so it is quick:
    // kill early).
    let killed = dir.path().join("killed.sqlite");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(&build)
        .args(data_args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (ok, _, err) = run(&build, &killed, None, None);
    assert!(ok, "{err}");
    assert_eq!(dump(&killed, &who), want);
}

#[test]
fn memory_commands_name_a_bad_store() {
    let (ok, _, err) = mrrec(&[
        "memory",
        "stats",
        "--data",
        mini().to_str().unwrap(),
        "--store",
        "postgres://nobody@127.0.0.1:1/none",
    ]);
    assert!(!ok);
    assert!(
        err.contains("memory store postgres://nobody@127.0.0.1:1/none"),
        "{err}"
    );
}
