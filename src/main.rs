//! The `mrrec` command line: a thin shell over the library crates. Each command group lives in
//! its own module under `cmd/`; arguments shared by several are in `args`.

mod args;
mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

use args::{DataArgs, EvalArgs};

#[derive(Parser)]
#[command(
    name = "mrrec",
    version,
    about = "MR.Rec: a recommendation assistant with hierarchical memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List or fetch models (the embedder now; chat LLMs as they land).
    Models {
        #[command(subcommand)]
        action: cmd::data::ModelsAction,
    },
    /// Read a data directory and report what was accepted and skipped.
    Check(DataArgs),
    /// Build (or reuse) the item indexes of a data directory.
    Index(DataArgs),
    /// Rank the catalogue for one request and print the top items.
    Search(cmd::data::SearchArgs),
    /// Evaluate a method on the queries of a data directory.
    Eval(EvalArgs),
    /// Ask the assistant for a user: it reasons, fetches memories, writes the ideal item profile
    /// and ranks the catalogue with it; prints the trace.
    Recommend(cmd::recommend::RecommendArgs),
    /// One Markdown report across finished runs: the paper's table with intervals, paired
    /// significance of the best method, costs, trace health, per category, and a bar chart.
    Report(cmd::data::ReportArgs),
    /// Compare two finished runs on their shared queries (paired bootstrap).
    Compare(cmd::data::CompareArgs),
    /// A finished re-ranked run (`eval --rerank N`) at other fusion weights, from the judge's
    /// scores in its trace: no model asked; `--out` writes it as a run folder.
    Reweigh(cmd::data::ReweighArgs),
    /// Chat with a model from the terminal (streams tokens).
    Chat(cmd::recommend::ChatArgs),
    /// Build, inspect and erase users' local memory.
    Memory {
        #[command(subcommand)]
        action: cmd::memory::MemoryAction,
    },
    /// Serve a local model as an OpenAI-compatible API (POST /v1/chat/completions).
    ServeLlm(cmd::serve::ServeLlmArgs),
    /// Serve the assistant over HTTP: recommend (JSON or streamed), memory, item search, the
    /// GRPO tool and reward endpoints, metrics, OpenAPI and a web page (see ARCHITECTURE.md).
    Serve(cmd::serve::ServeCmd),
    /// Train the assistant's policy with GRPO on `train` queries (LoRA on a local model);
    /// resumable: rerun the same command after an interruption.
    Train(cmd::train::TrainCmd),
    /// Sample G trajectories per `train` query with a local model (token ids, log-probabilities,
    /// text) or a server (`--llm-url`: text only, e.g. a teacher to distil), score them with the
    /// training rewards and write them as JSONL; resumable.
    Rollouts(cmd::train::RolloutsCmd),
    /// More `train` requests from the `train` users' earlier purchases: each review rated 4+
    /// with history before it becomes a request (written by the model from the review), asked
    /// by the user as they were then — a snapshot whose history ends before the purchase —,
    /// written as a new data directory for `memory build`, `rollouts`, `train` and `iterate`.
    /// With `--split val`: the same from the `val` users' purchases, a larger evaluation set.
    DeriveQueries(cmd::train::DeriveQueriesCmd),
    /// Expert iteration in one command: rounds of rollouts with the current adapter, selection
    /// of the samples that beat its greedy answers, and fine-tuning from it; resumable.
    Iterate(cmd::train::IterateCmd),
    /// The re-ranking judge distilled from a stronger model in one command: the teacher writes
    /// more `train` requests (`derive-queries`) and scores each one's hybrid top N, the student
    /// learns those scores as lists (`train --judge --judge-listwise`); the adapter is
    /// `OUT/adapter.safetensors` (`--rerank N --adapter` uses it). Resumable.
    DistilJudge(cmd::judge::DistilJudgeCmd),
    /// Manage the service's API keys (stored hashed).
    Keys {
        #[command(subcommand)]
        action: cmd::serve::KeysAction,
    },
    /// Measure embedding, search and BM25 speed; prints JSON (see BENCHMARKS.md).
    Bench(cmd::bench::BenchArgs),
    /// The main job: fetch the embedder, build the indexes, answer an example request and print
    /// the evaluation of the query-only baselines on both query fields.
    Demo(cmd::demo::DemoArgs),
}

/// glibc's malloc, tuned for the model's large temporaries (unless the `MALLOC_*` variables
/// say otherwise):
/// - at most two arenas: with the default of 8 per core, the threads of batched rollouts and
///   validation each kept freed training buffers in their own arena — a SmolLM2 training
///   process peaked at 14.2 GB, 4.9 GB with two arenas;
/// - blocks up to 256 MiB from the heap, not from `mmap`, and up to 512 MiB of freed memory kept:
///   by default every activation of a prefill (a 1,000-token prompt's MLP rows are 36 MB) was a
///   fresh mapping, faulted in and zeroed page by page, then unmapped — Qwen 0.5B prefilled at
///   320–335 tokens/s that way and at 415–480 with the heap reused (BENCHMARKS.md).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |v: &str| std::env::var_os(v).is_none();
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe {
            if unset("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if unset("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            }
            if unset("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            }
        }
    }
}

/// The process-wide settings the library crates take from the environment, read here once
/// (the README's table lists the variables): cache home and model fetching, the local engine's
/// switches, the crash tests' failpoint. Per-command variables (`MRREC_DATA`, `MRREC_LLM_*`…) are
/// clap defaults and `args::server_options`.
fn read_environment() -> Result<()> {
    mrrec_models::configure(mrrec_models::Settings::from_env())
        .map_err(|s| anyhow::anyhow!("model settings were fixed before main: {s:?}"))?;
    mrrec_llm_local::configure(mrrec_llm_local::Switches::from_env())
        .map_err(|s| anyhow::anyhow!("engine switches were fixed before main: {s:?}"))?;
    let failpoint = match std::env::var("MRREC_FAILPOINT") {
        Ok(v) => Some(
            v.parse()
                .map_err(|_| anyhow::anyhow!("MRREC_FAILPOINT={v:?} is not a write count"))?,
        ),
        Err(_) => None,
    };
    mrrec_agent::memory::set_failpoint(failpoint);
    Ok(())
}

fn main() -> Result<()> {
    tune_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MRREC_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    read_environment()?;
    match Cli::parse().command {
        Command::Models { action } => cmd::data::models(action),
        Command::Check(data) => cmd::data::check(data),
        Command::Index(data) => cmd::data::index(data),
        Command::Search(a) => cmd::data::search(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Recommend(a) => cmd::recommend::run(a),
        Command::Report(a) => cmd::data::report(a),
        Command::Compare(a) => cmd::data::compare(a),
        Command::Reweigh(a) => cmd::data::reweigh(a),
        Command::Chat(a) => cmd::recommend::chat(a),
        Command::Memory { action } => cmd::memory::memory(action),
        Command::ServeLlm(a) => cmd::serve::serve_llm(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Rollouts(a) => cmd::train::rollouts(a),
        Command::DeriveQueries(a) => cmd::train::derive_queries(a),
        Command::Iterate(a) => cmd::train::iterate(a),
        Command::DistilJudge(a) => cmd::judge::run(a),
        Command::Keys { action } => cmd::serve::keys(action),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Demo(a) => cmd::demo::run(a),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
