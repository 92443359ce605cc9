//! The WGSL composition step: what WGSL lacks for writing a kernel family once.
//!
//! A kernel file is plain WGSL plus line directives, expanded before naga or the driver
//! sees it:
//!
//! - `#include "NAME"`: a shared piece of `shaders/include/`, composed in place.
//! - `#template NAME(A, B)` … `#end`: a body written once, emitted by each
//!   `#stamp NAME(x, y)` with every `${A}` replaced by `x` and `${B}` by `y` (entry names,
//!   accumulator types, whether an optional input is bound).
//! - `#for J in 0..16` … `#end`: the lines repeated for J = 0 to 15, with `${J}` and integer
//!   expressions of it (`${J / 4}`, `${4 * G + J}`) replaced: unrolled register tiles as
//!   named variables, which CPU drivers keep in registers where an indexed array spills.
//! - `#if C` … `#else` … `#end`: kept when C is `true` or a flag the module is built with
//!   (`F16`), dropped when `false` or an absent flag; `!C` negates.
//!
//! Errors name the file and the line.

use std::collections::HashMap;

/// A name's value while expanding: a template argument or a loop index.
type Env = HashMap<String, String>;

/// Expands `source` (the file `file`) with `flags` set, taking `#include`d pieces from
/// `includes`: plain WGSL, or an error naming the file, line and what is wrong.
pub fn compose(
    file: &str,
    source: &str,
    flags: &[&str],
    includes: &[(&str, &str)],
) -> Result<String, String> {
    let mut state = State { flags, includes, templates: HashMap::new(), out: String::new() };
    let lines: Vec<Line> = numbered(file, source);
    state.expand(&lines, &Env::new())?;
    Ok(state.out)
}

/// A source line with where it came from, for errors.
#[derive(Clone)]
struct Line {
    file: String,
    number: usize,
    text: String,
}

impl Line {
    fn error(&self, what: impl std::fmt::Display) -> String {
        format!("{}:{}: {what} (line: {:?})", self.file, self.number, self.text.trim())
    }
}

fn numbered(file: &str, source: &str) -> Vec<Line> {
    source
        .lines()
        .enumerate()
        .map(|(i, text)| Line { file: file.to_string(), number: i + 1, text: text.to_string() })
        .collect()
}

struct State<'a> {
    flags: &'a [&'a str],
    includes: &'a [(&'a str, &'a str)],
    /// Each template's parameters and body, as written.
    templates: HashMap<String, (Vec<String>, Vec<Line>)>,
    out: String,
}

/// The directive a line holds, if any: its keyword and the rest.
fn directive(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim().strip_prefix('#')?;
    let (word, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((word, args.trim()))
}

/// Directives that open a block closed by `#end`.
const OPENERS: [&str; 3] = ["template", "for", "if"];

impl State<'_> {
    fn expand(&mut self, lines: &[Line], env: &Env) -> Result<(), String> {
        let mut i = 0;
        while i < lines.len() {
            let line = &lines[i];
            let Some((word, args)) = directive(&line.text) else {
                self.out.push_str(&substitute(line, env)?);
                self.out.push('\n');
                i += 1;
                continue;
            };
            let args = substitute(&Line { text: args.to_string(), ..line.clone() }, env)?;
            if !OPENERS.contains(&word) {
                match word {
                    "include" => self.include(line, &args, env)?,
                    "stamp" => self.stamp(line, &args)?,
                    _ => return Err(line.error(format!("unknown directive #{word}"))),
                }
                i += 1;
                continue;
            }
            let (end, otherwise) = block_end(lines, i)?;
            let body = &lines[i + 1..otherwise.unwrap_or(end)];
            match word {
                "template" => {
                    let (name, params) = call(line, &args)?;
                    if otherwise.is_some() {
                        return Err(line.error("#else belongs to #if"));
                    }
                    self.templates.insert(name, (params, body.to_vec()));
                }
                "for" => {
                    let (var, range) =
                        args.split_once(" in ").ok_or_else(|| line.error("expected `#for NAME in A..B`"))?;
                    let (from, to) = range
                        .split_once("..")
                        .and_then(|(a, b)| {
                            Some((a.trim().parse::<i64>().ok()?, b.trim().parse::<i64>().ok()?))
                        })
                        .ok_or_else(|| line.error("expected an integer range A..B"))?;
                    for value in from..to {
                        let mut inner = env.clone();
                        inner.insert(var.trim().to_string(), value.to_string());
                        self.expand(body, &inner)?;
                    }
                }
                _ => {
                    if self.condition(line, &args)? {
                        self.expand(body, env)?;
                    } else if let Some(e) = otherwise {
                        self.expand(&lines[e + 1..end], env)?;
                    }
                }
            }
            i = end + 1;
        }
        Ok(())
    }

    fn include(&mut self, line: &Line, args: &str, env: &Env) -> Result<(), String> {
        let name = args.trim_matches('"');
        let (_, piece) = self
            .includes
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| line.error(format!("no shared piece {name:?} in shaders/include/")))?;
        self.expand(&numbered(&format!("include/{name}"), piece), env)
    }

    fn stamp(&mut self, line: &Line, args: &str) -> Result<(), String> {
        let (name, values) = call(line, args)?;
        let (params, body) = self
            .templates
            .get(&name)
            .cloned()
            .ok_or_else(|| line.error(format!("no #template {name} above")))?;
        if params.len() != values.len() {
            return Err(line.error(format!(
                "{name} takes {} arguments, given {}",
                params.len(),
                values.len()
            )));
        }
        self.expand(&body, &params.into_iter().zip(values).collect())
    }

    fn condition(&self, line: &Line, args: &str) -> Result<bool, String> {
        let (negate, name) = match args.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, args),
        };
        let value = match name {
            "true" => true,
            "false" => false,
            _ if is_name(name) => self.flags.contains(&name),
            _ => return Err(line.error(format!("#if takes true, false or a flag name, not {name:?}"))),
        };
        Ok(value != negate)
    }
}

