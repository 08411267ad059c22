//! Building and maintaining memory: behaviour records, LLM-written preference patterns and
//! profiles, cross-user global aspects, incremental updates and complete forgetting.
//!
//! Every step is idempotent and resumable. Records are written per user in one transaction
//! together with the build-state marks they cause (`pattern:{user}:{category}`,
//! `profile:{user}`); a pattern or profile is rewritten in one transaction that also clears its
//! mark. Killing a build at any point and rerunning it therefore finishes the same store with no
//! duplicate and nothing lost; LLM answers already paid for come back from the response cache.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::error::{bail, Context, Result};
use mrrec_data::{LabeledQuery, Review};
use mrrec_llm::{ChatModel, ChatRequest, Usage};
use mrrec_memory::global::{self, AspectSet, MergeOptions};
use mrrec_memory::{
    summaries, Level, MemoryEntry, MemoryWrite, Owner, QueryAspects, Stale, StaleKind,
};
use serde::Serialize;

use crate::progress::Progress;
use crate::prompts;

/// What a build did, for the CLI and BENCHMARKS.md (the paper's Table 4 columns).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildReport {
    /// Users whose records were looked at.
    pub users: usize,
    /// Record entries added (0 on a rerun).
    pub records_added: usize,
    /// (user, category) preference patterns written.
    pub patterns_written: usize,
    /// User profiles written.
    pub profiles_written: usize,
    /// Pattern and profile segments stored.
    pub llm_entries: usize,
    /// Segments dropped because a number or name in them is not in the user's records.
    pub unfaithful_segments_dropped: usize,
    /// Named attributes and numbers in the LLM's summaries found in the sources / checked.
    pub faithful: (usize, usize),
    /// Training queries whose aspects were extracted (step A).
    pub global_queries: usize,
    /// Step-A answers that failed validation twice (counted, skipped).
    pub global_failures: usize,
    /// Categories merged (step B) and the canonical aspects they hold.
    pub global_categories: usize,
    /// Canonical aspects written.
    pub global_aspects: usize,
    /// LLM calls (cached replays included) and their usage (seconds exclude replays).
    pub llm_calls: usize,
    /// Token and time accounting.
    pub usage: Usage,
    /// Wall time.
    pub seconds: f64,
}

impl BuildReport {
    /// One line for the terminal.
    pub fn summary(&self, model: &str) -> String {
        format!(
            "{} users: +{} records, {} patterns and {} profiles rewritten ({} segments, {} dropped as unfaithful), global: {} queries ({} failed), {} aspects in {} categories; LLM {model}: {} calls, {} tokens in, {} out, {:.1}s ({:.2} s/LLM entry); {:.1}s in all",
            self.users,
            self.records_added,
            self.patterns_written,
            self.profiles_written,
            self.llm_entries,
            self.unfaithful_segments_dropped,
            self.global_queries,
            self.global_failures,
            self.global_aspects,
            self.global_categories,
            self.llm_calls,
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
            self.usage.seconds,
            self.usage.seconds / (self.llm_entries + self.global_aspects).max(1) as f64,
            self.seconds
        )
    }

    /// The LLM cost of this build, as `MemoryWrite::add_cost` accumulates it.
    pub fn cost(&self) -> mrrec_memory::BuildCost {
        mrrec_memory::BuildCost {
            llm_entries: (self.llm_entries + self.global_aspects) as u64,
            tokens_in: self.usage.prompt_tokens,
            tokens_out: self.usage.completion_tokens,
            seconds: self.usage.seconds,
            seconds_per_entry: 0.0,
        }
    }

    /// Share of checked claims found in the sources.
    pub fn faithfulness(&self) -> f64 {
        self.faithful.0 as f64 / self.faithful.1.max(1) as f64
    }
}

/// What forgetting a user removed, everywhere.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    /// From the store.
    pub store: mrrec_memory::Forgotten,
    /// Vectors removed from the embedding cache.
    pub embeddings: usize,
    /// Exchanges removed from the LLM response cache.
    pub llm_responses: usize,
}

/// Builds and maintains the memory of one tenant in one store.
pub struct MemoryBuilder<'a> {
    /// Catalogue, past interactions, embedder and item indexes.
    pub shop: crate::Shop<'a>,
    /// The embedder's cache (forget removes a user's vectors from it).
    pub embeddings: &'a mrrec_embed::EmbeddingCache,
    /// The query file (forget removes the user's requests from the caches too).
    pub queries: &'a mrrec_data::QuerySet,
    /// The store.
    pub store: &'a dyn MemoryWrite,
    /// Tenant every key carries.
    pub tenant: &'a str,
    /// Writes patterns, profiles and aspects (not needed for records).
    pub llm: Option<&'a dyn ChatModel>,
    /// Requests per LLM batch (also the unit of resumption).
    pub batch: usize,
    /// Show progress bars.
    pub progress: bool,
}

