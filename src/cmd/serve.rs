//! `mrrec serve`, `mrrec serve-llm` and `mrrec keys`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::args::*;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) addr: std::net::SocketAddr,
    /// Key file (default $MRREC_HOME/keys.json; created with one key for tenant `default`,
    /// printed once, when missing).
    #[arg(long, env = "MRREC_KEYS")]
    pub(crate) keys: Option<PathBuf>,
    /// The model that writes users' patterns and profiles when they add interactions (registry
    /// id or GGUF path; with --llm-url, a model of that server); default: the assistant's.
    #[arg(long)]
    pub(crate) memory_model: Option<String>,
    /// Requests per second per key (0: unlimited).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) rate_per_key: f64,
    /// Burst per key.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) burst: f64,
    /// Answers the LLM works on at once (default 1 for a local model, 8 for a server). With a
    /// local model and more than one slot, the answers' model calls are decoded together (one
    /// batch per token).
    #[arg(long)]
    pub(crate) llm_slots: Option<usize>,
    /// Answers that may wait for the LLM; beyond, 503.
    #[arg(long, default_value_t = 16)]
    pub(crate) llm_queue: usize,
    /// Embedding/ranking jobs at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) cpu_slots: usize,
    /// Embedding/ranking jobs that may wait; beyond, 503.
    #[arg(long, default_value_t = 512)]
    pub(crate) cpu_queue: usize,
    /// Longest wait for a slot, seconds (then 503).
    #[arg(long, default_value_t = 60.0)]
    pub(crate) queue_timeout: f64,
    /// Deadline of one answer, seconds (then 504).
    #[arg(long, default_value_t = 180.0)]
    pub(crate) answer_timeout: f64,
    /// Per-request timeout of an --llm-url server, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) llm_timeout: f64,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 256 << 10)]
    pub(crate) max_body_bytes: usize,
    /// Seconds a client has to send a request's headers (from connecting, or from the end of
    /// the previous response: also the idle keep-alive timeout); then the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers are in (then 408).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) body_timeout: f64,
    /// Open connections at once (beyond: 503 and closed).
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_connections: usize,
    /// Open connections per client address (beyond: 503 and closed).
    #[arg(long, default_value_t = 256)]
    pub(crate) max_connections_per_client: usize,
    /// Requests in flight per API key (beyond: 429).
    #[arg(long, default_value_t = 64)]
    pub(crate) max_in_flight_per_key: usize,
    /// Seconds requests in flight may take to finish after SIGTERM / Ctrl-C; then the
    /// connections left are dropped and the server exits.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) shutdown_grace: f64,
    /// Failed authentications per second allowed per client address after the burst (0:
    /// unlimited); beyond, 429.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) auth_failures_per_second: f64,
    /// Failed authentications a client address may make in a burst.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) auth_failure_burst: f64,
}

#[derive(Subcommand)]
pub(crate) enum KeysAction {
    /// Create a key for a tenant: its hash goes into the key file, the key is printed once.
    New {
        /// Tenant the key acts for.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// A label for people.
        #[arg(long, default_value = "key")]
        name: String,
        /// Key file (default $MRREC_HOME/keys.json).
        #[arg(long, env = "MRREC_KEYS")]
        file: Option<PathBuf>,
    },
    /// List the keys of the key file (names and tenants; the keys themselves are not stored).
    List {
        /// Key file (default $MRREC_HOME/keys.json).
        #[arg(long, env = "MRREC_KEYS")]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct ServeLlmArgs {
    /// Local model: a registry id or the path of a qwen2 / llama GGUF file.
    #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub(crate) model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub(crate) addr: std::net::SocketAddr,
}

#[derive(Args)]
pub(crate) struct ServeCmd {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
}

pub(crate) fn run(a: ServeCmd) -> Result<()> {
    serve(a.data, a.assistant, a.serve)
}

pub(crate) fn serve_llm(a: ServeLlmArgs) -> Result<()> {
    let ServeLlmArgs { model, addr } = a;
    let m: Arc<dyn mrrec_llm::ChatModel> = Arc::new(mrrec_llm_local::LocalModel::open(&model)?);
    mrrec_server::llm::serve(m, addr)?;
    Ok(())
}

fn default_keys() -> PathBuf {
    mrrec_models::home().join("keys.json")
}

pub(crate) fn keys(action: KeysAction) -> Result<()> {
    match action {
        KeysAction::New { tenant, name, file } => {
            let path = file.unwrap_or_else(default_keys);
            let key = mrrec_server::auth::add_key(&path, &tenant, &name)?;
            eprintln!(
                "added key {name:?} for tenant {tenant:?} to {} (only its hash is stored; this is the only time it is shown):",
                path.display()
            );
            println!("{key}");
        }
        KeysAction::List { file } => {
            let path = file.unwrap_or_else(default_keys);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a key file", path.display()))?;
            mrrec_server::auth::KeyRing::load(&path)?;
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{}\ttenant {}\tsha256 {}…",
                    k["name"].as_str().unwrap_or(""),
                    k["tenant"].as_str().unwrap_or(""),
                    &k["sha256"].as_str().unwrap_or("")
                        [..12.min(k["sha256"].as_str().unwrap_or("").len())]
                );
            }
        }
    }
    Ok(())
}

