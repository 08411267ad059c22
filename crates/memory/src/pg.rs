//! The PostgreSQL store, for deployments that outgrow one machine: the same tables and keys as the
//! SQLite store (tenant first in every primary key), embeddings as `bytea`. Local-memory
//! retrieval reads by the (tenant, user) key prefix only and scores in the client.
//!
//! Forgetting deletes the rows and runs `VACUUM FULL` on the tables it touched, which rewrites
//! them into new files without the dead tuples; PostgreSQL's WAL keeps the old row images until
//! the segments are recycled (see the issue notes).

use std::sync::Mutex;

use postgres::{Client, NoTls, Row};

use crate::{
    check_dims, from_blob, to_blob, top_k, user_key_prefixes, BuildCost, Forgotten, GlobalAspect,
    Level, MemoryEntry, MemoryError, MemoryRead, MemoryStats, MemoryWrite, Owner, QueryAspects,
    Result, Retrieved, Stale, StaleKind,
};

/// PostgreSQL-backed memory store.
pub struct PgStore {
    /// For messages (password redacted).
    url: String,
    /// For reconnecting.
    connect_url: String,
    client: Mutex<Client>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    tenant TEXT NOT NULL, user_id TEXT NOT NULL, id TEXT NOT NULL,
    level TEXT NOT NULL, category TEXT, text TEXT NOT NULL,
    provenance TEXT NOT NULL, embedding BYTEA NOT NULL, writer TEXT,
    PRIMARY KEY (tenant, user_id, id));
ALTER TABLE entries ADD COLUMN IF NOT EXISTS writer TEXT;
CREATE TABLE IF NOT EXISTS query_aspects (
    tenant TEXT NOT NULL, qid TEXT NOT NULL, user_id TEXT NOT NULL, category TEXT NOT NULL,
    json TEXT NOT NULL, writer TEXT, PRIMARY KEY (tenant, qid));
ALTER TABLE query_aspects ADD COLUMN IF NOT EXISTS writer TEXT;
CREATE INDEX IF NOT EXISTS query_aspects_user ON query_aspects (tenant, user_id);
CREATE TABLE IF NOT EXISTS global_aspects (
    tenant TEXT NOT NULL, category TEXT NOT NULL, id TEXT NOT NULL, subcategory TEXT,
    name TEXT NOT NULL, description TEXT NOT NULL, queries TEXT NOT NULL, users TEXT NOT NULL,
    embedding BYTEA NOT NULL, PRIMARY KEY (tenant, category, id));
CREATE TABLE IF NOT EXISTS build_state (
    tenant TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tenant, key));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);";

fn redact(url: &str) -> String {
    // postgres://user:password@host → postgres://user:***@host
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The server's own message when there is one ("db error" alone says nothing).
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({})", d.severity(), d.message(), d.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(x) = src {
                s.push_str(&format!(": {x}"));
                src = x.source();
            }
            s
        }
    }
}

fn json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn row_entry(r: &Row) -> MemoryEntry {
    let level: String = r.get(1);
    let prov: String = r.get(4);
    let emb: Vec<u8> = r.get(5);
    MemoryEntry {
        id: r.get(0),
        level: Level::parse(&level).unwrap_or(Level::Record),
        category: r.get(2),
        text: r.get(3),
        provenance: serde_json::from_str(&prov).unwrap_or_default(),
        embedding: from_blob(&emb),
        writer: r.get(6),
    }
}

