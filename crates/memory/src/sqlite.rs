//! The embedded store: SQLite in WAL mode, `secure_delete` on, every row keyed by tenant first.
//! Local-memory retrieval reads by the (tenant, user) key prefix only.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    check_dims, from_blob, to_blob, top_k, user_key_prefixes, BuildCost, Forgotten, GlobalAspect,
    Level, MemoryEntry, MemoryError, MemoryRead, MemoryStats, MemoryWrite, Owner, QueryAspects,
    Result, Retrieved, Stale, StaleKind,
};

/// SQLite-backed memory store.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "PRAGMA journal_mode=WAL; PRAGMA secure_delete=ON; PRAGMA synchronous=NORMAL;
     CREATE TABLE IF NOT EXISTS entries (
         tenant TEXT NOT NULL, user_id TEXT NOT NULL, id TEXT NOT NULL,
         level TEXT NOT NULL, category TEXT, text TEXT NOT NULL,
         provenance TEXT NOT NULL, embedding BLOB NOT NULL, writer TEXT,
         PRIMARY KEY (tenant, user_id, id)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS query_aspects (
         tenant TEXT NOT NULL, qid TEXT NOT NULL, user_id TEXT NOT NULL, category TEXT NOT NULL,
         json TEXT NOT NULL, writer TEXT, PRIMARY KEY (tenant, qid)) WITHOUT ROWID;
     CREATE INDEX IF NOT EXISTS query_aspects_user ON query_aspects (tenant, user_id);
     CREATE TABLE IF NOT EXISTS global_aspects (
         tenant TEXT NOT NULL, category TEXT NOT NULL, id TEXT NOT NULL, subcategory TEXT,
         name TEXT NOT NULL, description TEXT NOT NULL, queries TEXT NOT NULL, users TEXT NOT NULL,
         embedding BLOB NOT NULL, PRIMARY KEY (tenant, category, id)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS build_state (
         tenant TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tenant, key)) WITHOUT ROWID;
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);";