impl<'a> MemoryBuilder<'a> {
    /// A builder over `ws` (its shop, embedding cache and query file) writing `tenant`'s memory
    /// to `store`: no chat model (records only), batches of 8, no progress bars.
    pub fn new(ws: &'a crate::Workspace, store: &'a dyn MemoryWrite, tenant: &'a str) -> Self {
        MemoryBuilder {
            shop: ws.shop(),
            embeddings: ws.embedder.cache(),
            queries: &ws.dataset.queries,
            store,
            tenant,
            llm: None,
            batch: 8,
            progress: false,
        }
    }
}

/// The store write after which [`failpoint`] aborts the process (0: never).
static FAIL_AFTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Fault injection for the crash-and-resume tests (the binary sets it from `MRREC_FAILPOINT=N`):
/// the process aborts (no destructors, no flush: like `kill -9`) right after its N-th memory-store
/// write. `None` turns it off.
pub fn set_failpoint(after_writes: Option<usize>) {
    FAIL_AFTER.store(
        after_writes.unwrap_or(0),
        std::sync::atomic::Ordering::SeqCst,
    );
}

fn failpoint() {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let at = FAIL_AFTER.load(std::sync::atomic::Ordering::SeqCst);
    if at > 0 {
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n >= at {
            eprintln!("MRREC_FAILPOINT: aborting after store write {n}");
            std::process::abort();
        }
    }
}

/// One summary's segments and what they replace ([`MemoryBuilder::write_segments`]).
struct Rewrite<'a, F> {
    /// The owner.
    user: &'a str,
    /// The summary's segments (embeddings empty).
    segs: Vec<MemoryEntry>,
    /// The text the summary was written from (its claims are checked against it).
    source: &'a str,
    /// Which of the owner's entries the segments replace.
    replaces: F,
    /// The stale mark the write clears.
    done: Stale,
    /// The stale marks it sets (what depends on it).
    mark: &'a [Stale],
}

fn cat_of(e: &MemoryEntry) -> String {
    e.category.clone().unwrap_or_else(|| "Other".into())
}

impl<'a> MemoryBuilder<'a> {
    fn owner<'u>(&'u self, user: &'u str) -> Owner<'u> {
        Owner {
            tenant: self.tenant,
            user,
        }
    }

