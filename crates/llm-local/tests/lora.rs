//! LoRA adapters applied at inference beside the quantised weights.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use candle_core::{Device, Tensor};
use mrrec_llm_local::model::{LoraAdapter, Proj};
use mrrec_llm_local::*;

fn logits(m: &LocalModel, prompt: &[u32]) -> Vec<f32> {
    let t = m.transformer();
    let mut cache = t.new_cache();
    t.prefill(prompt, &mut cache)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn an_adapter_changes_the_model_only_while_applied() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let prompt = m
        .info()
        .encode("<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let base = logits(&m, &prompt);
    let t = m.transformer();
    let rank = 4;
    // B = 0: the adapter is a no-op (LoRA's initialisation).
    let mut zero = LoraAdapter::new(rank, 8.0);
    for p in Proj::ALL {
        let (out, inp) = t.proj_shape(p);
        let a = Tensor::randn(0f32, 0.02, (rank, inp), &Device::Cpu).unwrap();
        zero.insert(
            0,
            p,
            a,
            Tensor::zeros((out, rank), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    }
    t.set_lora(Some(Arc::new(zero)));
    assert_eq!(logits(&m, &prompt), base);
    // Non-zero factors on every projection of two layers move the logits.
    let mut ad = LoraAdapter::new(rank, 8.0);
    for layer in [1, t.n_layers() - 1] {
        for p in Proj::ALL {
            let (out, inp) = t.proj_shape(p);
            ad.insert(
                layer,
                p,
                Tensor::randn(0f32, 0.05, (rank, inp), &Device::Cpu).unwrap(),
                Tensor::randn(0f32, 0.05, (out, rank), &Device::Cpu).unwrap(),
            );
        }
    }
    t.set_lora(Some(Arc::new(ad.clone())));
    let adapted = logits(&m, &prompt);
    let diff: f32 = adapted
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff > 1e-3, "{diff}");
    // Saved and reloaded, it gives the same logits.
    let dir = tempfile::tempdir().unwrap();
    ad.save(&dir.path().join("adapter.safetensors")).unwrap();
    let back = LoraAdapter::load(&dir.path().join("adapter.safetensors")).unwrap();
    t.set_lora(Some(Arc::new(back)));
    assert_eq!(logits(&m, &prompt), adapted);
    // Removed, the quantised weights were never touched.
    t.set_lora(None);
    assert_eq!(logits(&m, &prompt), base);
}
