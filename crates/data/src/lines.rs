use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// Longest line accepted; anything longer is reported as a bad record instead of read into memory.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Opens a text file for streaming, decompressing it when its name ends in `.gz`.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// One line of a JSONL file: its 1-based number and its text, or why it could not be read.
pub enum JsonlLine {
    /// A line's text (without the newline).
    Text(u64, String),
    /// A line that is not valid UTF-8 or is too long.
    Bad(u64, String),
}

/// Streams the non-empty lines of a `.jsonl` / `.jsonl.gz` file with their line numbers.
pub struct JsonlReader {
    path: PathBuf,
    inner: Box<dyn BufRead + Send>,
    line: u64,
    buf: Vec<u8>,
}

impl JsonlReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(JsonlReader {
            path: path.to_path_buf(),
            inner: open_text(path)?,
            line: 0,
            buf: Vec::new(),
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next non-blank line, `None` at the end of the file.
    pub fn next_line(&mut self) -> Result<Option<JsonlLine>> {
        loop {
            self.buf.clear();
            let n = (&mut self.inner)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| DataError::io(&self.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            if self.buf.len() > MAX_LINE_BYTES && self.buf.last() != Some(&b'\n') {
                // Skip the rest of the over-long line.
                loop {
                    self.buf.clear();
                    let m = (&mut self.inner)
                        .take(1 << 20)
                        .read_until(b'\n', &mut self.buf)
                        .map_err(|e| DataError::io(&self.path, e))?;
                    if m == 0 || self.buf.last() == Some(&b'\n') {
                        break;
                    }
                }
                return Ok(Some(JsonlLine::Bad(
                    self.line,
                    format!("line longer than {MAX_LINE_BYTES} bytes"),
                )));
            }
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(
                match String::from_utf8(std::mem::take(&mut self.buf)) {
                    Ok(s) => JsonlLine::Text(self.line, s),
                    Err(e) => JsonlLine::Bad(self.line, format!("not valid UTF-8: {e}")),
                },
            ));
        }
    }
}