    fn llm(&self) -> Result<&'a dyn ChatModel> {
        self.llm
            .context("this level needs a chat model (pass --model or --llm-url)")
    }

    /// The id of the model that writes the LLM levels, kept with every entry it writes.
    fn writer(&self) -> String {
        self.llm.map(|m| m.id().to_string()).unwrap_or_default()
    }

    fn embed(&self, texts: &[&str], what: &str) -> Result<Vec<Vec<f32>>> {
        let mut pb = Progress::new(what, self.progress && texts.len() > 64);
        let v = self
            .shop
            .embedder
            .embed_reporting(texts, &mut |d, t| pb.set(d, t))?;
        pb.finish();
        Ok(v)
    }

    /// Adds new interactions of one user: their record entries, and marks for the pattern of
    /// each category they touch and for the profile, all in one transaction. Returns how many
    /// records were new (reviews already stored are ignored).
    pub fn add_reviews(&self, user: &str, reviews: &[Review]) -> Result<AddReport> {
        let (mut fresh, updated) = self.new_records(user, reviews)?;
        if fresh.is_empty() {
            return Ok(AddReport::default());
        }
        let texts: Vec<&str> = fresh.iter().map(|e| e.text.as_str()).collect();
        let vecs = self.embed(&texts, "embedding records")?;
        for (e, v) in fresh.iter_mut().zip(vecs) {
            e.embedding = v;
        }
        self.put_records(user, &fresh)?;
        Ok(AddReport {
            added: fresh.len() - updated,
            updated,
        })
    }

    /// Record entries (not yet embedded) of the `reviews` the store does not hold as they are:
    /// new ones, and ones whose text changed (same item and moment: an update, counted as the
    /// second number). A review repeated within `reviews` counts once (the first).
    fn new_records(&self, user: &str, reviews: &[Review]) -> Result<(Vec<MemoryEntry>, usize)> {
        let stored: HashMap<String, String> = self
            .store
            .entries(self.owner(user))?
            .into_iter()
            .map(|e| (e.id, e.text))
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut updated = 0;
        for e in mrrec_memory::record_entries(reviews, self.shop.catalogue) {
            if !seen.insert(e.id.clone()) {
                continue;
            }
            match stored.get(&e.id) {
                Some(text) if *text == e.text => continue,
                Some(_) => updated += 1,
                None => {}
            }
            out.push(e);
        }
        Ok((out, updated))
    }

    fn put_records(&self, user: &str, fresh: &[MemoryEntry]) -> Result<()> {
        let cats: BTreeSet<String> = fresh.iter().map(cat_of).collect();
        let mut marks: Vec<Stale> = cats.iter().map(|c| Stale::pattern(user, c)).collect();
        marks.push(Stale::profile(user));
        self.store
            .replace(self.owner(user), &[], fresh, &[], &marks)?;
        failpoint();
        Ok(())
    }

    /// Record memory for `users` from the dataset's histories (new records only).
    pub fn build_records(&self, users: &[&str], report: &mut BuildReport) -> Result<()> {
        let h = &self.shop.histories;
        let mut per_user: Vec<Vec<MemoryEntry>> = Vec::with_capacity(users.len());
        for u in users {
            per_user.push(self.new_records(u, h.of(u))?.0);
        }
        // One embedding pass over every new text: length-sorted batches, cached, resumable.
        let texts: Vec<&str> = per_user.iter().flatten().map(|e| e.text.as_str()).collect();
        let vecs = self.embed(&texts, "embedding record memory")?;
        drop(texts);
        let mut vecs = vecs.into_iter();
        for e in per_user.iter_mut().flatten() {
            e.embedding = vecs.next().unwrap_or_default();
        }
        for (u, es) in users.iter().zip(&per_user) {
            if !es.is_empty() {
                self.put_records(u, es)?;
                report.records_added += es.len();
            }
        }
        report.users += users.len();
        Ok(())
    }

    /// Runs requests in batches through the LLM; `done` receives each batch's answers (in order)
    /// so that results are stored as they arrive.
    fn run_llm<J>(
        &self,
        jobs: &[J],
        request: impl Fn(&J) -> ChatRequest,
        what: &str,
        report: &mut BuildReport,
        mut done: impl FnMut(&J, String, &mut BuildReport) -> Result<()>,
    ) -> Result<()> {
        let llm = self.llm()?;
        let mut pb = Progress::new(what, self.progress);
        let mut n = 0;
        for chunk in jobs.chunks(self.batch.max(1)) {
            let reqs: Vec<ChatRequest> = chunk.iter().map(&request).collect();
            for (j, r) in chunk.iter().zip(llm.chat_batch(&reqs)) {
                let r = r.with_context(|| format!("{what}: the chat model failed"))?;
                report.usage.add(&r.usage);
                report.llm_calls += 1;
                done(j, r.text, report)?;
            }
            n += chunk.len();
            pb.set(n, jobs.len());
        }
        pb.finish();
        Ok(())
    }

    /// Segments of a summary, with the ones that state a number or a name absent from `source`
    /// dropped (and counted); every claim is also counted for the faithfulness share.
    fn faithful_segments(
        &self,
        mut entries: Vec<MemoryEntry>,
        source: &str,
        report: &mut BuildReport,
    ) -> Vec<MemoryEntry> {
        entries.retain(|e| {
            let (ok, total) = summaries::faithfulness(&e.text, source);
            report.faithful.0 += ok;
            report.faithful.1 += total;
            if ok < total {
                report.unfaithful_segments_dropped += 1;
                false
            } else {
                true
            }
        });
        entries
    }

    /// Stores the faithful segments of one summary (embedded) in place of the owner's entries
    /// that `w.replaces` selects, clears the mark `w.done` and sets `w.mark`, in one transaction.
    fn write_segments(
        &self,
        w: Rewrite<'_, impl Fn(&MemoryEntry) -> bool>,
        report: &mut BuildReport,
    ) -> Result<()> {
        let Rewrite {
            user,
            segs,
            source,
            replaces,
            done,
            mark,
        } = w;
        let mut segs = self.faithful_segments(segs, source, report);
        let texts: Vec<&str> = segs.iter().map(|e| e.text.as_str()).collect();
        let vecs = self.shop.embedder.embed(&texts)?;
        for (e, v) in segs.iter_mut().zip(vecs) {
            e.embedding = v;
        }
        let old: Vec<String> = self
            .store
            .entries(self.owner(user))?
            .into_iter()
            .filter(|e| replaces(e))
            .map(|e| e.id)
            .collect();
        self.store
            .replace(self.owner(user), &old, &segs, &[done], mark)?;
        failpoint();
        report.llm_entries += segs.len();
        Ok(())
    }

    /// The (user, category) patterns to (re)write among `users`: those marked stale (records
    /// are stored together with the marks they cause, so nothing is missed).
    fn pattern_todo(&self, users: &[&str]) -> Result<Vec<(String, String)>> {
        let wanted: HashSet<&str> = users.iter().copied().collect();
        Ok(self
            .store
            .stale(self.tenant, Some(StaleKind::Pattern))?
            .into_iter()
            .filter_map(|k| match k {
                Stale::Pattern { user, category } => Some((user, category)),
                _ => None,
            })
            .filter(|(u, _)| wanted.contains(u.as_str()))
            .collect())
    }

    /// Rewrites the stale preference patterns of `users`.
    pub fn build_patterns(&self, users: &[&str], report: &mut BuildReport) -> Result<()> {
        let todo = self.pattern_todo(users)?;
        // The request reads the user's current records of that category.
        let mut jobs: Vec<(String, String, Vec<MemoryEntry>)> = Vec::new();
        for (u, c) in todo {
            let es: Vec<MemoryEntry> = self
                .store
                .entries(self.owner(&u))?
                .into_iter()
                .filter(|e| e.level == Level::Record && cat_of(e) == c)
                .collect();
            jobs.push((u, c, es));
        }
        self.run_llm(
            &jobs,
            |(_, c, es)| {
                let texts: Vec<&str> = es.iter().map(|e| e.text.as_str()).collect();
                prompts::memory::pattern_request(c, &texts)
            },
            "writing preference patterns",
            report,
            |(u, c, es), text, report| {
                let source: Vec<&str> = es.iter().map(|e| e.text.as_str()).collect();
                let sources: Vec<String> = es.iter().map(|e| e.id.clone()).collect();
                let segs = summaries::pattern_entries(c, &text, &sources, &self.writer());
                self.write_segments(
                    Rewrite {
                        user: u,
                        segs,
                        source: &source.join("\n"),
                        replaces: |e: &MemoryEntry| e.level == Level::Pattern && cat_of(e) == *c,
                        done: Stale::pattern(u, c),
                        mark: &[Stale::profile(u)],
                    },
                    report,
                )?;
                report.patterns_written += 1;
                Ok(())
            },
        )
    }

    /// Rewrites the stale profiles of `users` from their current patterns; a user left without
    /// any pattern (every segment dropped as unfaithful) keeps no profile, and the mark is settled.
    pub fn build_profiles(&self, users: &[&str], report: &mut BuildReport) -> Result<()> {
        let stale: HashSet<String> = self
            .store
            .stale(self.tenant, Some(StaleKind::Profile))?
            .into_iter()
            .filter_map(|k| k.user().map(str::to_string))
            .collect();
        // (user, (category, pattern text) pairs, source text for the faithfulness check)
        type ProfileJob = (String, Vec<(String, String)>, String);
        let mut jobs: Vec<ProfileJob> = Vec::new();
        for u in users {
            if !stale.contains(*u) {
                continue;
            }
            let es = self.store.entries(self.owner(u))?;
            let mut by_cat: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for e in es.iter().filter(|e| e.level == Level::Pattern) {
                by_cat.entry(cat_of(e)).or_default().push(&e.text);
            }
            if by_cat.is_empty() {
                // Every pattern segment was dropped as unfaithful (or none was ever kept):
                // there is nothing to describe the user from. An older profile no longer
                // stands on anything, and the mark is settled rather than left pending for
                // every later build.
                self.write_segments(
                    Rewrite {
                        user: u,
                        segs: vec![],
                        source: "",
                        replaces: |e: &MemoryEntry| e.level == Level::Profile,
                        done: Stale::profile(u),
                        mark: &[],
                    },
                    report,
                )?;
                continue;
            }
            let pairs: Vec<(String, String)> =
                by_cat.into_iter().map(|(c, t)| (c, t.join(" "))).collect();
            let source: Vec<&str> = es
                .iter()
                .filter(|e| e.level != Level::Profile)
                .map(|e| e.text.as_str())
                .collect();
            jobs.push((u.to_string(), pairs, source.join("\n")));
        }
        self.run_llm(
            &jobs,
            |(_, pairs, _)| prompts::memory::profile_request(pairs),
            "writing user profiles",
            report,
            |(u, pairs, source), text, report| {
                let sources: Vec<String> =
                    pairs.iter().map(|(c, _)| format!("pattern:{c}")).collect();
                let segs = summaries::profile_entries(&text, &sources, &self.writer());
                self.write_segments(
                    Rewrite {
                        user: u,
                        segs,
                        source,
                        replaces: |e: &MemoryEntry| e.level == Level::Profile,
                        done: Stale::profile(u),
                        mark: &[],
                    },
                    report,
                )?;
                report.profiles_written += 1;
                Ok(())
            },
        )
    }

    /// Hard negatives of a query: the items the dense index ranks highest for the request that
    /// are not the purchased item, preferring the purchased item's own `main_category`.
    pub fn hard_negatives(&self, q: &LabeledQuery, n: usize) -> Result<Vec<u32>> {
        let cat = self.shop.catalogue;
        let target = cat.by_id(q.target());
        let want = target.and_then(|t| t.main_category.clone());
        let hits = self.shop.search_dense(&q.query().query, 100)?;
        let mut same: Vec<u32> = Vec::new();
        let mut other: Vec<u32> = Vec::new();
        for h in hits {
            let Some(it) = cat.get(h.item) else { continue };
            if it.id == q.target() {
                continue;
            }
            if want.is_some() && it.main_category == want {
                same.push(h.item);
            } else {
                other.push(h.item);
            }
        }
        same.extend(other);
        same.truncate(n);
        Ok(same)
    }

    /// Step A over `queries` (already filtered to `train`/`aspect` by the caller through
    /// `Purpose::GlobalMemory`): queries whose aspects are stored are skipped, so a rerun resumes.
    pub fn build_global_aspects(
        &self,
        queries: &[&LabeledQuery],
        negatives: usize,
        report: &mut BuildReport,
    ) -> Result<()> {
        // Done: rows of the current prompt version (older versions' rows are redone).
        let done: HashSet<String> = self
            .store
            .query_aspects(self.tenant, None)?
            .into_iter()
            .filter(|r| prompts::aspects::is_current(&r.json))
            .map(|r| r.qid)
            .collect();
        let cat = self.shop.catalogue;
        let mut jobs: Vec<(&LabeledQuery, String, Vec<String>)> = Vec::new();
        for q in queries {
            if done.contains(&q.query().qid) {
                continue;
            }
            let Some(target) = cat.by_id(q.target()) else {
                continue;
            };
            let negs: Vec<String> = self
                .hard_negatives(q, negatives)?
                .into_iter()
                .filter_map(|i| cat.get(i).map(|it| it.text.clone()))
                .collect();
            jobs.push((q, target.text.clone(), negs));
        }
        let category =
            |q: &LabeledQuery| q.query().category.clone().unwrap_or_else(|| "Other".into());
        let request = |(q, chosen, negs): &(&LabeledQuery, String, Vec<String>), attempt: u64| {
            let negs: Vec<&str> = negs.iter().map(String::as_str).collect();
            prompts::aspects::aspect_request(&category(q), &q.query().query, chosen, &negs, attempt)
        };
        let mut failed: Vec<usize> = Vec::new();
        let mut rows: Vec<QueryAspects> = Vec::new();
        let idx: Vec<usize> = (0..jobs.len()).collect();
        let flush = |rows: &mut Vec<QueryAspects>| -> Result<()> {
            if rows.is_empty() {
                return Ok(());
            }
            self.store.put_query_aspects(self.tenant, rows)?;
            failpoint();
            rows.clear();
            Ok(())
        };
        let accept = |i: usize, text: &str, rows: &mut Vec<QueryAspects>| -> bool {
            match prompts::aspects::parse_aspects(text) {
                Ok(set) => {
                    let q = jobs[i].0.query();
                    rows.push(QueryAspects {
                        qid: q.qid.clone(),
                        user: q.user_id.clone(),
                        category: category(jobs[i].0),
                        json: serde_json::to_string(&set).unwrap_or_default(),
                        writer: Some(self.writer()),
                    });
                    true
                }
                Err(_) => false,
            }
        };
        for attempt in 0..2u64 {
            let todo: Vec<usize> = if attempt == 0 {
                idx.clone()
            } else {
                std::mem::take(&mut failed)
            };
            let what = if attempt == 0 {
                "extracting global aspects"
            } else {
                "retrying invalid aspect answers"
            };
            let mut batch_rows = 0;
            self.run_llm(
                &todo,
                |&i| request(&jobs[i], attempt),
                what,
                report,
                |&i, text, report| {
                    if accept(i, &text, &mut rows) {
                        report.global_queries += 1;
                    } else if attempt == 0 {
                        failed.push(i);
                    } else {
                        report.global_failures += 1;
                    }
                    batch_rows += 1;
                    if batch_rows % self.batch.max(1) == 0 {
                        flush(&mut rows)?;
                    }
                    Ok(())
                },
            )?;
            flush(&mut rows)?;
        }
        Ok(())
    }

    /// Step B for every category marked stale: merge its step-A results into canonical aspects.
    pub fn merge_global(&self, opts: MergeOptions, report: &mut BuildReport) -> Result<()> {
        for mark in self.store.stale(self.tenant, Some(StaleKind::Global))? {
            let Stale::Global { category } = mark else {
                continue;
            };
            let rows: Vec<(QueryAspects, AspectSet)> = self
                .store
                .query_aspects(self.tenant, Some(&category))?
                .into_iter()
                .filter_map(|r| {
                    let set: AspectSet = serde_json::from_str(&r.json).ok()?;
                    (set.version == prompts::GLOBAL_PROMPT_VERSION).then_some((r, set))
                })
                .collect();
            let aspects = global::merge(&category, &rows, opts, |texts| {
                self.shop.embedder.embed(texts).map_err(|e| e.to_string())
            })
            .map_err(crate::error::AgentError::Invalid)
            .with_context(|| format!("merging the global aspects of {category}"))?;
            self.store.put_global(self.tenant, &category, &aspects)?;
            failpoint();
            report.global_categories += 1;
            report.global_aspects += aspects.len();
        }
        Ok(())
    }

    /// Removes every trace of `user`: the store (entries, step-A results, derived global
    /// aspects, marks, freed pages), the embedding cache's vectors of their texts, and the LLM
    /// response cache's exchanges that contain their texts or their requests in the query file
    /// (the requests may sit in step-A prompts). `llm_cache` is the response cache to clean
    /// (the shared one under `$MRREC_HOME`, whatever model the caller runs).
    pub fn forget(&self, user: &str, llm_cache: Option<&std::path::Path>) -> Result<ForgetReport> {
        // The user's requests in the query file: prompts and cached embeddings hold them.
        let queries: Vec<&str> = self
            .queries
            .all()
            .iter()
            .filter(|q| q.query().user_id == user)
            .flat_map(|q| {
                std::iter::once(q.query().query.as_str()).chain(q.query().simple_query.as_deref())
            })
            .collect();
        let entries = self.store.entries(self.owner(user))?;
        let mut texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
        for r in self.store.query_aspects(self.tenant, None)? {
            if r.user == user {
                texts.push(r.json);
            }
        }
        texts.extend(queries.iter().map(|q| q.to_string()));
        // The reviews themselves, as they appear inside prompts: the dataset's, and the user's
        // own words inside record entries (reviews added through `memory add` or the service).
        let mut needles: Vec<String> = texts.clone();
        for e in entries.iter().filter(|e| e.level == Level::Record) {
            if let Some((_, words)) = e.text.split_once(" Review: ") {
                let words: String = words.chars().take(200).collect();
                if words.len() >= 24 {
                    needles.push(words);
                }
            }
        }
        for r in self.shop.histories.of(user) {
            if r.text.len() >= 24 {
                needles.push(r.text.chars().take(200).collect());
            }
        }
        let store = self.store.forget(self.owner(user))?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let model = self.shop.embedder.model_id().to_string();
        let embeddings = self.embeddings.forget_texts(&[&model], &refs)?;
        let mut llm_responses = 0;
        if let Some(path) = llm_cache.filter(|p| p.exists()) {
            let cache = mrrec_llm::ResponseCache::open(path)?;
            let refs: Vec<&str> = needles.iter().map(String::as_str).collect();
            llm_responses = cache.forget_containing(&refs)?;
        }
        Ok(ForgetReport {
            store,
            embeddings,
            llm_responses,
        })
    }
}

