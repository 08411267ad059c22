//! SQLite-specific: forgetting leaves none of the user's bytes in the file or its WAL. The
//! behaviour every store shares is in `conformance.rs`.

#![allow(clippy::unwrap_used)]

use mrrec_memory::*;

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
    assert_eq!(s.forget(a).unwrap().entries, 200);
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
