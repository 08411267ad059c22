//! The embedded store: SQLite in WAL mode, `secure_delete` on, every row keyed by
//! (tenant, user, id). Retrieval reads by the (tenant, user) key prefix only.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};

use crate::{
    dot, Level, MemoryEntry, MemoryError, MemoryRead, MemoryStats, MemoryWrite, Owner, Result,
    Retrieved,
};

/// SQLite-backed memory store.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl SqliteStore {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| MemoryError::Store {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let conn = Connection::open(path).map_err(|e| MemoryError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let store = SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        };
        store.exec(
            "PRAGMA journal_mode=WAL; PRAGMA secure_delete=ON; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS entries (
                 tenant TEXT NOT NULL, user_id TEXT NOT NULL, id TEXT NOT NULL,
                 level TEXT NOT NULL, category TEXT, text TEXT NOT NULL,
                 provenance TEXT NOT NULL, embedding BLOB NOT NULL,
                 PRIMARY KEY (tenant, user_id, id)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> MemoryError {
        MemoryError::Store {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn exec(&self, sql: &str) -> Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch(sql).map_err(|e| self.err(e))
    }

    fn dim(&self, conn: &Connection) -> Result<Option<usize>> {
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'dim'", [], |r| r.get(0))
            .map(Some)
            .or_else(|e| {
                if matches!(e, rusqlite::Error::QueryReturnedNoRows) {
                    Ok(None)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|s| s.parse().ok()))
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
    })
}

const SELECT: &str = "SELECT id, level, category, text, provenance, embedding FROM entries WHERE tenant = ?1 AND user_id = ?2";

impl MemoryRead for SqliteStore {
    fn entries(&self, owner: Owner<'_>) -> Result<Vec<MemoryEntry>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT} ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![owner.tenant, owner.user], row_entry)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn retrieve(
        &self,
        owner: Owner<'_>,
        query: &[f32],
        k: usize,
        levels: &[Level],
    ) -> Result<Vec<Retrieved>> {
        let mut scored: Vec<Retrieved> = self
            .entries(owner)?
            .into_iter()
            .filter(|e| levels.contains(&e.level))
            .map(|entry| Retrieved {
                score: dot(&entry.embedding, query),
                entry,
            })
            .collect();
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.entry.id.cmp(&b.entry.id))
        });
        scored.truncate(k);
        Ok(scored)
    }

    fn users(&self, tenant: &str) -> Result<Vec<String>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
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
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn
            .prepare_cached("SELECT level, COUNT(*) FROM entries WHERE tenant = ?1 GROUP BY level")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
            })
            .map_err(|e| self.err(e))?;
        let entries = rows
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))?;
        let bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(MemoryStats {
            users,
            entries,
            bytes,
        })
    }
}

impl MemoryWrite for SqliteStore {
    fn put(&self, owner: Owner<'_>, entries: &[MemoryEntry]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let dim = self.dim(&conn)?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let mut want = dim;
        for e in entries {
            match want {
                Some(d) if d != e.embedding.len() => {
                    return Err(MemoryError::Dimension {
                        id: e.id.clone(),
                        expected: d,
                        received: e.embedding.len(),
                    })
                }
                None => want = Some(e.embedding.len()),
                _ => {}
            }
        }
        if dim.is_none() {
            if let Some(d) = want {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?1)",
                    params![d.to_string()],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO entries (tenant, user_id, id, level, category, text, provenance, embedding)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(|e| self.err(e))?;
            for e in entries {
                stmt.execute(params![
                    owner.tenant,
                    owner.user,
                    e.id,
                    e.level.as_str(),
                    e.category,
                    e.text,
                    serde_json::to_string(&e.provenance).unwrap_or_else(|_| "[]".into()),
                    to_blob(&e.embedding)
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn forget(&self, owner: Owner<'_>) -> Result<usize> {
        let n = {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            conn.execute(
                "DELETE FROM entries WHERE tenant = ?1 AND user_id = ?2",
                params![owner.tenant, owner.user],
            )
            .map_err(|e| self.err(e))?
        };
        // secure_delete zeroes the freed cells; the checkpoint empties the WAL, which still held
        // the old pages; VACUUM rewrites the file without free pages.
        self.exec("PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(n)
    }
}
