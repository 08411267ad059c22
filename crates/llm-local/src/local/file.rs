//! Opening a model by registry id or by the path of a GGUF file on disk.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

use super::LocalModel;
use crate::convert::io;
use crate::gguf::bad;
use crate::Result;

/// The prefix of a model id that names a file by its content: `gguf-sha256:<hex>`.
pub const FILE_ID_PREFIX: &str = "gguf-sha256:";

/// Whether a `--model` value names a file rather than a registry id: it ends in `.gguf` or has a
/// path separator ([`LocalModel::open`] also takes an existing file that is no registry id).
pub fn names_a_file(model: &str) -> bool {
    model.ends_with(".gguf") || model.contains(std::path::MAIN_SEPARATOR) || model.contains('/')
}

/// Checks a GGUF file before its weights are read: the header parses, the architecture is one
/// the engine runs, and the file holds every tensor its header lists (a truncated download is
/// named as such instead of failing inside the tensor library).
pub fn check_gguf(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(bad(path, "not a file"));
    }
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        bad(
            path,
            format!("not a GGUF file (or a quantisation candle cannot read): {e}"),
        )
    })?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad(path, "no general.architecture in the header"))?;
    if arch != "qwen2" && arch != "llama" {
        return Err(bad(
            path,
            format!("architecture {arch:?} is not supported (qwen2, llama)"),
        ));
    }
    let mut needed = content.tensor_data_offset;
    for (name, t) in &content.tensor_infos {
        let elems = t.shape.elem_count();
        let block = t.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(bad(
                path,
                format!("tensor {name}: {elems} values are not whole {block}-value blocks"),
            ));
        }
        let bytes = (elems / block * t.ggml_dtype.type_size()) as u64;
        needed = needed.max(content.tensor_data_offset + t.offset + bytes);
    }
    if meta.len() < needed {
        return Err(bad(
            path,
            format!(
                "truncated: the file has {} bytes, its tensors need {needed}",
                meta.len()
            ),
        ));
    }
    Ok(())
}

/// The sha256 of a model file, remembered beside the conversions under
/// `<home>/models/files/` by (canonical path, length, modification time) so that a 2 GB file is
/// hashed once, not at every start.
fn file_sha256(path: &Path) -> Result<String> {
    let canonical = std::fs::canonicalize(path).map_err(io(path))?;
    let meta = std::fs::metadata(&canonical).map_err(io(path))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!("{}\n{}\n{modified}", canonical.display(), meta.len());
    let memo = files_dir().join(format!(
        "{}.sha256",
        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()))[..32]
    ));
    if let Ok(s) = std::fs::read_to_string(&memo) {
        if let Some(sha) = s.strip_prefix(&format!("{key}\n")) {
            let sha = sha.trim();
            if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(sha.to_string());
            }
        }
    }
    eprintln!("hashing {} (once)…", path.display());
    let sha = mrrec_models::sha256_file(&canonical)?;
    // The memo is a cache: failing to write it costs a re-hash next time, nothing else.
    if std::fs::create_dir_all(files_dir()).is_ok() {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, format!("{key}\n{sha}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, &memo);
        }
    }
    Ok(sha)
}

/// Where conversions of users' files and their hash memos live.
fn files_dir() -> PathBuf {
    mrrec_models::home().join("models").join("files")
}

impl LocalModel {
    /// A registered model by id, or a qwen2 / llama GGUF file by path (see [`names_a_file`]).
    pub fn open(model: &str) -> Result<Self> {
        let (id, path) = Self::resolve(model)?;
        Self::load(&id, &path)
    }

    /// What [`LocalModel::open`] loads, without reading its weights: the id the model will have
    /// (it keys caches and names kept results) and the file loaded — fetched, checked, hashed
    /// and converted once, as opening does. A caller that may need no answer from the model
    /// learns its id here and loads it only when asked ([`mrrec_llm::LazyChatModel`]).
    pub fn resolve(model: &str) -> Result<(String, PathBuf)> {
        if names_a_file(model) || (Path::new(model).is_file() && mrrec_models::find(model).is_err())
        {
            Self::resolve_file(Path::new(model))
        } else {
            Self::resolve_registry(model)
        }
    }

    /// A GGUF file from disk (a user's Qwen2.5-3B-Instruct, say), checked first ([`check_gguf`]),
    /// converted to Q8_0 once into `<home>/models/files/<first 16 hex of its sha256>/` when it holds slower
    /// quantisations. Its id is `gguf-sha256:<the file's sha256>` (plus the conversion's tag when
    /// converted), so caches and provenance name the content, not the path.
    pub fn from_file(path: &Path) -> Result<Self> {
        let (id, q8) = Self::resolve_file(path)?;
        Self::load(&id, &q8)
    }

    /// What [`LocalModel::from_file`] loads: its id and the (converted) file.
    fn resolve_file(path: &Path) -> Result<(String, PathBuf)> {
        check_gguf(path)?;
        let sha = file_sha256(path)?;
        let q8 = crate::convert::ensure_q8_0_in(path, &files_dir().join(&sha[..16]))?;
        let id = format!("{FILE_ID_PREFIX}{sha}");
        if q8 != path {
            Ok((format!("{id}+{}", crate::convert::CONVERSION_TAG), q8))
        } else {
            Ok((id, q8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_ids_and_paths_are_told_apart() {
        assert!(!names_a_file("qwen2.5-coder-0.5b-instruct"));
        assert!(!names_a_file("smollm2-135m-instruct"));
        assert!(names_a_file("model.gguf"));
        assert!(names_a_file("./models/qwen3b"));
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        let e = LocalModel::open(missing.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.gguf"), "{e}");
        let text = dir.path().join("notes.gguf");
        std::fs::write(&text, "this is not a model").unwrap();
        let e = LocalModel::open(text.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("notes.gguf") && e.contains("not a GGUF file"),
            "{e}"
        );
        let e = LocalModel::open(dir.path().to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a file"), "{e}");
    }

    #[test]
    fn another_architecture_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bert.gguf");
        let t = candle_core::quantized::QTensor::quantize(
            &candle_core::Tensor::zeros(
                (2, 32),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        let arch = gguf_file::Value::String("bert".into());
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w", &t)]).unwrap();
        drop(f);
        let e = LocalModel::open(path.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("bert.gguf") && e.contains("\"bert\" is not supported"),
            "{e}"
        );
    }
}
