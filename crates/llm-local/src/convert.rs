//! One-off conversion of the quantisations our packed kernel does not take (Q4_0/Q4_1/Q5_0/Q5_1
//! and the k-quants Q2_K…Q6_K) to Q8_0, so that every matrix runs [`crate::q8`]'s kernel (where the
//! CPU lacks it, candle's Q8_0 kernel, about three times faster than its Q4/Q5 ones). The result
//! is cached beside the original.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::Result;
use mrrec_llm::LlmError;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LlmError + '_ {
    move |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file-name tag of the conversion: `q8_0` converted the Q4/Q5 types only; `q8_0k` (this
/// version) the k-quants too, a different model (cached answers of the other are not replayed).
pub const CONVERSION_TAG: &str = "q8_0k";

fn slow(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    ) || is_k_quant(d)
}

fn is_k_quant(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    )
}

/// How many tensors of the GGUF file at `path` are k-quants (read from its header).
pub fn k_quant_tensors(path: &Path) -> Result<usize> {
    let mut f = File::open(path).map_err(io(path))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        crate::LocalError::Llm(LlmError::BadModelFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })?;
    Ok(content
        .tensor_infos
        .values()
        .filter(|t| is_k_quant(t.ggml_dtype))
        .count())
}

/// Writes a copy of `src` at `dst` with every slow-quantised tensor re-quantised to Q8_0;
/// returns how many tensors were converted.
pub fn requantize_gguf(src: &Path, dst: &Path) -> Result<usize> {
    let mut f = File::open(src).map_err(io(src))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        crate::LocalError::Llm(LlmError::BadModelFile {
            path: src.to_path_buf(),
            message: e.to_string(),
        })
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

/// The Q8_0 version of `path` (`<stem>.q8_0k.gguf` beside it), converting once if the file holds
/// quantisations other than Q8_0 (and f32/f16); `path` itself when it has none.
pub fn ensure_q8_0(path: &Path) -> Result<PathBuf> {
    ensure_q8_0_in(path, path.parent().unwrap_or(Path::new(".")))
}

/// [`ensure_q8_0`] writing the converted file (and its lock) into `dir` instead of beside `path`
/// (a user's own GGUF: its folder may be read-only, and it is not ours to write into).
pub fn ensure_q8_0_in(path: &Path, dir: &Path) -> Result<PathBuf> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let dst = dir.join(format!("{stem}.{CONVERSION_TAG}.gguf"));
    if dst.exists() {
        return Ok(dst);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock_path = dir.join(format!("{stem}.convert.lock"));
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if dst.exists() {
        return Ok(dst);
    }
    let mut f = File::open(path).map_err(io(path))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        crate::LocalError::Llm(LlmError::BadModelFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })?;
    if !content.tensor_infos.values().any(|t| slow(t.ggml_dtype)) {
        return Ok(path.to_path_buf());
    }
    // Seconds to a minute or two of work a user would otherwise wait through in silence.
    eprintln!(
        "converting {} to Q8_0 (once, into {})…",
        path.display(),
        dst.display()
    );
    let t0 = std::time::Instant::now();
    let n = requantize_gguf(path, &dst)?;
    eprintln!(
        "converted {n} tensors in {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(dst)
}