/// The line of the `#end` closing the block opened at `open`, and of its `#else` if any.
fn block_end(lines: &[Line], open: usize) -> Result<(usize, Option<usize>), String> {
    let mut depth = 0;
    let mut otherwise = None;
    for (i, line) in lines.iter().enumerate().skip(open + 1) {
        match directive(&line.text).map(|d| d.0) {
            Some(w) if OPENERS.contains(&w) => depth += 1,
            Some("else") if depth == 0 => otherwise = Some(i),
            Some("end") if depth == 0 => return Ok((i, otherwise)),
            Some("end") => depth -= 1,
            _ => {}
        }
    }
    Err(lines[open].error("no #end closes this block"))
}

/// `NAME(a, b, …)` as the name and its arguments.
fn call(line: &Line, text: &str) -> Result<(String, Vec<String>), String> {
    let (name, rest) = text.split_once('(').ok_or_else(|| line.error("expected NAME(ARGS)"))?;
    let inner = rest.trim_end().strip_suffix(')').ok_or_else(|| line.error("expected a closing `)`"))?;
    let args = if inner.trim().is_empty() {
        Vec::new()
    } else {
        inner.split(',').map(|a| a.trim().to_string()).collect()
    };
    Ok((name.trim().to_string(), args))
}

fn is_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The line with every `${…}` replaced: a name by its value, an integer expression of
/// names by its value.
fn substitute(line: &Line, env: &Env) -> Result<String, String> {
    let mut text = line.text.as_str();
    if !text.contains("${") {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    while let Some(start) = text.find("${") {
        out.push_str(&text[..start]);
        let rest = &text[start + 2..];
        let end = rest.find('}').ok_or_else(|| line.error("unclosed ${"))?;
        let expr = rest[..end].trim();
        let value = match env.get(expr) {
            Some(v) => v.clone(),
            None => evaluate(expr, env).map_err(|e| line.error(e))?.to_string(),
        };
        out.push_str(&value);
        text = &rest[end + 1..];
    }
    out.push_str(text);
    Ok(out)
}

/// An integer expression of literals and names with `+ - * / %` (the usual precedence,
/// left to right) and parentheses.
fn evaluate(expr: &str, env: &Env) -> Result<i64, String> {
    let tokens = tokenize(expr)?;
    let mut pos = 0;
    let value = sum(&tokens, &mut pos, env)?;
    if pos != tokens.len() {
        return Err(format!("cannot read ${{{expr}}}"));
    }
    Ok(value)
}

fn tokenize(expr: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut word = String::new();
            while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
                word.push(c);
                chars.next();
            }
            tokens.push(word);
        } else if "+-*/%()".contains(c) {
            tokens.push(c.to_string());
            chars.next();
        } else {
            return Err(format!("unexpected {c:?} in ${{{expr}}}"));
        }
    }
    Ok(tokens)
}

