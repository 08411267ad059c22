//! Markdown tables in the paper's layout, paired comparisons of runs, and SVG plots.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::run::{load_run, RunMetrics};
use crate::stats::{paired, PairedComparison};
use crate::{Metric, Result};

/// One table row per run: R@100, R@10, N@100, N@10 (the paper's order), then MRR and the count;
/// with `intervals`, each cell carries its 95% bootstrap interval.
pub fn markdown_table(rows: &[(String, &RunMetrics)], intervals: bool) -> String {
    let cols = Metric::paper_columns();
    let mut s = String::from("| method |");
    for c in cols {
        let _ = write!(s, " {} |", c.name());
    }
    s.push_str(" MRR | queries |\n|---|");
    for _ in 0..cols.len() + 2 {
        s.push_str("---|");
    }
    s.push('\n');
    for (name, m) in rows {
        let _ = write!(s, "| {name} |");
        for c in cols.iter().copied().chain([Metric::Mrr]) {
            match m.metrics.get(&c.name()) {
                Some(e) if intervals => {
                    let _ = write!(s, " {:.3} [{:.3}, {:.3}] |", e.mean, e.lo, e.hi);
                }
                Some(e) => {
                    let _ = write!(s, " {:.3} |", e.mean);
                }
                None => s.push_str(" – |"),
            }
        }
        let _ = writeln!(s, " {} |", m.n);
    }
    s
}

/// Per-category table: one row per category, the paper's columns, for one run.
pub fn category_table(m: &RunMetrics) -> String {
    let cols = Metric::paper_columns();
    let mut s = String::from("| category | queries |");
    for c in cols {
        let _ = write!(s, " {} |", c.name());
    }
    s.push_str("\n|---|---|");
    for _ in cols {
        s.push_str("---|");
    }
    s.push('\n');
    for (cat, (n, vals)) in &m.per_category {
        let _ = write!(s, "| {cat} | {n} |");
        for c in cols {
            let _ = write!(s, " {:.3} |", vals.get(&c.name()).copied().unwrap_or(0.0));
        }
        s.push('\n');
    }
    s
}

/// Row labels: the method's name, with the run folder's name added when two runs of the group
/// share a method name (two prompt versions, an adapter against the base model).
fn labels(runs: &[(&Path, &str)]) -> Vec<String> {
    runs.iter()
        .map(|(dir, method)| {
            let same = runs.iter().filter(|(_, m)| m == method).count();
            if same > 1 {
                let folder = dir
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string());
                format!("{method} ({folder})")
            } else {
                method.to_string()
            }
        })
        .collect()
}

/// How many folds a side read by [`load_runs`] joined (`None`: one run).
fn joined_folds(m: &RunMetrics) -> Option<usize> {
    let f = m.spec.provenance.get("fold")?;
    f.contains('+').then(|| f.split('+').count())
}

