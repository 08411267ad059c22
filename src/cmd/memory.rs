//! `mrrec memory`: build, add, show, retrieve, forget, stats.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use mrrec_agent::memory::{BuildReport, MemoryBuilder};

use crate::args::*;

/// A level `memory build` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BuildLevel {
    /// Raw interactions (no LLM).
    #[value(alias = "record")]
    Records,
    /// Per-category preference summaries (LLM).
    #[value(alias = "pattern")]
    Patterns,
    /// The user profile (LLM).
    #[value(alias = "profiles")]
    Profile,
    /// Cross-user aspects per category (LLM, from train/aspect queries).
    Global,
}

#[derive(Subcommand)]
pub(crate) enum MemoryAction {
    /// Build memory for every user with a history: idempotent and resumable (kill it and rerun).
    Build {
        #[command(flatten)]
        data: DataArgs,
        /// Store: a SQLite file (default: under $MRREC_HOME/memory, one per catalogue) or a
        /// postgres:// URL.
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// Only the first N users (sorted by id).
        #[arg(long)]
        users: Option<usize>,
        /// Only users who have a query in these splits (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',')]
        for_split: Option<Vec<SplitArg>>,
        /// Only these users (comma-separated ids).
        #[arg(long)]
        only: Option<String>,
        /// Levels to build (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "records")]
        levels: Vec<BuildLevel>,
        #[command(flatten)]
        llm: LlmArgs,
        /// Only the first N train/aspect queries for global memory.
        #[arg(long)]
        global_queries: Option<usize>,
        /// Hard negatives per query in global-memory step A (3–5).
        #[arg(long, default_value_t = 4)]
        negatives: usize,
    },
    /// Add new interactions of one user (JSONL, Amazon Reviews 2023 rows) and rewrite only the
    /// affected patterns and profile.
    Add {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// The user.
        user: String,
        /// JSONL file of reviews (rating, title, text, parent_asin, timestamp).
        file: PathBuf,
        /// Only store the records and mark the summaries stale (no LLM now).
        #[arg(long)]
        no_llm: bool,
        #[command(flatten)]
        llm: LlmArgs,
    },
    /// Print a user's entries.
    Show {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// The user.
        user: String,
    },
    /// The user's entries most similar to a text.
    Retrieve {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// The user.
        user: String,
        /// What to look for.
        text: String,
        /// How many entries.
        #[arg(short, default_value_t = 3)]
        k: usize,
        /// Levels to search (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "records,patterns,profile"
        )]
        levels: Vec<LevelArg>,
    },
    /// Global aspects of a category (all, or the n nearest to a text).
    Global {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// The category (scenario), e.g. Books.
        category: String,
        /// Rank by similarity to this text.
        text: Option<String>,
        #[arg(short, default_value_t = 5)]
        n: usize,
    },
    /// Remove every trace of a user: store, embedding cache, LLM response cache, global aspects.
    Forget {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// The user.
        user: String,
        /// Succeed when the user has no memory (for scripts); by default that is an error.
        #[arg(long)]
        missing_ok: bool,
    },
    /// Entries per level, users, global aspects, store size.
    Stats {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

/// Which training queries global memory is built from.
pub(crate) struct GlobalQueries {
    /// The first N (all when `None`).
    pub(crate) first: Option<usize>,
    /// Hard negatives per query in step A (clamped to 1–8).
    pub(crate) negatives: usize,
}

/// Builds `levels` of `users`' memory in order — records (which the summaries read), patterns,
/// profiles, global aspects (step A, then the merge) — each phase timed on standard error.
pub(crate) fn build_levels(
    b: &MemoryBuilder<'_>,
    ws: &mrrec_agent::Workspace,
    users: &[&str],
    levels: &[BuildLevel],
    global: GlobalQueries,
) -> Result<BuildReport> {
    let has = |l: BuildLevel| levels.contains(&l);
    let t0 = std::time::Instant::now();
    let mut report = BuildReport::default();
    let phase = |what: String, t: std::time::Instant, report: &BuildReport| {
        eprintln!(
            "memory: {what} in {:.0}s (LLM so far: {} tokens in, {} out)",
            t.elapsed().as_secs_f64(),
            report.usage.prompt_tokens,
            report.usage.completion_tokens
        );
    };
    if has(BuildLevel::Records) || has(BuildLevel::Patterns) || has(BuildLevel::Profile) {
        let t = std::time::Instant::now();
        b.build_records(users, &mut report)?;
        let n = report.records_added;
        phase(
            format!("records of {} users (+{n})", users.len()),
            t,
            &report,
        );
    }
    if has(BuildLevel::Patterns) {
        let t = std::time::Instant::now();
        b.build_patterns(users, &mut report)?;
        let n = report.patterns_written;
        phase(format!("{n} preference patterns"), t, &report);
    }
    if has(BuildLevel::Profile) {
        let t = std::time::Instant::now();
        b.build_profiles(users, &mut report)?;
        phase(format!("{} profiles", report.profiles_written), t, &report);
    }
    if has(BuildLevel::Global) && global.first != Some(0) {
        let t = std::time::Instant::now();
        let qs = ws
            .dataset
            .queries
            .for_purpose(&mrrec_data::Purpose::GlobalMemory)?;
        let qs = &qs[..global.first.unwrap_or(qs.len()).min(qs.len())];
        b.build_global_aspects(qs, global.negatives.clamp(1, 8), &mut report)?;
        b.merge_global(Default::default(), &mut report)?;
        phase(
            format!("global aspects of {} training queries", qs.len()),
            t,
            &report,
        );
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

pub(crate) fn memory(action: MemoryAction) -> Result<()> {
    use mrrec_embed::TextEmbedder;
    use mrrec_memory::Owner;
    match action {
        MemoryAction::Build {
            data,
            store,
            tenant,
            users,
            for_split,
            only,
            levels,
            llm,
            global_queries,
            negatives,
        } => {
            let tenant = tenant.tenant.as_str();
            let has = |l: BuildLevel| levels.contains(&l);
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let needs_llm =
                has(BuildLevel::Patterns) || has(BuildLevel::Profile) || has(BuildLevel::Global);
            let model = if needs_llm {
                Some(mrrec_agent::backend::cached_chat_model(
                    &llm.model,
                    llm.llm_url.as_deref(),
                    server_options()?,
                )?)
            } else {
                None
            };
            let b = MemoryBuilder {
                llm: model.as_ref().map(|m| m as &dyn mrrec_llm::ChatModel),
                batch: llm.batch,
                progress: true,
                ..MemoryBuilder::new(&ws, &*st, tenant)
            };
            let mut ids = ws.dataset.histories.user_ids();
            if let Some(sp) = &for_split {
                let splits = splits(sp);
                let askers: std::collections::HashSet<&str> = ws
                    .dataset
                    .queries
                    .all()
                    .iter()
                    .filter(|q| q.query().split.is_some_and(|s| splits.contains(&s)))
                    .map(|q| q.query().user_id.as_str())
                    .collect();
                ids.retain(|u| askers.contains(u));
            }
            if let Some(only) = &only {
                let keep: std::collections::HashSet<&str> =
                    only.split(',').map(str::trim).collect();
                ids.retain(|u| keep.contains(u));
            }
            let ids = &ids[..users.unwrap_or(ids.len()).min(ids.len())];
            let report = build_levels(
                &b,
                &ws,
                ids,
                &levels,
                GlobalQueries {
                    first: global_queries,
                    negatives,
                },
            )?;
            st.add_cost(tenant, &report.cost())?;
            if report.faithful.1 > 0 {
                println!(
                    "faithfulness: {} of {} named attributes and numbers in the summaries appear in the user's records ({:.0}%); {} unfaithful segments dropped",
                    report.faithful.0,
                    report.faithful.1,
                    100.0 * report.faithfulness(),
                    report.unfaithful_segments_dropped
                );
            }
            println!(
                "{}; prompts {} / {}",
                report.summary(if needs_llm { &llm.model } else { "none" }),
                mrrec_agent::prompts::MEMORY_PROMPT_VERSION,
                mrrec_agent::prompts::GLOBAL_PROMPT_VERSION
            );
        }
        MemoryAction::Add {
            data,
            store,
            tenant,
            user,
            file,
            no_llm,
            llm,
        } => {
            let tenant = tenant.tenant.as_str();
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let reviews = mrrec_agent::memory::read_reviews(&file, &user)?;
            let model = if no_llm {
                None
            } else {
                Some(mrrec_agent::backend::cached_chat_model(
                    &llm.model,
                    llm.llm_url.as_deref(),
                    server_options()?,
                )?)
            };
            let b = MemoryBuilder {
                llm: model.as_ref().map(|m| m as &dyn mrrec_llm::ChatModel),
                batch: llm.batch,
                progress: true,
                ..MemoryBuilder::new(&ws, &*st, tenant)
            };
            let n = b.add_reviews(&user, &reviews)?;
            let mut report = BuildReport::default();
            if model.is_some() {
                b.build_patterns(&[&user], &mut report)?;
                b.build_profiles(&[&user], &mut report)?;
                st.add_cost(tenant, &report.cost())?;
            }
            println!(
                "{user}: {} new records, {} updated (same item and moment, new text), {} already stored; {} patterns and {} profiles rewritten; LLM {} tokens in, {} out, {:.1}s",
                n.added,
                n.updated,
                reviews.len() - n.changed(),
                report.patterns_written,
                report.profiles_written,
                report.usage.prompt_tokens,
                report.usage.completion_tokens,
                report.usage.seconds
            );
        }
        MemoryAction::Show {
            data,
            store,
            tenant,
            user,
        } => {
            let tenant = tenant.tenant.as_str();
            let st = store_only(&data, store)?;
            let es = st.entries(Owner {
                tenant,
                user: &user,
            })?;
            if es.is_empty() {
                bail!(
                    "no memory for user {user:?} (run `mrrec memory build` first, or check the id)"
                );
            }
            for e in es {
                println!(
                    "[{}] {:<8} {:<22} {}",
                    e.id,
                    e.level.as_str(),
                    e.category.as_deref().unwrap_or("-"),
                    e.text
                );
            }
            let mine: Vec<String> = st
                .stale(tenant, None)?
                .iter()
                .filter(|m| m.user() == Some(user.as_str()))
                .map(|m| m.key())
                .collect();
            if !mine.is_empty() {
                println!("stale (rewritten by the next build): {mine:?}");
            }
        }
        MemoryAction::Retrieve {
            data,
            store,
            tenant,
            user,
            text,
            k,
            levels,
        } => {
            let tenant = tenant.tenant.as_str();
            let levels: Vec<mrrec_memory::Level> = levels.into_iter().map(Into::into).collect();
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let q = ws.embedder.embed(&[text.as_str()])?.remove(0);
            let t = std::time::Instant::now();
            let hits = st.retrieve(
                Owner {
                    tenant,
                    user: &user,
                },
                &q,
                k,
                &levels,
            )?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if hits.is_empty() {
                bail!("no memory for user {user:?}");
            }
            for h in hits {
                println!("{:.3} [{}] {}", h.score, h.entry.id, h.entry.text);
            }
            eprintln!("retrieved in {ms:.2} ms");
        }
        MemoryAction::Global {
            data,
            store,
            tenant,
            category,
            text,
            n,
        } => {
            let tenant = tenant.tenant.as_str();
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let all = st.global_aspects(tenant, Some(&category))?;
            if all.is_empty() {
                bail!("no global aspects for category {category:?} (run `mrrec memory build --levels global`)");
            }
            let shown: Vec<(mrrec_memory::GlobalAspect, Option<f32>)> = match text {
                Some(t) => {
                    let q = ws.embedder.embed(&[t.as_str()])?.remove(0);
                    st.global(tenant, &category, &q, n, 1)?
                        .into_iter()
                        .map(|(a, s)| (a, Some(s)))
                        .collect()
                }
                None => all.into_iter().map(|a| (a, None)).collect(),
            };
            for (a, s) in shown {
                println!(
                    "{}[{}] {} ({} queries)",
                    s.map(|s| format!("{s:.3} ")).unwrap_or_default(),
                    a.id,
                    a.text(),
                    a.queries.len()
                );
            }
        }
        MemoryAction::Forget {
            data,
            store,
            tenant,
            user,
            missing_ok,
        } => {
            let tenant = tenant.tenant.as_str();
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let b = MemoryBuilder::new(&ws, &*st, tenant);
            if !missing_ok
                && !st.has_entries(mrrec_memory::Owner {
                    tenant,
                    user: &user,
                })?
            {
                bail!(
                    "user {user:?} has no memory in tenant {tenant:?} of this store: nothing to forget (a mistyped id? --missing-ok accepts this)"
                );
            }
            let r = b.forget(&user, Some(&mrrec_agent::backend::llm_cache_path()))?;
            println!(
                "forgot {user}: {} entries, {} step-A results, {} global aspects (their categories will be merged again), {} cached embeddings, {} cached LLM exchanges",
                r.store.entries,
                r.store.query_aspects,
                r.store.global_aspects,
                r.embeddings,
                r.llm_responses
            );
        }
        MemoryAction::Stats {
            data,
            store,
            tenant,
        } => {
            let tenant = tenant.tenant.as_str();
            let st = store_only(&data, store)?;
            println!("{}", serde_json::to_string_pretty(&st.stats(tenant)?)?);
        }
    }
    Ok(())
}