/// What [`MemoryBuilder::add_reviews`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddReport {
    /// Reviews new to the store.
    pub added: usize,
    /// Reviews the store held with another text (same item and moment), now replaced.
    pub updated: usize,
}

impl AddReport {
    /// Records written.
    pub fn changed(&self) -> usize {
        self.added + self.updated
    }
}

/// The fields of an Amazon Reviews 2023 review row; an interaction with any other is refused.
pub const REVIEW_FIELDS: &[&str] = &[
    "rating",
    "title",
    "text",
    "images",
    "asin",
    "parent_asin",
    "user_id",
    "timestamp",
    "helpful_vote",
    "verified_purchase",
];

/// Reads new interactions from a JSONL file of Amazon Reviews 2023 rows for `user` (rows of
/// other users are refused, naming the line).
pub fn read_reviews(path: &std::path::Path, user: &str) -> Result<Vec<Review>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
        out.push(review_from_json(v, user, &at)?);
    }
    Ok(out)
}

/// One Amazon Reviews 2023 row as an interaction of `user`: `user_id` may be absent (it is
/// `user`) but not another user's; `asin` stands in for a missing `parent_asin`; the rating
/// must be 1–5. Errors start with `at` (file:line, or a JSON path).
pub fn review_from_json(mut v: serde_json::Value, user: &str, at: &str) -> Result<Review> {
    let Some(o) = v.as_object_mut() else {
        bail!("{at}: not a JSON object");
    };
    if let Some(k) = o.keys().find(|k| !REVIEW_FIELDS.contains(&k.as_str())) {
        bail!(
            "{at}: unknown field `{k}` (Amazon Reviews 2023 fields: {})",
            REVIEW_FIELDS.join(", ")
        );
    }
    match o.get("user_id") {
        Some(serde_json::Value::String(u)) if u != user => {
            bail!("{at}: the row is user {u:?}'s, not {user:?}")
        }
        _ => {
            o.insert("user_id".into(), user.into());
        }
    }
    if o.get("parent_asin").is_none() {
        if let Some(a) = o.get("asin").cloned() {
            o.insert("parent_asin".into(), a);
        }
    }
    let r: Review = serde_json::from_value(v).with_context(|| format!("{at}: not a review"))?;
    if !(1.0..=5.0).contains(&r.rating) {
        bail!("{at}: rating {} is not 1–5", r.rating);
    }
    if r.timestamp < 0 {
        bail!(
            "{at}: timestamp {} is before 1970 (milliseconds since the epoch)",
            r.timestamp
        );
    }
    for (field, text) in [("title", &r.title), ("text", &r.text)] {
        if !text.is_empty() && !text.chars().any(|c| !c.is_whitespace() && !c.is_control()) {
            bail!("{at}: `{field}` has no visible character");
        }
    }
    Ok(r)
}

