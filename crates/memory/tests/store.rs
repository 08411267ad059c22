//! The SQLite store: round trip, retrieval order, isolation (property-based), forget.

#![allow(clippy::unwrap_used)]

use mrrec_memory::*;
use proptest::prelude::*;

fn unit(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
    v
}

fn entry(id: &str, level: Level, text: &str, emb: Vec<f32>) -> MemoryEntry {
    MemoryEntry {
        id: id.into(),
        level,
        category: Some("Books".into()),
        text: text.into(),
        provenance: vec!["B1".into()],
        embedding: emb,
    }
}

#[test]
fn round_trip_and_retrieval_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("m.sqlite")).unwrap();
    let o = Owner {
        tenant: "t",
        user: "u1",
    };
    let es: Vec<MemoryEntry> = (0..10)
        .map(|i| {
            entry(
                &format!("e{i}"),
                if i % 2 == 0 {
                    Level::Record
                } else {
                    Level::Pattern
                },
                &format!("text {i}"),
                unit(i, 8),
            )
        })
        .collect();
    s.put(o, &es).unwrap();
    assert_eq!(s.entries(o).unwrap(), {
        let mut v = es.clone();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    });
    // The query equal to e4's vector finds e4 first; level filters apply.
    let r = s.retrieve(o, &unit(4, 8), 3, &Level::ALL).unwrap();
    assert_eq!(r[0].entry.id, "e4");
    assert!((r[0].score - 1.0).abs() < 1e-5);
    assert!(r.windows(2).all(|w| w[0].score >= w[1].score));
    let only = s.retrieve(o, &unit(4, 8), 10, &[Level::Pattern]).unwrap();
    assert_eq!(only.len(), 5);
    assert!(only.iter().all(|x| x.entry.level == Level::Pattern));
    // Replacing by id does not duplicate.
    s.put(o, &[entry("e0", Level::Record, "new text", unit(0, 8))])
        .unwrap();
    assert_eq!(s.entries(o).unwrap().len(), 10);
    // A wrong width is refused with the entry named.
    let err = s
        .put(o, &[entry("bad", Level::Record, "x", vec![1.0; 3])])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "entry bad: embedding has 3 dimensions, the store holds 8"
    );
    // Reopened from disk.
    drop(s);
    let s = SqliteStore::open(&dir.path().join("m.sqlite")).unwrap();
    assert_eq!(s.stats("t").unwrap().entries["record"], 5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn retrieval_never_returns_another_users_entry(
        users in proptest::collection::vec(0u8..6, 1..40),
        query_user in 0u8..6, seed in 0u64..1000, tenant_b in proptest::bool::ANY,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("m.sqlite")).unwrap();
        for (i, u) in users.iter().enumerate() {
            let tenant = if tenant_b && i % 3 == 0 { "b" } else { "a" };
            let user = format!("u{u}");
            // Same ids across users on purpose: ids are only unique per owner.
            s.put(Owner { tenant, user: &user }, &[entry(&format!("e{}", i % 4), Level::Record, &format!("{tenant}/{user}/{i}"), unit(seed + i as u64, 16))]).unwrap();
        }
        let user = format!("u{query_user}");
        for tenant in ["a", "b"] {
            let got = s.retrieve(Owner { tenant, user: &user }, &unit(seed, 16), 100, &Level::ALL).unwrap();
            for r in got {
                prop_assert!(r.entry.text.starts_with(&format!("{tenant}/{user}/")), "{} leaked into {tenant}/{user}", r.entry.text);
            }
        }
    }
}

#[test]
fn forget_removes_every_byte_of_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sqlite");
    let s = SqliteStore::open(&path).unwrap();
    let a = Owner {
        tenant: "t",
        user: "alice",
    };
    let b = Owner {
        tenant: "t",
        user: "bob",
    };
    for i in 0..200 {
        s.put(
            a,
            &[entry(
                &format!("a{i}"),
                Level::Record,
                &format!("ALICE-SECRET-{i} bought a red kettle"),
                unit(i, 8),
            )],
        )
        .unwrap();
        s.put(
            b,
            &[entry(
                &format!("b{i}"),
                Level::Record,
                &format!("BOB-NOTE-{i} bought a blue mug"),
                unit(1000 + i, 8),
            )],
        )
        .unwrap();
    }
    assert_eq!(s.forget(a).unwrap(), 200);
    assert!(s.entries(a).unwrap().is_empty());
    assert_eq!(s.entries(b).unwrap().len(), 200);
    let mut bytes = std::fs::read(&path).unwrap();
    if let Ok(w) = std::fs::read(dir.path().join("m.sqlite-wal")) {
        bytes.extend(w);
    }
    let hay = String::from_utf8_lossy(&bytes);
    assert!(
        !hay.contains("ALICE-SECRET"),
        "alice's text is still in the file"
    );
    assert!(hay.contains("BOB-NOTE"));
}