/// One side of a comparison read back: a run folder, or the folds of a cross-validation (runs
/// made with `eval --fold I/K`, each of a model that never learnt from its fold) joined into one
/// run of their queries. Folds must be distinct folds of the same K and share no query. The
/// metrics returned are the joined queries' (the first folder's spec names the side, its `fold`
/// provenance the folds joined, e.g. `1/2+2/2`; costs and skips summed).
pub fn load_runs(dirs: &[&Path]) -> Result<(RunMetrics, Vec<crate::QueryOutcome>)> {
    let bad = |path: &Path, message: String| crate::EvalError::BadRun {
        path: path.to_path_buf(),
        message,
    };
    let Some((first, rest)) = dirs.split_first() else {
        return Err(bad(Path::new(""), "no run folder given".into()));
    };
    let (m, mut outcomes) = load_run(first)?;
    if rest.is_empty() {
        return Ok((m, outcomes));
    }
    let fold = |dir: &Path, m: &RunMetrics| -> Result<mrrec_data::Fold> {
        m.spec
            .provenance
            .get("fold")
            .and_then(|f| f.parse::<mrrec_data::Fold>().ok())
            .ok_or_else(|| {
                bad(
                    dir,
                    "not a fold's run (made without `eval --fold I/K`): only the folds of a cross-validation are joined".into(),
                )
            })
    };
    let mut seen: HashMap<String, &Path> =
        outcomes.iter().map(|o| (o.qid.clone(), *first)).collect();
    let mut folds = vec![(fold(first, &m)?, *first)];
    let (mut seconds, mut skipped) = (m.method_seconds, m.skipped);
    for dir in rest {
        let (mi, oi) = load_run(dir)?;
        let f = fold(dir, &mi)?;
        if let Some((g, other)) = folds
            .iter()
            .find(|(g, _)| g.of != f.of || g.index == f.index)
        {
            return Err(bad(
                dir,
                format!("fold {f} does not join fold {g} of {}: the folds must be distinct folds of the same K", other.display()),
            ));
        }
        for o in &oi {
            if let Some(other) = seen.insert(o.qid.clone(), dir) {
                return Err(bad(
                    dir,
                    format!(
                        "query {} is also in {}: folds share no query",
                        o.qid,
                        other.display()
                    ),
                ));
            }
        }
        folds.push((f, dir));
        outcomes.extend(oi);
        seconds += mi.method_seconds;
        skipped += mi.skipped;
    }
    let mut spec = m.spec.clone();
    let joined: Vec<String> = folds.iter().map(|(f, _)| f.to_string()).collect();
    spec.provenance.insert("fold".into(), joined.join("+"));
    let mut joined = crate::run::summarise(&spec, &outcomes, skipped);
    joined.method_seconds = seconds;
    Ok((joined, outcomes))
}

/// Compares two finished runs on the queries they share, for each of the paper's metrics.
pub fn compare_runs(
    a: &Path,
    b: &Path,
    rounds: usize,
    seed: u64,
) -> Result<(Vec<(Metric, PairedComparison)>, String)> {
    compare_run_sets(&[a], &[b], rounds, seed)
}

/// [`compare_runs`] of two sides each given as [`load_runs`] reads them (a run, or the folds of
/// a cross-validation joined).
pub fn compare_run_sets(
    a: &[&Path],
    b: &[&Path],
    rounds: usize,
    seed: u64,
) -> Result<(Vec<(Metric, PairedComparison)>, String)> {
    let (ma, oa) = load_runs(a)?;
    let (mb, ob) = load_runs(b)?;
    let mut rows = Vec::new();
    let empty = Path::new("");
    let mut names = labels(&[
        (a.first().copied().unwrap_or(empty), ma.spec.method.as_str()),
        (b.first().copied().unwrap_or(empty), mb.spec.method.as_str()),
    ]);
    for (name, m) in names.iter_mut().zip([&ma, &mb]) {
        if let Some(folds) = joined_folds(m) {
            name.push_str(&format!(", {folds} folds joined"));
        }
    }
    let mut s = format!(
        "A = {} ({}), B = {} ({})\n\n| metric | A | B | A − B [95% CI] | p | queries | A > B / A < B |\n|---|---|---|---|---|---|---|\n",
        names[0], ma.spec.query_field, names[1], mb.spec.query_field
    );
    for metric in Metric::paper_columns().into_iter().chain([Metric::Mrr]) {
        let va: HashMap<String, (String, f64)> = oa
            .iter()
            .map(|o| (o.qid.clone(), (o.user_id.clone(), metric.of(o.rank))))
            .collect();
        let vb: HashMap<String, (String, f64)> = ob
            .iter()
            .map(|o| (o.qid.clone(), (o.user_id.clone(), metric.of(o.rank))))
            .collect();
        let c = paired(&va, &vb, rounds, seed);
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:+.3} [{:+.3}, {:+.3}] | {:.4} | {} | {} / {} |",
            metric.name(),
            c.mean_a,
            c.mean_b,
            c.diff.mean,
            c.diff.lo,
            c.diff.hi,
            c.p_value,
            c.n,
            c.up,
            c.down
        );
        rows.push((metric, c));
    }
    let one_sided: Vec<String> = rows
        .iter()
        .filter_map(|(m, c)| Some(format!("{} {}", m.name(), c.one_sided()?)))
        .collect();
    if !one_sided.is_empty() {
        let _ = writeln!(
            s,
            "\nEvery query that moved moved one way (A − B: {} 0): the bootstrap p is ~0 at any size and says only that; judge by the size.",
            one_sided.join(", ")
        );
    }
    Ok((rows, s))
}

