//! LoRA adapters at inference: low-rank factors beside the quantised projections (never merged),
//! saved and loaded as safetensors.

use std::path::Path;

use candle_core::{Device, Tensor};
use mrrec_llm::LlmError;

use crate::model::Proj;
use crate::Result;

/// A LoRA adapter applied at inference beside the quantised weights, never merged into them:
/// `y = W x + (alpha / rank) · B (A x)`, with `A: (rank, in)` and `B: (out, rank)` in f32.
#[derive(Clone, Default)]
pub struct LoraAdapter {
    /// Scale numerator.
    pub alpha: f32,
    /// Rank.
    pub rank: usize,
    /// What the adapter was trained on and how (kept in the file's safetensors metadata).
    pub metadata: std::collections::BTreeMap<String, String>,
    deltas: std::collections::HashMap<(usize, Proj), (Tensor, Tensor)>,
}

impl LoraAdapter {
    /// An empty adapter.
    pub fn new(rank: usize, alpha: f32) -> Self {
        LoraAdapter {
            alpha,
            rank,
            metadata: Default::default(),
            deltas: Default::default(),
        }
    }

    /// Sets the factors of one projection of one layer.
    pub fn insert(&mut self, layer: usize, proj: Proj, a: Tensor, b: Tensor) {
        self.deltas.insert((layer, proj), (a, b));
    }

