//! How the rest of the fleet takes part in a decision: the view the sync task sets (alone,
//! synced, or one of the outage policies), and how a counter's charge is judged under it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Algorithm;
use super::counter::{Counts, Limits, Over, breaks, saturating_u32};

/// How the rest of the fleet is seen, read once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FleetView {
    /// No fleet store: this process is the whole fleet.
    #[default]
    Alone,
    /// The store answers: admit from this replica's leases (what the store set aside for it
    /// from the fleet's budgets of requests and tokens).
    Synced {
        /// Replicas alive, this one included.
        replicas: u32,
    },
    /// The store is unreachable: enforce `limit / replicas` on local counts alone.
    LocalShare {
        /// The fleet size last seen.
        replicas: u32,
    },
    /// The store is unreachable and the policy is to let everything through.
    AllowAll,
    /// The store is unreachable and the policy is to refuse anything limited.
    DenyAll,
}

/// How the fleet looks to the request path, set by the sync task: one atomic word, read once
/// per request.
#[derive(Debug, Default)]
pub struct FleetState(AtomicU64);

impl FleetState {
    const ALONE: u64 = 0;
    const SYNCED: u64 = 1;
    const LOCAL_SHARE: u64 = 2;
    const ALLOW_ALL: u64 = 3;
    const DENY_ALL: u64 = 4;

    /// Sets the view requests take from now on.
    pub fn set(&self, view: FleetView) {
        let (tag, replicas) = match view {
            FleetView::Alone => (Self::ALONE, 1),
            FleetView::Synced { replicas } => (Self::SYNCED, replicas),
            FleetView::LocalShare { replicas } => (Self::LOCAL_SHARE, replicas),
            FleetView::AllowAll => (Self::ALLOW_ALL, 1),
            FleetView::DenyAll => (Self::DENY_ALL, 1),
        };
        let word = (u64::from(replicas.max(1)) << 8) | tag;
        self.0.store(word, Ordering::Release);
    }

    /// The view in force.
    pub fn get(&self) -> FleetView {
        let word = self.0.load(Ordering::Acquire);
        let replicas = ((word >> 8) as u32).max(1);
        match word & 0xff {
            Self::SYNCED => FleetView::Synced { replicas },
            Self::LOCAL_SHARE => FleetView::LocalShare { replicas },
            Self::ALLOW_ALL => FleetView::AllowAll,
            Self::DENY_ALL => FleetView::DenyAll,
            _ => FleetView::Alone,
        }
    }
}

/// What the fleet had counted at the last sync, as one counter knows it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FleetCounts {
    /// What the other replicas hold in leases (tokens they reported past a lease count as
    /// held).
    pub others: Counts,
    /// What this replica holds in its leases for the window: what it may admit on its own,
    /// the store having taken it from the fleet's budget.
    pub held: Counts,
    /// Whether `others` was read from the store moments ago: then a request it finds the fleet
    /// spent is refused without asking the store again.
    pub fresh: bool,
}

/// One limit of a counter, as a charge meets it.
#[derive(Debug, Clone, Copy)]
struct Side {
    /// This replica's own count in the window.
    local: u64,
    charge: u64,
    limit: Option<u64>,
    others: u64,
    /// Whether a check (charge 0) needs lease left, as a tokens check does: it starts a call
    /// whose tokens are reported after, from the lease. A requests check takes nothing.
    check_takes_lease: bool,
    /// Whether budget comes back to the fleet in this window only when a replica gives its
    /// lease back (a fixed window's requests): a refusal on a spent view read a while ago
    /// stands, and the store is asked again in the background ([`Judged::recheck`]).
    recheck_in_background: bool,
}

/// How a charge meets one limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Judged {
    over: bool,
    /// Over only because the lease is spent, while the fleet had budget left at the last
    /// sync: a fresh lease may admit it.
    lease_spent: bool,
    /// Over on a view of the fleet spent, read a while ago, where only a lease given back
    /// can reopen it: refused now, and worth asking the store again for the calls after.
    recheck: bool,
}

impl Judged {
    /// Whether a fresh lease may admit a charge judged `requests` and `tokens`: it is over,
    /// and only where a lease is spent.
    fn lease_may_admit(requests: Judged, tokens: Judged) -> bool {
        (requests.over || tokens.over)
            && (!requests.over || requests.lease_spent)
            && (!tokens.over || tokens.lease_spent)
    }
}

impl Judged {
    const FITS: Judged = Judged {
        over: false,
        lease_spent: false,
        recheck: false,
    };
    const OVER: Judged = Judged {
        over: true,
        lease_spent: false,
        recheck: false,
    };

    fn over_if(over: bool) -> Judged {
        if over { Judged::OVER } else { Judged::FITS }
    }
}