fn row_aspect(r: &Row) -> GlobalAspect {
    let queries: String = r.get(5);
    let users: String = r.get(6);
    let emb: Vec<u8> = r.get(7);
    GlobalAspect {
        category: r.get(0),
        id: r.get(1),
        subcategory: r.get(2),
        name: r.get(3),
        description: r.get(4),
        queries: serde_json::from_str(&queries).unwrap_or_default(),
        users: serde_json::from_str(&users).unwrap_or_default(),
        embedding: from_blob(&emb),
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and creates the tables if needed.
    pub fn connect(url: &str) -> Result<Self> {
        let mut client = Client::connect(url, NoTls).map_err(|e| MemoryError::Store {
            path: redact(url),
            message: describe(&e),
        })?;
        client
            .batch_execute(SCHEMA)
            .map_err(|e| MemoryError::Store {
                path: redact(url),
                message: describe(&e),
            })?;
        Ok(PgStore {
            url: redact(url),
            connect_url: url.to_string(),
            client: Mutex::new(client),
        })
    }

    fn err(&self, e: postgres::Error) -> MemoryError {
        MemoryError::Store {
            path: self.url.clone(),
            message: describe(&e),
        }
    }

    /// The connection; one that was lost (the server restarted, the network dropped) is replaced
    /// by a new one first, so a store outlives its server's restarts. (The call that noticed the
    /// loss got an error; nothing is retried behind the caller's back.)
    fn lock(&self) -> std::sync::MutexGuard<'_, Client> {
        let mut g = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_closed() {
            match Client::connect(&self.connect_url, NoTls) {
                Ok(c) => {
                    tracing::info!("reconnected to {}", self.url);
                    *g = c;
                }
                Err(e) => tracing::warn!("reconnecting to {}: {}", self.url, describe(&e)),
            }
        }
        g
    }

    fn dim(&self, c: &mut Client) -> Result<Option<usize>> {
        let rows = c
            .query("SELECT value FROM meta WHERE key = 'dim'", &[])
            .map_err(|e| self.err(e))?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<_, String>(0).parse().ok()))
    }
}

impl MemoryRead for PgStore {
    fn entries(&self, owner: Owner<'_>) -> Result<Vec<MemoryEntry>> {
        let rows = self
            .lock()
            .query(
                "SELECT id, level, category, text, provenance, embedding, writer FROM entries
                 WHERE tenant = $1 AND user_id = $2 ORDER BY id",
                &[&owner.tenant, &owner.user],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(row_entry).collect())
    }

    fn has_entries(&self, owner: Owner<'_>) -> Result<bool> {
        let row = self
            .lock()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM entries WHERE tenant = $1 AND user_id = $2)",
                &[&owner.tenant, &owner.user],
            )
            .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    fn retrieve(
        &self,
        owner: Owner<'_>,
        query: &[f32],
        k: usize,
        levels: &[Level],
    ) -> Result<Vec<Retrieved>> {
        Ok(top_k(self.entries(owner)?, query, k, levels))
    }

    fn users(&self, tenant: &str) -> Result<Vec<String>> {
        let rows = self
            .lock()
            .query(
                "SELECT DISTINCT user_id FROM entries WHERE tenant = $1 ORDER BY user_id",
                &[&tenant],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn stats(&self, tenant: &str) -> Result<MemoryStats> {
        let users = self.users(tenant)?.len();
        let mut c = self.lock();
        let mut count = |sql: &str| -> Result<std::collections::BTreeMap<String, usize>> {
            let rows = c.query(sql, &[&tenant]).map_err(|e| self.err(e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
                .collect())
        };
        let entries =
            count("SELECT level, COUNT(*) FROM entries WHERE tenant = $1 GROUP BY level")?;
        let global = count(
            "SELECT category, COUNT(*) FROM global_aspects WHERE tenant = $1 GROUP BY category",
        )?;
        let mut writers = count(
            "SELECT COALESCE(writer, 'unrecorded'), COUNT(*) FROM entries
             WHERE tenant = $1 AND level <> 'record' GROUP BY 1",
        )?;
        for (w, n) in count(
            "SELECT COALESCE(writer, 'unrecorded'), COUNT(*) FROM query_aspects
             WHERE tenant = $1 GROUP BY 1",
        )? {
            *writers.entry(w).or_default() += n;
        }
        let stale: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM build_state WHERE tenant = $1",
                &[&tenant],
            )
            .map_err(|e| self.err(e))?
            .get(0);
        let bytes: i64 = c
            .query_one(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
                 WHERE c.relname IN ('entries', 'query_aspects', 'global_aspects', 'build_state', 'meta')",
                &[],
            )
            .map_err(|e| self.err(e))?
            .get(0);
        let cost: Option<String> = c
            .query_opt(
                "SELECT value FROM meta WHERE key = $1",
                &[&format!("cost:{tenant}")],
            )
            .map_err(|e| self.err(e))?
            .map(|r| r.get(0));
        Ok(MemoryStats {
            users,
            entries,
            bytes: bytes as u64,
            global,
            stale: stale as usize,
            cost: cost
                .and_then(|c| serde_json::from_str(&c).ok())
                .unwrap_or_default(),
            writers,
        })
    }

    fn global_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<GlobalAspect>> {
        let rows = self
            .lock()
            .query(
                "SELECT category, id, subcategory, name, description, queries, users, embedding
                 FROM global_aspects WHERE tenant = $1 AND ($2::text IS NULL OR category = $2)
                 ORDER BY category, id",
                &[&tenant, &category],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(row_aspect).collect())
    }

    fn query_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<QueryAspects>> {
        let rows = self
            .lock()
            .query(
                "SELECT qid, user_id, category, json, writer FROM query_aspects
                 WHERE tenant = $1 AND ($2::text IS NULL OR category = $2) ORDER BY qid",
                &[&tenant, &category],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| QueryAspects {
                qid: r.get(0),
                user: r.get(1),
                category: r.get(2),
                json: r.get(3),
                writer: r.get(4),
            })
            .collect())
    }

    fn stale(&self, tenant: &str, kind: Option<StaleKind>) -> Result<Vec<Stale>> {
        let prefix = kind.map_or("", StaleKind::prefix);
        let rows = self
            .lock()
            .query(
                "SELECT key FROM build_state WHERE tenant = $1 AND left(key, length($2)) = $2 ORDER BY key",
                &[&tenant, &prefix],
            )
            .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .filter_map(|r| Stale::parse(&r.get::<_, String>(0)))
            .collect())
    }
}

