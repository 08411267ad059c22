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

/// A key file or key record that cannot be used, in words naming the file and the record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

type Result<T> = std::result::Result<T, KeyError>;

/// What was being done, before the reason (`anyhow`'s `with_context`, typed).
trait Context<T> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| KeyError(format!("{}: {e}", f())))
    }
}

impl<T> Context<T> for Option<T> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| KeyError(f()))
    }
}

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

/// Whether `s` has a character a person can see (not white space, not a control character).
pub fn has_visible(s: &str) -> bool {
    s.chars().any(|c| !c.is_whitespace() && !c.is_control())
}

/// Tenant and user ids: 1–128 characters, at least one visible, no control characters (they
/// become key parts).
pub fn check_id(what: &str, id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if !id.chars().any(char::is_control) && !has_visible(id) {
        return Err(format!("{what} has no visible character"));
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
            check_id("tenant", &r.tenant).map_err(|e| KeyError(format!("keys[{i}]: {e}")))?;
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
                return Err(KeyError(format!(
                    "keys[{i}] ({}): the same key is listed twice",
                    r.name
                )));
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
    check_id("tenant", tenant).map_err(KeyError)?;
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
        let text =
            serde_json::to_string_pretty(&f).with_context(|| "serialising the keys".into())?;
        w.write_all(text.as_bytes())
            .and_then(|_| w.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Why the credentials of a request cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// `Authorization` with a scheme other than Bearer.
    Scheme(String),
    /// A header given twice, or `Authorization` and `X-API-Key` naming different keys.
    Conflict(&'static str),
    /// A header that is not visible ASCII, or an empty key.
    Malformed(&'static str),
}

impl std::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialError::Scheme(s) => write!(
                f,
                "the Authorization scheme {s:?} is not supported (use `Authorization: Bearer KEY` or `X-API-Key: KEY`)"
            ),
            CredentialError::Conflict(why) => write!(f, "conflicting credentials: {why}"),
            CredentialError::Malformed(why) => write!(f, "malformed credentials: {why}"),
        }
    }
}

/// The one key a request presents: `Authorization: Bearer KEY` (the scheme in any case, as
/// HTTP schemes are case-insensitive) and/or `X-API-Key: KEY`. Both may be sent only with the
/// same key; any other scheme, a repeated header or an empty key is refused, never passed over.
/// `Ok(None)`: no credentials at all.
pub fn presented_key(
    authorization: &[&[u8]],
    api_key: &[&[u8]],
) -> std::result::Result<Option<String>, CredentialError> {
    fn text<'a>(v: &'a [u8], what: &'static str) -> std::result::Result<&'a str, CredentialError> {
        std::str::from_utf8(v)
            .ok()
            .filter(|s| s.chars().all(|c| c.is_ascii() && !c.is_ascii_control()))
            .map(str::trim)
            .ok_or(CredentialError::Malformed(what))
    }
    if authorization.len() > 1 {
        return Err(CredentialError::Conflict(
            "Authorization is given more than once",
        ));
    }
    if api_key.len() > 1 {
        return Err(CredentialError::Conflict(
            "X-API-Key is given more than once",
        ));
    }
    let bearer = match authorization.first() {
        None => None,
        Some(v) => {
            let v = text(v, "Authorization is not printable ASCII")?;
            let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(CredentialError::Scheme(scheme.chars().take(32).collect()));
            }
            let key = rest.trim();
            if key.is_empty() {
                return Err(CredentialError::Malformed("the Bearer token is empty"));
            }
            Some(key.to_string())
        }
    };
    let header = match api_key.first() {
        None => None,
        Some(v) => {
            let key = text(v, "X-API-Key is not printable ASCII")?;
            if key.is_empty() {
                return Err(CredentialError::Malformed("X-API-Key is empty"));
            }
            Some(key.to_string())
        }
    };
    match (bearer, header) {
        (Some(a), Some(b)) if a != b => Err(CredentialError::Conflict(
            "Authorization and X-API-Key carry different keys",
        )),
        (a, b) => Ok(a.or(b)),
    }
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

    /// `Some(seconds until a token is available)` when `key`'s bucket is empty; takes nothing.
    pub fn empty(&self, key: &str) -> Option<f64> {
        if self.rate <= 0.0 {
            return None;
        }
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = b.get(key)?;
        let now = (*tokens + last.elapsed().as_secs_f64() * self.rate).min(self.burst);
        (now < 1.0).then(|| (1.0 - now) / self.rate)
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
    fn a_request_presents_one_key_or_is_refused() {
        let k = |a: &[&str], x: &[&str]| {
            let a: Vec<&[u8]> = a.iter().map(|s| s.as_bytes()).collect();
            let x: Vec<&[u8]> = x.iter().map(|s| s.as_bytes()).collect();
            presented_key(&a, &x)
        };
        assert_eq!(k(&[], &[]), Ok(None));
        assert_eq!(k(&["Bearer KB"], &[]), Ok(Some("KB".into())));
        assert_eq!(k(&["bearer KB"], &[]), Ok(Some("KB".into())));
        assert_eq!(k(&["BEARER   KB "], &[]), Ok(Some("KB".into())));
        assert_eq!(k(&[], &["KD"]), Ok(Some("KD".into())));
        assert_eq!(k(&["Bearer KB"], &["KB"]), Ok(Some("KB".into())));
        assert!(matches!(
            k(&["Bearer KB"], &["KD"]),
            Err(CredentialError::Conflict(_))
        ));
        // A non-Bearer Authorization never falls through to X-API-Key.
        assert_eq!(
            k(&["Basic dXNlcjpwYXNz"], &["KD"]),
            Err(CredentialError::Scheme("Basic".into()))
        );
        assert!(matches!(
            k(&["Bearer"], &[]),
            Err(CredentialError::Malformed(_))
        ));
        assert!(matches!(k(&[], &[" "]), Err(CredentialError::Malformed(_))));
        assert!(matches!(
            k(&["Bearer A", "Bearer B"], &[]),
            Err(CredentialError::Conflict(_))
        ));
        assert!(matches!(
            presented_key(&[b"Bearer \xff"], &[]),
            Err(CredentialError::Malformed(_))
        ));
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