/// How much of the memory a method reads exists for the users of a run — what `mrrec eval`,
/// `train` and `rollouts` check before they answer, since a user whose memory was never built
/// answers as if memory-free and dilutes any comparison of memory against none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Distinct users looked at.
    pub users: usize,
    /// Of them, users without any past review (cold start: no memory to build).
    pub no_history: usize,
    /// Users with a history but no record entries (when records are read).
    pub without_records: Vec<String>,
    /// Users with records whose patterns or profile were never written or are out of date
    /// (a pending build mark; when patterns or profiles are read).
    pub unsummarised: Vec<String>,
}

impl Coverage {
    /// Whether every user with a history has every level read, up to date.
    pub fn complete(&self) -> bool {
        self.without_records.is_empty() && self.unsummarised.is_empty()
    }

    /// One line for logs and a run's provenance.
    pub fn summary(&self) -> String {
        let built = self.users - self.no_history - self.incomplete();
        let mut s = format!(
            "{} users: {built} with the memory read, {} without records, {} without up-to-date patterns/profile",
            self.users,
            self.without_records.len(),
            self.unsummarised.len()
        );
        if self.no_history > 0 {
            s.push_str(&format!(", {} without history", self.no_history));
        }
        s
    }

    /// Users with a history whose memory is incomplete.
    pub fn incomplete(&self) -> usize {
        self.without_records.len() + self.unsummarised.len()
    }
}

