//! Prometheus metrics in the text exposition format: request latency histograms per route,
//! requests per route and status, LLM tokens and seconds, the LLM queue, rejections.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency buckets, seconds.
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

/// The service's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    latency: Mutex<BTreeMap<String, Histogram>>,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    llm_micros: AtomicU64,
    answers: AtomicU64,
    fallbacks: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// One finished request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        lock(&self.latency)
            .entry(route.to_string())
            .or_default()
            .observe(seconds);
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// A request turned away (`rate_limited`, `queue_full`, `unauthorized`, …).
    pub fn reject(&self, reason: &'static str) {
        *lock(&self.rejected).entry(reason).or_default() += 1;
    }

    /// LLM work of one answer.
    pub fn llm(&self, usage: &mrrec_llm::Usage, fallback: bool) {
        self.prompt_tokens
            .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(usage.completion_tokens, Ordering::Relaxed);
        self.llm_micros
            .fetch_add((usage.seconds * 1e6) as u64, Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
        if fallback {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exposition text; `gauges` are (name, help, value).
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP mrrec_http_request_duration_seconds Request latency by route.\n# TYPE mrrec_http_request_duration_seconds histogram"
        );
        for (route, h) in lock(&self.latency).iter() {
            let r = escape(route);
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    s,
                    "mrrec_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                s,
                "mrrec_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}\nmrrec_http_request_duration_seconds_sum{{route=\"{r}\"}} {}\nmrrec_http_request_duration_seconds_count{{route=\"{r}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            s,
            "# HELP mrrec_http_requests_total Requests by route and status.\n# TYPE mrrec_http_requests_total counter"
        );
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                s,
                "mrrec_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            s,
            "# HELP mrrec_rejected_total Requests turned away, by reason.\n# TYPE mrrec_rejected_total counter"
        );
        for (reason, n) in lock(&self.rejected).iter() {
            let _ = writeln!(s, "mrrec_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let counters = [
            (
                "mrrec_llm_prompt_tokens_total",
                "Prompt tokens sent to the LLM.",
                self.prompt_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "mrrec_llm_completion_tokens_total",
                "Tokens the LLM generated.",
                self.completion_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "mrrec_llm_seconds_total",
                "Seconds spent in the LLM.",
                self.llm_micros.load(Ordering::Relaxed) as f64 / 1e6,
            ),
            (
                "mrrec_answers_total",
                "Assistant answers.",
                self.answers.load(Ordering::Relaxed) as f64,
            ),
            (
                "mrrec_fallbacks_total",
                "Answers that ranked the request because no profile parsed.",
                self.fallbacks.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.observe("/v1/items/search", 200, 0.003);
        m.observe("/v1/items/search", 200, 0.2);
        m.observe("/v1/items/search", 429, 0.0001);
        let t = m.render(&[("mrrec_llm_queue_depth", "Waiting.", 2.0)]);
        assert!(t.contains(
            "mrrec_http_request_duration_seconds_bucket{route=\"/v1/items/search\",le=\"0.005\"} 2"
        ));
        assert!(t.contains(
            "mrrec_http_request_duration_seconds_bucket{route=\"/v1/items/search\",le=\"+Inf\"} 3"
        ));
        assert!(
            t.contains("mrrec_http_requests_total{route=\"/v1/items/search\",status=\"429\"} 1")
        );
        assert!(t.contains("mrrec_llm_queue_depth 2"));
    }
}