/// History-length buckets of the paper's users (past reviews): where memory can matter.
pub const HISTORY_BUCKETS: [&str; 3] = ["≤ 4", "5–9", "≥ 10"];

/// The bucket of a user with `n` past reviews.
pub fn history_bucket(n: usize) -> &'static str {
    match n {
        0..=4 => HISTORY_BUCKETS[0],
        5..=9 => HISTORY_BUCKETS[1],
        _ => HISTORY_BUCKETS[2],
    }
}

/// [`compare_runs`] per group of queries (e.g. the asking user's history length): for each group
/// in `groups`, the paired N@100 and MRR differences (bootstrap over that group's users) of the
/// queries both runs answered. `group_of` names a query's group (`None`: left out).
pub fn compare_runs_by(
    a: &[&Path],
    b: &[&Path],
    rounds: usize,
    seed: u64,
    title: &str,
    groups: &[&str],
    group_of: &dyn Fn(&crate::QueryOutcome) -> Option<String>,
) -> Result<String> {
    let (_, oa) = load_runs(a)?;
    let (_, ob) = load_runs(b)?;
    let mut s = format!(
        "| {title} | queries | N@100 A | N@100 B | A − B [95% CI] | p | MRR A − B [95% CI] | p |\n|---|---|---|---|---|---|---|---|\n"
    );
    for g in groups {
        let pick = |o: &[crate::QueryOutcome], m: Metric| -> HashMap<String, (String, f64)> {
            o.iter()
                .filter(|q| group_of(q).as_deref() == Some(*g))
                .map(|q| (q.qid.clone(), (q.user_id.clone(), m.of(q.rank))))
                .collect()
        };
        let n = paired(
            &pick(&oa, Metric::Ndcg(100)),
            &pick(&ob, Metric::Ndcg(100)),
            rounds,
            seed,
        );
        let r = paired(
            &pick(&oa, Metric::Mrr),
            &pick(&ob, Metric::Mrr),
            rounds,
            seed,
        );
        if n.n == 0 {
            let _ = writeln!(s, "| {g} | 0 | – | – | – | – | – | – |");
            continue;
        }
        let _ = writeln!(
            s,
            "| {g} | {} | {:.3} | {:.3} | {:+.3} [{:+.3}, {:+.3}] | {:.4} | {:+.3} [{:+.3}, {:+.3}] | {:.4} |",
            n.n,
            n.mean_a,
            n.mean_b,
            n.diff.mean,
            n.diff.lo,
            n.diff.hi,
            n.p_value,
            r.diff.mean,
            r.diff.lo,
            r.diff.hi,
            r.p_value
        );
    }
    Ok(s)
}

