//! The descriptor tree a domain compiles to, and the walk that finds a request descriptor's rule.
//!
//! Matching follows envoyproxy/ratelimit so its users' files behave the same: at each level try
//! the exact value, then wildcard values in file order, then the key alone; a rule applies only
//! when the request descriptor ends exactly at its depth. The walk does not backtrack.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Rule;

/// A `value` with `*` wildcards, matched without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    pieces: Box<[Box<str>]>,
}

impl Pattern {
    /// `None` when the value holds no `*` and so is matched exactly.
    pub fn parse(text: &str) -> Option<Pattern> {
        text.contains('*').then(|| Pattern {
            text: text.into(),
            pieces: text.split('*').map(Into::into).collect(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, value: &str) -> bool {
        let (first, rest) = self.pieces.split_first().expect("split yields a piece");
        let (last, middle) = rest.split_last().expect("a pattern holds a `*`");
        if value.len() < first.len() + last.len()
            || !value.starts_with(&**first)
            || !value.ends_with(&**last)
        {
            return false;
        }
        let mut inner = &value[first.len()..value.len() - last.len()];
        for piece in middle {
            match inner.find(&**piece) {
                Some(at) => inner = &inner[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// What a request descriptor entry looks like to the matcher.
pub trait Entry {
    fn key(&self) -> &str;
    fn value(&self) -> &str;
}

impl Entry for (&str, &str) {
    fn key(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        self.1
    }
}

/// Maps looked up on every request: foldhash, not the standard SipHash (keys come from rule
/// files, not from callers).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

/// One level of the descriptor tree.
#[derive(Debug, Default, Clone)]
pub struct Level {
    by_key: HashMap<Box<str>, Branch>,
}

#[derive(Debug, Default, Clone)]
struct Branch {
    exact: HashMap<Box<str>, Node>,
    /// Values given as SHA-256 hashes (API keys that rule files should not hold in clear).
    hashed: HashMap<[u8; 32], Node>,
    wildcards: Vec<(Pattern, Node)>,
    any: Option<Box<Node>>,
}

/// A descriptor of the file: its rule (if it limits) and the level below it.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub rule: Option<Arc<Rule>>,
    pub children: Level,
}

/// How a descriptor of the file selects request values.
#[derive(Debug, Clone)]
pub enum Selector {
    Exact(Box<str>),
    /// The SHA-256 of the value.
    Hashed([u8; 32]),
    Wildcard(Pattern),
    AnyValue,
}

impl Level {
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Adds `other`'s descriptors to this level (the domain of one file merged into the same
    /// domain of another). Returns the descriptors both define, as `key` or `key=value`; those
    /// keep this level's.
    pub fn merge(&mut self, other: &Level) -> Vec<String> {
        let mut both = Vec::new();
        for (key, branch) in &other.by_key {
            let selectors = (branch.exact.iter())
                .map(|(v, n)| (Selector::Exact(v.clone()), format!("{key}={v}"), n))
                .chain(branch.hashed.iter().map(|(d, n)| {
                    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
                    (Selector::Hashed(*d), format!("{key}=sha256:{hex}"), n)
                }))
                .chain(branch.wildcards.iter().map(|(p, n)| {
                    (
                        Selector::Wildcard(p.clone()),
                        format!("{key}={}", p.as_str()),
                        n,
                    )
                }))
                .chain((branch.any.iter()).map(|n| (Selector::AnyValue, key.to_string(), &**n)));
            for (selector, label, node) in selectors {
                if !self.insert(key, selector, node.clone()) {
                    both.push(label);
                }
            }
        }
        both.sort();
        both
    }

    /// Inserts a node; `false` if one with the same key and selector is already there.
    pub fn insert(&mut self, key: &str, selector: Selector, node: Node) -> bool {
        let branch = self.by_key.entry(key.into()).or_default();
        match selector {
            Selector::Exact(value) => match branch.exact.entry(value) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(node);
                    true
                }
            },
            Selector::Hashed(digest) => match branch.hashed.entry(digest) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(node);
                    true
                }
            },
            Selector::Wildcard(pattern) => {
                if branch.wildcards.iter().any(|(p, _)| *p == pattern) {
                    return false;
                }
                branch.wildcards.push((pattern, node));
                true
            }
            Selector::AnyValue => {
                if branch.any.is_some() {
                    return false;
                }
                branch.any = Some(Box::new(node));
                true
            }
        }
    }

    /// The rule for a request descriptor, if any: borrowed, nothing allocated.
    pub fn find<E: Entry>(&self, entries: &[E]) -> Option<&Arc<Rule>> {
        let mut level = self;
        for (i, entry) in entries.iter().enumerate() {
            let branch = level.by_key.get(entry.key())?;
            let node = branch
                .exact
                .get(entry.value())
                .or_else(|| {
                    // Hashed only when the file holds hashed values at this level.
                    (!branch.hashed.is_empty())
                        .then(|| {
                            branch
                                .hashed
                                .get(&<[u8; 32]>::from(Sha256::digest(entry.value())))
                        })
                        .flatten()
                })
                .or_else(|| {
                    branch
                        .wildcards
                        .iter()
                        .find(|(pattern, _)| pattern.matches(entry.value()))
                        .map(|(_, node)| node)
                })
                .or(branch.any.as_deref())?;
            if i + 1 == entries.len() {
                return node.rule.as_ref();
            }
            if node.children.is_empty() {
                return None;
            }
            level = &node.children;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_anywhere_in_the_value() {
        let p = |t: &str| Pattern::parse(t).unwrap();
        assert!(p("gpt-4*").matches("gpt-4o-mini"));
        assert!(p("gpt-4*").matches("gpt-4"));
        assert!(!p("gpt-4*").matches("gpt-3.5"));
        assert!(p("*-mini").matches("gpt-4o-mini"));
        assert!(p("a*b*c").matches("a-x-b-y-c"));
        assert!(!p("a*b*c").matches("a-x-c-y-b"));
        assert!(!p("ab*ba").matches("aba"));
        assert!(p("*").matches(""));
        assert!(Pattern::parse("plain").is_none());
    }
}