impl SqliteStore {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| MemoryError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| err(&e))?;
        }
        // One opener at a time sets the journal mode and the schema: switching a new file to WAL
        // while another process does the same can fail at once with "database is locked" (an
        // upgrade SQLite refuses instead of waiting, so the busy timeout does not cover it).
        let _init = mrrec_models::artefact::lock_beside(path).map_err(|e| err(&e))?;
        let conn = Connection::open(path).map_err(|e| err(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| err(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| err(&e))?;
        add_writer_columns(&conn).map_err(|e| err(&e))?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> MemoryError {
        MemoryError::Store {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dim(&self, conn: &Connection) -> Result<Option<usize>> {
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'dim'", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|s| s.parse().ok()))
    }

    fn set_dim(&self, conn: &Connection, have: Option<usize>, want: Option<usize>) -> Result<()> {
        if let (None, Some(d)) = (have, want) {
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?1)",
                params![d.to_string()],
            )
            .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Stores made before the memory model was recorded get the `writer` columns (NULL: not
/// recorded). Checked and altered in one immediate transaction, so processes opening one old
/// store at once do not both add a column.
fn add_writer_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has = |table: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == "writer" {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if has("entries")? && has("query_aspects")? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| {
        for table in ["entries", "query_aspects"] {
            if !has(table)? {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN writer TEXT"))?;
            }
        }
        Ok(())
    })();
    conn.execute_batch(if r.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    r
}

fn row_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<MemoryEntry> {
    let level: String = r.get(1)?;
    let prov: String = r.get(4)?;
    let emb: Vec<u8> = r.get(5)?;
    Ok(MemoryEntry {
        id: r.get(0)?,
        level: Level::parse(&level).unwrap_or(Level::Record),
        category: r.get(2)?,
        text: r.get(3)?,
        provenance: serde_json::from_str(&prov).unwrap_or_default(),
        embedding: from_blob(&emb),
        writer: r.get(6)?,
    })
}

fn row_aspect(r: &rusqlite::Row<'_>) -> rusqlite::Result<GlobalAspect> {
    let queries: String = r.get(5)?;
    let users: String = r.get(6)?;
    let emb: Vec<u8> = r.get(7)?;
    Ok(GlobalAspect {
        category: r.get(0)?,
        id: r.get(1)?,
        subcategory: r.get(2)?,
        name: r.get(3)?,
        description: r.get(4)?,
        queries: serde_json::from_str(&queries).unwrap_or_default(),
        users: serde_json::from_str(&users).unwrap_or_default(),
        embedding: from_blob(&emb),
    })
}

fn json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

const ASPECT_COLS: &str =
    "SELECT category, id, subcategory, name, description, queries, users, embedding FROM global_aspects";

impl MemoryRead for SqliteStore {
    fn entries(&self, owner: Owner<'_>) -> Result<Vec<MemoryEntry>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, level, category, text, provenance, embedding, writer FROM entries
                 WHERE tenant = ?1 AND user_id = ?2 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![owner.tenant, owner.user], row_entry)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn has_entries(&self, owner: Owner<'_>) -> Result<bool> {
        let conn = self.lock();
        conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE tenant = ?1 AND user_id = ?2)",
        )
        .and_then(|mut s| s.query_row(params![owner.tenant, owner.user], |r| r.get(0)))
        .map_err(|e| self.err(e))
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
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT DISTINCT user_id FROM entries WHERE tenant = ?1 ORDER BY user_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn stats(&self, tenant: &str) -> Result<MemoryStats> {
        let users = self.users(tenant)?.len();
        let conn = self.lock();
        let count = |sql: &str| -> Result<std::collections::BTreeMap<String, usize>> {
            let mut stmt = conn.prepare_cached(sql).map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![tenant], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
                })
                .map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.err(e))
        };
        let entries =
            count("SELECT level, COUNT(*) FROM entries WHERE tenant = ?1 GROUP BY level")?;
        let global = count(
            "SELECT category, COUNT(*) FROM global_aspects WHERE tenant = ?1 GROUP BY category",
        )?;
        let mut writers = count(
            "SELECT COALESCE(writer, 'unrecorded'), COUNT(*) FROM entries
             WHERE tenant = ?1 AND level != 'record' GROUP BY 1",
        )?;
        for (w, n) in count(
            "SELECT COALESCE(writer, 'unrecorded'), COUNT(*) FROM query_aspects
             WHERE tenant = ?1 GROUP BY 1",
        )? {
            *writers.entry(w).or_default() += n;
        }
        let stale: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM build_state WHERE tenant = ?1",
                params![tenant],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        let cost: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![format!("cost:{tenant}")],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(MemoryStats {
            users,
            entries,
            bytes,
            global,
            stale: stale as usize,
            cost: cost
                .and_then(|c| serde_json::from_str(&c).ok())
                .unwrap_or_default(),
            writers,
        })
    }

    fn global_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<GlobalAspect>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{ASPECT_COLS} WHERE tenant = ?1 AND (?2 IS NULL OR category = ?2) ORDER BY category, id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant, category], row_aspect)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn query_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<QueryAspects>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT qid, user_id, category, json, writer FROM query_aspects
                 WHERE tenant = ?1 AND (?2 IS NULL OR category = ?2) ORDER BY qid",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant, category], |r| {
                Ok(QueryAspects {
                    qid: r.get(0)?,
                    user: r.get(1)?,
                    category: r.get(2)?,
                    json: r.get(3)?,
                    writer: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn stale(&self, tenant: &str, kind: Option<StaleKind>) -> Result<Vec<Stale>> {
        let prefix = kind.map_or("", StaleKind::prefix);
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT key FROM build_state WHERE tenant = ?1 AND substr(key, 1, length(?2)) = ?2 ORDER BY key",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant, prefix], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let keys = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        Ok(keys.iter().filter_map(|k| Stale::parse(k)).collect())
    }
}

impl MemoryWrite for SqliteStore {
    fn replace(
        &self,
        owner: Owner<'_>,
        remove: &[String],
        put: &[MemoryEntry],
        done: &[Stale],
        mark: &[Stale],
    ) -> Result<()> {
        let mut conn = self.lock();
        let have = self.dim(&conn)?;
        let dims: Vec<(&str, usize)> = put
            .iter()
            .map(|e| (e.id.as_str(), e.embedding.len()))
            .collect();
        let want = check_dims(have, &dims)?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        self.set_dim(&tx, have, want)?;
        {
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM entries WHERE tenant = ?1 AND user_id = ?2 AND id = ?3",
                )
                .map_err(|e| self.err(e))?;
            for id in remove {
                del.execute(params![owner.tenant, owner.user, id])
                    .map_err(|e| self.err(e))?;
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO entries (tenant, user_id, id, level, category, text, provenance, embedding, writer)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(|e| self.err(e))?;
            for e in put {
                stmt.execute(params![
                    owner.tenant,
                    owner.user,
                    e.id,
                    e.level.as_str(),
                    e.category,
                    e.text,
                    json(&e.provenance),
                    to_blob(&e.embedding),
                    e.writer
                ])
                .map_err(|e| self.err(e))?;
            }
            let mut clear = tx
                .prepare_cached("DELETE FROM build_state WHERE tenant = ?1 AND key = ?2")
                .map_err(|e| self.err(e))?;
            for k in done {
                clear
                    .execute(params![owner.tenant, k.key()])
                    .map_err(|e| self.err(e))?;
            }
            for k in mark {
                tx.execute(
                    "INSERT OR IGNORE INTO build_state (tenant, key) VALUES (?1, ?2)",
                    params![owner.tenant, k.key()],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn mark_stale(&self, tenant: &str, keys: &[Stale]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO build_state (tenant, key) VALUES (?1, ?2)")
                .map_err(|e| self.err(e))?;
            for k in keys {
                stmt.execute(params![tenant, k.key()])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn add_cost(&self, tenant: &str, cost: &BuildCost) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let key = format!("cost:{tenant}");
        let old: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let mut total: BuildCost = old
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default();
        total.add(cost);
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, serde_json::to_string(&total).unwrap_or_default()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn put_query_aspects(&self, tenant: &str, rows: &[QueryAspects]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO query_aspects (tenant, qid, user_id, category, json, writer) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| self.err(e))?;
            for q in rows {
                stmt.execute(params![tenant, q.qid, q.user, q.category, q.json, q.writer])
                    .map_err(|e| self.err(e))?;
                tx.execute(
                    "INSERT OR IGNORE INTO build_state (tenant, key) VALUES (?1, ?2)",
                    params![tenant, Stale::global(&q.category).key()],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn put_global(&self, tenant: &str, category: &str, aspects: &[GlobalAspect]) -> Result<()> {
        let mut conn = self.lock();
        let have = self.dim(&conn)?;
        let dims: Vec<(&str, usize)> = aspects
            .iter()
            .map(|a| (a.id.as_str(), a.embedding.len()))
            .collect();
        let want = check_dims(have, &dims)?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        self.set_dim(&tx, have, want)?;
        tx.execute(
            "DELETE FROM global_aspects WHERE tenant = ?1 AND category = ?2",
            params![tenant, category],
        )
        .map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO global_aspects (tenant, category, id, subcategory, name, description, queries, users, embedding)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(|e| self.err(e))?;
            for a in aspects {
                stmt.execute(params![
                    tenant,
                    category,
                    a.id,
                    a.subcategory,
                    a.name,
                    a.description,
                    json(&a.queries),
                    json(&a.users),
                    to_blob(&a.embedding)
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.execute(
            "DELETE FROM build_state WHERE tenant = ?1 AND key = ?2",
            params![tenant, Stale::global(category).key()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn forget(&self, owner: Owner<'_>) -> Result<Forgotten> {
        let mut out = Forgotten::default();
        {
            // Which categories' canonical aspects drew on this user's queries.
            let derived: Vec<(String, String)> = self
                .global_aspects(owner.tenant, None)?
                .into_iter()
                .filter(|a| a.users.iter().any(|u| u == owner.user))
                .map(|a| (a.category, a.id))
                .collect();
            let mut conn = self.lock();
            let tx = conn.transaction().map_err(|e| self.err(e))?;
            out.entries = tx
                .execute(
                    "DELETE FROM entries WHERE tenant = ?1 AND user_id = ?2",
                    params![owner.tenant, owner.user],
                )
                .map_err(|e| self.err(e))?;
            out.query_aspects = tx
                .execute(
                    "DELETE FROM query_aspects WHERE tenant = ?1 AND user_id = ?2",
                    params![owner.tenant, owner.user],
                )
                .map_err(|e| self.err(e))?;
            for (cat, id) in &derived {
                out.global_aspects += tx
                    .execute(
                        "DELETE FROM global_aspects WHERE tenant = ?1 AND category = ?2 AND id = ?3",
                        params![owner.tenant, cat, id],
                    )
                    .map_err(|e| self.err(e))?;
                tx.execute(
                    "INSERT OR IGNORE INTO build_state (tenant, key) VALUES (?1, ?2)",
                    params![owner.tenant, Stale::global(cat).key()],
                )
                .map_err(|e| self.err(e))?;
            }
            // Build-state marks name the user (`pattern:{user}:…`, `profile:{user}`).
            let (profile, patterns) = user_key_prefixes(owner.user);
            tx.execute(
                "DELETE FROM build_state WHERE tenant = ?1 AND (key = ?2 OR substr(key, 1, length(?3)) = ?3)",
                params![owner.tenant, profile, patterns],
            )
            .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
        }
        // secure_delete zeroes the freed cells; the checkpoint empties the WAL, which still held
        // the old pages; VACUUM rewrites the file without free pages.
        self.lock()
            .execute_batch(
                "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .map_err(|e| self.err(e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A store written before the memory model was recorded opens, reads its entries back with
    /// no writer, and stores writers from then on.
    #[test]
    fn a_store_from_before_writers_gains_the_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE entries (
                     tenant TEXT NOT NULL, user_id TEXT NOT NULL, id TEXT NOT NULL,
                     level TEXT NOT NULL, category TEXT, text TEXT NOT NULL,
                     provenance TEXT NOT NULL, embedding BLOB NOT NULL,
                     PRIMARY KEY (tenant, user_id, id)) WITHOUT ROWID;
                 CREATE TABLE query_aspects (
                     tenant TEXT NOT NULL, qid TEXT NOT NULL, user_id TEXT NOT NULL,
                     category TEXT NOT NULL, json TEXT NOT NULL,
                     PRIMARY KEY (tenant, qid)) WITHOUT ROWID;",
            )
            .unwrap();
            c.execute(
                "INSERT INTO entries VALUES ('t', 'u', 'p-0', 'pattern', NULL, 'likes tea', '[]', ?1)",
                params![to_blob(&[1.0, 0.0])],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let o = Owner {
            tenant: "t",
            user: "u",
        };
        let old = s.entries(o).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(
            (old[0].text.as_str(), old[0].writer.as_deref()),
            ("likes tea", None)
        );
        assert_eq!(s.stats("t").unwrap().writers.get("unrecorded"), Some(&1));
        let mut e = old[0].clone();
        e.id = "p-1".into();
        e.writer = Some("m".into());
        s.put(o, &[e]).unwrap();
        drop(s);
        // Opening again finds the column and alters nothing.
        let s = SqliteStore::open(&path).unwrap();
        let w: Vec<_> = s
            .entries(o)
            .unwrap()
            .into_iter()
            .map(|e| e.writer)
            .collect();
        assert_eq!(w, vec![None, Some("m".to_string())]);
    }

    /// Set by `a_new_store_opened_by_many_processes_at_once_opens_for_all` for the copies of this
    /// test binary it starts: the store each copy opens.
    const OPEN_IN_CHILD: &str = "MRREC_TEST_SQLITE_OPEN";

    /// Not a test of its own: in a copy started with `OPEN_IN_CHILD`, opens that store and
    /// writes one entry of its own.
    #[test]
    fn open_the_store_named_by_the_parent() {
        let Some(path) = mrrec_models::testing::raced_file(OPEN_IN_CHILD) else {
            return;
        };
        let e = MemoryEntry {
            id: format!("r-{}", std::process::id()),
            level: Level::Record,
            category: None,
            text: "x".into(),
            provenance: vec![],
            embedding: vec![1.0, 0.0],
            writer: None,
        };
        let s = SqliteStore::open(&path).unwrap();
        s.put(OWNER, &[e]).unwrap();
    }

    const OWNER: Owner<'static> = Owner {
        tenant: "t",
        user: "u",
    };

    /// Processes opening one new store file at once (a service and a `memory build` on a fresh
    /// home, parallel tests) all open it and all of their writes land: switching a new file to
    /// WAL while another process does the same can fail at once with "database is locked", which
    /// the busy timeout does not cover. (Without the lock in `open`, about one run in two failed.)
    #[test]
    fn a_new_store_opened_by_many_processes_at_once_opens_for_all() {
        mrrec_models::testing::race_copies(
            "sqlite::tests::open_the_store_named_by_the_parent",
            OPEN_IN_CHILD,
            "store.sqlite",
            25,
            8,
            |path, round| {
                let s = SqliteStore::open(path).unwrap();
                assert_eq!(s.entries(OWNER).unwrap().len(), 8, "round {round}");
            },
        );
    }
}