    /// The factors of one projection, if adapted.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<&(Tensor, Tensor)> {
        self.deltas.get(&(layer, proj))
    }

    /// Writes the adapter as safetensors (`blk.{i}.{proj}.lora_a` / `.lora_b`, plus `lora.alpha`
    /// and `lora.rank` scalars; [`LoraAdapter::metadata`] as the file's metadata). The same
    /// adapter gives the same bytes in every process (the metadata in key order), and the file
    /// is written beside and renamed, so a reader never sees half of it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| {
            crate::LocalError::Llm(LlmError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        };
        let mut map: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        for ((l, p), (a, b)) in &self.deltas {
            map.insert(format!("blk.{l}.{}.lora_a", p.name()), a.clone());
            map.insert(format!("blk.{l}.{}.lora_b", p.name()), b.clone());
        }
        map.insert(
            "lora.alpha".into(),
            Tensor::new(&[self.alpha], &Device::Cpu)?,
        );
        map.insert(
            "lora.rank".into(),
            Tensor::new(&[self.rank as f32], &Device::Cpu)?,
        );
        let metadata: std::collections::HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let bytes = safetensors::serialize(map, (!metadata.is_empty()).then_some(metadata))
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let bytes = metadata_in_key_order(bytes).map_err(io)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Reads an adapter written by [`LoraAdapter::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        let scalar = |k: &str| -> Result<f32> {
            map.get(k)
                .ok_or_else(|| {
                    crate::LocalError::Llm(LlmError::BadModelFile {
                        path: path.to_path_buf(),
                        message: format!("no {k}"),
                    })
                })?
                .flatten_all()?
                .get(0)?
                .to_scalar::<f32>()
                .map_err(Into::into)
        };
        let mut ad = LoraAdapter::new(scalar("lora.rank")? as usize, scalar("lora.alpha")?);
        let bytes = std::fs::read(path).map_err(|e| {
            crate::LocalError::Llm(LlmError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) {
            ad.metadata = meta
                .metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
        }
        for (name, a) in &map {
            let Some(rest) = name
                .strip_prefix("blk.")
                .and_then(|r| r.strip_suffix(".lora_a"))
            else {
                continue;
            };
            let Some((l, pname)) = rest.split_once('.') else {
                continue;
            };
            let (Ok(l), Some(p)) = (
                l.parse::<usize>(),
                Proj::ALL.iter().find(|p| p.name() == pname),
            ) else {
                continue;
            };
            let b = map.get(&format!("blk.{l}.{pname}.lora_b")).ok_or_else(|| {
                LlmError::BadModelFile {
                    path: path.to_path_buf(),
                    message: format!("{name} without its lora_b"),
                }
            })?;
            ad.insert(l, *p, a.clone(), b.clone());
        }
        Ok(ad)
    }
}

/// Rewrites a safetensors file's header with its `__metadata__` entries in key order: the
/// writer takes them as a hash map, whose order differs between processes, so the same adapter
/// would be written as different bytes. The tensors' entries (already in a fixed order) and the
/// data are unchanged; the header keeps its padding to 8 bytes.
fn metadata_in_key_order(bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let bad = |m: &str| std::io::Error::other(format!("a safetensors header as written: {m}"));
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
        .ok_or_else(|| bad("shorter than 8 bytes"))?;
    let header = bytes
        .get(8..8usize.saturating_add(n))
        .ok_or_else(|| bad("shorter than its length"))?;
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    if let Some(serde_json::Value::Object(meta)) = value.get_mut("__metadata__") {
        let mut entries: Vec<(String, serde_json::Value)> =
            std::mem::take(meta).into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        meta.extend(entries);
    }
    let mut out = serde_json::to_vec(&value).map_err(|e| bad(&e.to_string()))?;
    out.resize(out.len().next_multiple_of(8), b' ');
    let mut file = Vec::with_capacity(bytes.len());
    file.extend((out.len() as u64).to_le_bytes());
    file.extend(out);
    file.extend(&bytes[8 + n..]);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(keys: &[&str]) -> LoraAdapter {
        let mut ad = LoraAdapter::new(2, 4.0);
        for l in 0..3 {
            ad.insert(
                l,
                Proj::ALL[l % Proj::ALL.len()],
                Tensor::new(&[[0.5f32, -1.0], [0.25, 2.0]], &Device::Cpu).unwrap(),
                Tensor::new(&[[1.0f32, 0.0], [0.0, -3.0]], &Device::Cpu).unwrap(),
            );
        }
        for (i, k) in keys.iter().enumerate() {
            ad.metadata
                .insert(k.to_string(), format!("value {i} of {k}"));
        }
        ad
    }

    #[test]
    fn the_same_adapter_is_written_as_the_same_bytes_and_read_back_whole() {
        let keys: Vec<String> = (0..40)
            .map(|i| format!("key-{:02}", (i * 17) % 40))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let ad = adapter(&keys);
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.safetensors");
        ad.save(&first).unwrap();
        let bytes = std::fs::read(&first).unwrap();
        // Hash maps of 40 keys are ordered differently by each new map's seed: ten writes
        // would almost surely differ somewhere if the order leaked into the file.
        for i in 0..10 {
            let p = dir.path().join(format!("{i}.safetensors"));
            ad.save(&p).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "write {i}");
        }
        // The header lists the metadata in key order and stays 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let at = |k: &str| header.find(&format!("\"{k}\":\"value")).unwrap();
        for w in 0..39 {
            assert!(at(&format!("key-{w:02}")) < at(&format!("key-{:02}", w + 1)));
        }
        // Read back: every factor, the scalars and the metadata.
        let back = LoraAdapter::load(&first).unwrap();
        assert_eq!((back.rank, back.alpha), (2, 4.0));
        assert_eq!(back.metadata, ad.metadata);
        for l in 0..3 {
            let p = Proj::ALL[l % Proj::ALL.len()];
            let (a, b) = back.get(l, p).unwrap();
            let (a0, b0) = ad.get(l, p).unwrap();
            assert_eq!(a.to_vec2::<f32>().unwrap(), a0.to_vec2::<f32>().unwrap());
            assert_eq!(b.to_vec2::<f32>().unwrap(), b0.to_vec2::<f32>().unwrap());
        }
        // Nothing is left beside it.
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn an_adapter_without_metadata_is_written_without_a_metadata_entry() {
        let ad = adapter(&[]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        ad.save(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(!std::str::from_utf8(&bytes[8..8 + n])
            .unwrap()
            .contains("__metadata__"));
        assert!(LoraAdapter::load(&p).unwrap().metadata.is_empty());
    }

    #[test]
    fn a_header_shorter_than_its_length_is_an_error_not_a_panic() {
        let mut b = 64u64.to_le_bytes().to_vec();
        b.extend(b"{}");
        assert!(metadata_in_key_order(b).is_err());
        assert!(metadata_in_key_order(vec![1, 2, 3]).is_err());
        assert!(metadata_in_key_order(u64::MAX.to_le_bytes().to_vec()).is_err());
    }
}