impl MemoryWrite for PgStore {
    fn replace(
        &self,
        owner: Owner<'_>,
        remove: &[String],
        put: &[MemoryEntry],
        done: &[Stale],
        mark: &[Stale],
    ) -> Result<()> {
        let mut c = self.lock();
        let have = self.dim(&mut c)?;
        let dims: Vec<(&str, usize)> = put
            .iter()
            .map(|e| (e.id.as_str(), e.embedding.len()))
            .collect();
        let want = check_dims(have, &dims)?;
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        if let (None, Some(d)) = (have, want) {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dim', $1) ON CONFLICT (key) DO NOTHING",
                &[&d.to_string()],
            )
            .map_err(|e| self.err(e))?;
        }
        for id in remove {
            tx.execute(
                "DELETE FROM entries WHERE tenant = $1 AND user_id = $2 AND id = $3",
                &[&owner.tenant, &owner.user, id],
            )
            .map_err(|e| self.err(e))?;
        }
        let stmt = tx
            .prepare(
                "INSERT INTO entries (tenant, user_id, id, level, category, text, provenance, embedding, writer)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (tenant, user_id, id) DO UPDATE SET level = EXCLUDED.level,
                 category = EXCLUDED.category, text = EXCLUDED.text,
                 provenance = EXCLUDED.provenance, embedding = EXCLUDED.embedding,
                 writer = EXCLUDED.writer",
            )
            .map_err(|e| self.err(e))?;
        for e in put {
            tx.execute(
                &stmt,
                &[
                    &owner.tenant,
                    &owner.user,
                    &e.id,
                    &e.level.as_str(),
                    &e.category,
                    &e.text,
                    &json(&e.provenance),
                    &to_blob(&e.embedding),
                    &e.writer,
                ],
            )
            .map_err(|e| self.err(e))?;
        }
        for k in done {
            tx.execute(
                "DELETE FROM build_state WHERE tenant = $1 AND key = $2",
                &[&owner.tenant, &k.key()],
            )
            .map_err(|e| self.err(e))?;
        }
        for k in mark {
            tx.execute(
                "INSERT INTO build_state (tenant, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&owner.tenant, &k.key()],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn mark_stale(&self, tenant: &str, keys: &[Stale]) -> Result<()> {
        let mut c = self.lock();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        for k in keys {
            tx.execute(
                "INSERT INTO build_state (tenant, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&tenant, &k.key()],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn add_cost(&self, tenant: &str, cost: &BuildCost) -> Result<()> {
        let mut c = self.lock();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        let key = format!("cost:{tenant}");
        let old: Option<String> = tx
            .query_opt("SELECT value FROM meta WHERE key = $1 FOR UPDATE", &[&key])
            .map_err(|e| self.err(e))?
            .map(|r| r.get(0));
        let mut total: BuildCost = old
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default();
        total.add(cost);
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &serde_json::to_string(&total).unwrap_or_default()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn put_query_aspects(&self, tenant: &str, rows: &[QueryAspects]) -> Result<()> {
        let mut c = self.lock();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        for q in rows {
            tx.execute(
                "INSERT INTO query_aspects (tenant, qid, user_id, category, json, writer) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant, qid) DO UPDATE SET user_id = EXCLUDED.user_id,
                 category = EXCLUDED.category, json = EXCLUDED.json, writer = EXCLUDED.writer",
                &[&tenant, &q.qid, &q.user, &q.category, &q.json, &q.writer],
            )
            .map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO build_state (tenant, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&tenant, &Stale::global(&q.category).key()],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn put_global(&self, tenant: &str, category: &str, aspects: &[GlobalAspect]) -> Result<()> {
        let mut c = self.lock();
        let have = self.dim(&mut c)?;
        let dims: Vec<(&str, usize)> = aspects
            .iter()
            .map(|a| (a.id.as_str(), a.embedding.len()))
            .collect();
        let want = check_dims(have, &dims)?;
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        if let (None, Some(d)) = (have, want) {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dim', $1) ON CONFLICT (key) DO NOTHING",
                &[&d.to_string()],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.execute(
            "DELETE FROM global_aspects WHERE tenant = $1 AND category = $2",
            &[&tenant, &category],
        )
        .map_err(|e| self.err(e))?;
        for a in aspects {
            tx.execute(
                "INSERT INTO global_aspects (tenant, category, id, subcategory, name, description, queries, users, embedding)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &tenant,
                    &category,
                    &a.id,
                    &a.subcategory,
                    &a.name,
                    &a.description,
                    &json(&a.queries),
                    &json(&a.users),
                    &to_blob(&a.embedding),
                ],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.execute(
            "DELETE FROM build_state WHERE tenant = $1 AND key = $2",
            &[&tenant, &Stale::global(category).key()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn forget(&self, owner: Owner<'_>) -> Result<Forgotten> {
        let derived: Vec<(String, String)> = self
            .global_aspects(owner.tenant, None)?
            .into_iter()
            .filter(|a| a.users.iter().any(|u| u == owner.user))
            .map(|a| (a.category, a.id))
            .collect();
        let mut out = Forgotten::default();
        let mut c = self.lock();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        out.entries = tx
            .execute(
                "DELETE FROM entries WHERE tenant = $1 AND user_id = $2",
                &[&owner.tenant, &owner.user],
            )
            .map_err(|e| self.err(e))? as usize;
        out.query_aspects = tx
            .execute(
                "DELETE FROM query_aspects WHERE tenant = $1 AND user_id = $2",
                &[&owner.tenant, &owner.user],
            )
            .map_err(|e| self.err(e))? as usize;
        for (cat, id) in &derived {
            out.global_aspects += tx
                .execute(
                    "DELETE FROM global_aspects WHERE tenant = $1 AND category = $2 AND id = $3",
                    &[&owner.tenant, cat, id],
                )
                .map_err(|e| self.err(e))? as usize;
            tx.execute(
                "INSERT INTO build_state (tenant, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&owner.tenant, &Stale::global(cat).key()],
            )
            .map_err(|e| self.err(e))?;
        }
        let (profile, patterns) = user_key_prefixes(owner.user);
        tx.execute(
            "DELETE FROM build_state WHERE tenant = $1 AND (key = $2 OR left(key, length($3)) = $3)",
            &[&owner.tenant, &profile, &patterns],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        // Rewrite the tables without the dead tuples.
        // One statement each: VACUUM cannot run inside the implicit transaction of a batch.
        for t in ["entries", "query_aspects", "global_aspects"] {
            c.batch_execute(&format!("VACUUM FULL {t}"))
                .map_err(|e| self.err(e))?;
        }
        // Needs superuser or pg_checkpoint; best effort.
        let _ = c.batch_execute("CHECKPOINT;");
        Ok(out)
    }
}
