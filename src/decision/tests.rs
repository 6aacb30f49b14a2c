//! The decision as a table: rules, a sequence of calls, and what each call must answer.

use std::sync::Arc;

use super::*;
use crate::limiter::ManualClock;
use crate::rules::{DomainFiles, RuleSet, SourceFile, compile_file};

const RULES: &str = "domain: d
descriptors:
  - key: key
    limits:
      - { unit: minute, requests: 3 }
      - { unit: hour, requests: 100 }
    descriptors:
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 2, name: per_model, replaces: [{ name: per_key }] }
  - key: tenant
    limits:
      - { unit: minute, requests: 2, name: per_key }
  - key: shadowed
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: free
    rate_limit: { unlimited: true }
";

fn rules() -> RuleSet {
    let file = SourceFile {
        path: "d.yaml".into(),
        text: RULES.into(),
    };
    let (set, errors) = RuleSet::assemble(
        vec![Arc::new(compile_file(&file).unwrap())],
        DomainFiles::One,
    );
    assert!(errors.is_empty());
    set
}

/// One descriptor of a call: its entries and hits.
type Call = &'static [(&'static [(&'static str, &'static str)], u64)];

/// What each descriptor must answer: code, remaining, and the limit reported (`None`: none).
type Expected = &'static [(Code, u32, Option<u32>)];

fn ask(
    entries: &'static [(&'static str, &'static str)],
    hits: u64,
) -> Ask<'static, (&'static str, &'static str)> {
    Ask {
        entries,
        hits,
        refund: false,
        limit_override: None,
        purpose: Purpose::Call,
        class: None,
    }
}

#[test]
fn decisions_follow_the_table() {
    const K1: &[(&str, &str)] = &[("key", "k1")];
    const K1_MODEL: &[(&str, &str)] = &[("key", "k1"), ("model", "m")];
    const TENANT: &[(&str, &str)] = &[("tenant", "t")];
    const TABLE: &[(&str, Call, bool, Expected)] = &[
        (
            "within the limit: the nearer of two windows is reported",
            &[(K1, 1)],
            true,
            &[(Code::Ok, 2, Some(3))],
        ),
        ("a second call", &[(K1, 1)], true, &[(Code::Ok, 1, Some(3))]),
        (
            "a check (0 hits) counts nothing",
            &[(K1, 0)],
            true,
            &[(Code::Ok, 1, Some(3))],
        ),
        (
            "the last one left",
            &[(K1, 1)],
            true,
            &[(Code::Ok, 0, Some(3))],
        ),
        (
            "over: denied, and nothing taken",
            &[(K1, 1)],
            false,
            &[(Code::OverLimit, 0, Some(3))],
        ),
        (
            "a denial by a later descriptor gives back what earlier ones took",
            &[(TENANT, 1), (K1, 1)],
            false,
            // Its count is reported as it stands once given back.
            &[(Code::Ok, 2, Some(2)), (Code::OverLimit, 0, Some(3))],
        ),
        (
            "the tenant's count was given back",
            &[(TENANT, 1)],
            true,
            &[(Code::Ok, 1, Some(2))],
        ),
        (
            "a matched per_model limit replaces per_key of another descriptor",
            &[(TENANT, 1), (K1_MODEL, 1)],
            true,
            &[(Code::Ok, 0, None), (Code::Ok, 1, Some(2))],
        ),
        (
            "shadow mode: over, yet allowed",
            &[(&[("shadowed", "s")], 2)],
            true,
            &[(Code::Ok, 0, Some(1))],
        ),
        (
            "unlimited",
            &[(&[("free", "f")], 1_000)],
            true,
            &[(Code::Ok, u32::MAX, None)],
        ),
        (
            "no rule at this depth",
            &[(&[("key", "k1"), ("other", "x")], 1)],
            true,
            &[(Code::Ok, 0, None)],
        ),
    ];
    let rules = rules();
    let limiter = Limiter::new(Arc::new(ManualClock::new(1_767_225_600_000)));
    let narrow = |n: u64| u32::try_from(n).expect("a 32-bit figure");
    for (what, call, allowed, expected) in TABLE {
        let asks: Vec<_> = call
            .iter()
            .map(|(entries, hits)| ask(entries, *hits))
            .collect();
        let verdict = decide(&rules, &limiter, "d", &asks, Mode::default());
        assert_eq!(verdict.allowed, *allowed, "{what}: allowed");
        let got: Vec<(Code, u32, Option<u32>)> = verdict
            .statuses
            .iter()
            .map(|s| {
                (
                    s.code,
                    narrow(s.remaining),
                    s.limit.map(|l| narrow(l.per_unit)),
                )
            })
            .collect();
        assert_eq!(&got, expected, "{what}");
    }
}

#[test]
fn unknown_domains_allow_everything_and_say_so() {
    let limiter = Limiter::new(Arc::new(ManualClock::new(0)));
    let asks = [ask(&[("key", "k1")], 5)];
    let rules = rules();
    let verdict = decide(&rules, &limiter, "elsewhere", &asks, Mode::default());
    assert!(verdict.allowed && !verdict.known_domain);
    assert_eq!(verdict.statuses.len(), 1);
    assert!(verdict.statuses[0].limit.is_none());
}

#[test]
fn an_override_replaces_the_rule_and_counts_apart() {
    let limiter = Limiter::new(Arc::new(ManualClock::new(0)));
    let rules = rules();
    let mut asks = [ask(&[("key", "k1")], 1)];
    asks[0].limit_override = Some(LimitOverride {
        per_unit: 1,
        unit: Unit::Second,
    });
    let first = decide(&rules, &limiter, "d", &asks, Mode::default());
    assert!(first.allowed);
    assert_eq!(
        first.statuses[0].limit.map(|l| (l.per_unit, l.unit)),
        Some((1, Unit::Second))
    );
    assert!(!decide(&rules, &limiter, "d", &asks, Mode::default()).allowed);
    // The rule's own counter was never touched.
    let plain = [ask(&[("key", "k1")], 1)];
    assert_eq!(
        decide(&rules, &limiter, "d", &plain, Mode::default()).statuses[0].remaining,
        2
    );
}

#[test]
fn explain_reads_what_decide_would_enforce_without_counting() {
    let limiter = Limiter::new(Arc::new(ManualClock::new(0)));
    let rules = rules();
    let asks = [ask(&[("key", "k1")], 1)];
    decide(&rules, &limiter, "d", &asks, Mode::default());
    // A capacity reduction to half: 3 a minute becomes 1.
    let rule = rules
        .domain("d")
        .unwrap()
        .tree
        .find(&[("key", "k1")])
        .unwrap();
    rule.capacity.set(crate::rules::Factor::FULL / 2);
    let judged = explain(&rules, &limiter, "d", &asks, Mode::default()).unwrap();
    let minute = judged[0].1.iter().find(|j| j.unit == Unit::Minute).unwrap();
    assert_eq!(
        (minute.standing.limit.per_unit, minute.standing.used),
        (1, 1)
    );
    assert!(minute.standing.over, "the next call would be denied");
    let verdict = decide(&rules, &limiter, "d", &asks, Mode::default());
    assert!(!verdict.allowed, "and decide denies it");
    assert_eq!(verdict.statuses[0].remaining, minute.standing.remaining());
    assert!(explain(&rules, &limiter, "elsewhere", &asks, Mode::default()).is_none());
}