const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG plot of Recall@K against K (log scale, 1..=max_k), one curve per run.
pub fn recall_curve_svg(curves: &[(String, Vec<Option<usize>>)], max_k: usize) -> String {
    let (w, h, l, r, t, b) = (640.0, 400.0, 60.0, 20.0, 30.0, 50.0);
    let max_k = max_k.max(2);
    let lx = |k: f64| l + (k.ln() / (max_k as f64).ln()) * (w - l - r);
    let ly = |y: f64| t + (1.0 - y) * (h - t - b);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">Recall@K</text>
"#,
        w / 2.0
    );
    for i in 0..=5 {
        let y = i as f64 / 5.0;
        let (x2, yy, tx, ty) = (w - r, ly(y), l - 6.0, ly(y) + 4.0);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{tx}" y="{ty}" text-anchor="end">{y:.1}</text>"##
        );
    }
    let mut k = 1usize;
    while k <= max_k {
        let (x, y2, ty) = (lx(k as f64), h - b, h - b + 16.0);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{t}" y2="{y2}" stroke="#ddd"/><text x="{x}" y="{ty}" text-anchor="middle">{k}</text>"##
        );
        k *= 10;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">K (log scale)</text>"#,
        (l + w - r) / 2.0,
        h - 12.0
    );
    for (ci, (name, ranks)) in curves.iter().enumerate() {
        let color = PALETTE[ci % PALETTE.len()];
        let n = ranks.len().max(1) as f64;
        let mut pts = String::new();
        let mut kk = 1.0f64;
        while kk <= max_k as f64 + 0.5 {
            let kint = kk.round() as usize;
            let rec = ranks
                .iter()
                .filter(|r| r.is_some_and(|r| r <= kint))
                .count() as f64
                / n;
            let _ = write!(pts, "{:.1},{:.1} ", lx(kint as f64), ly(rec));
            kk *= 1.25;
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            l + 10.0,
            t + 10.0 + ci as f64 * 16.0,
            l + 28.0,
            t + 14.0 + ci as f64 * 16.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A bar chart (SVG) of one metric across runs.
pub fn bar_chart_svg(rows: &[(String, f64)], metric: &str) -> String {
    let (w, bar_h, l) = (640.0, 22.0, 220.0);
    let h = 40.0 + rows.len() as f64 * (bar_h + 8.0);
    let max = rows.iter().map(|r| r.1).fold(0.0f64, f64::max).max(1e-9);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>
"#,
        w / 2.0,
        escape(metric)
    );
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = 30.0 + i as f64 * (bar_h + 8.0);
        let bw = (w - l - 60.0) * v / max;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{l}" y="{y}" width="{bw:.1}" height="{bar_h}" fill="{}"/><text x="{}" y="{}">{v:.3}</text>"#,
            l - 6.0,
            y + 15.0,
            escape(name),
            PALETTE[i % PALETTE.len()],
            l + bw + 4.0,
            y + 15.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Shares read off the traces of LLM methods (`None` for methods without traces).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceRates {
    /// Answers whose ideal item profile parsed.
    pub parsed: f64,
    /// Tool calls that parsed and ran, of all tool calls.
    pub tool_ok: f64,
    /// Tool calls per answer.
    pub calls_per_query: f64,
    /// Cited memory ids that were retrieved in the same answer, of all cited.
    pub cited_valid: f64,
    /// Answers that fell back to the raw request.
    pub fallback: f64,
    /// Answers that needed a repair attempt.
    pub repaired: f64,
    /// LLM seconds per answer: median and 95th percentile (cached replays count zero).
    pub llm_seconds_p50_p95: (f64, f64),
    /// Time outside the LLM (memory retrieval + ranking), milliseconds: median and 95th percentile.
    pub other_ms_p50_p95: (f64, f64),
}

fn p50_p95(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.95))
}

/// The trace shares of a run's outcomes, when they carry traces.
pub fn trace_rates(outcomes: &[crate::run::QueryOutcome]) -> Option<TraceRates> {
    let traces: Vec<&serde_json::Value> =
        outcomes.iter().filter_map(|o| o.trace.as_ref()).collect();
    if traces.is_empty() {
        return None;
    }
    let n = traces.len() as f64;
    let (mut calls, mut ok, mut cited, mut valid) = (0usize, 0usize, 0usize, 0usize);
    let (mut parsed, mut fallback, mut repaired) = (0usize, 0usize, 0usize);
    for t in &traces {
        if t.get("profile").is_some_and(|p| !p.is_null()) {
            parsed += 1;
        }
        if t.get("fallback").and_then(serde_json::Value::as_bool) == Some(true) {
            fallback += 1;
        }
        if t.get("repairs")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
            > 0
        {
            repaired += 1;
        }
        if let Some(cs) = t.get("tool_calls").and_then(serde_json::Value::as_array) {
            calls += cs.len();
            ok += cs
                .iter()
                .filter(|c| c.get("ok").and_then(serde_json::Value::as_bool) == Some(true))
                .count();
        }
        cited += t
            .get("cited")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len);
        valid += t
            .get("cited_valid")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as usize;
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let num = |t: &serde_json::Value, k: &str| {
        t.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0)
    };
    let llm: Vec<f64> = traces
        .iter()
        .map(|t| t.get("usage").map_or(0.0, |u| num(u, "seconds")))
        .collect();
    let other: Vec<f64> = traces
        .iter()
        .map(|t| num(t, "memory_ms") + num(t, "ranking_ms"))
        .collect();
    Some(TraceRates {
        parsed: parsed as f64 / n,
        tool_ok: share(ok, calls),
        calls_per_query: calls as f64 / n,
        cited_valid: share(valid, cited),
        fallback: fallback as f64 / n,
        repaired: repaired as f64 / n,
        llm_seconds_p50_p95: p50_p95(llm),
        other_ms_p50_p95: p50_p95(other),
    })
}

