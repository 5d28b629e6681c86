//! HuJSON, the JSON dialect policy files are written in (JSON plus `//` and `/* */`
//! comments and trailing commas, as tailscale/tailscale reads them through its `hujson`
//! package), turned into a tree whose every value and key knows its byte offset.
//!
//! Two steps: [`standardize`] blanks comments and trailing commas with spaces (newlines
//! kept), so every byte keeps its offset; serde_json then checks the syntax (its errors
//! carry line and column) and [`tree`] walks the now plain JSON recording offsets, so a
//! semantic error can point at the exact string it is about. No crate did the first step
//! as HuJSON wants it: `json_comments` keeps trailing commas, `json-strip-comments` also
//! takes `#` comments and gives no position for an unterminated one.

use super::PolicyError;

/// A JSON value and where it starts in the text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Json {
    /// Byte offset of the value's first character (the quote of a string).
    pub at: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(String),
    Array(Vec<Json>),
    /// Keys in file order, each with the offset of its quote.
    Object(Vec<Field>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Field {
    pub key: String,
    pub at: usize,
    pub value: Json,
}

impl Json {
    /// The value as serde_json has it (capability values are passed on as written).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Number(n) => Value::Number(n.clone()),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Kind::Object(f) => Value::Object(
                f.iter()
                    .map(|f| (f.key.clone(), f.value.to_value()))
                    .collect(),
            ),
        }
    }
}

/// 1-based line and column (in bytes, as serde_json counts) of byte offset `at`.
pub(super) fn position(text: &str, at: usize) -> (usize, usize) {
    let before = text.as_bytes().get(..at).unwrap_or(text.as_bytes());
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|b| **b == b'\n').count();
    (line, before.len() - line_start + 1)
}

