//! Commands over data and runs: models, check, index, search, report, compare.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mrrec_data::QueryField;

use crate::args::*;
use crate::cmd::eval::{method_for, print_ranked};

#[derive(Subcommand)]
pub(crate) enum ModelsAction {
    /// List registered models and whether they are cached.
    List,
    /// Fetch models (all embedders by default), verifying sha256.
    Fetch {
        /// Model ids; `all` for every registered model.
        #[arg(default_value = "all-minilm-l6-v2")]
        ids: Vec<String>,
    },
}

pub(crate) fn models(action: ModelsAction) -> Result<()> {
    match action {
        ModelsAction::List => {
            for m in mrrec_models::registry() {
                let cached = m.files.iter().all(|f| {
                    mrrec_models::home()
                        .join("models")
                        .join(m.id)
                        .join(f.name)
                        .exists()
                });
                println!(
                    "{:<30} {:<9} {}  {}",
                    m.id,
                    format!("{:?}", m.kind),
                    if cached { "cached " } else { "missing" },
                    m.description
                );
            }
        }
        ModelsAction::Fetch { ids } => {
            let specs = if ids.iter().any(|i| i == "all") {
                mrrec_models::registry()
            } else {
                ids.iter()
                    .map(|i| mrrec_models::find(i))
                    .collect::<Result<Vec<_>, _>>()?
            };
            for spec in specs {
                let paths = mrrec_models::fetch_model(&spec, &Default::default(), &mut |m| {
                    eprintln!("{m}")
                })?;
                println!("{}: {}", spec.id, paths.dir.display());
            }
        }
    }
    Ok(())
}

pub(crate) fn check(data: DataArgs) -> Result<()> {
    let ds = mrrec_data::Dataset::load(
        &data.data,
        data.queries.as_deref(),
        &mrrec_data::LoadOptions {
            strict: data.strict,
            ..Default::default()
        },
    )?;
    for r in &ds.reports {
        println!("{r}");
    }
    println!(
        "{} items, {} users with {} reviews, {} queries",
        ds.catalogue.len(),
        ds.histories.users(),
        ds.histories.total(),
        ds.queries.len()
    );
    Ok(())
}

pub(crate) fn index(data: DataArgs) -> Result<()> {
    let ws = data.open()?;
    println!(
        "{} items indexed in {}",
        ws.catalogue().len(),
        ws.index_dir.display()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct SearchArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// The request.
    pub(crate) text: String,
    /// Method.
    #[arg(long, default_value = "dense", value_parser = ["dense", "bm25", "hybrid"])]
    pub(crate) method: String,
    /// How many items to show.
    #[arg(short, default_value_t = 10)]
    pub(crate) k: usize,
}

#[derive(Args)]
pub(crate) struct ReportArgs {
    /// Run folders (each may be the folds of a cross-validation joined with commas, as in
    /// `compare`: a row of their queries).
    #[arg(required = true)]
    pub(crate) runs: Vec<RunFolders>,
    /// Write report.md and the charts here (default: print the Markdown).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rounds: usize,
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

#[derive(Args)]
pub(crate) struct CompareArgs {
    /// Run folder A — or the folds of a cross-validation joined with commas
    /// (`runs/f1,runs/f2`: runs of `eval --fold 1/2` and `--fold 2/2`), read as one run.
    pub(crate) a: RunFolders,
    /// Run folder B (or folds joined with commas, as A).
    pub(crate) b: RunFolders,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rounds: usize,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// The data the runs were made on (for the per-history-length table: each user's number of
    /// past reviews; skipped with a note when it cannot be read).
    #[arg(
        long,
        env = "MRREC_DATA",
        default_value = "../shared/data/amazon23-mini"
    )]
    pub(crate) data: PathBuf,
}

