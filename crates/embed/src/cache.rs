use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::{EmbedError, Result, TextEmbedder};

/// A persistent map (model id, text) → vector in SQLite (WAL). Safe to share between processes.
pub struct EmbeddingCache {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn key(model: &str, text: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    h.finalize().into()
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl EmbeddingCache {
    /// Opens (creating) the cache at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |source| EmbedError::Cache {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EmbedError::BadModelFile {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        // One opener at a time sets the journal mode and the schema: switching a new file to WAL
        // while another process does the same can fail at once with "database is locked" (an
        // upgrade SQLite refuses instead of waiting; seen with parallel tests on a cold cache).
        let _init = mrrec_models::artefact::lock_beside(path)?;
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA secure_delete=ON;
             CREATE TABLE IF NOT EXISTS embeddings (
                 key BLOB PRIMARY KEY, model TEXT NOT NULL, vec BLOB NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(err)?;
        Ok(EmbeddingCache {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> EmbedError {
        EmbedError::Cache {
            path: self.path.clone(),
            source,
        }
    }

    /// The cached vector of `text` under `model`, if any.
    pub fn get(&self, model: &str, text: &str) -> Result<Option<Vec<f32>>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(model, text);
        conn.query_row(
            "SELECT vec FROM embeddings WHERE key = ?1",
            params![&k[..]],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .map(|o| o.map(|b| from_blob(&b)))
        .map_err(|e| self.err(e))
    }

    /// Stores vectors for texts in one transaction.
    pub fn put_many(&self, model: &str, items: &[(&str, &[f32])]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO embeddings (key, model, vec) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            for (text, v) in items {
                let k = key(model, text);
                stmt.execute(params![&k[..], model, to_blob(v)])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Removes the vector of each text under every model; returns how many rows went.
    pub fn forget_texts(&self, models: &[&str], texts: &[&str]) -> Result<usize> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for m in models {
            for t in texts {
                let k = key(m, t);
                n += conn
                    .execute("DELETE FROM embeddings WHERE key = ?1", params![&k[..]])
                    .map_err(|e| self.err(e))?;
            }
        }
        if n > 0 {
            // No freed page or WAL frame keeps the vectors.
            conn.execute_batch(
                "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .map_err(|e| self.err(e))?;
        }
        Ok(n)
    }

    /// Number of cached vectors.
    pub fn len(&self) -> Result<usize> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row("SELECT COUNT(*) FROM embeddings", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as usize)
        .map_err(|e| self.err(e))
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// An embedder whose results go through an [`EmbeddingCache`]: cached texts are read back,
/// the rest embedded in chunks, each chunk committed before the next (so a killed run resumes).
pub struct CachedEmbedder<E: TextEmbedder> {
    inner: E,
    cache: EmbeddingCache,
    chunk: usize,
}

impl<E: TextEmbedder> CachedEmbedder<E> {
    /// Wraps `inner` with `cache`.
    pub fn new(inner: E, cache: EmbeddingCache) -> Self {
        CachedEmbedder {
            inner,
            cache,
            chunk: 512,
        }
    }

    /// The cache.
    pub fn cache(&self) -> &EmbeddingCache {
        &self.cache
    }

    /// The wrapped embedder.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Embeds `texts`, reporting `(done, total)` after each chunk (cached texts count as done).
    pub fn embed_with_progress(
        &self,
        texts: &[&str],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        let model = self.inner.model_id();
        let mut out: Vec<Option<Vec<f32>>> = Vec::with_capacity(texts.len());
        let mut missing: Vec<usize> = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let v = self.cache.get(model, t)?;
            if v.is_none() {
                missing.push(i);
            }
            out.push(v);
        }
        // Dedupe identical texts among the misses.
        missing.sort_by(|&a, &b| texts[a].cmp(texts[b]));
        missing.dedup_by(|a, b| texts[*a] == texts[*b]);
        // Length order keeps batches tight across chunks too.
        missing.sort_by_key(|&i| texts[i].len());
        let mut done = texts.len() - missing.len();
        progress(done, texts.len());
        for chunk in missing.chunks(self.chunk) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let vecs = self.inner.embed(&batch)?;
            let pairs: Vec<(&str, &[f32])> = batch
                .iter()
                .copied()
                .zip(vecs.iter().map(Vec::as_slice))
                .collect();
            self.cache.put_many(model, &pairs)?;
            for (&i, v) in chunk.iter().zip(vecs) {
                out[i] = Some(v);
            }
            done += chunk.len();
            progress(done.min(texts.len()), texts.len());
        }
        // Fill duplicates of deduped texts from the cache.
        let mut result = Vec::with_capacity(texts.len());
        for (i, v) in out.into_iter().enumerate() {
            match v {
                Some(v) => result.push(v),
                None => match self.cache.get(model, texts[i])? {
                    Some(v) => result.push(v),
                    None => result.push(self.inner.embed(&[texts[i]])?.remove(0)),
                },
            }
        }
        Ok(result)
    }
}

impl<E: TextEmbedder> TextEmbedder for CachedEmbedder<E> {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embed_with_progress(texts, &mut |_, _| {})
    }
    fn embed_reporting(
        &self,
        texts: &[&str],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        self.embed_with_progress(texts, progress)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Set by `a_new_cache_opened_by_many_processes_at_once_opens_for_all` for the copies of
    /// this test binary it starts: the cache each copy opens.
    const OPEN_IN_CHILD: &str = "MRREC_TEST_EMBEDDING_CACHE_OPEN";

    /// Not a test of its own: in a copy started with `OPEN_IN_CHILD`, opens that cache and
    /// stores one vector under a text of its own.
    #[test]
    fn open_the_cache_named_by_the_parent() {
        let Some(path) = mrrec_models::testing::raced_file(OPEN_IN_CHILD) else {
            return;
        };
        let text = std::process::id().to_string();
        let c = EmbeddingCache::open(&path).unwrap();
        c.put_many("m", &[(text.as_str(), &[1.0, 2.0][..])])
            .unwrap();
    }

    /// Many processes opening one new cache at once (parallel test processes on a cold
    /// `$MRREC_HOME`: a clean-clone CI run failed once with "database is locked" here) all get
    /// it and all of their writes land: the journal mode and the schema are set up one at a
    /// time. (Without the lock in `open`, about one run in three failed with CI's error.)
    #[test]
    fn a_new_cache_opened_by_many_processes_at_once_opens_for_all() {
        mrrec_models::testing::race_copies(
            "cache::tests::open_the_cache_named_by_the_parent",
            OPEN_IN_CHILD,
            "embeddings.sqlite",
            25,
            8,
            |path, round| {
                let c = EmbeddingCache::open(path).unwrap();
                let n: i64 = c
                    .conn
                    .lock()
                    .unwrap()
                    .query_row("SELECT COUNT(*) FROM embeddings", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(n, 8, "round {round}");
            },
        );
    }
}
