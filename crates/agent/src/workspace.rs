//! A data directory made ready to answer: its dataset, its catalogue (possibly a slice), the
//! embedder, and the item indexes, built once and reopened by fingerprint.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Context, Result};
use mrrec_data::{Catalogue, Dataset, LoadOptions};
use mrrec_embed::{BertEmbedder, CachedEmbedder, EmbeddingCache, TextEmbedder};
use mrrec_index::{
    open_index, Bm25Index, ExactIndex, Hit, HnswIndex, HnswParams, HybridIndex, HybridParams,
    ItemIndex, SearchQuery,
};
use mrrec_models::artefact::build_dir_once;
use sha2::{Digest, Sha256};

/// How to open a workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceOptions {
    /// The data directory (Amazon Reviews 2023 / C4 files).
    pub data: PathBuf,
    /// A query file overriding the one in `data`.
    pub queries: Option<PathBuf>,
    /// Keep every query target plus this many other items (a slice for CI and quick runs).
    pub max_items: Option<usize>,
    /// Any bad record is an error.
    pub strict: bool,
    /// Where indexes are kept (default `$MRREC_HOME/indexes`).
    pub index_root: PathBuf,
    /// Show progress bars.
    pub progress: bool,
    /// Which dense index ranks: exact, HNSW, or auto (HNSW above [`HNSW_ABOVE`] items).
    pub dense: DenseKind,
}

/// The dense index a workspace ranks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseKind {
    /// Exact inner product over every item.
    Exact,
    /// HNSW graph (approximate).
    Hnsw,
    /// HNSW above [`HNSW_ABOVE`] items, exact below.
    Auto,
}

/// Catalogue size from which `DenseKind::Auto` picks HNSW.
pub const HNSW_ABOVE: usize = 200_000;

impl std::str::FromStr for DenseKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(DenseKind::Exact),
            "hnsw" => Ok(DenseKind::Hnsw),
            "auto" => Ok(DenseKind::Auto),
            o => Err(format!("unknown dense index {o:?} (exact, hnsw, auto)")),
        }
    }
}

impl WorkspaceOptions {
    /// Defaults for `data`.
    pub fn new(data: impl Into<PathBuf>) -> Self {
        WorkspaceOptions {
            data: data.into(),
            queries: None,
            max_items: None,
            strict: false,
            index_root: mrrec_models::home().join("indexes"),
            progress: false,
            dense: DenseKind::Auto,
        }
    }
}

/// A loaded dataset with its retrieval machinery.
pub struct Workspace {
    /// The dataset (catalogue possibly sliced).
    pub dataset: Dataset,
    /// The embedder, its vectors cached on disk.
    pub embedder: Arc<CachedEmbedder<BertEmbedder>>,
    /// Folder of this catalogue's indexes.
    pub index_dir: PathBuf,
    /// The dense index (exact or HNSW).
    pub dense: Arc<dyn ItemIndex>,
    /// Folder of the dense index in use.
    pub dense_dir: PathBuf,
    /// BM25 index.
    pub lexical: Arc<dyn ItemIndex>,
    /// sha256 over the input files.
    pub data_sha256: String,
}