#[derive(Args)]
pub(crate) struct ReweighArgs {
    /// A finished run with a re-ranking stage (`eval --rerank N`).
    pub(crate) run: PathBuf,
    /// The judge's weight(s) in the fusion to compute (comma-separated; the method's is 1).
    #[arg(long = "weight", value_delimiter = ',', required = true)]
    pub(crate) weights: Vec<f32>,
    /// Write the run at this (single) weight as a run folder, for `compare` and `report`.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// `mrrec reweigh`: a finished re-ranked run's metrics at other fusion weights, from the judge's
/// scores kept in its per-query trace (no model is asked).
pub(crate) fn reweigh(a: ReweighArgs) -> Result<()> {
    let ReweighArgs { run, weights, out } = a;
    if out.is_some() && weights.len() != 1 {
        bail!("--out writes one run: give one --weight");
    }
    for &w in &weights {
        let p = mrrec_agent::rerank::RerankParams {
            weight: w,
            ..Default::default()
        };
        p.check()
            .map_err(|(_, why)| anyhow::anyhow!("--weight {w}: {why}"))?;
    }
    let (m, outcomes) =
        mrrec_eval::load_run(&run).with_context(|| format!("reading the run {}", run.display()))?;
    if !m.spec.settings["rerank"].is_object() {
        bail!(
            "{}: its last stage is not a judge (settings: {}); reweigh reads runs of `eval --rerank N` without a stage after it",
            run.display(),
            m.spec.settings
        );
    }
    let mut rows = Vec::new();
    for &w in &weights {
        let again: Vec<mrrec_eval::QueryOutcome> = outcomes
            .iter()
            .map(|o| mrrec_agent::rerank::reweigh(o, w))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?;
        let mut spec = m.spec.clone();
        spec.settings["rerank"]["weight"] = serde_json::json!(w);
        spec.provenance
            .insert("reweighed_from".into(), run.display().to_string());
        let mut metrics = mrrec_eval::summarise(&spec, &again, m.skipped);
        metrics.method_seconds = m.method_seconds;
        if let Some(dir) = &out {
            mrrec_eval::save_run(dir, &metrics, &again)
                .with_context(|| format!("writing {}", dir.display()))?;
        }
        rows.push((
            format!("{} w {w} ({})", m.spec.method, m.spec.query_field),
            metrics,
        ));
    }
    let refs: Vec<(String, &mrrec_eval::RunMetrics)> =
        rows.iter().map(|(n, m)| (n.clone(), m)).collect();
    println!(
        "{} ({} queries) re-fused at each weight from its judge's scores:\n",
        run.display(),
        m.n
    );
    print!("{}", mrrec_eval::markdown_table(&refs, true));
    if let Some(dir) = out {
        println!("\nwrote {}", dir.display());
    }
    Ok(())
}

pub(crate) fn search(a: SearchArgs) -> Result<()> {
    let SearchArgs {
        data,
        text,
        method,
        k,
    } = a;
    let ws = data.open()?;
    let m = method_for(&ws, &method, None, Default::default())?;
    let q = mrrec_data::Query {
        qid: "cli".into(),
        user_id: String::new(),
        query: text.clone(),
        simple_query: None,
        category: None,
        timestamp: None,
        split: None,
    };
    let ans = m.answer(&[&q], QueryField::Query, k)?;
    let ranked: Vec<(u32, Option<f32>)> = ans[0].ranking.iter().map(|&item| (item, None)).collect();
    print_ranked(&ws, &ranked);
    Ok(())
}

pub(crate) fn report(a: ReportArgs) -> Result<()> {
    let ReportArgs {
        runs,
        out,
        rounds,
        seed,
    } = a;
    let sides: Vec<Vec<&Path>> = runs.iter().map(RunFolders::paths).collect();
    let sides: Vec<&[&Path]> = sides.iter().map(Vec::as_slice).collect();
    let (md, charts) = mrrec_eval::report_runs(&sides, rounds, seed)?;
    match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            let mut md = md;
            for (field, svg) in &charts {
                let name = format!("n100-{field}.svg");
                std::fs::write(dir.join(&name), svg)?;
                md.push_str(&format!("![N@100, {field}]({name})\n"));
            }
            std::fs::write(dir.join("report.md"), &md)?;
            print!("{md}");
            println!("\nwrote {}", dir.join("report.md").display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// One side of `compare`: a run folder, or several joined with commas.
#[derive(Clone, Debug)]
pub(crate) struct RunFolders(Vec<PathBuf>);

impl std::str::FromStr for RunFolders {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let dirs: Vec<PathBuf> = s.split(',').map(PathBuf::from).collect();
        if dirs.iter().any(|d| d.as_os_str().is_empty()) {
            return Err(format!(
                "{s:?}: an empty run folder (folds are joined as DIR,DIR)"
            ));
        }
        Ok(RunFolders(dirs))
    }
}

impl RunFolders {
    fn paths(&self) -> Vec<&Path> {
        self.0.iter().map(PathBuf::as_path).collect()
    }
}

/// The two kinds of request `compare` tells apart in a derived data set.
const ORIGINS: [&str; 2] = ["own", "derived"];

pub(crate) fn compare(a: CompareArgs) -> Result<()> {
    let CompareArgs {
        a,
        b,
        rounds,
        seed,
        data,
    } = a;
    let (a, b) = (a.paths(), b.paths());
    let (_, table) = mrrec_eval::compare_run_sets(&a, &b, rounds, seed)?;
    print!("{table}");
    // Memory should matter most for users with long histories: the same comparison per bucket.
    let opts = mrrec_data::LoadOptions::default();
    match mrrec_data::Dataset::load(&data, None, &opts) {
        Ok(ds) => {
            let by = mrrec_eval::compare_runs_by(
                &a,
                &b,
                rounds,
                seed,
                "past reviews",
                &mrrec_eval::HISTORY_BUCKETS,
                &|q| {
                    Some(mrrec_eval::history_bucket(ds.histories.of(&q.user_id).len()).to_string())
                },
            )?;
            print!(
                "\nPer history length (the asking user's reviews in {}):\n\n{by}",
                data.display()
            );
            // Requests derived from a purchase (`derive-queries`) are written by a model from the
            // item itself; a method may gain on one kind and not the other.
            let derived = |user: &str| mrrec_data::derive::snapshot_of(user).is_some();
            let queries = ds.queries.all();
            let of_kind = |d: bool| queries.iter().any(|q| derived(&q.query().user_id) == d);
            if of_kind(true) && of_kind(false) {
                let by = mrrec_eval::compare_runs_by(
                    &a,
                    &b,
                    rounds,
                    seed,
                    "requests",
                    &ORIGINS,
                    &|q| Some(ORIGINS[usize::from(derived(&q.user_id))].to_string()),
                )?;
                print!(
                    "\nPer origin (the data's own requests; those `derive-queries` wrote from a purchase, asked by its snapshot user `USER@TIME`):\n\n{by}"
                );
            }
        }
        Err(e) => println!("\n(no per-history-length table: {e})"),
    }
    Ok(())
}
