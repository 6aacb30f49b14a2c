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
    /// sluice's LLM shorthand: API keys and their tiers.
    #[serde(default)]
    pub api_keys: Option<RawApiKeys>,
    /// sluice's LLM shorthand: upstream endpoints and their shared budgets.
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    /// An endpoint whose `tpm_limit` is above this is treated as unlimited (a mock, or an
    /// endpoint with no real limit). Default 100,000,000.
    #[serde(default)]
    pub unlimited_tpm_above: Option<u64>,
}

/// Per-minute and per-day budgets of an API key tier.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename = "tier")]
pub struct RawTier {
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u32>,
    #[serde(default)]
    pub rpd: Option<u32>,
    #[serde(default)]
    pub tpd: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "api_keys")]
pub struct RawApiKeys {
    /// The descriptor entry key carrying the API key (default `api_key`).
    #[serde(default)]
    pub descriptor_key: Option<String>,
    #[serde(default)]
    pub tiers: std::collections::BTreeMap<String, RawTier>,
    /// The tier of keys the table does not list.
    #[serde(default)]
    pub default_tier: Option<String>,
    /// What keys the table does not list get (default: the default tier).
    #[serde(default)]
    pub unknown_keys: Option<UnknownKeys>,
    #[serde(default)]
    pub keys: Vec<RawApiKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "api key")]
pub struct RawApiKey {
    /// The key in clear; or give `sha256`, the hex SHA-256 of the key.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
    /// The original design's per-key limits; they override the tier's.
    #[serde(default)]
    pub rate_limit_rpm: Option<u32>,
    #[serde(default)]
    pub rate_limit_tpm: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "endpoint")]
pub struct RawEndpoint {
    pub id: String,
    #[serde(default)]
    pub rpm_limit: Option<u32>,
    #[serde(default)]
    pub tpm_limit: Option<u64>,
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
    /// sluice extension: how long a call that would be refused may wait for capacity (`250ms`).
    #[serde(default)]
    pub wait: Option<String>,
    /// sluice extension: shares of the limits kept for priority classes (`{high: 20%}`).
    #[serde(default)]
    pub reserve: Option<std::collections::BTreeMap<String, serde_yaml::Value>>,
    /// sluice extension: `strict` decides in Redis on the request path, exactly;
    /// `approximate` (the default) decides locally against synced fleet totals.
    #[serde(default)]
    pub consistency: Option<super::Consistency>,
}

/// What API keys the `api_keys` table does not list get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownKeys {
    /// The limits of `default_tier`; with no default tier, no limit.
    #[default]
    DefaultTier,
    /// Refused (429): a limit of zero.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "limit")]
pub struct RawLimit {
    #[serde(default)]
    pub unit: Option<String>,
    /// sluice extension: a window of any whole number of seconds, in place of `unit`
    /// (`90s`, `5m`, `2h`).
    #[serde(default)]
    pub window: Option<String>,
    /// sluice extension: `calendar_day`, `calendar_week` or `calendar_month`, in place of
    /// `unit`, in `timezone` (an IANA name; UTC by default).
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    /// envoyproxy/ratelimit's limit: each call counts its hits.
    #[serde(default)]
    pub requests_per_unit: Option<u32>,
    /// sluice extension: each call counts one.
    #[serde(default)]
    pub requests: Option<u32>,
    /// sluice extension: each call counts its hits, reported as tokens. Read as 64 bits so a
    /// budget too large to count yet gets an error that says so.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// sluice extension: holds in flight, each taken by a call while its stream lasts.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// sluice extension: how long a concurrency hold lives when its release never comes
    /// (`30s`, `5m`; 5 minutes by default).
    #[serde(default)]
    pub hold_ttl: Option<String>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub replaces: Vec<RawReplace>,
    /// sluice extension: `fixed_window` (the default), `sliding_window` or `token_bucket`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// sluice extension: a token bucket's size (the limit by default).
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "replaces entry")]
pub struct RawReplace {
    pub name: String,
}
