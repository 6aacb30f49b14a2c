//! The rule files as written: serde types that mirror the YAML one to one. Nothing here is
//! validated beyond its shape; `compile` turns it into rules that cannot be wrong.

use serde::Deserialize;

/// One rule file: a domain and its descriptor tree (the envoyproxy/ratelimit format).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "rule file")]
pub struct RawFile {
    pub domain: String,
    #[serde(default)]
    pub descriptors: Vec<RawDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "descriptor")]
pub struct RawDescriptor {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RawLimit>,
    /// sluice extension: several limits on one descriptor.
    #[serde(default)]
    pub limits: Vec<RawLimit>,
    #[serde(default)]
    pub descriptors: Vec<RawDescriptor>,
    #[serde(default)]
    pub shadow_mode: bool,
    #[serde(default)]
    pub quota_mode: bool,
    #[serde(default)]
    pub detailed_metric: bool,
    #[serde(default)]
    pub value_to_metric: bool,
    #[serde(default)]
    pub share_threshold: bool,
    #[serde(default)]
    pub metadata: Option<serde_yaml::Mapping>,
    /// sluice extension: `strict` decides in Redis on the request path, exactly;
    /// `approximate` (the default) decides locally against synced fleet totals.
    #[serde(default)]
    pub consistency: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "limit")]
pub struct RawLimit {
    #[serde(default)]
    pub unit: Option<String>,
    /// envoyproxy/ratelimit's limit: each call counts its hits.
    #[serde(default)]
    pub requests_per_unit: Option<u32>,
    /// sluice extension: each call counts one.
    #[serde(default)]
    pub requests: Option<u32>,
    /// sluice extension: each call counts its hits, reported as tokens.
    #[serde(default)]
    pub tokens: Option<u32>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub replaces: Vec<RawReplace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "replaces entry")]
pub struct RawReplace {
    pub name: String,
}
