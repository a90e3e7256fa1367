//! The invariants ARCHITECTURE.md states about the code's shape, checked against the source tree
//! (no build needed): the dependency order (parsed from ARCHITECTURE.md itself), `unsafe` only in
//! `src/io/`, stdout only from `src/cli/output.rs`, and no I/O in the pure layout modules.
//!
//! The checks read paths, not types: a lexer drops comments, string and character literals and
//! `#[cfg(test)]` items, then every path (`crate::…`, `super::…`, `std::{fs, thread}`, …) is
//! expanded and resolved. A method call reaches no path, so what a module does through a value it
//! was handed (a `&dyn ObjectStore`, an inherent method defined elsewhere) is not seen; what it
//! names is. Each check has a unit test on a synthetic snippet below, so it can fail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The crate's root directory.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, relative to the crate root, sorted.
fn rust_files(dir: &str) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join(dir), &mut files);
    let mut names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(root()).unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Lexing: code without comments and literals, as tokens.

/// A token of the code: an identifier or keyword, `::`, or one punctuation character.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// `source` as tokens, without comments, string/byte/raw-string/char literals (a literal
/// becomes `Punct('"')`) and numbers; lifetimes stay out too. Each token carries its line.
fn tokens(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(at(i) == '\n');
                    i += 1;
                }
                assert!(i <= chars.len(), "unterminated block comment");
            }
        } else if let Some(hashes) = raw_string_start(&chars, i) {
            // r"…", r#"…"#, br"…": no escapes; ends at a quote and the same number of #.
            i += chars[i..].iter().position(|&c| c == '"').unwrap() + 1;
            loop {
                assert!(i < chars.len(), "unterminated raw string");
                if chars[i] == '"' && (0..hashes).all(|k| at(i + 1 + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
            out.push((Token::Punct('"'), line));
        } else if c == '"' || (c == 'b' && at(i + 1) == '"') {
            i += if c == 'b' { 2 } else { 1 };
            while at(i) != '"' {
                assert!(i < chars.len(), "unterminated string");
                line += usize::from(chars[i] == '\n');
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push((Token::Punct('"'), line));
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            // A char literal ('x', '\n', '\u{..}', b'x') or a lifetime ('a, 'static).
            let start = if c == 'b' { i + 1 } else { i };
            if at(start + 1) == '\\' {
                // skip the escaped character, which may be a quote, then find the closing one
                i = start + 3;
                while at(i) != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(start + 2) == '\'' {
                i = start + 3;
            } else {
                i = start + 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // r#ident is the identifier
            if word == "r" && at(i) == '#' && (at(i + 1).is_alphabetic() || at(i + 1) == '_') {
                i += 1;
                continue;
            }
            out.push((Token::Ident(word), line));
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric()
                || at(i) == '_'
                || (at(i) == '.' && at(i + 1).is_ascii_digit())
            {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// At `i`, the start of a raw string (`r"`, `r#"`, `br"`, `br#"`): its number of `#`.
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    let prev_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    if prev_ident {
        return None;
    }
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some(hashes)
}

/// `tokens` without `#[cfg(test)]` items (an attribute, then the item up to its `;` or the end
/// of its `{…}` block), and the names of the out-of-line test modules (`#[cfg(test)] mod x;`).
fn without_tests(tokens: &[(Token, usize)]) -> (Vec<(Token, usize)>, Vec<String>) {
    let ident =
        |i: usize, word: &str| matches!(tokens.get(i), Some((Token::Ident(w), _)) if w == word);
    let punct = |i: usize, c: char| matches!(tokens.get(i), Some((Token::Punct(p), _)) if *p == c);
    let mut out = Vec::new();
    let mut test_modules = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let is_cfg_test = punct(i, '#')
            && punct(i + 1, '[')
            && ident(i + 2, "cfg")
            && punct(i + 3, '(')
            && ident(i + 4, "test")
            && punct(i + 5, ')')
            && punct(i + 6, ']');
        if !is_cfg_test {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        i += 7;
        if ident(i, "mod")
            && let Some((Token::Ident(name), _)) = tokens.get(i + 1)
            && punct(i + 2, ';')
        {
            test_modules.push(name.clone());
        }
        // Skip the item: to a `;` outside brackets, or to the end of its first `{…}`.
        let mut depth = 0i32;
        while i < tokens.len() {
            match &tokens[i].0 {
                Token::Punct('(' | '[') => depth += 1,
                Token::Punct(')' | ']') => depth -= 1,
                Token::Punct('{') => depth += 1,
                Token::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                Token::Punct(';') if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    (out, test_modules)
}

// ---------------------------------------------------------------------------------------------
// Paths.

/// A path the code names, expanded out of `use` trees (`a::{b, c::d}` is `a::b` and `a::c::d`),
/// with the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NamedPath {
    segments: Vec<String>,
    line: usize,
}

/// Every path of two or more segments in `tokens`, and every single identifier followed by
/// `!` (a macro) as a one-segment path `name!`.
fn paths(tokens: &[(Token, usize)]) -> Vec<NamedPath> {
    let mut out = Vec::new();
    let mut parsed_to = 0;
    for i in 0..tokens.len() {
        let (Token::Ident(first), line) = &tokens[i] else { continue };
        if i < parsed_to {
            continue; // inside a tree already expanded
        }
        if matches!(tokens.get(i + 1), Some((Token::Punct('!'), _))) {
            out.push(NamedPath { segments: vec![format!("{first}!")], line: *line });
            continue;
        }
        let starts = i == 0 || tokens[i - 1].0 != Token::PathSep;
        if starts && matches!(tokens.get(i + 1), Some((Token::PathSep, _))) {
            let mut expanded = Vec::new();
            parsed_to = tree(tokens, i, &[], &mut expanded);
            out.extend(
                expanded
                    .into_iter()
                    .filter(|p| p.len() >= 2)
                    .map(|segments| NamedPath { segments, line: *line }),
            );
        }
    }
    out
}

/// Parses a `use` tree (or an expression path) at `i` under `prefix`; returns the index after it.
fn tree(
    tokens: &[(Token, usize)],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match tokens.get(i).map(|t| &t.0) {
            Some(Token::Ident(word)) => {
                // `self` first in a group (`a::{self, b}`) names the prefix itself.
                if word != "self" || prefix.is_empty() || path.len() > prefix.len() {
                    path.push(word.clone());
                }
                i += 1;
                if let Some((Token::Ident(kw), _)) = tokens.get(i)
                    && kw == "as"
                {
                    i += 2;
                }
            }
            Some(Token::Punct('{')) => {
                i += 1;
                loop {
                    match tokens.get(i).map(|t| &t.0) {
                        Some(Token::Punct('}')) => return i + 1,
                        Some(Token::Punct(',')) => i += 1,
                        None => return i,
                        _ => i = tree(tokens, i, &path, out),
                    }
                }
            }
            Some(Token::Punct('*')) => {
                path.push("*".into());
                out.push(path);
                return i + 1;
            }
            _ => {
                out.push(path);
                return i;
            }
        }
        if tokens.get(i).map(|t| &t.0) == Some(&Token::PathSep) {
            i += 1;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The code of a file as the checks see it: tokens without test items, and its paths.
struct Code {
    paths: Vec<NamedPath>,
    tokens: Vec<(Token, usize)>,
    test_modules: Vec<String>,
}

fn code(source: &str) -> Code {
    let (tokens, test_modules) = without_tests(&tokens(source));
    Code { paths: paths(&tokens), tokens, test_modules }
}

// ---------------------------------------------------------------------------------------------
// The dependency order.

/// The dependency order ARCHITECTURE.md states: each module node with its rank (modules of one
/// group, separated by commas, share a rank and may not use each other).
#[derive(Debug)]
struct Order {
    rank: BTreeMap<Vec<String>, usize>,
}

impl Order {
    /// Parses the first code block after the line "Dependency order" in `markdown`:
    /// `a, b → c → d::e, d::f → …`.
    fn parse(markdown: &str) -> Order {
        let after =
            &markdown[markdown.find("Dependency order").expect("a 'Dependency order' line")..];
        let start = after.find("```").expect("a code block after 'Dependency order'") + 3;
        let body = &after[start..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let body = &body[..body.find("```").expect("the end of the code block")];
        let mut rank = BTreeMap::new();
        for (r, group) in body.split('→').enumerate() {
            for node in group.split(',') {
                let node = node.trim();
                assert!(
                    !node.is_empty()
                        && node.chars().all(|c| c.is_alphanumeric() || c == '_' || c == ':'),
                    "dependency order: {node:?} is not a module path"
                );
                let segments: Vec<String> = node.split("::").map(str::to_owned).collect();
                assert!(rank.insert(segments, r).is_none(), "dependency order names {node} twice");
            }
        }
        Order { rank }
    }

    /// The node a module path belongs to: the longest node that is a prefix of it.
    fn node_of(&self, module: &[String]) -> Option<&Vec<String>> {
        (1..=module.len()).rev().find_map(|n| self.rank.get_key_value(&module[..n]).map(|(k, _)| k))
    }

    /// True when `module` is a proper prefix of a node (a container such as `native`).
    fn is_container(&self, module: &[String]) -> bool {
        self.rank.keys().any(|node| node.len() > module.len() && node.starts_with(module))
    }
}

/// The module path of a library source file: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`.
fn module_path(file: &str) -> Vec<String> {
    let rel = file.strip_prefix("src/").unwrap().strip_suffix(".rs").unwrap();
    let mut segments: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if segments.last().is_some_and(|s| s == "mod" || s == "lib") {
        let _ = segments.pop();
    }
    segments
}

/// What a container module re-exports with `pub use child::*;`: the child.
fn glob_reexports(code: &Code, container: &[String]) -> Vec<Vec<String>> {
    code.paths
        .iter()
        .filter(|p| p.segments.last().is_some_and(|s| s == "*") && p.segments.len() == 2)
        .map(|p| [container, &p.segments[..1]].concat())
        .collect()
}

/// The crate module a path names, from inside `module`: `crate::x::y` is `x::y`, `super::y` is
/// `y` in `module`'s parent, `self::y` is `module::y`. `None` for paths outside the crate.
fn resolve(path: &[String], module: &[String]) -> Option<Vec<String>> {
    let (mut base, mut rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("self") => (module.to_vec(), &path[1..]),
        Some("super") => (module.to_vec(), path),
        _ => return None,
    };
    while rest.first().is_some_and(|s| s == "super") {
        assert!(base.pop().is_some(), "super:: above the crate root");
        rest = &rest[1..];
    }
    base.extend(rest.iter().filter(|s| *s != "*").cloned());
    Some(base)
}

/// The dependency-order violations of one library file, as messages.
fn order_violations(
    order: &Order,
    file: &str,
    code: &Code,
    reexports: &BTreeMap<Vec<String>, Vec<Vec<String>>>,
) -> Vec<String> {
    let module = module_path(file);
    let Some(own) = order.node_of(&module) else { return Vec::new() };
    let own_rank = order.rank[own];
    let mut out = Vec::new();
    for path in &code.paths {
        let Some(target) = resolve(&path.segments, &module) else { continue };
        let targets: Vec<&Vec<String>> = match order.node_of(&target) {
            Some(node) => vec![node],
            None if let Some(len) =
                (1..=target.len()).rev().find(|&n| order.is_container(&target[..n])) =>
            {
                // `use crate::native;` may reach any of it; `crate::cinder::X` is what
                // `cinder/mod.rs` re-exports with `pub use layout::*`.
                let container = &target[..len];
                let globs = reexports.get(container).cloned().unwrap_or_default();
                let nodes = order.rank.keys();
                if target.len() == len {
                    nodes.filter(|node| node.starts_with(container)).collect()
                } else if globs.is_empty() {
                    out.push(format!(
                        "{file}:{}: {} names no module of the dependency order, and {} \
                         re-exports none with `pub use child::*`",
                        path.line,
                        path.segments.join("::"),
                        container.join("::")
                    ));
                    continue;
                } else {
                    nodes.filter(|node| globs.contains(node)).collect()
                }
            }
            None => {
                out.push(format!(
                    "{file}:{}: {} names no module of the dependency order",
                    path.line,
                    path.segments.join("::")
                ));
                continue;
            }
        };
        for node in targets {
            if node != own && order.rank[node] >= own_rank {
                out.push(format!(
                    "{file}:{}: {} uses {} ({}), which is not to its left in ARCHITECTURE.md's \
                     dependency order",
                    path.line,
                    own.join("::"),
                    node.join("::"),
                    path.segments.join("::")
                ));
            }
        }
    }
    out
}

/// The library's files with their code, the out-of-line test modules left out.
fn library() -> Vec<(String, Code)> {
    let files: Vec<(String, Code)> = rust_files("src")
        .into_iter()
        .filter(|f| !f.starts_with("src/bin/") && f != "src/main.rs")
        .map(|f| {
            let code = code(&read(&f));
            (f, code)
        })
        .collect();
    let mut tests: Vec<String> = Vec::new();
    for (file, code) in &files {
        let dir = Path::new(file).parent().unwrap();
        let in_dir = file.ends_with("/mod.rs") || file == "src/lib.rs";
        for name in &code.test_modules {
            let base = if in_dir {
                dir.to_path_buf()
            } else {
                dir.join(Path::new(file).file_stem().unwrap())
            };
            tests.push(base.join(format!("{name}.rs")).to_string_lossy().into_owned());
            tests.push(base.join(name).join("mod.rs").to_string_lossy().into_owned());
        }
    }
    files.into_iter().filter(|(f, _)| !tests.contains(f)).collect()
}

#[test]
fn dependency_order_of_architecture_md_holds() {
    let order = Order::parse(&read("ARCHITECTURE.md"));
    let files = library();
    let mut problems = Vec::new();
    for node in order.rank.keys() {
        let dir = format!("src/{}", node.join("/"));
        if !root().join(format!("{dir}.rs")).exists() && !root().join(&dir).is_dir() {
            problems.push(format!(
                "the dependency order names {}, which has no {dir}(.rs)",
                node.join("::")
            ));
        }
    }
    let mut reexports = BTreeMap::new();
    for (file, code) in &files {
        let module = module_path(file);
        if order.node_of(&module).is_none() {
            if module.is_empty() || order.is_container(&module) {
                let _ = reexports.insert(module.clone(), glob_reexports(code, &module));
            } else {
                problems
                    .push(format!("{file} is in no module of ARCHITECTURE.md's dependency order"));
            }
        }
    }
    for (file, code) in &files {
        problems.extend(order_violations(&order, file, code, &reexports));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_source_path_architecture_md_names_exists() {
    let markdown = read("ARCHITECTURE.md");
    let mut missing = Vec::new();
    for word in markdown.split(|c: char| c.is_whitespace() || "`()[],;:".contains(c)) {
        let word = word.trim_end_matches('.');
        let is_path =
            ["src/", "tests/", "scripts/", "benches/", "perf/"].iter().any(|p| word.starts_with(p));
        if is_path && !word.contains('*') && !root().join(word).exists() {
            missing.push(word.to_owned());
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md names paths that do not exist: {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// unsafe, stdout, pure layout.

/// Lines of `code` where the keyword `unsafe` appears.
fn unsafe_lines(code: &Code) -> Vec<usize> {
    code.tokens
        .iter()
        .filter(|(t, _)| *t == Token::Ident("unsafe".into()))
        .map(|(_, line)| *line)
        .collect()
}

#[test]
fn unsafe_only_in_src_io() {
    let mut found = String::new();
    for file in [rust_files("src"), rust_files("tests"), rust_files("benches")].concat() {
        if file.starts_with("src/io/") {
            continue;
        }
        // Test code counts too: read whole files, test items included.
        let all =
            Code { paths: Vec::new(), tokens: tokens(&read(&file)), test_modules: Vec::new() };
        for line in unsafe_lines(&all) {
            let _ = writeln!(found, "{file}:{line}");
        }
    }
    assert!(found.is_empty(), "`unsafe` outside src/io/:\n{found}");
}

/// Lines of `code` that write to stdout: `print!`, `println!`, `std::io::stdout`/`Stdout`,
/// `STDOUT_FILENO`.
fn stdout_lines(code: &Code) -> Vec<usize> {
    let by_path = code.paths.iter().filter_map(|p| {
        let last = p.segments.last()?;
        let hit = ["print!", "println!"].contains(&last.as_str())
            || (p.segments.len() >= 2
                && ["stdout", "Stdout", "STDOUT_FILENO"].contains(&last.as_str()));
        hit.then_some(p.line)
    });
    let by_name = code.tokens.iter().filter_map(|(t, line)| match t {
        Token::Ident(w) if w == "STDOUT_FILENO" => Some(*line),
        _ => None,
    });
    let mut lines: Vec<usize> = by_path.chain(by_name).collect();
    lines.sort_unstable();
    lines.dedup();
    lines
}

/// Only the output module writes to stdout. `src/bin/bench.rs` is a separate program whose stdout
/// is its own JSON Lines results, and is left out; `src/main.rs` is not.
#[test]
fn stdout_only_from_cli_output() {
    let mut found = String::new();
    for file in rust_files("src") {
        if file == "src/cli/output.rs" || file == "src/bin/bench.rs" {
            continue;
        }
        for line in stdout_lines(&code(&read(&file))) {
            let _ = writeln!(found, "{file}:{line}");
        }
    }
    assert!(found.is_empty(), "stdout written outside src/cli/output.rs:\n{found}");
}

/// The pure modules: the two formats' layouts and the native stage bodies.
fn is_pure(file: &str) -> bool {
    file.starts_with("src/native/layout/")
        || file.starts_with("src/cinder/layout/")
        || file == "src/native/chunk.rs"
        || file == "src/native/compress.rs"
}

/// What a pure module may not name: the file system, the network, processes, threads, the
/// environment, clocks, OS randomness, raw system calls, and the crate's I/O modules.
const IMPURE: &[&[&str]] = &[
    &["std", "fs"],
    &["std", "net"],
    &["std", "process"],
    &["std", "thread"],
    &["std", "env"],
    &["std", "os"],
    &["std", "io", "stdin"],
    &["std", "io", "stdout"],
    &["std", "io", "stderr"],
    &["SystemTime", "now"],
    &["Instant", "now"],
    &["std", "time", "SystemTime", "now"],
    &["std", "time", "Instant", "now"],
    &["getrandom"],
    &["libc"],
    &["tokio"],
    &["crate", "io"],
    &["crate", "store"],
    &["crate", "plane"],
    &["crate", "lightbits"],
];

/// The impure paths `code` names, as `line: path`.
fn impure_paths(code: &Code) -> Vec<String> {
    code.paths
        .iter()
        .filter(|p| {
            IMPURE
                .iter()
                .any(|bad| p.segments.len() >= bad.len() && p.segments[..bad.len()] == **bad)
        })
        .map(|p| format!("{}: {}", p.line, p.segments.join("::")))
        .collect()
}

#[test]
fn layout_modules_do_no_io() {
    let mut found = String::new();
    for (file, code) in library() {
        if !is_pure(&file) {
            continue;
        }
        for hit in impure_paths(&code) {
            let _ = writeln!(found, "{file}:{hit}");
        }
        // Relative paths reach crate modules too: `super::super::io` from a layout file.
        let module = module_path(&file);
        for path in &code.paths {
            if let Some(target) = resolve(&path.segments, &module)
                && ["io", "store", "plane", "lightbits"]
                    .contains(&target.first().map_or("", String::as_str))
            {
                let _ = writeln!(found, "{file}:{}: {}", path.line, path.segments.join("::"));
            }
        }
    }
    assert!(found.is_empty(), "I/O in a pure layout module:\n{found}");
}

// ---------------------------------------------------------------------------------------------
// The checkers, on synthetic code: each can fail.

#[test]
fn lexer_drops_comments_literals_and_test_items() {
    let source = r##"
        // unsafe println!("x")
        /* nested /* unsafe */ still comment */
        let a = "unsafe { println!() }";
        let b = r#"std::fs::read"#;
        let c = '"'; let d = b'\''; fn f<'a>(x: &'a str) {}
        #[cfg(test)]
        mod tests { use std::fs; fn t() { unsafe {} } }
        #[cfg(test)]
        mod more;
        let e = 1;
    "##;
    let code = code(source);
    assert!(unsafe_lines(&code).is_empty(), "{:?}", code.tokens);
    assert!(stdout_lines(&code).is_empty());
    assert!(impure_paths(&code).is_empty());
    assert_eq!(code.test_modules, ["more"]);
    assert!(
        code.tokens.iter().any(|(t, _)| *t == Token::Ident("e".into())),
        "code after the tests survives"
    );
}

#[test]
fn use_trees_expand() {
    let code = code("use crate::a::{self, b::{c, d as e}, f::*}; let x = super::super::g::h(1);");
    let got: Vec<String> = code.paths.iter().map(|p| p.segments.join("::")).collect();
    assert_eq!(
        got,
        ["crate::a", "crate::a::b::c", "crate::a::b::d", "crate::a::f::*", "super::super::g::h"]
    );
    assert_eq!(
        resolve(&code.paths[4].segments, &["x".into(), "y".into(), "z".into()]),
        Some(vec!["x".into(), "g".into(), "h".into()])
    );
}

#[test]
fn each_check_catches_a_violation() {
    let order =
        Order::parse("Dependency order:\n\n```\nerror → io → fmt::layout → fmt::job → cli\n```\n");
    let none = BTreeMap::new();
    // A layout reaching right (to its job) and into the I/O module.
    let layout =
        code("use crate::fmt::job::Run;\nuse super::super::io::read;\nuse crate::error::E;");
    let problems = order_violations(&order, "src/fmt/layout/mod.rs", &layout, &none);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("fmt::layout uses fmt::job"), "{problems:?}");
    let paths =
        code("use std::{fs, thread::spawn}; let t = Instant::now(); getrandom::fill(&mut b);");
    assert_eq!(impure_paths(&paths).len(), 4, "{:?}", impure_paths(&paths));
    // Importing a container may reach any of it.
    let via_container = code("use crate::fmt; fmt::job::run();");
    assert!(!order_violations(&order, "src/io/mod.rs", &via_container, &none).is_empty());
    // An unknown module.
    let unknown = code("use crate::nowhere::X;");
    assert!(
        order_violations(&order, "src/cli/mod.rs", &unknown, &none)[0].contains("names no module")
    );
    // unsafe and stdout.
    assert_eq!(unsafe_lines(&code("fn f() {\n unsafe { g() }\n}")), [2]);
    let prints = code("println!(\"a\");\nlet o = std::io::stdout();\nlet _ = io::stdout().lock();");
    assert_eq!(stdout_lines(&prints), [1, 2, 3]);
    assert!(stdout_lines(&code("eprintln!(\"a\"); let e = std::io::stderr();")).is_empty());
}