fn serve(data: DataArgs, assistant: AssistantArgs, args: ServeArgs) -> Result<()> {
    let keys_path = args.keys.clone().unwrap_or_else(default_keys);
    if !keys_path.exists() {
        let key = mrrec_server::auth::add_key(&keys_path, TENANT, "first")?;
        eprintln!(
            "created {} with a key for tenant {TENANT:?} (shown only now; `mrrec keys new` makes more):\n\n    {key}\n",
            keys_path.display()
        );
    }
    let keys = mrrec_server::auth::KeyRing::load(&keys_path)?;
    if keys.is_empty() {
        bail!(
            "{} holds no keys: add one with `mrrec keys new`",
            keys_path.display()
        );
    }
    let ws = Arc::new(data.open()?);
    let echo = mrrec_llm::EchoModel::from_id(&assistant.llm.model);
    let local = assistant.llm.llm_url.is_none() && echo.is_none();
    // The instant model is never cached (it measures the service, and would fill the cache).
    // Whatever the model, forget cleans the shared response cache under $MRREC_HOME: the CLI
    // and other servers may have written the user's text there.
    let llm_cache = Some(mrrec_agent::backend::llm_cache_path());
    let llm: Arc<dyn mrrec_llm::ChatModel> = match echo {
        Some(m) if assistant.llm.llm_url.is_none() => Arc::new(m),
        _ => Arc::new(mrrec_llm::CachedChatModel::open(
            match &assistant.adapter {
                Some(a) if assistant.llm.llm_url.is_none() => Box::new(
                    mrrec_agent::backend::local_with_adapter(&assistant.llm.model, Some(a))?,
                ),
                Some(_) => bail!("--adapter applies to a local model, not --llm-url"),
                None => mrrec_agent::backend::chat_model(
                    &assistant.llm.model,
                    assistant.llm.llm_url.as_deref(),
                    &mrrec_agent::backend::ServerOptions {
                        timeout: Some(std::time::Duration::from_secs_f64(args.llm_timeout)),
                        ..server_options()?.clone()
                    },
                )?,
            },
            &mrrec_agent::backend::llm_cache_path(),
            mrrec_llm::CachePolicy::All,
        )?),
    };
    let store: Arc<dyn mrrec_memory::MemoryWrite + Send + Sync> =
        Arc::from(open_store(&ws, assistant.store.clone())?);
    let cfg = mrrec_server::ServiceConfig {
        max_body_bytes: args.max_body_bytes,
        rate_per_key: args.rate_per_key,
        burst: args.burst,
        llm_slots: args.llm_slots.unwrap_or(if local { 1 } else { 8 }),
        llm_queue: args.llm_queue,
        cpu_slots: args.cpu_slots,
        cpu_queue: args.cpu_queue,
        queue_timeout: std::time::Duration::from_secs_f64(args.queue_timeout),
        answer_timeout: std::time::Duration::from_secs_f64(args.answer_timeout),
        batch_llm: local,
        auth_failures_per_second: args.auth_failures_per_second,
        auth_failure_burst: args.auth_failure_burst,
        conn: mrrec_server::ConnLimits {
            header_timeout: secs("--header-timeout", args.header_timeout)?,
            body_timeout: secs("--body-timeout", args.body_timeout)?,
            max_connections: args.max_connections.max(1),
            max_connections_per_client: args.max_connections_per_client.max(1),
            max_in_flight_per_key: args.max_in_flight_per_key.max(1),
            shutdown_grace: secs("--shutdown-grace", args.shutdown_grace)?,
        },
        assistant: assistant.config()?,
        ..Default::default()
    };
    let memory: Option<Arc<dyn mrrec_llm::ChatModel>> = match &args.memory_model {
        Some(m) if *m != assistant.llm.model => {
            Some(Arc::new(mrrec_agent::backend::cached_chat_model(
                m,
                assistant.llm.llm_url.as_deref(),
                server_options()?,
            )?))
        }
        _ => None,
    };
    let models = mrrec_server::Models {
        assistant: llm,
        memory,
    };
    let svc = mrrec_server::Service::new(ws, store, models, llm_cache, keys, cfg);
    // Clients that own a runtime (PostgreSQL, the OpenAI client) must not be dropped inside one:
    // the last reference to the service is released here, after the runtime has stopped.
    let keep = svc.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        eprintln!(
            "mrrec serving {} items with {} on http://{} (web page at /, API at /openapi.json; {} keys from {})",
            svc.ws.catalogue().len(),
            svc.llm.id(),
            listener.local_addr()?,
            svc.keys.len(),
            keys_path.display()
        );
        mrrec_server::serve(listener, svc, mrrec_server::shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Work a dropped connection left on the blocking pool (an answer being cancelled) gets a
    // moment to end; the process does not wait for it beyond that.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(keep);
    eprintln!("stopped");
    Ok(())
}
