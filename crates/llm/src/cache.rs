//! A content-addressed response cache: (model id, request) → response, in SQLite, so reruns of
//! memory building and evaluation are free and reproducible.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::{ChatModel, ChatRequest, ChatResponse, LlmError, Result};

/// When responses are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Every request (sampled ones are keyed by their seed, so replays are exact).
    All,
    /// Greedy requests only (temperature 0); sampled ones, such as GRPO rollouts, always run.
    GreedyOnly,
}

/// The response store itself: (key) → (model, request, response) in SQLite, openable without a
/// model (to forget a user's exchanges, or count them).
pub struct ResponseCache {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A chat model whose answers are remembered on disk (in a [`ResponseCache`]).
pub struct CachedChatModel<M: ChatModel> {
    inner: M,
    cache: ResponseCache,
    policy: CachePolicy,
}

fn cache_err(path: &Path, e: rusqlite::Error) -> LlmError {
    LlmError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl ResponseCache {
    /// Opens the cache at `path` (created if needed).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| LlmError::Io {
                path: d.to_path_buf(),
                source: e,
            })?;
        }
        // One opener at a time sets the journal mode and the schema (see the embedding cache:
        // a new file switched to WAL by two processes at once can fail with "database is locked").
        let _init = mrrec_models::artefact::lock_beside(path)?;
        let mut conn = Connection::open(path).map_err(|e| cache_err(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| cache_err(path, e))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA secure_delete=ON;")
            .map_err(|e| cache_err(path, e))?;
        // The schema is created and upgraded in one write transaction, so processes opening a
        // new cache at once cannot both decide to add the column.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| cache_err(path, e))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS responses (key BLOB PRIMARY KEY, model TEXT NOT NULL, response TEXT NOT NULL, request TEXT) WITHOUT ROWID;",
        )
        .map_err(|e| cache_err(path, e))?;
        // The request is kept beside the response so that a user's text can be found and
        // forgotten (caches from before this column have NULL there and are matched on the
        // response only).
        let has_request: bool = tx
            .prepare("SELECT 1 FROM pragma_table_info('responses') WHERE name = 'request'")
            .and_then(|mut st| st.exists([]))
            .map_err(|e| cache_err(path, e))?;
        if !has_request {
            tx.execute_batch("ALTER TABLE responses ADD COLUMN request TEXT")
                .map_err(|e| cache_err(path, e))?;
        }
        tx.commit().map_err(|e| cache_err(path, e))?;
        Ok(ResponseCache {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The response stored under `key`, if any.
    pub fn get(&self, key: &[u8; 32]) -> Result<Option<ChatResponse>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let text: Option<String> = conn
            .query_row(
                "SELECT response FROM responses WHERE key = ?1",
                params![&key[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| cache_err(&self.path, e))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Stores `model`'s response to `req` under `key`.
    pub fn put(
        &self,
        key: &[u8; 32],
        model: &str,
        req: &ChatRequest,
        resp: &ChatResponse,
    ) -> Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT OR REPLACE INTO responses (key, model, response, request) VALUES (?1, ?2, ?3, ?4)",
            params![
                &key[..],
                model,
                serde_json::to_string(resp).unwrap_or_default(),
                serde_json::to_string(req).unwrap_or_default()
            ],
        )
        .map_err(|e| cache_err(&self.path, e))?;
        Ok(())
    }

    /// Deletes every cached exchange whose request or response contains one of `needles` (a
    /// user's texts, when the user is forgotten), then rewrites the file so that no freed page
    /// keeps them. Returns how many were deleted.
    pub fn forget_containing(&self, needles: &[&str]) -> Result<usize> {
        let needles: Vec<&str> = needles.iter().copied().filter(|n| n.len() >= 8).collect();
        if needles.is_empty() {
            return Ok(0);
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        {
            let mut st = conn
                .prepare("SELECT key, response, COALESCE(request, '') FROM responses")
                .map_err(|e| cache_err(&self.path, e))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(|e| cache_err(&self.path, e))?;
            for row in rows {
                let (key, resp, req) = row.map_err(|e| cache_err(&self.path, e))?;
                // JSON escapes quotes and newlines: look for the escaped form as well.
                if needles.iter().any(|n| {
                    let esc = serde_json::to_string(n).unwrap_or_default();
                    let esc = esc.trim_matches('"');
                    resp.contains(n) || req.contains(n) || resp.contains(esc) || req.contains(esc)
                }) {
                    doomed.push(key);
                }
            }
        }
        for k in &doomed {
            conn.execute("DELETE FROM responses WHERE key = ?1", params![k])
                .map_err(|e| cache_err(&self.path, e))?;
        }
        if !doomed.is_empty() {
            conn.execute_batch(
                "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .map_err(|e| cache_err(&self.path, e))?;
        }
        Ok(doomed.len())
    }

    /// Number of cached responses.
    pub fn len(&self) -> Result<usize> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| cache_err(&self.path, e))
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl<M: ChatModel> CachedChatModel<M> {
    /// Wraps `inner` with the cache at `path` (created if needed).
    pub fn open(inner: M, path: &Path, policy: CachePolicy) -> Result<Self> {
        Ok(CachedChatModel {
            inner,
            cache: ResponseCache::open(path)?,
            policy,
        })
    }

    /// The response store under the model.
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// The cache key of a request for this model.
    pub fn key(&self, req: &ChatRequest) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.id().as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(req).unwrap_or_default());
        h.finalize().into()
    }

    fn cacheable(&self, req: &ChatRequest) -> bool {
        self.policy == CachePolicy::All || req.sampling.temperature <= 0.0
    }
}

impl<M: ChatModel> ChatModel for CachedChatModel<M> {
    fn id(&self) -> &str {
        self.inner.id()
    }

    /// Scores are not cached: scoring costs one prefill, which the model's prefix reuse shares.
    fn score_choices(
        &self,
        reqs: &[ChatRequest],
        choices: &[&str],
    ) -> Vec<Result<crate::ChoiceScores>> {
        self.inner.score_choices(reqs, choices)
    }

    fn ready(&self) -> Result<()> {
        self.inner.ready()
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatResponse> {
        if !self.cacheable(req) {
            return self.inner.chat_stream(req, on_text);
        }
        let key = self.key(req);
        if let Some(mut hit) = self.cache.get(&key)? {
            on_text(&hit.text);
            // A replay costs nothing now; the recorded usage stays in `usage` for accounting.
            hit.usage.seconds = 0.0;
            return Ok(hit);
        }
        let resp = self.inner.chat_stream(req, on_text)?;
        self.cache.put(&key, self.inner.id(), req, &resp)?;
        Ok(resp)
    }

    /// Cached answers are replayed; the rest go to the inner model together (so its batched
    /// generation is used) and are stored as they come back.
    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        let mut out: Vec<Option<Result<ChatResponse>>> = (0..reqs.len()).map(|_| None).collect();
        let mut todo: Vec<(usize, [u8; 32])> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if !self.cacheable(r) {
                todo.push((i, [0; 32]));
                continue;
            }
            let key = self.key(r);
            match self.cache.get(&key) {
                Ok(Some(mut hit)) => {
                    hit.usage.seconds = 0.0;
                    out[i] = Some(Ok(hit));
                }
                Ok(None) => todo.push((i, key)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let batch: Vec<ChatRequest> = todo.iter().map(|(i, _)| reqs[*i].clone()).collect();
        for ((i, key), r) in todo.iter().zip(self.inner.chat_batch(&batch)) {
            let r = r.and_then(|resp| {
                if self.cacheable(&reqs[*i]) {
                    self.cache.put(key, self.inner.id(), &reqs[*i], &resp)?;
                }
                Ok(resp)
            });
            out[*i] = Some(r);
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(LlmError::Tokenizer("request lost in batch".into()))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinishReason, Message, Sampling, Usage};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);
    impl ChatModel for Counting {
        fn id(&self) -> &str {
            "counting"
        }
        fn chat_stream(&self, req: &ChatRequest, _: &mut dyn FnMut(&str)) -> Result<ChatResponse> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Ok(ChatResponse {
                text: format!("{} #{n}", req.messages[0].content),
                tool_calls: vec![],
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    seconds: 1.0,
                },
            })
        }
    }

    #[test]
    fn greedy_answers_are_replayed_and_sampled_ones_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let m = CachedChatModel::open(
            Counting(AtomicUsize::new(0)),
            &dir.path().join("c.sqlite"),
            CachePolicy::GreedyOnly,
        )
        .unwrap();
        let greedy = ChatRequest {
            messages: vec![Message::user("a")],
            ..Default::default()
        };
        let first = m.chat(&greedy).unwrap();
        let again = m.chat(&greedy).unwrap();
        assert_eq!(first.text, again.text);
        assert_eq!(again.usage.seconds, 0.0);
        assert_eq!(m.inner.0.load(Ordering::SeqCst), 1);
        let sampled = ChatRequest {
            sampling: Sampling {
                temperature: 1.0,
                ..Default::default()
            },
            ..greedy.clone()
        };
        m.chat(&sampled).unwrap();
        m.chat(&sampled).unwrap();
        assert_eq!(m.inner.0.load(Ordering::SeqCst), 3);
        // A different request is a different key.
        let other = ChatRequest {
            messages: vec![Message::user("b")],
            ..Default::default()
        };
        assert_ne!(m.chat(&other).unwrap().text, first.text);
        assert_eq!(m.cache().len().unwrap(), 2);
        // Batches replay what is cached and run the rest once.
        let third = ChatRequest {
            messages: vec![Message::user("c \"quoted\"\nline")],
            ..Default::default()
        };
        let before = m.inner.0.load(Ordering::SeqCst);
        let got = m.chat_batch(&[greedy.clone(), third.clone(), other.clone()]);
        assert_eq!(got[0].as_ref().unwrap().text, first.text);
        assert_eq!(m.inner.0.load(Ordering::SeqCst), before + 1);
        assert_eq!(m.cache().len().unwrap(), 3);
        // Forgetting by content removes exactly the exchanges holding the text.
        assert_eq!(
            m.cache()
                .forget_containing(&["c \"quoted\"\nline"])
                .unwrap(),
            1
        );
        assert_eq!(m.cache().len().unwrap(), 2);
        assert_eq!(m.cache().forget_containing(&["short"]).unwrap(), 0);
    }

    /// Set by `a_new_cache_opened_by_many_processes_at_once_opens_for_all` for the copies of
    /// this test binary it starts: the cache each copy opens.
    const OPEN_IN_CHILD: &str = "MRREC_TEST_RESPONSE_CACHE_OPEN";

    /// Not a test of its own: in a copy started with `OPEN_IN_CHILD`, opens that cache and
    /// stores one response under a key of its own.
    #[test]
    fn open_the_cache_named_by_the_parent() {
        let Some(path) = mrrec_models::testing::raced_file(OPEN_IN_CHILD) else {
            return;
        };
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&std::process::id().to_le_bytes());
        let resp = ChatResponse {
            text: "x".into(),
            tool_calls: vec![],
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        };
        let c = ResponseCache::open(&path).unwrap();
        c.put(&key, "m", &ChatRequest::default(), &resp).unwrap();
    }

    /// Processes opening one new response cache at once (parallel tests on a cold
    /// `$MRREC_HOME`, a service beside a CLI run) all open it and all of their writes land.
    #[test]
    fn a_new_cache_opened_by_many_processes_at_once_opens_for_all() {
        mrrec_models::testing::race_copies(
            "cache::tests::open_the_cache_named_by_the_parent",
            OPEN_IN_CHILD,
            "llm.sqlite",
            25,
            8,
            |path, round| {
                let n = ResponseCache::open(path).unwrap().len().unwrap();
                assert_eq!(n, 8, "round {round}");
            },
        );
    }
}
