//! The core's settings: timer lengths and the lease policy, with their defaults next to
//! their validation.
//!
//! Validated once, in [`crate::Core::new`]; an error names the values. This module must
//! never read a file or the environment: the daemon's configuration layer maps its
//! `[failover]` section onto [`Config`].

use core::fmt;

use crate::api::Millis;

/// Who grants the right to hold the address.
///
/// Today only [`LeasePolicy::None`]: the right comes from the operator's command and the
/// probe. A later witness or etcd lease adds a variant (`Required { margin }`) and an
/// input (`LeaseGranted { until }`); the core already asks [`crate::Core`]'s
/// `lease_allows(now)` before every add and on every timer while it claims the address,
/// so that is one more input and one more arm, not a rewrite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeasePolicy {
    /// Manual only: no lease is needed (automatic failover is refused elsewhere).
    #[default]
    None,
}

/// Timer lengths, all in monotonic milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// How often a heartbeat (our state) goes to the peer.
    pub heartbeat_interval: Millis,
    /// The peer is unreachable when nothing was heard from it for this long.
    pub peer_timeout: Millis,
    /// How long an add, remove, persist, announce, start or stop may take.
    pub action_timeout: Millis,
    /// How long a probe may take (the shell's probe itself is shorter).
    pub probe_timeout: Millis,
    /// How long shipping a final snapshot or installing a generation may take.
    pub transfer_timeout: Millis,
    /// How long either side of a switchover waits for the other.
    pub handover_timeout: Millis,
    /// How often the live host repeats its gratuitous ARP burst.
    pub announce_refresh: Millis,
    /// How long a host started with a leftover address waits for the peer to confirm
    /// it is current before removing it.
    pub leftover_grace: Millis,
    /// Pause between attempts to remove the address after a failure.
    pub remove_retry: Millis,
    /// Who grants the right to hold the address.
    pub lease: LeasePolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Millis(500),
            peer_timeout: Millis(2_000),
            action_timeout: Millis(5_000),
            probe_timeout: Millis(3_000),
            transfer_timeout: Millis(120_000),
            handover_timeout: Millis(150_000),
            announce_refresh: Millis(10_000),
            leftover_grace: Millis(5_000),
            remove_retry: Millis(1_000),
            lease: LeasePolicy::None,
        }
    }
}

/// Why a [`Config`] was refused. Each variant names the setting and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A timer of zero length would fire forever.
    Zero {
        /// The setting.
        name: &'static str,
    },
    /// A timer too short for the ones it depends on.
    TooShort {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Millis,
        /// The least value that works, and how it is made up.
        min: Millis,
        /// The rule, in words.
        rule: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero { name } => write!(f, "{name} is 0 ms: it must be positive"),
            ConfigError::TooShort {
                name,
                value,
                min,
                rule,
            } => write!(f, "{name} is {value}, below {min}: {rule}"),
        }
    }
}

impl core::error::Error for ConfigError {}

impl Config {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let all = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("peer_timeout", self.peer_timeout),
            ("action_timeout", self.action_timeout),
            ("probe_timeout", self.probe_timeout),
            ("transfer_timeout", self.transfer_timeout),
            ("handover_timeout", self.handover_timeout),
            ("announce_refresh", self.announce_refresh),
            ("leftover_grace", self.leftover_grace),
            ("remove_retry", self.remove_retry),
        ];
        if let Some((name, _)) = all.iter().find(|(_, v)| v.0 == 0) {
            return Err(ConfigError::Zero { name });
        }
        let hb2 = Millis(self.heartbeat_interval.0.saturating_mul(2));
        let rules = [
            (
                "peer_timeout",
                self.peer_timeout,
                hb2,
                "it must cover 2 × heartbeat_interval, or one lost heartbeat makes the peer unreachable",
            ),
            (
                "leftover_grace",
                self.leftover_grace,
                hb2,
                "it must cover 2 × heartbeat_interval, or a restarted live host drops its address before the peer can confirm it",
            ),
            (
                "handover_timeout",
                self.handover_timeout,
                Millis(
                    self.transfer_timeout
                        .0
                        .saturating_add(self.probe_timeout.0.saturating_mul(2))
                        .saturating_add(self.action_timeout.0.saturating_mul(4)),
                ),
                "it must cover transfer_timeout + 2 × probe_timeout + 4 × action_timeout (the standby's install, probes, persist, add, announce and start)",
            ),
        ];
        for (name, value, min, rule) in rules {
            if value < min {
                return Err(ConfigError::TooShort {
                    name,
                    value,
                    min,
                    rule,
                });
            }
        }
        Ok(())
    }
}
