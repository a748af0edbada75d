//! Source files, spans and diagnostics (rendered by miette).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, Severity, SourceCode};

/// One source file (the experiment file or an `include`d one).
pub struct SourceFile {
    pub path: PathBuf,
    /// The name diagnostics show (the path as written or given).
    pub name: String,
    pub text: String,
    named: NamedSource<String>,
}

impl SourceFile {
    pub fn new(path: &Path, text: String) -> Arc<SourceFile> {
        let name = path.display().to_string();
        let named = NamedSource::new(name.clone(), text.clone());
        Arc::new(SourceFile { path: path.to_path_buf(), name, text, named })
    }

    /// The directory relative paths in this file are resolved against.
    pub fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

impl fmt::Debug for SourceFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceFile({})", self.name)
    }
}

/// A byte range in a source file.
#[derive(Clone)]
pub struct Span {
    pub file: Arc<SourceFile>,
    pub range: Range<usize>,
}

/// `file:start..end` (byte offsets), with the file's name as written: what snapshots of the AST
/// show for a span.
impl serde::Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}:{}..{}", self.file.name, self.range.start, self.range.end))
    }
}

impl Span {
    pub fn new(file: &Arc<SourceFile>, range: Range<usize>) -> Span {
        Span { file: file.clone(), range }
    }
    pub fn text(&self) -> &str {
        &self.file.text[self.range.clone()]
    }
    /// The smallest span covering both (same file assumed; else `self`).
    pub fn to(&self, other: &Span) -> Span {
        if !Arc::ptr_eq(&self.file, &other.file) {
            return self.clone();
        }
        Span::new(&self.file, self.range.start.min(other.range.start)..self.range.end.max(other.range.end))
    }
    /// 1-based line number of the start.
    pub fn line(&self) -> usize {
        self.file.text[..self.range.start.min(self.file.text.len())].matches('\n').count() + 1
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}..{}", self.file.name, self.range.start, self.range.end)
    }
}

/// Something found in an experiment file: an error, or a warning that does not stop the run.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    /// The primary span and its label.
    pub span: Option<Span>,
    pub label: String,
    /// Secondary labels in the primary span's file.
    pub labels: Vec<(Span, String)>,
    pub help: Option<String>,
    /// Notes pointing into other files (e.g. the first definition in an included file).
    pub related: Vec<Diagnostic>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>, span: &Span, label: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            span: Some(span.clone()),
            label: label.into(),
            labels: Vec::new(),
            help: None,
            related: Vec::new(),
        }
    }

    /// A diagnostic without a location (e.g. a file that cannot be read at all).
    pub fn bare(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            span: None,
            label: String::new(),
            labels: Vec::new(),
            help: None,
            related: Vec::new(),
        }
    }

    pub fn warning(mut self) -> Diagnostic {
        self.severity = Severity::Warning;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// A secondary label; in another file it becomes a related note.
    pub fn with_label(mut self, span: &Span, label: impl Into<String>) -> Diagnostic {
        let same = self.span.as_ref().map(|s| Arc::ptr_eq(&s.file, &span.file)).unwrap_or(false);
        let label = label.into();
        if same {
            self.labels.push((span.clone(), label));
        } else {
            let mut note = Diagnostic::error("patchbay::note", label.clone(), span, label);
            note.severity = Severity::Advice;
            self.related.push(note);
        }
        self
    }

    /// Render with miette's graphical handler in a plain (colourless, ASCII) theme.
    pub fn render_plain(&self) -> String {
        let handler = GraphicalReportHandler::new_themed(GraphicalTheme::none()).with_width(100).with_links(false);
        let mut out = String::new();
        let _ = handler.render_report(&mut out, self);
        out
    }

    /// Render for a terminal (colours when stderr is one).
    pub fn render_terminal(&self) -> String {
        let theme = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_width(110);
        let mut out = String::new();
        let _ = handler.render_report(&mut out, self);
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

impl miette::Diagnostic for Diagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        if self.code == "patchbay::note" {
            None
        } else {
            Some(Box::new(self.code))
        }
    }
    fn severity(&self) -> Option<Severity> {
        Some(self.severity)
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.span.as_ref().map(|s| &s.file.named as &dyn SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.span.as_ref()?;
        let mut labels = vec![LabeledSpan::new_primary_with_span(
            if self.label.is_empty() { None } else { Some(self.label.clone()) },
            (span.range.start, span.range.len()),
        )];
        for (s, l) in &self.labels {
            labels.push(LabeledSpan::new_with_span(Some(l.clone()), (s.range.start, s.range.len())));
        }
        Some(Box::new(labels.into_iter()))
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            None
        } else {
            Some(Box::new(self.related.iter().map(|d| d as &dyn miette::Diagnostic)))
        }
    }
}

/// Edit distance, for "did you mean" suggestions.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a sensible edit distance.
pub fn did_you_mean<'a, I: IntoIterator<Item = &'a str>>(name: &str, candidates: I) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1) + 1;
    candidates
        .into_iter()
        .map(|c| (levenshtein(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, c.to_string()))
        .map(|(_, c)| c)
}
