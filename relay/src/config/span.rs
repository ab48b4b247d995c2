//! Where things are in the file: key paths, their spans, and line/column numbers.

use std::{fmt, ops::Range};

use toml::{de::DeTable, Spanned};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for Seg {
    fn from(key: &'static str) -> Self {
        Self::Key(key)
    }
}

impl From<usize> for Seg {
    fn from(index: usize) -> Self {
        Self::Index(index)
    }
}

/// A key path such as `port[2].name`.
pub type KeyPath = Vec<Seg>;

/// Builds a [`KeyPath`]: `at!["port", 2, "name"]`.
macro_rules! at {
    ($($seg:expr),* $(,)?) => { vec![$($crate::config::span::Seg::from($seg)),*] };
}
pub(crate) use at;

/// Something wrong at a key path, found after the file was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub at: KeyPath,
    pub message: String,
}

impl Issue {
    pub fn new(at: KeyPath, message: impl Into<String>) -> Self {
        Self { at, message: message.into() }
    }
}

/// A 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LineCol {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The line and column of byte offset `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> LineCol {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCol {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Finds the span of a key path in the parsed document.
pub struct Locator<'i> {
    root: Option<Spanned<DeTable<'i>>>,
}

impl<'i> Locator<'i> {
    /// Parses `text` once more, keeping every span. A document that does not parse locates
    /// everything at its start.
    pub fn new(text: &'i str) -> Self {
        Self { root: DeTable::parse(text).ok() }
    }

    /// The span of the value at `path`, or of the deepest part of the path that exists (the
    /// start of the file when nothing does).
    pub fn span(&self, path: &[Seg]) -> Range<usize> {
        let Some(root) = &self.root else { return 0..0 };
        let mut table: Option<&DeTable<'i>> = Some(root.get_ref());
        let mut array: Option<&[Spanned<toml::de::DeValue<'i>>]> = None;
        let mut best = 0..0;
        for seg in path {
            let next = match seg {
                Seg::Key(key) => table.and_then(|t| t.get(*key)),
                Seg::Index(i) => array.and_then(|a| a.get(*i)),
            };
            let Some(value) = next else { break };
            best = value.span();
            table = value.get_ref().as_table();
            array = value.get_ref().as_array().map(|a| &a[..]);
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_lines_and_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), LineCol { line: 1, column: 1 });
        assert_eq!(line_col(text, 6), LineCol { line: 2, column: 1 });
        // Right after the two-byte 'é': the third character of line 2.
        assert_eq!(line_col(text, 9), LineCol { line: 2, column: 3 });
        assert_eq!(line_col(text, 1000), LineCol { line: 3, column: 1 });
    }

    #[test]
    fn locator_finds_values_and_falls_back_to_parents() {
        let text = "x = 1\n[[port]]\nname = \"a\"\n[[port]]\nname = \"b\"\n[policy]\nallow = [\n  \"239.0.0.0/8\",\n  \"bad\",\n]\n";
        let loc = Locator::new(text);
        let lc = |path: KeyPath| line_col(text, loc.span(&path).start);
        assert_eq!(lc(at!["port", 1, "name"]).line, 5);
        assert_eq!(lc(at!["policy", "allow", 1]).line, 9);
        assert_eq!(lc(at!["policy", "allow", 7]).line, 7, "missing index: the list");
        assert_eq!(lc(at!["timers", "robustness"]).line, 1, "missing table: start of file");
    }
}
