//! Evaluation: metrics exactly as MR.Rec scores rankings, user-level bootstrap intervals, paired
//! comparisons, and resumable evaluation runs of any [`Method`] with their reports and plots.

pub mod metrics;
pub mod report;
pub mod run;
pub mod stats;

pub use metrics::{ndcg_at, rank_of, recall_at, reciprocal_rank, Metric};
pub use report::{
    bar_chart_svg, category_table, compare_run_sets, compare_runs, compare_runs_by, history_bucket,
    load_runs, markdown_table, recall_curve_svg, report_runs, trace_rates, TraceRates,
    HISTORY_BUCKETS,
};
pub use run::{
    load_run, run_eval, save_run, select_queries, summarise, Method, MethodAnswer, MethodError,
    QueryOutcome, RunMetrics, RunSpec, Usage,
};
pub use stats::{bootstrap, paired, Estimate, PairedComparison};

/// Errors of evaluation runs.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A filesystem error, with the path.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A run folder's files are not what a run writes.
    #[error("{path}: {message}")]
    BadRun {
        path: std::path::PathBuf,
        message: String,
    },
    /// The method failed on a batch of queries.
    #[error("method {method} failed on query {qid}: {message}")]
    Method {
        method: String,
        qid: String,
        message: String,
    },
    /// The queries asked for are not allowed or not there.
    #[error("{0}")]
    Queries(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