fn sum(tokens: &[String], pos: &mut usize, env: &Env) -> Result<i64, String> {
    let mut value = product(tokens, pos, env)?;
    while let Some(op) = tokens.get(*pos).filter(|t| *t == "+" || *t == "-") {
        *pos += 1;
        let rhs = product(tokens, pos, env)?;
        value = if op == "+" { value + rhs } else { value - rhs };
    }
    Ok(value)
}

fn product(tokens: &[String], pos: &mut usize, env: &Env) -> Result<i64, String> {
    let mut value = atom(tokens, pos, env)?;
    while let Some(op) = tokens.get(*pos).filter(|t| ["*", "/", "%"].contains(&t.as_str())) {
        *pos += 1;
        let rhs = atom(tokens, pos, env)?;
        value = match op.as_str() {
            "*" => value * rhs,
            _ if rhs == 0 => return Err("division by zero".into()),
            "/" => value / rhs,
            _ => value % rhs,
        };
    }
    Ok(value)
}

fn atom(tokens: &[String], pos: &mut usize, env: &Env) -> Result<i64, String> {
    let token = tokens.get(*pos).ok_or("an expression ends early")?;
    *pos += 1;
    if token == "(" {
        let value = sum(tokens, pos, env)?;
        if tokens.get(*pos).map(String::as_str) != Some(")") {
            return Err("expected `)`".into());
        }
        *pos += 1;
        return Ok(value);
    }
    if let Ok(v) = token.parse() {
        return Ok(v);
    }
    let value = env.get(token).ok_or_else(|| format!("{token} is not defined here"))?;
    value.parse().map_err(|_| format!("{token} = {value:?} is not an integer"))
}

#[cfg(test)]
mod tests {
    use super::compose;

    #[test]
    fn loops_expand_indices_and_expressions() {
        let src = "#for J in 0..3\nlet a${J} = w${J / 2}[${J % 2}] + ${(J + 1) * 2};\n#end";
        let out = compose("t.wgsl", src, &[], &[]).unwrap();
        assert_eq!(out, "let a0 = w0[0] + 2;\nlet a1 = w0[1] + 4;\nlet a2 = w1[0] + 6;\n");
    }

    #[test]
    fn templates_stamp_their_arguments_and_nested_blocks() {
        let src = "#template body(NAME, WIDE)\nfn ${NAME}() {\n#if ${WIDE}\nwide();\n#else\nnarrow();\n#end\n#for I in 0..2\nstep(${I});\n#end\n}\n#end\n#stamp body(f, false)\n#stamp body(g, true)";
        let out = compose("t.wgsl", src, &[], &[]).unwrap();
        assert_eq!(
            out,
            "fn f() {\nnarrow();\nstep(0);\nstep(1);\n}\nfn g() {\nwide();\nstep(0);\nstep(1);\n}\n"
        );
    }

    #[test]
    fn flags_and_includes_compose() {
        let src = "#if F16\nenable f16;\n#end\n#if !F16\nplain;\n#end\n#include \"piece\"";
        let pieces = [("piece", "shared;")];
        assert_eq!(compose("t.wgsl", src, &["F16"], &pieces).unwrap(), "enable f16;\nshared;\n");
        assert_eq!(compose("t.wgsl", src, &[], &pieces).unwrap(), "plain;\nshared;\n");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        for (src, wanted) in [
            ("ok\n#for J in 0..2\nx", "t.wgsl:2: no #end closes this block"),
            ("#stamp nothing(a)", "t.wgsl:1: no #template nothing above"),
            ("#include \"missing\"", "t.wgsl:1: no shared piece \"missing\""),
            ("x ${K + 1}", "t.wgsl:1: K is not defined here"),
            ("#template t(A)\n#end\n#stamp t(a, b)", "t.wgsl:3: t takes 1 arguments, given 2"),
            ("#if maybe?\n#end", "t.wgsl:1: #if takes true, false or a flag name"),
            ("#define X 1", "t.wgsl:1: unknown directive #define"),
        ] {
            let e = compose("t.wgsl", src, &[], &[]).unwrap_err();
            assert!(e.starts_with(wanted), "{src:?}: {e}");
        }
    }
}
