//! A reader for the subset of YAML the official HRNet-OCR experiment files use: nested
//! block maps, block lists (`- 4`), flow lists (`[0.4, 1]`), plain and quoted scalars, and
//! comments. Anything else is an error naming the line, never a guess.

use crate::error::{Error, Result};

/// A parsed YAML value. Scalars stay text; the config reader types them.
#[derive(Clone, Debug, PartialEq)]
pub enum Yaml {
    Map(Vec<(String, Yaml)>),
    List(Vec<Yaml>),
    Scalar(String),
}

impl Yaml {
    /// The value at a dotted path such as `MODEL.EXTRA.STAGE2`, if present.
    pub fn get(&self, path: &str) -> Option<&Yaml> {
        path.split('.').try_fold(self, |node, key| match node {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        })
    }
}

struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

/// Parses a document; `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Yaml> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let content = strip_comment(raw).trim_end();
        if content.trim().is_empty() || content.trim() == "---" {
            continue;
        }
        if content.contains('\t') {
            return Err(err(source, i + 1, "tabs are not allowed in YAML indentation"));
        }
        let indent = content.len() - content.trim_start().len();
        lines.push(Line { number: i + 1, indent, text: content.trim_start() });
    }
    let mut parser = Parser { lines, pos: 0, source };
    if parser.lines.is_empty() {
        return Ok(Yaml::Map(Vec::new()));
    }
    let value = parser.block(0)?;
    if let Some(line) = parser.lines.get(parser.pos) {
        return Err(err(source, line.number, "unexpected indentation"));
    }
    Ok(value)
}

fn err(source: &str, line: usize, what: &str) -> Error {
    Error::Format { path: source.to_string(), what: format!("line {line}: {what}") }
}

/// Drops a `#` comment that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('#', None) if i == 0 || line[..i].ends_with(' ') => return &line[..i],
            _ => {}
        }
    }
    line
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    source: &'a str,
}

impl Parser<'_> {
    /// A map or list whose lines are indented exactly `indent`.
    fn block(&mut self, indent: usize) -> Result<Yaml> {
        if self.lines[self.pos].text.starts_with("- ") || self.lines[self.pos].text == "-" {
            return self.list(indent);
        }
        let mut entries: Vec<(String, Yaml)> = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                return Err(err(self.source, line.number, "unexpected indentation"));
            }
            let (number, text) = (line.number, line.text);
            let Some((key, rest)) = split_key(text) else {
                return Err(err(self.source, number, &format!("expected `key: value`, found {text:?}")));
            };
            if entries.iter().any(|(k, _)| k == key) {
                return Err(err(self.source, number, &format!("duplicate key {key}")));
            }
            self.pos += 1;
            let value = if rest.is_empty() {
                self.nested(indent, number)?
            } else {
                scalar_or_flow(rest, self.source, number)?
            };
            entries.push((key.to_string(), value));
        }
        Ok(Yaml::Map(entries))
    }

    /// The value of a `key:` with nothing after it: the following deeper block, or a list
    /// at the key's own indentation (as the official files write them).
    fn nested(&mut self, indent: usize, number: usize) -> Result<Yaml> {
        match self.lines.get(self.pos) {
            Some(next) if next.indent > indent => self.block(next.indent),
            Some(next) if next.indent == indent && next.text.starts_with('-') => self.list(indent),
            _ => Err(err(self.source, number, "a key with no value")),
        }
    }

    fn list(&mut self, indent: usize) -> Result<Yaml> {
        let mut items = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent != indent || !line.text.starts_with('-') {
                break;
            }
            let item = line.text[1..].trim();
            if item.is_empty() || split_key(item).is_some() {
                return Err(err(self.source, line.number, "only scalar list items are supported"));
            }
            items.push(scalar_or_flow(item, self.source, line.number)?);
            self.pos += 1;
        }
        Ok(Yaml::List(items))
    }
}

/// Splits `key: rest` (a key is a plain word; quoted keys are not used by the configs).
fn split_key(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = text.split_once(':')?;
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (plain && (rest.is_empty() || rest.starts_with(' '))).then(|| (key, rest.trim()))
}

fn scalar_or_flow(text: &str, source: &str, number: usize) -> Result<Yaml> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            err(source, number, "an unterminated flow list (nested lists are not supported)")
        })?;
        if inner.trim().is_empty() {
            return Ok(Yaml::List(Vec::new()));
        }
        return inner
            .split(',')
            .map(|item| scalar(item.trim(), source, number))
            .collect::<Result<_>>()
            .map(Yaml::List);
    }
    if text.starts_with('{') {
        return Err(err(source, number, "flow maps are not supported"));
    }
    scalar(text, source, number)
}

fn scalar(text: &str, source: &str, number: usize) -> Result<Yaml> {
    for q in ['\'', '"'] {
        if let Some(inner) = text.strip_prefix(q) {
            let inner =
                inner.strip_suffix(q).ok_or_else(|| err(source, number, "an unterminated quoted string"))?;
            return Ok(Yaml::Scalar(inner.to_string()));
        }
    }
    if text.starts_with('[') || text.starts_with('{') {
        return Err(err(source, number, "nested flow collections are not supported"));
    }
    Ok(Yaml::Scalar(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_official_layout() {
        let doc = "A:\n  B: 1 # comment\n  L:\n  - 4\n  - 5\n  F: [0.4, 1]\n  S: 'x # y'\nC: (0,1)\n";
        let y = parse(doc, "t").unwrap();
        assert_eq!(y.get("A.B"), Some(&Yaml::Scalar("1".into())));
        assert_eq!(y.get("A.L"), Some(&Yaml::List(vec![Yaml::Scalar("4".into()), Yaml::Scalar("5".into())])));
        assert_eq!(
            y.get("A.F"),
            Some(&Yaml::List(vec![Yaml::Scalar("0.4".into()), Yaml::Scalar("1".into())]))
        );
        assert_eq!(y.get("A.S"), Some(&Yaml::Scalar("x # y".into())));
        assert_eq!(y.get("C"), Some(&Yaml::Scalar("(0,1)".into())));
    }

    #[test]
    fn malformed_documents_name_the_line() {
        for (doc, line) in
            [("A:\n  B: 1\n    C: 2\n", "line 3"), ("A: [1, 2\n", "line 1"), ("A: 1\nA: 2\n", "line 2")]
        {
            let e = parse(doc, "bad.yaml").unwrap_err().to_string();
            assert!(e.contains("bad.yaml") && e.contains(line), "{doc:?}: {e}");
        }
    }
}
