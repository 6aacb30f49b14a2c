//! The request path's lease calls, gathered into pipelines. At a window's start many counters
//! are new at once and each call that finds its lease spent waits on Redis. With a pipeline of
//! its own each, such a call kept its own Redis future (7.5 KiB) alive while it waited, and
//! each top-up a task of its own: about 2,000 calls and 6,600 tasks at once at each minute's
//! start in the soak (BENCHMARKS.md), and Redis read each as a command apart. Queued here, a
//! waiting call holds its wants and a oneshot; one task sends what is queued as one pipeline,
//! [`IN_FLIGHT`] at most at once, so what queues while they are out goes in the next.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::RedisError;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::Fleet;
use crate::decision::LeaseWant;
use crate::limiter::Limiter;

/// Pipelines out at once: one more is gathered while they are answered.
const IN_FLIGHT: usize = 4;
/// Most queued calls sent in one pipeline.
const MOST_QUEUED: usize = 512;

/// Why a lease call on the request path got no lease.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// Redis refused the pipeline, did not answer in time, or could not be reached.
    #[error("Redis: {0}")]
    Redis(Arc<RedisError>),
    /// The queue did not answer in time (its pipelines are each bounded by the Redis timeout).
    #[error("no lease within {0:?}")]
    Unanswered(Duration),
}

/// The queue's sending end, its task started on first use (inside the runtime).
#[derive(Default)]
pub(super) struct LeaseQueue {
    sender: OnceLock<mpsc::UnboundedSender<Queued>>,
}

/// One call's wants, and where its answer goes (none for a top-up: no request waits on it).
struct Queued {
    wants: Vec<LeaseWant>,
    replicas: u32,
    answer: Option<oneshot::Sender<Result<(), LeaseError>>>,
}

impl Fleet {
    /// Leases afresh the counters of a denied request whose lease ran out (the request path),
    /// in the next pipeline the queue sends. Each counter records what the store answered, so
    /// the request can be decided again.
    pub async fn take_leases(
        self: &Arc<Self>,
        limiter: &Arc<Limiter>,
        wants: Vec<LeaseWant>,
        replicas: u32,
    ) -> Result<(), LeaseError> {
        let (answer, answered) = oneshot::channel();
        self.queue(limiter, wants, replicas, Some(answer));
        // Behind at most IN_FLIGHT pipelines, each bounded by the timeout, and its own.
        let patience = self.timeout() * (IN_FLIGHT as u32 + 2);
        match tokio::time::timeout(patience, answered).await {
            Ok(Ok(result)) => result,
            _ => Err(LeaseError::Unanswered(patience)),
        }
    }

    /// Tops up the leases of `wants` in the next pipeline; nothing waits on it.
    pub fn top_up_leases(
        self: &Arc<Self>,
        limiter: &Arc<Limiter>,
        wants: Vec<LeaseWant>,
        replicas: u32,
    ) {
        self.queue(limiter, wants, replicas, None);
    }

    fn queue(
        self: &Arc<Self>,
        limiter: &Arc<Limiter>,
        wants: Vec<LeaseWant>,
        replicas: u32,
        answer: Option<oneshot::Sender<Result<(), LeaseError>>>,
    ) {
        let sender = self.lease_queue.sender.get_or_init(|| {
            let (sender, queued) = mpsc::unbounded_channel();
            tokio::spawn(send_queued(Arc::downgrade(self), limiter.clone(), queued));
            sender
        });
        let queued = Queued {
            wants,
            replicas,
            answer,
        };
        if let Err(mpsc::error::SendError(queued)) = sender.send(queued) {
            // The task is gone (its runtime shut down): no lease.
            if let Some(answer) = queued.answer {
                let _ = answer.send(Err(LeaseError::Unanswered(Duration::ZERO)));
            }
        }
    }
}

/// The queue's task: takes what is queued when a pipeline may go out, and sends it. Ends when
/// the fleet is dropped (its sender with it).
async fn send_queued(
    fleet: Weak<Fleet>,
    limiter: Arc<Limiter>,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut taken = Vec::new();
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut taken, MOST_QUEUED).await == 0 {
            return;
        }
        let Some(fleet) = fleet.upgrade() else {
            return;
        };
        let limiter = limiter.clone();
        let calls = std::mem::take(&mut taken);
        tokio::spawn(async move {
            let wants = merged(&calls);
            let result = fleet
                .lease_now(&limiter, &wants)
                .await
                .map_err(|error| LeaseError::Redis(Arc::new(error)));
            if let Err(error) = &result
                && calls.iter().all(|call| call.answer.is_none())
            {
                // The next request that finds its lease spent asks again, and switches to
                // the failure policy if the store still fails.
                tracing::debug!(%error, "cannot top up leases");
            }
            for call in calls {
                if let Some(answer) = call.answer {
                    let _ = answer.send(result.clone());
                }
            }
            drop(permit);
        });
    }
}

/// The wants of the calls taken, one per counter: what calls waiting on the same counter need
/// is added up (one grant covers them all); a top-up goes only where no call waits.
fn merged(calls: &[Queued]) -> Vec<(LeaseWant, u32)> {
    let mut wants: Vec<(LeaseWant, u32)> = Vec::new();
    let mut at: HashMap<&crate::limiter::CounterKey, usize> = HashMap::new();
    for call in calls {
        for want in &call.wants {
            match at.get(&want.counter) {
                None => {
                    at.insert(&want.counter, wants.len());
                    wants.push((want.clone(), call.replicas));
                }
                Some(_) if want.top_up => {}
                Some(&i) if wants[i].0.top_up => wants[i] = (want.clone(), call.replicas),
                Some(&i) => wants[i].0.need = wants[i].0.need.plus(want.need),
            }
        }
    }
    wants
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{CounterRef, Counts, Limits, Unit};

    fn want(name: &str, requests: u32, top_up: bool) -> LeaseWant {
        LeaseWant {
            counter: CounterRef {
                scope: 3,
                unit: Unit::Minute,
                parts: &[name],
            }
            .to_key(),
            rule: None,
            limits: Limits {
                requests: Some(6),
                ..Limits::default()
            },
            need: Counts {
                requests,
                tokens: 0,
            },
            top_up,
        }
    }

    fn queued(wants: Vec<LeaseWant>, waits: bool) -> Queued {
        Queued {
            wants,
            replicas: 1,
            answer: waits.then(|| oneshot::channel().0),
        }
    }

    #[test]
    fn calls_waiting_on_one_counter_ask_once_for_what_they_need_together() {
        let calls = [
            queued(vec![want("a", 1, false), want("b", 2, false)], true),
            queued(vec![want("a", 3, false)], true),
            queued(vec![want("b", 0, true), want("c", 0, true)], false),
            queued(vec![want("c", 1, false)], true),
        ];
        let wants: Vec<(String, u32, bool)> = merged(&calls)
            .into_iter()
            .map(|(w, _)| {
                let name = w.counter.parts().next().unwrap().to_string();
                (name, w.need.requests, w.top_up)
            })
            .collect();
        // a: 1 + 3; b: the top-up goes where a call waits already; c: the call replaces the
        // top-up queued before it.
        assert_eq!(
            wants,
            [
                ("a".to_string(), 4, false),
                ("b".to_string(), 2, false),
                ("c".to_string(), 1, false)
            ]
        );
    }
}
