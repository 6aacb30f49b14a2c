//! The one-way architecture, enforced: every module of `src/` may import only the modules its
//! row of `DESIGN.md`'s table names ("Who may import whom"), read from the file itself so the
//! map and the check cannot drift apart. Both `use
//! crate::…` items and `crate::…` paths in expressions count; comments and strings do not.
//! The table itself must have no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Who may import whom: the table of `DESIGN.md`, section "Who may import whom". `a, b → c, d`:
/// a and b may import c and d (and nothing else of the crate). A `module::part` entry allows
/// that part alone. `main` imports through `sluice::`.
fn table_text() -> String {
    let design = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("DESIGN.md"))
        .expect("DESIGN.md beside Cargo.toml");
    let section = design
        .split("## Who may import whom")
        .nth(1)
        .expect("DESIGN.md has a section \"Who may import whom\"");
    let block = section
        .split("```")
        .nth(1)
        .expect("the section holds the table in a code block");
    block.to_string()
}

/// Each module's allowed imports.
fn table() -> BTreeMap<String, BTreeSet<String>> {
    let mut allowed = BTreeMap::new();
    for line in table_text()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let (who, whom) = line.split_once('→').expect("a row has an arrow");
        let whom: BTreeSet<String> = whom
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty() && *m != "nothing in the crate")
            .map(String::from)
            .collect();
        for module in who.split(',').map(str::trim) {
            allowed.insert(module.to_string(), whom.clone());
        }
    }
    allowed
}

/// The source with comments, strings and char literals blanked out, so that only code is read.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let (c, next) = (chars[i], chars.get(i + 1).copied());
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident(chars.get(i.wrapping_sub(1)))
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '"'), or a lifetime ('a), which is kept.
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// The modules (`name`, and `name::part`) a piece of code reaches through `root::`.
fn imports(code: &str, root: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let needle = format!("{root}::");
    let mut rest = code;
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if ident(before.as_ref()) {
            continue; // `foocrate::`, not ours
        }
        let rest_trimmed = rest.trim_start();
        if let Some(group) = rest_trimmed.strip_prefix('{') {
            // `crate::{a::b, c}`: each top-level item of the group.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(path_of(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.extend(path_of(&item));
        } else {
            found.extend(path_of(rest_trimmed));
        }
    }
    found
}

/// `name` and, when the path goes on, `name::part`, from the start of a path.
fn path_of(text: &str) -> Vec<String> {
    let segments: Vec<String> = text
        .trim()
        .split("::")
        .take(2)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .take_while(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        [] => vec![],
        [one] => vec![one.clone()],
        [one, two] => vec![one.clone(), format!("{one}::{two}")],
        _ => unreachable!(),
    }
}

/// The module a file of `src/` belongs to: `src/sync/round.rs` → `sync`.
fn module_of(path: &Path, src: &Path) -> String {
    let relative = path.strip_prefix(src).expect("under src");
    let first = relative
        .components()
        .next()
        .expect("a file")
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import of every file that its module's row does not allow: `file: module → module`.
fn violations(src: &Path) -> Vec<String> {
    let allowed = table();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in files {
        let module = module_of(&file, src);
        if module == "lib" {
            continue; // the crate root declares the modules
        }
        let row = allowed.get(&module).unwrap_or_else(|| {
            panic!(
                "{}: module `{module}` has no row in the table",
                file.display()
            )
        });
        let root = if module == "main" { "sluice" } else { "crate" };
        let code = code_only(&std::fs::read_to_string(&file).expect("readable file"));
        let found = imports(&code, root);
        let tops: BTreeSet<&str> = found.iter().filter_map(|i| i.split("::").next()).collect();
        for top in tops {
            if top == module || !allowed.contains_key(top) || row.contains(top) {
                continue; // its own parts, not a module (`crate::App`), or allowed whole
            }
            // Allowed only in part (`sync::strict`): every path into it must name such a part.
            let prefix = format!("{top}::");
            let parts: Vec<&String> = found.iter().filter(|i| i.starts_with(&prefix)).collect();
            if !parts.is_empty() && parts.iter().all(|p| row.contains(*p)) {
                continue;
            }
            wrong.push(format!("{}: {module} → {top}", file.display()));
        }
    }
    wrong
}

#[test]
fn every_module_imports_only_what_its_row_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let wrong = violations(&src);
    assert!(
        wrong.is_empty(),
        "imports the architecture table does not allow:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn every_row_names_a_module_of_src() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in table().keys() {
        let exists =
            src.join(format!("{module}.rs")).is_file() || src.join(module).join("mod.rs").is_file();
        assert!(
            exists,
            "the table names `{module}`, which src/ does not hold"
        );
    }
}

#[test]
fn the_table_has_no_cycle() {
    let allowed = table();
    // Depth-first search for a path back to where it started.
    fn reaches(
        allowed: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let top = |m: &str| m.split("::").next().unwrap_or_default().to_string();
        for next in allowed.get(from).into_iter().flatten().map(|m| top(m)) {
            if next == to || (seen.insert(next.clone()) && reaches(allowed, &next, to, seen)) {
                return true;
            }
        }
        false
    }
    for module in allowed.keys() {
        assert!(
            !reaches(&allowed, module, module, &mut BTreeSet::new()),
            "`{module}` can reach itself through the table"
        );
    }
}

#[test]
fn the_scanner_sees_grouped_and_inline_paths_but_not_comments_or_strings() {
    let code = code_only(
        r#"
        use crate::{limiter::Unit, sync::strict::settle};
        // use crate::server;
        /* crate::admin */
        let x = "crate::grpc";
        let c = '"'; let l: &'static str = "";
        fn f() { crate::decision::decide(); }
        "#,
    );
    let found = imports(&code, "crate");
    let tops: BTreeSet<&str> = found
        .iter()
        .map(|i| i.split("::").next().unwrap())
        .collect();
    assert_eq!(tops, BTreeSet::from(["decision", "limiter", "sync"]));
    assert!(found.contains("sync::strict"));
}
