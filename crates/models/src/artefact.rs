//! Artefacts under `$MRREC_HOME` (indexes, converted models) built once across processes.
//!
//! Several processes may open the same new artefact at once (parallel test processes, an `eval`
//! beside a `serve` on a fresh cache). [`build_dir_once`] makes that safe: a reader first tries
//! the finished folder without any lock; a builder takes an exclusive lock on `<dir>.lock`,
//! looks again (another process may have finished meanwhile), builds into a private temporary
//! folder beside `dir`, and renames it into place in one step. A folder at `dir` is therefore
//! always complete, a second process waits for the first one's result and reuses it, and a
//! build killed half-way leaves only a temporary folder that the next builder removes.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ModelError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The lock file guarding `target` (`<target>.lock` beside it), held exclusively until dropped.
/// Blocks while another process holds it; released by the OS if the holder dies.
pub fn lock_beside(target: &Path) -> crate::Result<File> {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = target.with_file_name(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    f.lock().map_err(io(&path))?;
    Ok(f)
}

/// A fresh sibling of `target` named `.<name>.<tag>-<pid>-<nanos>`.
fn sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// Removes what killed builders of `target` left beside it (called with the lock held, so no
/// live builder owns them).
fn remove_leftovers(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefixes = [
        format!(".{}.tmp-", name.to_string_lossy()),
        format!(".{}.old-", name.to_string_lossy()),
    ];
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if prefixes.iter().any(|p| n.starts_with(p.as_str())) {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

/// Opens the folder artefact `dir` with `open`, building it first with `build` when `open`
/// finds nothing usable — at most one process builds, the others wait and reuse its result.
///
/// `open` returns `None` for a missing or unusable folder. `build` writes the whole artefact
/// into the empty folder it is given (not `dir`); that folder then replaces `dir` atomically and
/// is opened again, so what the caller gets is always what a later process will open.
pub fn build_dir_once<T, E>(
    dir: &Path,
    open: impl Fn(&Path) -> Option<T>,
    build: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<T, E>
where
    E: From<ModelError>,
{
    if let Some(t) = open(dir) {
        return Ok(t);
    }
    let _lock = lock_beside(dir)?;
    if let Some(t) = open(dir) {
        return Ok(t);
    }
    remove_leftovers(dir);
    let tmp = sibling(dir, "tmp");
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // Unusable (an older format, a partial folder from before these locks): move it aside
        // in one step, then delete it. Readers that still hold its files keep them open.
        let old = sibling(dir, "old");
        fs::rename(dir, &old).map_err(io(dir))?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    open(dir).ok_or_else(|| {
        E::from(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other("built, but the result cannot be opened again"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    fn open(dir: &Path) -> Option<String> {
        fs::read_to_string(dir.join("done")).ok()
    }

    #[test]
    fn many_threads_build_once_and_all_get_the_result() {
        let root = tempfile::tempdir().unwrap();
        let dir = Arc::new(root.path().join("idx"));
        let builds = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (dir, builds, barrier) = (dir.clone(), builds.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    build_dir_once::<_, ModelError>(&dir, open, |tmp| {
                        builds.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that the others arrive while it runs.
                        std::thread::sleep(std::time::Duration::from_millis(150));
                        fs::write(tmp.join("part"), "x").unwrap();
                        fs::write(tmp.join("done"), format!("built by {i}")).unwrap();
                        Ok(())
                    })
                    .unwrap()
                })
            })
            .collect();
        let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(builds.load(Ordering::SeqCst), 1, "built more than once");
        assert!(got.iter().all(|g| g == &got[0]), "{got:?}");
        // Nothing but the artefact and its lock is left beside it.
        let mut names: Vec<String> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["idx", "idx.lock"]);
    }

    #[test]
    fn a_failed_or_killed_build_leaves_no_partial_artefact() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("idx");
        let r = build_dir_once::<String, ModelError>(&dir, open, |tmp| {
            fs::write(tmp.join("part"), "half").unwrap();
            Err(ModelError::UnknownModel("boom".into(), String::new()))
        });
        assert!(matches!(r, Err(ModelError::UnknownModel(..))));
        assert!(!dir.exists());
        // A builder killed half-way leaves its temporary folder; the next build removes it.
        let stale = root.path().join(".idx.tmp-999999-1");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("part"), "half").unwrap();
        let got = build_dir_once::<_, ModelError>(&dir, open, |tmp| {
            fs::write(tmp.join("done"), "ok").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(got, "ok");
        assert!(!stale.exists());
    }

    #[test]
    fn an_unusable_folder_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("idx");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("junk"), "from an older format").unwrap();
        let got = build_dir_once::<_, ModelError>(&dir, open, |tmp| {
            fs::write(tmp.join("done"), "new").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(got, "new");
        assert!(!dir.join("junk").exists());
    }
}
