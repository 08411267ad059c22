//! The service's limits and settings.

use crate::*;

/// Limits and defaults.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest request / query text, characters.
    pub max_text_chars: usize,
    /// Most items per answer.
    pub max_k: usize,
    /// Most interactions per `POST .../interactions`.
    pub max_interactions: usize,
    /// Requests per second per key (0: unlimited).
    pub rate_per_key: f64,
    /// Burst per key.
    pub burst: f64,
    /// Answers the LLM works on at once.
    pub llm_slots: usize,
    /// Answers that may wait for a slot; beyond, 503.
    pub llm_queue: usize,
    /// CPU jobs (embedding, ranking) at once.
    pub cpu_slots: usize,
    /// CPU jobs that may wait; beyond, 503.
    pub cpu_queue: usize,
    /// Longest wait for a slot before a 503.
    pub queue_timeout: Duration,
    /// Deadline of one answer (504 after it).
    pub answer_timeout: Duration,
    /// Decode the model calls of the answers in the LLM slots together (a [`Batcher`]: one
    /// decoding step for all of them per token) instead of letting them compete for the cores.
    /// For a local model with `llm_slots` > 1; a server batches by itself. Streamed answers then
    /// send each call's text when the call ends rather than token by token.
    pub batch_llm: bool,
    /// Failed authentications per second allowed per client address, after a burst of
    /// `auth_failure_burst` (0: unlimited); beyond, the address gets 429 until it refills.
    pub auth_failures_per_second: f64,
    /// Failed authentications an address may make at once.
    pub auth_failure_burst: f64,
    /// Connections, timeouts and shutdown.
    pub conn: ConnLimits,
    /// The assistant's settings.
    pub assistant: AssistantConfig,
}

/// How long a client may take and how many connections it may hold; what shutdown waits for.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A request's headers must arrive within this, from the connection's start or the end of
    /// the previous response (otherwise the connection is closed); this is also the idle
    /// keep-alive timeout.
    pub header_timeout: Duration,
    /// A request's body must arrive within this once its headers are in (408 otherwise).
    pub body_timeout: Duration,
    /// Open connections at once; beyond, new ones get 503 and are closed.
    pub max_connections: usize,
    /// Open connections per client address; beyond, 503 and closed.
    pub max_connections_per_client: usize,
    /// Requests in flight per API key at once; beyond, 429.
    pub max_in_flight_per_key: usize,
    /// After a shutdown signal: how long requests in flight may take to finish before every
    /// remaining connection is dropped.
    pub shutdown_grace: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_client: 256,
            max_in_flight_per_key: 64,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_body_bytes: 256 << 10,
            max_text_chars: 2000,
            max_k: 100,
            max_interactions: 1000,
            rate_per_key: 50.0,
            burst: 100.0,
            llm_slots: 1,
            llm_queue: 16,
            cpu_slots: 4,
            cpu_queue: 512,
            queue_timeout: Duration::from_secs(60),
            answer_timeout: Duration::from_secs(180),
            batch_llm: false,
            auth_failures_per_second: 1.0,
            auth_failure_burst: 20.0,
            conn: ConnLimits::default(),
            assistant: AssistantConfig::default(),
        }
    }
}