/// The [`Coverage`] of `levels` for `users` (repeats counted once) in `tenant`'s memory.
/// Records count as present when the user has any entry; patterns and profiles when
/// the user has records and no pending pattern or profile mark (a summary whose every segment
/// was dropped as unfaithful counts as written).
pub fn coverage(
    histories: &mrrec_data::Histories,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    users: &[&str],
    levels: &[Level],
) -> Result<Coverage> {
    let users: BTreeSet<&str> = users.iter().copied().collect();
    let summaries = levels
        .iter()
        .any(|l| matches!(l, Level::Pattern | Level::Profile));
    let pending: HashSet<String> = if summaries {
        store
            .stale(tenant, None)?
            .into_iter()
            .filter(|m| match m {
                Stale::Pattern { .. } => levels.contains(&Level::Pattern),
                Stale::Profile { .. } => levels.contains(&Level::Profile),
                Stale::Global { .. } => false,
            })
            .filter_map(|m| m.user().map(str::to_string))
            .collect()
    } else {
        HashSet::new()
    };
    let mut c = Coverage {
        users: users.len(),
        ..Default::default()
    };
    if levels.is_empty() {
        return Ok(c);
    }
    for u in users {
        if histories.of(u).is_empty() {
            c.no_history += 1;
            continue;
        }
        // Records come first and summaries are written from them, so a user with any entry
        // has records (one `EXISTS` query instead of reading every entry and its vector).
        if !store.has_entries(Owner { tenant, user: u })? {
            // Summaries are written from records: without them nothing is built.
            c.without_records.push(u.to_string());
        } else if pending.contains(u) {
            c.unsummarised.push(u.to_string());
        }
    }
    Ok(c)
}

