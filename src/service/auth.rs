//! API keys and per-key rate limits.
//!
//! Keys are random (`mrk_` + 64 hex digits) and stored only as their SHA-256 in a JSON key file
//! (`{"keys": [{"name", "tenant", "sha256"}]}`), written atomically with mode 0600. A request
//! presents its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`; the key decides the
//! tenant, and every memory operation of the request is scoped to that tenant.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// A label for people (shown in logs, never the key).
    pub name: String,
    /// The tenant the key acts for.
    pub tenant: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyRecord>,
}

/// Who a valid key acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name.
    pub name: String,
    /// The tenant.
    pub tenant: String,
}

/// The valid keys, by hash.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_hash: HashMap<[u8; 32], Principal>,
}

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Tenant and user ids: 1–128 characters, no control characters (they become key parts).
pub fn check_id(what: &str, id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.chars().count() > 128 {
        return Err(format!("{what} is longer than 128 characters"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

impl KeyRing {
    /// A ring of `records` (errors name the record).
    pub fn from_records(records: &[KeyRecord]) -> Result<Self> {
        let mut by_hash = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            check_id("tenant", &r.tenant).map_err(|e| anyhow::anyhow!("keys[{i}]: {e}"))?;
            let bytes = hex::decode(&r.sha256)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .with_context(|| format!("keys[{i}] ({}): sha256 is not 64 hex digits", r.name))?;
            if by_hash
                .insert(
                    bytes,
                    Principal {
                        name: r.name.clone(),
                        tenant: r.tenant.clone(),
                    },
                )
                .is_some()
            {
                bail!("keys[{i}] ({}): the same key is listed twice", r.name);
            }
        }
        Ok(KeyRing { by_hash })
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self> {
        let f = read_file(path)?;
        Self::from_records(&f.keys).with_context(|| format!("in {}", path.display()))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Who `key` acts for, if it is valid.
    pub fn check(&self, key: &str) -> Option<&Principal> {
        let h: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&h)
    }
}

fn read_file(path: &Path) -> Result<KeyFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a key file ({{\"keys\": [{{\"name\", \"tenant\", \"sha256\"}}]}})",
            path.display()
        )
    })
}

/// A fresh random key.
pub fn new_key() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("mrk_{}", hex::encode(b))
}

/// Creates a key for `tenant`, adds its hash to the key file at `path` (created if missing;
/// rewritten atomically, mode 0600) and returns the key — the only time it is shown.
pub fn add_key(path: &Path, tenant: &str, name: &str) -> Result<String> {
    check_id("tenant", tenant).map_err(anyhow::Error::msg)?;
    let mut f = if path.exists() {
        read_file(path)?
    } else {
        KeyFile::default()
    };
    let key = new_key();
    f.keys.push(KeyRecord {
        name: name.to_string(),
        tenant: tenant.to_string(),
        sha256: hash_key(&key),
    });
    KeyRing::from_records(&f.keys)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut w = opts
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.write_all(serde_json::to_string_pretty(&f)?.as_bytes())?;
        w.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// A token bucket per key: `rate` requests per second, bursts up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` per second per key (0 or less: unlimited).
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(seconds until one is available)` when empty.
    pub fn take(&self, key: &str) -> std::result::Result<(), f64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = b.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_stored_hashed_and_map_to_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let a = add_key(&p, "acme", "ci").unwrap();
        let b = add_key(&p, "globex", "ci").unwrap();
        assert_ne!(a, b);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(&a[4..]) && !text.contains(&b[4..]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let ring = KeyRing::load(&p).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.check(&a).unwrap().tenant, "acme");
        assert_eq!(ring.check(&b).unwrap().tenant, "globex");
        assert!(ring.check("mrk_00").is_none());
        assert!(ring.check("").is_none());
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        std::fs::write(
            &p,
            r#"{"keys": [{"name": "x", "tenant": "t", "sha256": "zz"}]}"#,
        )
        .unwrap();
        let e = format!("{:#}", KeyRing::load(&p).unwrap_err());
        assert!(e.contains("keys[0]") && e.contains("keys.json"), "{e}");
        std::fs::write(&p, "not json").unwrap();
        let e = format!("{:#}", KeyRing::load(&p).unwrap_err());
        assert!(e.contains("not a key file"), "{e}");
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let l = RateLimiter::new(10.0, 3.0);
        for _ in 0..3 {
            l.take("k").unwrap();
        }
        let wait = l.take("k").unwrap_err();
        assert!(wait > 0.0 && wait <= 0.1 + 1e-9, "{wait}");
        l.take("other").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120));
        l.take("k").unwrap();
        assert!(RateLimiter::new(0.0, 1.0).take("k").is_ok());
    }
}
