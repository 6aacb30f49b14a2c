//! Where reloads come from: file events on the config directory, debounced.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// File events on the config directory. Set up before the rules are first read, so an edit
/// made while the server starts is not missed until the periodic rescan.
pub struct Changes {
    signalled: Arc<Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Changes {
    /// Waits for the next burst of file events to end (quiet for `debounce`).
    pub async fn next(&self, debounce: Duration) {
        self.signalled.notified().await;
        settle(&self.signalled, debounce).await;
    }

    /// Watches `dir` when `watch` is set; without a watch, SIGHUP and the periodic rescan
    /// still reload.
    pub fn watch(dir: &Path, watch: bool) -> Changes {
        let signalled = Arc::new(Notify::new());
        let watcher = if watch {
            watch_dir(dir, signalled.clone())
        } else {
            None
        };
        Changes {
            signalled,
            _watcher: watcher,
        }
    }
}

/// Waits until events stop for `quiet`, or at most 20 times that, so a stream of writes still
/// reloads.
async fn settle(changed: &Notify, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet * 20;
    loop {
        tokio::select! {
            _ = changed.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
            _ = tokio::time::sleep(quiet) => return,
        }
    }
}

/// Watches the directory itself (not recursively): edits, creations, removals, renames, and a
/// Kubernetes ConfigMap's `..data` symlink swap all show up as events on its entries.
fn watch_dir(dir: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => changed.notify_one(),
        Err(e) => tracing::warn!(error = %e, "config watch error; the periodic rescan still runs"),
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on the periodic rescan");
            None
        }
    }
}
