//! A writer producing exactly the bytes of Python's `json.dumps` for the two styles Cinder uses:
//! `sort_keys=True, indent=2` (the `_metadata` and `_sha256file` objects) and the defaults
//! (`jsonutils.dumps` of a backup record: `", "` and `": "`, insertion order).
//! Both keep `ensure_ascii=True`.
//!
//! Keys are sorted here, by code point as Python does, never by relying on the map type:
//! `serde_json`'s `preserve_order` feature, switched on by any crate in the build, would change
//! the order of a `serde_json::Map`.

use std::fmt::Write as _;

/// A JSON value in the shape Python holds it: dicts keep insertion order until written.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    /// `None` → `null`.
    Null,
    /// `True`/`False`.
    Bool(bool),
    /// A non-negative `int`.
    UInt(u64),
    /// A negative `int`.
    Int(i64),
    /// A `float`, written as Python's `float.__repr__`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `list`.
    List(Vec<Py>),
    /// A `dict`, in insertion order.
    Dict(Vec<(String, Py)>),
}

impl Py {
    /// Converts a parsed `serde_json::Value` (numbers keep their integer or float kind).
    pub fn from_value(v: &serde_json::Value) -> Py {
        use serde_json::Value;
        match v {
            Value::Null => Py::Null,
            Value::Bool(b) => Py::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Py::UInt(u),
                (None, Some(i), _) => Py::Int(i),
                (None, None, Some(f)) => Py::Float(f),
                (None, None, None) => Py::Str(n.to_string()),
            },
            Value::String(s) => Py::Str(s.clone()),
            Value::Array(a) => Py::List(a.iter().map(Py::from_value).collect()),
            Value::Object(o) => {
                Py::Dict(o.iter().map(|(k, v)| (k.clone(), Py::from_value(v))).collect())
            }
        }
    }

    /// Python truthiness (`if extra_metadata:`): empty containers, `""`, zero, `False` and
    /// `None` are false.
    pub fn is_truthy(&self) -> bool {
        match self {
            Py::Null => false,
            Py::Bool(b) => *b,
            Py::UInt(u) => *u != 0,
            Py::Int(i) => *i != 0,
            Py::Float(f) => *f != 0.0,
            Py::Str(s) => !s.is_empty(),
            Py::List(l) => !l.is_empty(),
            Py::Dict(d) => !d.is_empty(),
        }
    }
}

/// `json.dumps(value, sort_keys=True, indent=2).encode("utf-8")`.
pub fn dumps_sorted_indent2(value: &Py) -> Vec<u8> {
    let mut out = String::new();
    write_indented(&mut out, value, 0);
    out.into_bytes()
}

/// `json.dumps(value).encode("utf-8")`: default separators, dicts in insertion order.
pub fn dumps_default(value: &Py) -> Vec<u8> {
    let mut out = String::new();
    write_default(&mut out, value);
    out.into_bytes()
}

fn write_indented(out: &mut String, value: &Py, level: usize) {
    match value {
        Py::List(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                push_indent(out, level + 1);
                write_indented(out, item, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push(']');
        }
        Py::Dict(entries) if !entries.is_empty() => {
            let mut sorted: Vec<&(String, Py)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                push_indent(out, level + 1);
                write_str(out, k);
                out.push_str(": ");
                write_indented(out, v, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push('}');
        }
        scalar => write_default(out, scalar),
    }
}

fn write_default(out: &mut String, value: &Py) {
    match value {
        Py::Null => out.push_str("null"),
        Py::Bool(true) => out.push_str("true"),
        Py::Bool(false) => out.push_str("false"),
        Py::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Py::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Py::Float(f) => write_float(out, *f),
        Py::Str(s) => write_str(out, s),
        Py::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_default(out, item);
            }
            out.push(']');
        }
        Py::Dict(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_default(out, v);
            }
            out.push('}');
        }
    }
}

fn push_indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

/// A string literal as `ensure_ascii=True` writes it: `"` `\` and the five short escapes, every
/// other character outside `' '..='~'` (DEL included) as `\u00xx`, astral characters as a
/// surrogate pair; hex digits lower-case.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// `float.__repr__` as `json.dumps` uses it: shortest round-trip digits, positional notation
/// when the decimal exponent is in -4..16, else `d.ddde+XX`; `NaN`, `Infinity`, `-Infinity`.
fn write_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("NaN");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // Rust's `{:e}` gives the same shortest digits as Python's repr: "1.5e-7", "1e16".
    let sci = format!("{f:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        out.push_str(&sci);
        return;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let fixed = format!("{f}");
        out.push_str(&fixed);
        if !fixed.contains('.') {
            out.push_str(".0");
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exp.abs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Floats render as Python's repr, checked against values computed with python3.
    #[test]
    fn floats() {
        let cases = [
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (1e100, "1e+100"),
            (123_456_789_012_345_678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (2.5, "2.5"),
            (-3.0, "-3.0"),
        ];
        for (f, want) in cases {
            let mut s = String::new();
            write_float(&mut s, f);
            assert_eq!(s, want, "{f}");
        }
    }

    /// ensure_ascii escaping matches Python's output for control, DEL, BMP and astral characters.
    #[test]
    fn strings() {
        let mut s = String::new();
        write_str(&mut s, "é\u{2028}\u{1F600}\u{7f}\u{1}\"\\/\n\t\u{8}\u{c}\r");
        assert_eq!(s, r#""\u00e9\u2028\ud83d\ude00\u007f\u0001\"\\/\n\t\b\f\r""#);
    }

    /// Empty containers stay on one line; nested ones indent by two; keys sort by code point.
    #[test]
    fn layout() {
        let v = Py::Dict(vec![
            ("b".into(), Py::List(vec![])),
            ("a".into(), Py::Dict(vec![])),
            ("Z".into(), Py::List(vec![Py::UInt(1), Py::Dict(vec![("x".into(), Py::Null)])])),
        ]);
        let got = String::from_utf8(dumps_sorted_indent2(&v)).unwrap();
        assert_eq!(
            got,
            "{\n  \"Z\": [\n    1,\n    {\n      \"x\": null\n    }\n  ],\n  \"a\": {},\n  \"b\": []\n}"
        );
        let got = String::from_utf8(dumps_default(&v)).unwrap();
        assert_eq!(got, r#"{"b": [], "a": {}, "Z": [1, {"x": null}]}"#);
    }
}
