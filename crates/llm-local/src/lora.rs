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
    /// and `lora.rank` scalars; [`LoraAdapter::metadata`] as the file's metadata).
    pub fn save(&self, path: &Path) -> Result<()> {
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
        safetensors::serialize_to_file(map, (!metadata.is_empty()).then_some(metadata), path)
            .map_err(|e| {
                crate::LocalError::Llm(LlmError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
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
