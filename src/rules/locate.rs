//! Finds the line and column of a node in a YAML text, given its path (`descriptors[1].key`).
//!
//! serde_yaml reports positions only with its own errors. To place an error found after parsing
//! (a duplicate, a conflict), the text is read again by a visitor that walks to the node and
//! fails there on purpose: serde_yaml then reports exactly where that node starts. This runs
//! only when a file is wrong.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into a YAML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Field(&'static str),
    Index(usize),
}

/// A path into a rule file, printed the way serde_yaml prints its own paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct YamlPath(pub Vec<Step>);

impl YamlPath {
    pub fn join(&self, step: Step) -> YamlPath {
        let mut steps = self.0.clone();
        steps.push(step);
        YamlPath(steps)
    }

    pub fn field(&self, name: &'static str) -> YamlPath {
        self.join(Step::Field(name))
    }

    pub fn index(&self, i: usize) -> YamlPath {
        self.join(Step::Index(i))
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Field(name) if i == 0 => write!(f, "{name}")?,
                Step::Field(name) => write!(f, ".{name}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Line and column (1-based) where the node at `path` starts, if the text has it.
pub fn locate(text: &str, path: &YamlPath) -> Option<(usize, usize)> {
    let err = Walk(&path.0)
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    let here = err.to_string().contains(FOUND);
    let at = err.location()?;
    here.then_some((at.line(), at.column()))
}

const FOUND: &str = "sluice: node found";

struct Walk<'p>(&'p [Step]);

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0.is_empty() {
            d.deserialize_any(Found)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match &self.0[0] {
                Step::Field(want) if *want == key => map.next_value_seed(Walk(&self.0[1..]))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = match self.0[0] {
                Step::Index(want) if want == i => seq.next_element_seed(Walk(&self.0[1..]))?,
                _ => seq.next_element::<IgnoredAny>()?.map(drop),
            };
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    // A scalar where the path goes deeper: the node is not there.
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Fails on whatever node it is given, before reading into it.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "domain: a\ndescriptors:\n  - key: x\n  # note\n  - key: y\n    rate_limit:\n      unit: Minute\n";

    #[test]
    fn finds_nodes_by_path() {
        let root = YamlPath::default().field("descriptors");
        assert_eq!(
            locate(TEXT, &YamlPath::default().field("domain")),
            Some((1, 9))
        );
        assert_eq!(locate(TEXT, &root.index(1)), Some((5, 5)));
        let unit = root.index(1).field("rate_limit").field("unit");
        assert_eq!(locate(TEXT, &unit), Some((7, 13)));
        assert_eq!(unit.to_string(), "descriptors[1].rate_limit.unit");
        assert_eq!(locate(TEXT, &root.index(5)), None);
    }
}