/// Replaces comments and trailing commas by spaces, keeping every byte's offset and every
/// newline. A comma is trailing when only whitespace and comments separate it from `]` or
/// `}` and a value precedes it (so `[,]` stays an error).
pub(super) fn standardize(text: &str) -> Result<String, PolicyError> {
    let mut out = text.as_bytes().to_vec();
    let mut i = 0;
    // Offset of a comma that may turn out trailing, and the last significant byte.
    let mut comma: Option<usize> = None;
    let mut last = b' ';
    while i < out.len() {
        match out[i] {
            b'"' => {
                i += 1;
                while i < out.len() && out[i] != b'"' {
                    i += if out[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                comma = None;
                last = b'"';
                continue;
            }
            b'/' if out.get(i + 1) == Some(&b'/') => {
                while i < out.len() && out[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
                continue;
            }
            b'/' if out.get(i + 1) == Some(&b'*') => {
                let start = i;
                let Some(len) = out[i + 2..].windows(2).position(|w| w == b"*/") else {
                    return Err(PolicyError::at(text, start, "unterminated /* comment"));
                };
                for b in &mut out[start..start + len + 4] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = start + len + 4;
                continue;
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b',' => {
                comma = (!matches!(last, b'[' | b'{' | b',' | b':')).then_some(i);
                last = b',';
            }
            c @ (b']' | b'}') => {
                if let Some(c) = comma.take() {
                    out[c] = b' ';
                }
                last = c;
            }
            c => {
                comma = None;
                last = c;
            }
        }
        i += 1;
    }
    // Only whole comments (ASCII-delimited) and ASCII commas were blanked, so the bytes
    // are still UTF-8; checked rather than assumed.
    String::from_utf8(out).map_err(|_| PolicyError::at(text, 0, "the policy is not UTF-8"))
}

/// Parses HuJSON `text` into a [`Json`] tree, or says where and why it is not.
pub(super) fn parse(text: &str) -> Result<Json, PolicyError> {
    let plain = standardize(text)?;
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&plain) {
        let msg = e.to_string();
        let reason = msg.split(" at line ").next().unwrap_or(&msg);
        return Err(PolicyError {
            line: e.line(),
            column: e.column(),
            reason: format!("syntax error: {reason}"),
        });
    }
    // serde_json accepted it, so it is JSON nested at most 128 deep (its recursion
    // limit): the recursive walk below is bounded.
    let mut walk = Walk {
        s: &plain,
        b: plain.as_bytes(),
        i: 0,
    };
    walk.value()
        .map_err(|(at, reason)| PolicyError::at(text, at, reason))
}

/// A walk over JSON already known to be valid; any surprise is still an error, never a
/// panic.
struct Walk<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

type WalkResult<T> = Result<T, (usize, String)>;

impl Walk<'_> {
    fn skip_ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let hit = self.b.get(self.i) == Some(&c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn bad<T>(&self) -> WalkResult<T> {
        Err((self.i, "malformed JSON".into()))
    }

    fn value(&mut self) -> WalkResult<Json> {
        self.skip_ws();
        let at = self.i;
        let kind = match self.b.get(at) {
            Some(b'"') => Kind::Str(self.string()?),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.value()?);
                        if self.eat(b']') {
                            break;
                        }
                        if !self.eat(b',') {
                            return self.bad();
                        }
                    }
                }
                Kind::Array(items)
            }
            Some(b'{') => {
                self.i += 1;
                let mut fields: Vec<Field> = Vec::new();
                let mut keys = std::collections::BTreeSet::new();
                if !self.eat(b'}') {
                    loop {
                        self.skip_ws();
                        let key_at = self.i;
                        let key = self.string()?;
                        if !keys.insert(key.clone()) {
                            return Err((key_at, format!("duplicate key {key:?}")));
                        }
                        if !self.eat(b':') {
                            return self.bad();
                        }
                        let value = self.value()?;
                        fields.push(Field {
                            key,
                            at: key_at,
                            value,
                        });
                        if self.eat(b'}') {
                            break;
                        }
                        if !self.eat(b',') {
                            return self.bad();
                        }
                    }
                }
                Kind::Object(fields)
            }
            Some(_) => {
                let end = self.b[at..]
                    .iter()
                    .position(|c| matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'))
                    .map_or(self.b.len(), |n| at + n);
                self.i = end;
                match self.s.get(at..end) {
                    Some("null") => Kind::Null,
                    Some("true") => Kind::Bool(true),
                    Some("false") => Kind::Bool(false),
                    Some(n) => match serde_json::from_str(n) {
                        Ok(n) => Kind::Number(n),
                        Err(_) => return Err((at, "malformed JSON".into())),
                    },
                    None => return self.bad(),
                }
            }
            None => return self.bad(),
        };
        Ok(Json { at, kind })
    }

    fn string(&mut self) -> WalkResult<String> {
        let start = self.i;
        if self.b.get(start) != Some(&b'"') {
            return self.bad();
        }
        let mut j = start + 1;
        while j < self.b.len() && self.b[j] != b'"' {
            j += if self.b[j] == b'\\' { 2 } else { 1 };
        }
        self.i = j + 1;
        match self.s.get(start..j + 1).map(serde_json::from_str::<String>) {
            Some(Ok(s)) => Ok(s),
            _ => Err((start, "malformed JSON string".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_become_spaces_in_place() {
        let text = "{ // note é\n \"a\": [1, 2, /* x\n y */ ], \"b\": \"// not a comment\",\n}";
        let plain = standardize(text).unwrap();
        assert_eq!(plain.len(), text.len());
        assert_eq!(
            plain.lines().count(),
            text.lines().count(),
            "newlines are kept"
        );
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2], "b": "// not a comment"}));
    }

    #[test]
    fn a_lone_comma_is_not_trailing() {
        assert!(parse("[,]").is_err());
        assert!(parse("{\"a\": 1,,}").is_err());
        assert!(parse("[1,]").is_ok());
    }

    #[test]
    fn syntax_error_reports_its_line_and_column() {
        let e = parse("{\n  // fine\n  \"a\": [1, 2],\n  \"b\": tru,\n}").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.column > 0 && e.reason.starts_with("syntax error"), "{e}");
        let e = parse("{\n\"a\": 1 /* never closed\n}").unwrap_err();
        assert_eq!((e.line, e.column), (2, 8), "{e}");
        assert!(e.reason.contains("unterminated"), "{e}");
    }

    #[test]
    fn tree_records_offsets_and_refuses_duplicate_keys() {
        let text = "{\n  \"k\": [\"x\", {\"y\": null}],\n}";
        let t = parse(text).unwrap();
        let Kind::Object(f) = &t.kind else {
            panic!("object")
        };
        assert_eq!(position(text, f[0].at), (2, 3));
        let Kind::Array(a) = &f[0].value.kind else {
            panic!("array")
        };
        assert_eq!(a[0].kind, Kind::Str("x".into()));
        assert_eq!(position(text, a[1].at), (2, 14));
        assert_eq!(t.to_value(), serde_json::json!({"k": ["x", {"y": null}]}));
        let e = parse("{\"a\": 1,\n \"a\": 2}").unwrap_err();
        assert_eq!((e.line, e.column), (2, 2));
        assert!(e.reason.contains("duplicate key"), "{e}");
    }
}
