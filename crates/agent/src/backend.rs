//! Chat-model backends: a registered local model (default) or any OpenAI-compatible server,
//! behind the on-disk response cache.

use std::path::PathBuf;

use crate::error::{Context, Result};
use mrrec_llm::{CachePolicy, CachedChatModel, ChatModel};

/// The response cache every CLI command shares (under [`mrrec_models::home`]).
pub fn llm_cache_path() -> PathBuf {
    mrrec_models::home().join("cache").join("llm.sqlite")
}

/// How to reach a server (the binary reads them from the environment, once: `MRREC_LLM_API_KEY`
/// else `OPENAI_API_KEY`, `MRREC_LLM_TIMEOUT`, `MRREC_LLM_RETRIES`); the library reads no
/// environment variable.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Bearer token, when the server needs one.
    pub api_key: Option<String>,
    /// Per-request timeout (the client's default when `None`).
    pub timeout: Option<std::time::Duration>,
    /// Retries after a 429, a 5xx or a transport failure (the client's default when `None`).
    pub retries: Option<u32>,
}

/// A local model by registry id or GGUF path (`echo` / `echo@MS`: the instant model that writes the request
/// back, for measuring everything but the LLM), or the server at `base_url`, asked for `model`
/// (the model named is the model used). The echo model with a server is an error naming both.
pub fn chat_model(
    model: &str,
    base_url: Option<&str>,
    server: &ServerOptions,
) -> Result<Box<dyn ChatModel>> {
    if let Some(echo) = mrrec_llm::EchoModel::from_id(model) {
        if let Some(url) = base_url {
            crate::error::bail!(
                "--model {model} is the instant echo model, but the server URL (--llm-url or MRREC_LLM_BASE_URL) names a server ({url}): drop one of the two"
            );
        }
        return Ok(Box::new(echo));
    }
    Ok(match base_url {
        Some(url) => {
            let mut cfg = mrrec_llm::OpenAiConfig::new(url, model);
            cfg.api_key = server.api_key.clone();
            if let Some(t) = server.timeout {
                cfg.timeout = t;
            }
            if let Some(r) = server.retries {
                cfg.max_retries = r;
            }
            Box::new(mrrec_llm::OpenAiModel::new(cfg)?)
        }
        None => {
            eprintln!("loading {model}…");
            Box::new(mrrec_llm_local::LocalModel::open(model)?)
        }
    })
}

/// A registered local model with a LoRA adapter (trained by `mrrec train`) applied beside its
/// quantised weights, never merged; the adapter's content hash joins the model id, so cached
/// answers of the base model are not replayed for it.
pub fn local_with_adapter(
    model: &str,
    adapter: Option<&std::path::Path>,
) -> Result<mrrec_llm_local::LocalModel> {
    eprintln!("loading {model}…");
    with_adapter(mrrec_llm_local::LocalModel::open(model)?, adapter)
}

/// `m` with the adapter at `adapter` applied and named (see [`local_with_adapter`]).
fn with_adapter(
    mut m: mrrec_llm_local::LocalModel,
    adapter: Option<&std::path::Path>,
) -> Result<mrrec_llm_local::LocalModel> {
    if let Some(path) = adapter {
        let ad = mrrec_llm_local::model::LoraAdapter::load(path)
            .with_context(|| format!("reading the adapter {}", path.display()))?;
        m.transformer().set_lora(Some(std::sync::Arc::new(ad)));
        let id = adapter_id(mrrec_llm::ChatModel::id(&m), path)?;
        m.set_id(id);
    }
    Ok(m)
}

/// The id of model `base` with the adapter at `path`: the adapter's content hash joins it.
fn adapter_id(base: &str, path: &std::path::Path) -> Result<String> {
    let hash = crate::workspace::files_sha256(&[path])?;
    Ok(format!("{base}+lora-{}", &hash[..12]))
}

/// [`cached_chat_model_with_adapter`], but a local model's weights are read only when it is
/// first asked something: its id (what caches and kept results are found by) is known without
/// them. A command that may find every answer it needs already kept — a resumed distillation's
/// teacher — then never loads the model. A server or the echo model is made as usual (they cost
/// nothing to make).
pub fn lazy_chat_model_with_adapter(
    model: &str,
    base_url: Option<&str>,
    server: &ServerOptions,
    adapter: Option<&std::path::Path>,
) -> Result<CachedChatModel<Box<dyn ChatModel>>> {
    if base_url.is_some() || mrrec_llm::EchoModel::from_id(model).is_some() {
        return cached_chat_model_with_adapter(model, base_url, server, adapter);
    }
    // Resolved once: the loader reads the file named here (fetched, converted and hashed now).
    let (base, file) = mrrec_llm_local::LocalModel::resolve(model)?;
    let id = match adapter {
        Some(a) => adapter_id(&base, a).with_context(|| format!("the adapter {}", a.display()))?,
        None => base.clone(),
    };
    let (model, adapter) = (model.to_string(), adapter.map(std::path::Path::to_path_buf));
    let lazy = mrrec_llm::LazyChatModel::new(
        id,
        Box::new(move || {
            eprintln!("loading {model}…");
            mrrec_llm_local::LocalModel::load(&base, &file)
                .map_err(crate::error::AgentError::from)
                .and_then(|m| with_adapter(m, adapter.as_deref()))
                .map(|m| Box::new(m) as Box<dyn ChatModel>)
                .map_err(|e| mrrec_llm::LlmError::Engine(format!("loading {model}: {e:#}")))
        }),
    );
    Ok(CachedChatModel::open(
        Box::new(lazy) as Box<dyn ChatModel>,
        &llm_cache_path(),
        CachePolicy::All,
    )?)
}

/// [`chat_model`] with an adapter, behind the shared response cache (a server takes no adapter).
pub fn cached_chat_model_with_adapter(
    model: &str,
    base_url: Option<&str>,
    server: &ServerOptions,
    adapter: Option<&std::path::Path>,
) -> Result<CachedChatModel<Box<dyn ChatModel>>> {
    let inner: Box<dyn ChatModel> = match (adapter, base_url) {
        (Some(_), Some(_)) => crate::error::bail!(
            "--adapter applies to a local model; a server (--llm-url) serves its own weights"
        ),
        (Some(a), None) => Box::new(local_with_adapter(model, Some(a))?),
        (None, _) => chat_model(model, base_url, server)?,
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
    server: &ServerOptions,
) -> Result<CachedChatModel<Box<dyn ChatModel>>> {
    Ok(CachedChatModel::open(
        chat_model(model, base_url, server)?,
        &llm_cache_path(),
        CachePolicy::All,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_named_is_the_model_used_and_echo_with_a_server_is_an_error() {
        let none = ServerOptions::default();
        let m = chat_model("my-served-model", Some("http://127.0.0.1:9/v1"), &none).unwrap();
        assert_eq!(m.id(), "openai:my-served-model@http://127.0.0.1:9/v1");
        let e = chat_model("echo", Some("http://127.0.0.1:9/v1"), &none)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--model echo") && e.contains("http://127.0.0.1:9/v1"),
            "{e}"
        );
        assert_eq!(chat_model("echo", None, &none).unwrap().id(), "echo");
    }
}
