use std::collections::HashSet;
use std::path::Path;

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, FAST, INDEXED, STORED, TEXT};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{doc, Index, IndexReader, ReloadPolicy, Term};

use crate::{sort_hits, write_kind, Hit, ItemIndex, Result, SearchQuery};

/// Most distinct query terms used (a hostile or huge query cannot blow up the search).
pub const MAX_QUERY_TERMS: usize = 256;

/// BM25 over item text (tantivy's default tokenizer: split on non-alphanumerics, lowercase).
/// The query is a bag of words: no query syntax is interpreted, so any text is safe.
pub struct Bm25Index {
    reader: IndexReader,
    text: Field,
    analyzer: TextAnalyzer,
    /// Per segment: doc id → catalogue position.
    positions: Vec<Vec<u32>>,
    /// The folder the index lives in.
    dir: std::path::PathBuf,
    /// Keeps a temporary folder alive for indexes built without one.
    _tmp: Option<tempfile::TempDir>,
}

fn schema() -> (Schema, Field, Field) {
    let mut b = Schema::builder();
    let item = b.add_u64_field("item", INDEXED | FAST | STORED);
    let text = b.add_text_field("text", TEXT);
    (b.build(), item, text)
}

impl Bm25Index {
    /// Indexes `(position, text)` pairs, in a folder when `dir` is given, else in memory.
    pub fn build<'a>(
        docs: impl IntoIterator<Item = (u32, &'a str)>,
        dir: Option<&Path>,
    ) -> Result<Self> {
        let (schema, item, text) = schema();
        let (index, folder, tmp_holder) = match dir {
            Some(d) => {
                let td = d.join("tantivy");
                if td.exists() {
                    std::fs::remove_dir_all(&td).map_err(crate::io_err(&td))?;
                }
                std::fs::create_dir_all(&td).map_err(crate::io_err(&td))?;
                (Index::create_in_dir(&td, schema)?, td, None)
            }
            None => {
                // A private temporary folder, so that `save` can copy plain files.
                let tmp = tempfile::tempdir().map_err(crate::io_err(Path::new("(temp dir)")))?;
                let idx = Index::create_in_dir(tmp.path(), schema)?;
                (idx, tmp.path().to_path_buf(), Some(tmp))
            }
        };
        {
            let mut writer = index.writer_with_num_threads(1, 200_000_000)?;
            for (pos, t) in docs {
                writer.add_document(doc!(item => pos as u64, text => t))?;
            }
            writer.commit()?;
            writer.wait_merging_threads()?;
        }
        if let Some(d) = dir {
            write_kind(d, "bm25")?;
        }
        let mut ix = Self::from_index(index, text, folder)?;
        ix._tmp = tmp_holder;
        Ok(ix)
    }

    /// Reopens an index saved by [`ItemIndex::save`] / built in a folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = Index::open_in_dir(dir.join("tantivy"))?;
        let text = index.schema().get_field("text")?;
        Self::from_index(index, text, dir.join("tantivy"))
    }

    fn from_index(index: Index, text: Field, dir: std::path::PathBuf) -> Result<Self> {
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let analyzer = index.tokenizer_for_field(text)?;
        let searcher = reader.searcher();
        let mut positions = Vec::with_capacity(searcher.segment_readers().len());
        for seg in searcher.segment_readers() {
            let col = seg.fast_fields().u64("item")?;
            let ids = (0..seg.max_doc())
                .map(|d| col.first(d).unwrap_or(0) as u32)
                .collect();
            positions.push(ids);
        }
        Ok(Bm25Index {
            reader,
            text,
            analyzer,
            positions,
            dir,
            _tmp: None,
        })
    }

    fn query_for(&self, text: &str) -> Option<Box<dyn Query>> {
        let mut analyzer = self.analyzer.clone();
        let mut stream = analyzer.token_stream(text);
        let mut seen = HashSet::new();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        while stream.advance() {
            let t = stream.token().text.clone();
            if seen.len() >= MAX_QUERY_TERMS {
                break;
            }
            if seen.insert(t.clone()) {
                let term = Term::from_field_text(self.text, &t);
                clauses.push((
                    Occur::Should,
                    Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
                ));
            }
        }
        if clauses.is_empty() {
            None
        } else {
            Some(Box::new(BooleanQuery::new(clauses)))
        }
    }
}

impl ItemIndex for Bm25Index {
    fn kind(&self) -> &'static str {
        "bm25"
    }

    fn len(&self) -> usize {
        self.positions.iter().map(Vec::len).sum()
    }

    fn search(&self, query: &SearchQuery<'_>, k: usize) -> Result<Vec<Hit>> {
        let k = k.min(self.len());
        let Some(q) = self.query_for(query.text).filter(|_| k > 0) else {
            return Ok(Vec::new());
        };
        let searcher = self.reader.searcher();
        let top = searcher.search(&q, &TopDocs::with_limit(k).order_by_score())?;
        let mut hits: Vec<Hit> = top
            .into_iter()
            .filter_map(|(score, addr)| {
                self.positions
                    .get(addr.segment_ord as usize)
                    .and_then(|p| p.get(addr.doc_id as usize))
                    .map(|&item| Hit { item, score })
            })
            .collect();
        sort_hits(&mut hits);
        Ok(hits)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let td = dir.join("tantivy");
        let same = self
            .dir
            .canonicalize()
            .ok()
            .is_some_and(|d| Some(d) == td.canonicalize().ok());
        if !same {
            if td.exists() {
                std::fs::remove_dir_all(&td).map_err(crate::io_err(&td))?;
            }
            std::fs::create_dir_all(&td).map_err(crate::io_err(&td))?;
            let src = &self.dir;
            for entry in std::fs::read_dir(src).map_err(crate::io_err(src))? {
                let entry = entry.map_err(crate::io_err(src))?;
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(".lock") || !entry.path().is_file() {
                    continue;
                }
                let to = td.join(&name);
                std::fs::copy(entry.path(), &to).map_err(crate::io_err(&to))?;
            }
        }
        write_kind(dir, "bm25")
    }
}
