//! One-off conversion of slow quantisations (Q4_0/Q4_1/Q5_0/Q5_1) to Q8_0, which candle's CPU
//! kernels run about three times faster. The result is cached beside the original.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::{LlmError, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LlmError + '_ {
    move |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn slow(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    )
}

/// Writes a copy of `src` at `dst` with every slow-quantised tensor re-quantised to Q8_0;
/// returns how many tensors were converted.
pub fn requantize_gguf(src: &Path, dst: &Path) -> Result<usize> {
    let mut f = File::open(src).map_err(io(src))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| LlmError::BadModelFile {
        path: src.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut converted = 0;
    for name in names {
        let t = content.tensor(&mut f, name, &Device::Cpu)?;
        if slow(t.dtype()) {
            let deq = t.dequantize(&Device::Cpu)?;
            tensors.push((name.clone(), QTensor::quantize(&deq, GgmlDType::Q8_0)?));
            converted += 1;
        } else {
            tensors.push((name.clone(), t));
        }
    }
    let mut md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    md.sort_by_key(|(k, _)| *k);
    let tmp = dst.with_extension("tmp");
    {
        let mut w = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &md, &refs)?;
    }
    std::fs::rename(&tmp, dst).map_err(io(dst))?;
    Ok(converted)
}

/// The Q8_0 version of `path` (`<stem>.q8_0.gguf` beside it), converting once if the file holds
/// slow quantisations; `path` itself when it has none.
pub fn ensure_q8_0(path: &Path) -> Result<PathBuf> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let dst = path.with_file_name(format!("{stem}.q8_0.gguf"));
    if dst.exists() {
        return Ok(dst);
    }
    let lock_path = path.with_extension("convert.lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if dst.exists() {
        return Ok(dst);
    }
    let mut f = File::open(path).map_err(io(path))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| LlmError::BadModelFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !content.tensor_infos.values().any(|t| slow(t.ggml_dtype)) {
        return Ok(path.to_path_buf());
    }
    tracing::info!("converting {} to Q8_0 (once)", path.display());
    requantize_gguf(path, &dst)?;
    Ok(dst)
}