impl FleetView {
    /// How the charge meets a limit counted in leases. Requests are exact: the store never
    /// leases more than the limit in a window, and a replica admits only what it holds. A
    /// tokens check (charge 0) is admitted only while the tokens reported stay under the
    /// lease, so the fleet goes past the limit only by what calls already admitted report.
    fn leased(self, side: Side, held: u64, fresh: bool) -> Judged {
        let Side {
            local,
            charge,
            limit,
            others,
            ..
        } = side;
        let Some(limit) = limit else {
            return Judged::FITS;
        };
        let fits = |ceiling: u64| {
            if charge == 0 {
                local < ceiling
            } else {
                local.saturating_add(charge) <= ceiling
            }
        };
        match self {
            FleetView::Alone => Judged::over_if(breaks(local, charge, Some(limit))),
            FleetView::AllowAll => Judged::FITS,
            // What it holds was taken from the fleet's budget: it stays this replica's to
            // spend while the store is away.
            FleetView::DenyAll => Judged::over_if(!fits(held)),
            FleetView::LocalShare { replicas } => {
                let share = limit.div_ceil(u64::from(replicas.max(1)));
                Judged::over_if(!fits(held.max(share)))
            }
            FleetView::Synced { .. } => {
                // A lowered limit (a reload, the capacity factor) binds at once.
                let fleet = local.saturating_add(others);
                let within_limit = if charge == 0 {
                    fleet < limit
                } else {
                    fleet.saturating_add(charge) <= limit
                };
                let fleet_spent = held.saturating_add(others) >= limit;
                if charge == 0 && !side.check_takes_lease {
                    // A check: over when neither this replica's lease nor the fleet's budget
                    // has anything left.
                    return Judged::over_if(!within_limit || (!fits(held) && fleet_spent));
                }
                if fits(held) && within_limit {
                    return Judged::FITS;
                }
                // Past the limit on this replica's own count: no lease anywhere admits it, and
                // asking the store again would only cost the call (a replica alone re-asked a
                // few times a window once it had admitted the whole limit).
                let own_within = fits(limit);
                let budget_left = within_limit && !fleet_spent;
                // A spent fleet read a while ago, where budget comes back only as a lease a
                // replica gives back: this call is refused on it at once, and the store is
                // asked in the background; a lease given back serves the calls after it. Asked
                // on the request path instead, three replicas at 3x a limit of 200 a second
                // made two calls a window each to learn what they knew.
                let recheck = own_within && !fresh && !budget_left && side.recheck_in_background;
                Judged {
                    over: true,
                    lease_spent: own_within && (!fresh || budget_left) && !recheck,
                    recheck,
                }
            }
        }
    }
}

impl Limits {
    /// What a counter counted in leases is judged against under `view`: its limits, but for a
    /// token bucket kept in leases its burst while synced (the store answers what the fleet
    /// has taken as the burst less what the bucket holds: the fleet is spent when the bucket
    /// is empty), and without the store what the bucket refills in the counter's window of a
    /// second, which the outage policies share as they share a fixed window's limit.
    fn judged_under(self, view: FleetView) -> Limits {
        let Algorithm::TokenBucket { burst } = self.algorithm else {
            return self;
        };
        if self.refill_ms == 0 {
            return self;
        }
        let per_window = |limit: u64| {
            (u128::from(limit) * u128::from(super::LEASED_BUCKET_WINDOW.millis()))
                .div_ceil(u128::from(self.refill_ms)) as u64
        };
        let limit = |limit: u64| match view {
            FleetView::Synced { .. } => u64::from(burst),
            _ => per_window(limit),
        };
        Limits {
            requests: self.requests.map(|l| saturating_u32(limit(l.into()))),
            tokens: self.tokens.map(limit),
            ..self
        }
    }
}

/// Which of a counter's limits `charge` breaks on top of its `local` counts, under `view`:
/// both counted in leases. `background`: a refusal on a stale view of a spent fleet may be
/// rechecked in the background ([`Over::recheck`]), the counter's next call being due in the
/// window.
pub(super) fn judge(
    local: Counts,
    charge: Counts,
    limits: Limits,
    fleet: FleetCounts,
    (view, background): (FleetView, bool),
) -> Over {
    let limits = limits.judged_under(view);
    let requests = view.leased(
        Side {
            local: local.requests.into(),
            charge: charge.requests.into(),
            limit: limits.requests.map(u64::from),
            others: fleet.others.requests.into(),
            check_takes_lease: false,
            recheck_in_background: background
                && !matches!(limits.algorithm, Algorithm::TokenBucket { .. })
                && limits.refill_ms == 0,
        },
        fleet.held.requests.into(),
        fleet.fresh,
    );
    let tokens = view.leased(
        Side {
            local: local.tokens,
            charge: charge.tokens,
            limit: limits.tokens,
            others: fleet.others.tokens,
            check_takes_lease: true,
            recheck_in_background: false,
        },
        fleet.held.tokens,
        fleet.fresh,
    );
    Over {
        requests: requests.over,
        tokens: tokens.over,
        lease_spent: Judged::lease_may_admit(requests, tokens),
        lease_low: false,
        recheck: requests.recheck,
    }
}
