//! Chat-model backends: a registered local model (default) or any OpenAI-compatible server,
//! behind the on-disk response cache.

use std::path::PathBuf;

use anyhow::Result;
use mrrec_llm::{CachePolicy, CachedChatModel, ChatModel};

/// The response cache every CLI command shares.
pub fn llm_cache_path() -> PathBuf {
    mrrec_models::home().join("cache").join("llm.sqlite")
}

/// A local model by registry id, or the server at `base_url` (model name `model`; the key is
/// read from `OPENAI_API_KEY` / `MRREC_LLM_API_KEY` by [`mrrec_llm::OpenAiConfig::from_env`]).
pub fn chat_model(model: &str, base_url: Option<&str>) -> Result<Box<dyn ChatModel>> {
    Ok(match base_url {
        Some(url) => {
            let mut cfg = mrrec_llm::OpenAiConfig::from_env()
                .unwrap_or_else(|| mrrec_llm::OpenAiConfig::new(url, model));
            cfg.base_url = url.to_string();
            Box::new(mrrec_llm::OpenAiModel::new(cfg)?)
        }
        None => {
            eprintln!("loading {model}…");
            Box::new(mrrec_llm::LocalModel::from_registry(model)?)
        }
    })
}

/// [`chat_model`] behind the shared response cache (greedy and seeded requests replay).
pub fn cached_chat_model(
    model: &str,
    base_url: Option<&str>,
) -> Result<CachedChatModel<Box<dyn ChatModel>>> {
    Ok(CachedChatModel::open(
        chat_model(model, base_url)?,
        &llm_cache_path(),
        CachePolicy::All,
    )?)
}