/// sha256 over the files a dataset was read from, in order.
pub fn files_sha256(paths: &[&Path]) -> Result<String> {
    let mut h = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", p.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// The index saved in `dir`, when there is one of `len` items.
fn reopen(dir: &Path, len: usize) -> Option<Arc<dyn ItemIndex>> {
    open_index(dir)
        .ok()
        .filter(|ix| ix.len() == len)
        .map(Arc::from)
}

fn catalogue_fingerprint(cat: &Catalogue, model: &str) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    for it in cat.items() {
        h.update(it.id.as_bytes());
        h.update([0]);
        h.update(it.text.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

impl Workspace {
    /// Loads the data, fetches the embedder if needed, and builds (or reopens) the indexes.
    pub fn open(opts: &WorkspaceOptions) -> Result<Self> {
        let load = LoadOptions {
            strict: opts.strict,
            ..Default::default()
        };
        let mut dataset = Dataset::load(&opts.data, opts.queries.as_deref(), &load)
            .with_context(|| format!("loading the data in {}", opts.data.display()))?;
        for r in &dataset.reports {
            tracing::info!("{r}");
        }
        let files = mrrec_data::DatasetFiles::discover(&opts.data)?;
        let mut paths: Vec<&Path> = vec![&files.items];
        paths.extend(files.reviews.as_deref());
        let qpath = opts.queries.clone().or(files.queries.clone());
        paths.extend(qpath.as_deref());
        let data_sha256 = files_sha256(&paths)?;
        if let Some(extra) = opts.max_items {
            let mut keep: HashSet<String> = dataset
                .queries
                .all()
                .iter()
                .map(|q| q.target().to_string())
                .collect();
            for u in dataset.histories.user_ids() {
                for r in dataset.histories.of(u) {
                    keep.insert(r.parent_asin.clone());
                }
            }
            dataset.catalogue = dataset.catalogue.slice(&keep, extra);
        }
        let cache =
            EmbeddingCache::open(&mrrec_models::home().join("cache").join("embeddings.sqlite"))?;
        let embedder = Arc::new(CachedEmbedder::new(BertEmbedder::default_model()?, cache));
        let fp = catalogue_fingerprint(&dataset.catalogue, embedder.model_id());
        let index_dir = opts.index_root.join(&fp);
        let exact = Self::dense_index(
            &dataset.catalogue,
            &embedder,
            &index_dir.join("exact"),
            opts.progress,
        )?;
        let use_hnsw = match opts.dense {
            DenseKind::Exact => false,
            DenseKind::Hnsw => true,
            DenseKind::Auto => dataset.catalogue.len() > HNSW_ABOVE,
        };
        let (dense, dense_dir) = if use_hnsw {
            let dir = index_dir.join("hnsw");
            (
                Self::hnsw_index(&index_dir.join("exact"), &dir, exact.len())?,
                dir,
            )
        } else {
            (exact, index_dir.join("exact"))
        };
        let lexical = Self::lexical_index(&dataset.catalogue, &index_dir.join("bm25"))?;
        Ok(Workspace {
            dataset,
            embedder,
            index_dir,
            dense,
            dense_dir,
            lexical,
            data_sha256,
        })
    }

    fn dense_index(
        cat: &Catalogue,
        embedder: &CachedEmbedder<BertEmbedder>,
        dir: &Path,
        progress: bool,
    ) -> Result<Arc<dyn ItemIndex>> {
        build_dir_once(
            dir,
            |d| reopen(d, cat.len()),
            |tmp| {
                let texts: Vec<&str> = cat.items().iter().map(|i| i.text.as_str()).collect();
                let mut pb = crate::progress::Progress::new("embedding items", progress);
                let vecs =
                    embedder.embed_with_progress(&texts, &mut |done, total| pb.set(done, total))?;
                pb.finish();
                let ix = ExactIndex::from_rows(embedder.dim(), &vecs)?;
                ix.save(tmp)
                    .with_context(|| format!("saving {}", dir.display()))
            },
        )
    }

    fn hnsw_index(exact_dir: &Path, dir: &Path, len: usize) -> Result<Arc<dyn ItemIndex>> {
        build_dir_once(
            dir,
            |d| reopen(d, len),
            |tmp| {
                eprintln!("building the HNSW graph over {len} items…");
                let exact = ExactIndex::open(exact_dir)?;
                let ix = HnswIndex::build(exact.dim(), exact.vectors(), HnswParams::default())?;
                ix.save(tmp)
                    .with_context(|| format!("saving {}", dir.display()))
            },
        )
    }

    fn lexical_index(cat: &Catalogue, dir: &Path) -> Result<Arc<dyn ItemIndex>> {
        build_dir_once(
            dir,
            |d| reopen(d, cat.len()),
            |tmp| {
                let docs = cat
                    .items()
                    .iter()
                    .enumerate()
                    .map(|(i, it)| (i as u32, it.text.as_str()));
                Bm25Index::build(docs, Some(tmp))
                    .map(drop)
                    .with_context(|| format!("building {}", dir.display()))
            },
        )
    }

    /// A hybrid (RRF) index over this workspace's lexical and dense indexes.
    pub fn hybrid(&self) -> HybridIndex {
        HybridIndex::new(
            self.lexical.clone(),
            self.dense.clone(),
            HybridParams::default(),
        )
    }

    /// What a request may read: catalogue, past interactions, embedder and indexes; not the
    /// labelled queries.
    pub fn shop(&self) -> crate::Shop<'_> {
        crate::Shop {
            catalogue: &self.dataset.catalogue,
            histories: &self.dataset.histories,
            embedder: self.embedder.as_ref(),
            dense: &self.dense,
            lexical: &self.lexical,
        }
    }

    /// The catalogue every method ranks.
    pub fn catalogue(&self) -> &Catalogue {
        &self.dataset.catalogue
    }

    /// Embeds `text` and returns the `k` nearest items.
    pub fn search_dense(&self, text: &str, k: usize) -> Result<Vec<Hit>> {
        let v = self.embedder.embed(&[text])?.remove(0);
        Ok(self.dense.search(
            &SearchQuery {
                text,
                vector: Some(&v),
            },
            k,
        )?)
    }
}