/// What [`write_derived_queries`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DerivedWriteReport {
    /// Requests written and kept.
    pub written: usize,
    /// Of them, kept only after a repair turn.
    pub repaired: usize,
    /// First answers refused, by reason (before any repair).
    pub refused_first: BTreeMap<String, usize>,
    /// Targets finally refused, by the reason of their last answer (unparsable, naming the
    /// product, copying the review, a model error).
    pub refused: BTreeMap<String, usize>,
    /// LLM tokens and time.
    pub usage: Usage,
}

/// Writes the request of every derived training target with `llm` (greedy, in batches of
/// `batch`, cached like every other call): `(index into targets, request)` for the answers that
/// parse, do not name the product and do not copy the review. A refused answer gets up to
/// `repairs` repair turns ([`prompts::derive::repair_request`]: its own answer and the words it
/// must not repeat); the targets still refused are counted by reason.
pub fn write_derived_queries(
    llm: &dyn ChatModel,
    catalogue: &mrrec_data::Catalogue,
    targets: &[mrrec_data::derive::DerivedTarget],
    batch: usize,
    repairs: usize,
    progress: bool,
) -> (
    Vec<(usize, mrrec_data::derive::DerivedQuery)>,
    DerivedWriteReport,
) {
    let mut report = DerivedWriteReport::default();
    let mut out = Vec::new();
    let mut pb = Progress::new("writing requests", progress);
    // (target, its item's title, the request to send, repair turns used); each title looked
    // up once.
    let mut pending: Vec<(usize, &str, ChatRequest, usize)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let item = catalogue.by_id(&t.review.parent_asin);
            let title = item.map_or("", |i| i.title.as_str());
            let r = prompts::derive::query_request(
                title,
                item.and_then(|i| i.main_category.as_deref()),
                &t.review.title,
                &t.review.text,
                t.review.rating,
            );
            (i, title, r, 0)
        })
        .collect();
    while !pending.is_empty() {
        let mut next = Vec::new();
        for chunk in pending.chunks(batch.max(1)) {
            let reqs: Vec<ChatRequest> = chunk.iter().map(|c| c.2.clone()).collect();
            for (&(i, title, ref req, turn), r) in chunk.iter().zip(llm.chat_batch(&reqs)) {
                let r = match r {
                    Err(e) => {
                        *report
                            .refused
                            .entry(format!("model error: {e}"))
                            .or_default() += 1;
                        continue;
                    }
                    Ok(r) => r,
                };
                report.usage.add(&r.usage);
                let t = &targets[i].review;
                let review = format!("{} {}", t.title, t.text);
                match prompts::derive::parse_queries(&r.text, title, &review) {
                    Ok(q) => {
                        report.written += 1;
                        report.repaired += usize::from(turn > 0);
                        out.push((i, q));
                    }
                    Err(why) => {
                        if turn == 0 {
                            *report
                                .refused_first
                                .entry(why.reason.to_string())
                                .or_default() += 1;
                        }
                        if turn < repairs {
                            let again = prompts::derive::repair_request(req, &r.text, &why);
                            next.push((i, title, again, turn + 1));
                        } else {
                            *report.refused.entry(why.reason.to_string()).or_default() += 1;
                        }
                    }
                }
            }
            pb.set(
                out.len() + report.refused.values().sum::<usize>(),
                targets.len(),
            );
        }
        pending = next;
    }
    pb.finish();
    out.sort_by_key(|(i, _)| *i);
    (out, report)
}
