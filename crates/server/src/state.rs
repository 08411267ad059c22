//! The service's state: the workspace, the memory store, the model behind its gates (bounded
//! slots and queues for LLM and CPU work), the key ring, and the caller extracted from a request;
//! the checks every body goes through.

use crate::*;

/// A fixed number of slots and a bounded queue in front of them.
pub(crate) struct Gate {
    pub(crate) what: &'static str,
    pub(crate) slots: usize,
    pub(crate) sem: Arc<Semaphore>,
    pub(crate) waiting: AtomicUsize,
    pub(crate) queue: usize,
    pub(crate) wait: Duration,
}

pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    pub(crate) fn new(what: &'static str, slots: usize, queue: usize, wait: Duration) -> Self {
        let slots = slots.max(1);
        Gate {
            what,
            slots,
            sem: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            queue,
            wait,
        }
    }

    pub(crate) fn busy(&self, why: String) -> ApiError {
        ApiError {
            retry_after: Some(self.wait.as_secs().clamp(1, 5)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", why)
        }
    }

    pub(crate) async fn enter(&self, metrics: &Metrics) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _w = Waiting(&self.waiting);
        if ahead >= self.queue {
            metrics.reject("queue_full");
            return Err(self.busy(format!(
                "{} work is at capacity ({} running, {} waiting); retry later",
                self.what, self.slots, self.queue
            )));
        }
        match tokio::time::timeout(self.wait, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(self.busy("the service is shutting down".into())),
            Err(_) => {
                metrics.reject("queue_timeout");
                Err(self.busy(format!(
                    "waited {:?} for a {} slot; retry later",
                    self.wait, self.what
                )))
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.slots - self.sem.available_permits()
    }
}

/// The service's state: one workspace, one store, one chat model, the keys and the limits.
pub struct Service {
    /// Catalogue, embedder, indexes.
    pub ws: Arc<Workspace>,
    /// Memory of every tenant.
    pub store: Arc<dyn MemoryWrite + Send + Sync>,
    /// The chat model.
    pub llm: Arc<dyn ChatModel>,
    /// The model that writes memory (patterns, profiles) when users add interactions: the
    /// assistant's unless another was chosen (`--memory-model`).
    pub memory_llm: Arc<dyn ChatModel>,
    /// The LLM response cache that forget cleans (the shared one under `$MRREC_HOME`, whatever
    /// model this service runs: other processes may have written the user's text there).
    pub llm_cache: Option<PathBuf>,
    /// Valid keys.
    pub keys: KeyRing,
    /// Limits.
    pub cfg: ServiceConfig,
    /// Counters.
    pub metrics: Metrics,
    pub(crate) limiter: RateLimiter,
    pub(crate) auth_failures: RateLimiter,
    pub(crate) key_in_flight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    pub(crate) llm_gate: Gate,
    pub(crate) cpu_gate: Gate,
    /// With `batch_llm` and several slots: the answers' model calls, decoded together.
    pub(crate) batcher: Option<Batcher<'static>>,
    pub(crate) workers: AtomicUsize,
}

/// The re-ranking stage's outcome ([`Service::rerank`]).
pub(crate) struct Reranked {
    /// The first `k` items, re-ordered, with their method's scores.
    pub(crate) items: Vec<(u32, f32)>,
    /// The judged ids and scores, depth, weight, memory, judge, cost (the response's `rerank`).
    pub(crate) stage: Value,
    /// The judge's cost.
    pub(crate) usage: mrrec_llm::Usage,
}

/// The service's chat models: the assistant's, and the one that writes memory.
pub struct Models {
    /// Answers requests.
    pub assistant: Arc<dyn ChatModel>,
    /// Writes patterns and profiles (`None`: the assistant's).
    pub memory: Option<Arc<dyn ChatModel>>,
}

impl From<Arc<dyn ChatModel>> for Models {
    /// One model for both roles.
    fn from(assistant: Arc<dyn ChatModel>) -> Self {
        Models {
            assistant,
            memory: None,
        }
    }
}

impl Service {
    /// The service over these parts.
    pub fn new(
        ws: Arc<Workspace>,
        store: Arc<dyn MemoryWrite + Send + Sync>,
        models: Models,
        llm_cache: Option<PathBuf>,
        keys: KeyRing,
        cfg: ServiceConfig,
    ) -> Arc<Self> {
        let llm = models.assistant;
        let memory_llm = models.memory.unwrap_or_else(|| llm.clone());
        Arc::new(Service {
            limiter: RateLimiter::new(cfg.rate_per_key, cfg.burst),
            auth_failures: RateLimiter::new(cfg.auth_failures_per_second, cfg.auth_failure_burst),
            key_in_flight: Default::default(),
            llm_gate: Gate::new("LLM", cfg.llm_slots, cfg.llm_queue, cfg.queue_timeout),
            cpu_gate: Gate::new("CPU", cfg.cpu_slots, cfg.cpu_queue, cfg.queue_timeout),
            batcher: (cfg.batch_llm && cfg.llm_slots > 1).then(|| Batcher::shared(llm.clone())),
            workers: AtomicUsize::new(0),
            ws,
            store,
            llm,
            memory_llm,
            llm_cache,
            keys,
            cfg,
            metrics: Metrics::default(),
        })
    }

    /// Answers on the calling (blocking) thread: every model call carries `cancel`, and goes
    /// through a worker of the batcher (registered for the answer's lifetime) when the service
    /// batches. A cancelled answer is counted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn answer(
        &self,
        tenant: &str,
        cfg: AssistantConfig,
        observer: Option<&(dyn Fn(&Event) + Sync)>,
        cancel: Cancel,
        user: &str,
        request: &str,
        category: Option<&str>,
        k: usize,
    ) -> mrrec_agent::Result<Answer> {
        self.with_model(cancel, |llm| {
            let mut a = self.assistant(tenant, cfg, observer);
            a.llm = llm;
            a.answer(user, request, category, k)
        })
    }

    /// Runs `f` with the service's model as this answer sees it: through a worker of the
    /// batcher (registered for the call's lifetime) when the service batches, every call
    /// carrying `cancel`. A cancelled answer is counted.
    fn with_model<T>(
        &self,
        cancel: Cancel,
        f: impl FnOnce(&dyn ChatModel) -> mrrec_agent::Result<T>,
    ) -> mrrec_agent::Result<T> {
        let worker = self
            .batcher
            .as_ref()
            .map(|b| b.worker(self.workers.fetch_add(1, Ordering::Relaxed)));
        let model: &dyn ChatModel = match &worker {
            Some(w) => w,
            None => &*self.llm,
        };
        let llm = Cancellable::new(model, cancel);
        let r = f(&llm);
        if r.as_ref().is_err_and(AgentError::is_cancelled) {
            self.metrics.reject("cancelled");
        }
        r
    }

    /// The re-ranking stage on the calling (blocking) thread: the service's model judges the
    /// first `p.depth` of `items` against the request (and the user's stored profile with
    /// `JudgeMemory::Profile`, read in `tenant` only), and they are re-ordered by the fusion of
    /// the two orders ([`mrrec_agent::rerank::fuse_judged`]); each item keeps its method's score.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rerank(
        &self,
        tenant: &str,
        user: &str,
        request: &str,
        category: Option<&str>,
        items: &[(u32, f32)],
        p: mrrec_agent::rerank::RerankParams,
        cancel: Cancel,
        k: usize,
    ) -> mrrec_agent::Result<Reranked> {
        use mrrec_agent::rerank::{judge_ranking, stored_profile, JudgeMemory};
        let memory = match p.memory {
            JudgeMemory::Profile => stored_profile(&*self.store, tenant, user)?,
            // `parse_recommend` refuses `recent` (the data's histories, not the service's users).
            JudgeMemory::None | JudgeMemory::Recent => None,
        };
        let ranking: Vec<u32> = items.iter().map(|&(i, _)| i).collect();
        let j = self.with_model(cancel, |llm| {
            judge_ranking(
                llm,
                self.ws.catalogue(),
                request,
                category,
                memory.as_deref(),
                &ranking,
                p,
            )
        })?;
        let score_of: std::collections::HashMap<u32, f32> = items.iter().copied().collect();
        let out: Vec<(u32, f32)> = j
            .ranking
            .iter()
            .take(k)
            .map(|&i| (i, score_of.get(&i).copied().unwrap_or(f32::NAN)))
            .collect();
        let stage = json!({
            "depth": j.ids.len(),
            "weight": p.weight,
            "memory": p.memory.name(),
            "judge": self.llm.id(),
            "items": j.ids,
            "scores": j.scores,
            "prompt_tokens": j.usage.prompt_tokens,
            "llm_ms": j.usage.seconds * 1e3,
        });
        let usage = j.usage;
        Ok(Reranked {
            items: out,
            stage,
            usage,
        })
    }

    pub(crate) fn assistant<'a>(
        &'a self,
        tenant: &'a str,
        cfg: AssistantConfig,
        observer: Option<&'a (dyn Fn(&Event) + Sync)>,
    ) -> Assistant<'a> {
        Assistant {
            shop: self.ws.shop(),
            store: &*self.store,
            tenant,
            llm: &*self.llm,
            cfg,
            observer,
        }
    }

    pub(crate) fn builder<'a>(
        &'a self,
        tenant: &'a str,
        llm: bool,
    ) -> mrrec_agent::memory::MemoryBuilder<'a> {
        mrrec_agent::memory::MemoryBuilder {
            llm: if llm { Some(&*self.memory_llm) } else { None },
            batch: 4,
            ..mrrec_agent::memory::MemoryBuilder::new(&self.ws, &*self.store, tenant)
        }
    }

    /// Runs CPU work (embedding, ranking, store reads) on the blocking pool behind the CPU gate.
    pub(crate) async fn cpu<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Service) -> mrrec_agent::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.cpu_gate.enter(&self.metrics).await?;
        let svc = self.clone();
        match tokio::task::spawn_blocking(move || {
            let _p = permit;
            f(&svc)
        })
        .await
        {
            Ok(r) => r.map_err(ApiError::internal),
            Err(e) => Err(ApiError::worker(e)),
        }
    }
}

