//! What the status server and the metrics read of the manager at scrape
//! time ([`AgentReport`]): the cache itself, never a copy.

use std::time::SystemTime;

use super::SecretManager;
use crate::metrics::{AgentReport, IdentityReport};

impl AgentReport for SecretManager {
    fn identities(&self) -> Vec<IdentityReport> {
        SecretManager::identities(self)
    }

    fn ca_queue_depth(&self) -> usize {
        SecretManager::ca_queue_depth(self)
    }

    fn now(&self) -> SystemTime {
        self.opts.clock.now()
    }
}
