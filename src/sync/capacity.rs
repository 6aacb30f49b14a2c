//! Capacity announcements through Redis: kept in a hash (replicas read it every tick, and a
//! replica that starts later catches up) and published on a channel (others apply them now).

use std::collections::HashMap;

use super::{Fleet, SyncError};
use crate::capacity::{Announcement, RuleName};

impl Fleet {
    fn capacity_key(&self) -> String {
        format!("{}:sluice:capacity", self.settings.namespace)
    }

    /// Announces a capacity reduction to the fleet: kept in a hash (replicas read it every
    /// tick, and a replica that starts later catches up), and published so others apply it now.
    pub async fn announce_capacity(
        &self,
        name: &RuleName,
        a: Announcement,
    ) -> Result<(), SyncError> {
        let mut store = self.store().await?;
        let (field, value) = (name.encode(), a.encode());
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(self.capacity_key())
            .arg(&field)
            .arg(&value)
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(self.capacity_key())
            .arg(7 * 86_400_000u64)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.capacity_key())
            .arg(&field)
            .ignore();
        let () = store.pipeline(&pipe, self.timeout()).await?;
        Ok(())
    }

    /// Every capacity announcement the fleet holds.
    pub async fn capacity_announcements(&self) -> Result<Vec<(RuleName, Announcement)>, SyncError> {
        let mut store = self.store().await?;
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.capacity_key());
        let all: HashMap<String, String> = store.command(&cmd, self.timeout()).await?;
        Ok(all
            .into_iter()
            .filter_map(|(field, value)| {
                Some((RuleName::decode(&field)?, Announcement::decode(&value)?))
            })
            .collect())
    }

    /// Wakes `changed` whenever another replica publishes an announcement (the hash is read
    /// every tick as well, so one lost while the subscription was down arrives all the same).
    pub async fn follow_capacity(&self, changed: &tokio::sync::Notify) {
        let lost = "capacity channel lost; reading the hash every tick meanwhile";
        self.follow_channel(self.capacity_key(), |_| changed.notify_one(), lost)
            .await;
    }
}
