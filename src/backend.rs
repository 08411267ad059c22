//! Chat-model backends: a registered local model (default) or any OpenAI-compatible server,
//! behind the on-disk response cache.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mrrec_llm::{CachePolicy, CachedChatModel, ChatModel};

/// The response cache every CLI command shares.
pub fn llm_cache_path() -> PathBuf {
    mrrec_models::home().join("cache").join("llm.sqlite")
}

/// A local model by registry id (`echo` / `echo@MS`: the instant model that writes the request
/// back, for measuring everything but the LLM), or the server at `base_url` (model name `model`; the key is
/// read from `OPENAI_API_KEY` / `MRREC_LLM_API_KEY` by [`mrrec_llm::OpenAiConfig::from_env`]).
///
/// `MRREC_LLM_TIMEOUT` (seconds per request) and `MRREC_LLM_RETRIES` tune the server client.
pub fn chat_model(model: &str, base_url: Option<&str>) -> Result<Box<dyn ChatModel>> {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    chat_model_with(
        model,
        base_url,
        env("MRREC_LLM_TIMEOUT").map(std::time::Duration::from_secs_f64),
        env("MRREC_LLM_RETRIES").map(|r| r as u32),
    )
}

/// [`chat_model`] with an explicit per-request timeout and retry count for servers.
pub fn chat_model_with(
    model: &str,
    base_url: Option<&str>,
    timeout: Option<std::time::Duration>,
    retries: Option<u32>,
) -> Result<Box<dyn ChatModel>> {
    if base_url.is_none() {
        if let Some(echo) = mrrec_llm::EchoModel::from_id(model) {
            return Ok(Box::new(echo));
        }
    }
    Ok(match base_url {
        Some(url) => {
            let mut cfg = mrrec_llm::OpenAiConfig::from_env()
                .unwrap_or_else(|| mrrec_llm::OpenAiConfig::new(url, model));
            cfg.base_url = url.to_string();
            if let Some(t) = timeout {
                cfg.timeout = t;
            }
            if let Some(r) = retries {
                cfg.max_retries = r;
            }
            Box::new(mrrec_llm::OpenAiModel::new(cfg)?)
        }
        None => {
            eprintln!("loading {model}…");
            Box::new(mrrec_llm::LocalModel::from_registry(model)?)
        }
    })
}

/// A registered local model with a LoRA adapter (trained by `mrrec train`) applied beside its
/// quantised weights, never merged; the adapter's content hash joins the model id, so cached
/// answers of the base model are not replayed for it.
pub fn local_with_adapter(
    model: &str,
    adapter: Option<&std::path::Path>,
) -> Result<mrrec_llm::LocalModel> {
    eprintln!("loading {model}…");
    let mut m = mrrec_llm::LocalModel::from_registry(model)?;
    if let Some(path) = adapter {
        let ad = mrrec_llm::model::LoraAdapter::load(path)
            .with_context(|| format!("reading the adapter {}", path.display()))?;
        m.transformer().set_lora(Some(std::sync::Arc::new(ad)));
        let hash = crate::workspace::files_sha256(&[path])?;
        m.set_id(format!("{model}+lora-{}", &hash[..12]));
    }
    Ok(m)
}

/// [`chat_model`] with an adapter, behind the shared response cache (a server takes no adapter).
pub fn cached_chat_model_with_adapter(
    model: &str,
    base_url: Option<&str>,
    adapter: Option<&std::path::Path>,
) -> Result<CachedChatModel<Box<dyn ChatModel>>> {
    let inner: Box<dyn ChatModel> = match (adapter, base_url) {
        (Some(_), Some(_)) => anyhow::bail!(
            "--adapter applies to a local model; a server (--llm-url) serves its own weights"
        ),
        (Some(a), None) => Box::new(local_with_adapter(model, Some(a))?),
        (None, _) => chat_model(model, base_url)?,
    };
    Ok(CachedChatModel::open(
        inner,
        &llm_cache_path(),
        CachePolicy::All,
    )?)
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