/// `mrrec report`: one Markdown report over many runs, in the paper's layout. Runs are grouped
/// by query field; within a group, rows are methods (R@100 / R@10 / N@100 / N@10 with 95%
/// bootstrap intervals), the best method by N@100 is compared with each other one (paired user
/// bootstrap on the shared queries), and per-category N@100 and the cost columns follow.
/// Returns the Markdown and one SVG bar chart of N@100 per group.
pub fn report_runs(
    sides: &[&[&Path]],
    rounds: usize,
    seed: u64,
) -> Result<(String, Vec<(String, String)>)> {
    let mut runs = Vec::new();
    for dirs in sides {
        let (m, o) = load_runs(dirs)?;
        let first = dirs
            .first()
            .map_or_else(Default::default, |d| d.to_path_buf());
        runs.push((first, m, o));
    }
    let mut fields: Vec<String> = runs
        .iter()
        .map(|r| r.1.spec.query_field.to_string())
        .collect();
    fields.sort();
    fields.dedup();
    // simple_query first, as in the paper.
    fields.sort_by_key(|f| f != "simple_query");
    let mut md = String::new();
    let mut charts = Vec::new();
    for field in fields {
        let group: Vec<&(
            std::path::PathBuf,
            RunMetrics,
            Vec<crate::run::QueryOutcome>,
        )> = runs
            .iter()
            .filter(|r| r.1.spec.query_field.to_string() == field)
            .collect();
        let _ = writeln!(md, "## Query field `{field}`\n");
        let mut names = labels(
            &group
                .iter()
                .map(|r| (r.0.as_path(), r.1.spec.method.as_str()))
                .collect::<Vec<_>>(),
        );
        for (name, r) in names.iter_mut().zip(&group) {
            if let Some(folds) = joined_folds(&r.1) {
                name.push_str(&format!(", {folds} folds joined"));
            }
        }
        let name = |r: &(
            std::path::PathBuf,
            RunMetrics,
            Vec<crate::run::QueryOutcome>,
        )| {
            let i = group
                .iter()
                .position(|g| std::ptr::eq(*g, r))
                .unwrap_or_default();
            names[i].clone()
        };
        let rows: Vec<(String, &RunMetrics)> = group.iter().map(|r| (name(r), &r.1)).collect();
        md.push_str(&markdown_table(&rows, true));
        let n100 = |m: &RunMetrics| m.metrics.get("N@100").map_or(0.0, |e| e.mean);
        let best = group
            .iter()
            .max_by(|a, b| n100(&a.1).total_cmp(&n100(&b.1)))
            .copied();
        if let Some(best) = best {
            if group.len() > 1 {
                let _ = writeln!(
                    md,
                    "\nBest by N@100: **{}**. Paired user bootstrap ({rounds} rounds) on shared queries:\n\n| vs | N@100 best − other [95% CI] | p | queries |\n|---|---|---|---|",
                    name(best)
                );
                let vals = |o: &[crate::run::QueryOutcome]| -> HashMap<String, (String, f64)> {
                    o.iter()
                        .map(|x| {
                            (
                                x.qid.clone(),
                                (x.user_id.clone(), Metric::Ndcg(100).of(x.rank)),
                            )
                        })
                        .collect()
                };
                let vb = vals(&best.2);
                for r in &group {
                    if std::ptr::eq(*r, best) {
                        continue;
                    }
                    let c = paired(&vb, &vals(&r.2), rounds, seed);
                    let _ = writeln!(
                        md,
                        "| {} | {:+.3} [{:+.3}, {:+.3}] | {:.4} | {} |",
                        name(r),
                        c.diff.mean,
                        c.diff.lo,
                        c.diff.hi,
                        c.p_value,
                        c.n
                    );
                }
            }
        }
        // Cost and trace columns (the paper's Table 4, and the LLM methods' health).
        let _ = writeln!(
            md,
            "\n| method | memory tokens / query | LLM tokens in / query | out / query | LLM s / query | parsed | tool calls / query | tool ok | cited valid | repaired | fallback | LLM s p50 / p95 | non-LLM ms p50 / p95 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &group {
            let n = r.1.n.max(1) as f64;
            let u = &r.1.usage;
            let _ = write!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.1} |",
                name(r),
                r.1.memory_tokens_per_query,
                u.prompt_tokens as f64 / n,
                u.completion_tokens as f64 / n,
                u.llm_seconds / n
            );
            match trace_rates(&r.2) {
                Some(t) => {
                    let _ = writeln!(
                        md,
                        " {:.0}% | {:.2} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {:.1} / {:.1} | {:.0} / {:.0} |",
                        100.0 * t.parsed,
                        t.calls_per_query,
                        100.0 * t.tool_ok,
                        100.0 * t.cited_valid,
                        100.0 * t.repaired,
                        100.0 * t.fallback,
                        t.llm_seconds_p50_p95.0,
                        t.llm_seconds_p50_p95.1,
                        t.other_ms_p50_p95.0,
                        t.other_ms_p50_p95.1
                    );
                }
                None => md.push_str(" – | – | – | – | – | – | – | – |\n"),
            }
        }
        // Runs whose users' memory was incomplete when they ran (`memory_coverage`): their
        // comparison with memory-free methods understates what memory adds.
        let partial: Vec<String> = group
            .iter()
            .filter_map(|r| {
                let p = &r.1.spec.provenance;
                let c = p.get("memory_coverage")?;
                // `memory_incomplete` (users with a history and incomplete memory); runs
                // written before it carry only the summary line.
                let incomplete = match p.get("memory_incomplete") {
                    Some(n) => n != "0",
                    None => !c.contains(" 0 without records, 0 without up-to-date"),
                };
                incomplete.then(|| format!("- {}: {c}", name(r)))
            })
            .collect();
        if !partial.is_empty() {
            let _ = writeln!(
                md,
                "\n**Incomplete memory** when these runs answered (users with a history but no records, or patterns/profile not written):\n\n{}",
                partial.join("\n")
            );
        }
        // Per category, N@100.
        let mut cats: Vec<&String> = group.iter().flat_map(|r| r.1.per_category.keys()).collect();
        cats.sort();
        cats.dedup();
        if !cats.is_empty() {
            md.push_str("\nN@100 per category (queries):\n\n| method |");
            for c in &cats {
                let n = group
                    .iter()
                    .filter_map(|r| r.1.per_category.get(*c).map(|x| x.0))
                    .max()
                    .unwrap_or(0);
                let _ = write!(md, " {c} ({n}) |");
            }
            md.push_str("\n|---|");
            for _ in &cats {
                md.push_str("---|");
            }
            md.push('\n');
            for r in &group {
                let _ = write!(md, "| {} |", name(r));
                for c in &cats {
                    match r.1.per_category.get(*c).and_then(|x| x.1.get("N@100")) {
                        Some(v) => {
                            let _ = write!(md, " {v:.3} |");
                        }
                        None => md.push_str(" – |"),
                    }
                }
                md.push('\n');
            }
        }
        md.push('\n');
        let bars: Vec<(String, f64)> = group.iter().map(|r| (name(r), n100(&r.1))).collect();
        charts.push((
            field.clone(),
            bar_chart_svg(&bars, &format!("N@100 ({field})")),
        ));
    }
    Ok((md, charts))
}