/// The caller, authenticated and within its rate.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        svc: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        // Failed authentications are limited per client address: once its bucket is empty, an
        // address is refused (429) before any key is checked, until the bucket refills.
        let client = client_addr(parts);
        if let Some(wait) = svc.auth_failures.empty(&client) {
            svc.metrics.reject("auth_rate_limited");
            return Err(ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "auth_rate_limited",
                "too many failed authentications from this address",
                wait,
            ));
        }
        let fail = |status: StatusCode, code: &'static str, message: String| {
            svc.metrics.reject(code);
            let _ = svc.auth_failures.take(&client);
            ApiError::new(status, code, message)
        };
        let values = |name: header::HeaderName| -> Vec<&[u8]> {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        };
        let key = match auth::presented_key(
            &values(header::AUTHORIZATION),
            &values(header::HeaderName::from_static("x-api-key")),
        ) {
            Ok(k) => k,
            Err(e @ auth::CredentialError::Conflict(_)) => {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "bad_credentials",
                    e.to_string(),
                ))
            }
            Err(e) => {
                return Err(fail(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    e.to_string(),
                ))
            }
        };
        let Some(key) = key else {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required (Authorization: Bearer KEY or X-API-Key: KEY)".into(),
            ));
        };
        let key = key.as_str();
        let Some(p) = svc.keys.check(key) else {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API key is not valid".into(),
            ));
        };
        if let Err(wait) = svc.limiter.take(&auth::hash_key(key)) {
            svc.metrics.reject("rate_limited");
            return Err(ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests per second with this key",
                    svc.cfg.rate_per_key
                ),
                wait,
            ));
        }
        Ok(Caller(p.clone()))
    }
}

/// The client's IP address as the connection gave it (`unknown` when the app is served
/// without connection info).
pub(crate) fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            },
            e.body_text(),
        )
    })
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("{what}: {e}")))
}

pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.trim().is_empty() {
        return Err(ApiError::bad(format!("`{what}` is empty")));
    }
    if !auth::has_visible(s) {
        return Err(ApiError::bad(format!("`{what}` has no visible character")));
    }
    let n = s.chars().count();
    if n > max {
        return Err(ApiError::bad(format!(
            "`{what}` has {n} characters; at most {max}"
        )));
    }
    Ok(())
}

pub(crate) fn check_user(user: &str) -> Result<(), ApiError> {
    check_id("user", user).map_err(ApiError::bad)
}
