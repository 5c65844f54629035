//! What the gateway does when a served interface disappears.
//!
//! The AF_XDP sockets and the XDP program are bound to an interface index;
//! once the interface is deleted (a veth torn down, a driver unbound, a NIC
//! renamed) they are gone with it, and nothing comes back on its own even if
//! an interface of the same name returns (it gets a new index). So:
//!
//! - the loss is logged once, at error level, naming the interface, and
//!   `/healthz` answers 503 with that reason (a readiness probe takes the
//!   gateway out of service; `/livez` stays 200: the process is well and
//!   waiting);
//! - while it stays lost, a reminder is logged with back-off (after 30 s,
//!   then each interval doubled, at most every 10 minutes), and the next-hop
//!   refresh, which would fail on every round, is paused;
//! - when an interface of that name exists again, the gateway exits with
//!   [`EXIT_INTERFACE_RETURNED`], so that the orchestrator (the DaemonSet's
//!   restart policy, systemd's `Restart=on-failure`) starts it afresh and it
//!   attaches to the new interface from scratch, as at any start.
//!
//! Exiting was chosen over re-attaching in place: a fresh start rebuilds the
//! UMEM, the sockets, the steering program and its maps through the one
//! path that start-up already tests, instead of a second, rarely run path.
//! The connection table is lost with the process; the flows are re-picked
//! by Maglev, which sends each one to the same backend while the endpoints
//! are unchanged.
//!
//! [`LinkWatch`] is the decision alone (no I/O, a `now` passed in), so it is
//! tested without interfaces; [`probe`] asks the kernel.

use std::time::{Duration, Instant};

use clustergate_dataplane::io::nexthop::{self, NextHopError};

/// The gateway's exit status when a lost interface returned (EX_TEMPFAIL:
/// "try again", as sysexits.h has it).
pub const EXIT_INTERFACE_RETURNED: i32 = 75;

/// The first reminder after a loss.
const FIRST_REMINDER: Duration = Duration::from_secs(30);
/// Reminders at most this far apart.
const MAX_REMINDER: Duration = Duration::from_secs(600);

/// What the kernel says of one served interface, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Present, with the index the gateway attached to.
    Same,
    /// No interface of that name.
    Gone,
    /// An interface of that name, with another index: it was deleted and
    /// made again (or another one took its name).
    Replaced(u32),
    /// The kernel could not be asked (a netlink error): no decision.
    Unknown,
}

/// What the management loop must do after [`LinkWatch::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing new.
    None,
    /// An interface was just lost: log this (once) and answer 503.
    Lost(String),
    /// Still lost: log this reminder.
    Remind(String),
    /// Every lost interface exists again: exit, so as to be restarted.
    Returned(String),
}

/// The served interfaces' state, as the management loop sees it.
#[derive(Debug)]
pub struct LinkWatch {
    /// (name, index attached to).
    served: Vec<(String, u32)>,
    /// Since when, and the next reminder's time and interval; `None` while
    /// every interface is present.
    lost: Option<Lost>,
}

#[derive(Debug)]
struct Lost {
    since: Instant,
    names: Vec<String>,
    next_reminder: Instant,
    interval: Duration,
}

impl LinkWatch {
    /// Watches `served`: (name, index attached to).
    #[must_use]
    pub fn new(served: Vec<(String, u32)>) -> Self {
        Self { served, lost: None }
    }

    /// The served interfaces: (name, index attached to).
    #[must_use]
    pub fn served(&self) -> &[(String, u32)] {
        &self.served
    }

    /// Why the gateway cannot serve, while an interface is lost.
    #[must_use]
    pub fn reason(&self) -> Option<String> {
        self.lost.as_ref().map(|l| lost_text(&l.names))
    }

    /// Whether an interface is lost now.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// Takes in what the kernel says of each served interface (`presence`,
    /// in [`served`](Self::served)'s order) at `now`.
    pub fn observe(&mut self, now: Instant, presence: &[Presence]) -> Action {
        let missing: Vec<String> = self
            .served
            .iter()
            .zip(presence)
            .filter(|(_, p)| matches!(p, Presence::Gone | Presence::Replaced(_)))
            .map(|((name, _), _)| name.clone())
            .collect();
        let unknown = presence.contains(&Presence::Unknown);
        match &mut self.lost {
            None if missing.is_empty() => Action::None,
            None => {
                let why = lost_text(&missing);
                self.lost = Some(Lost {
                    since: now,
                    names: missing,
                    next_reminder: now + FIRST_REMINDER,
                    interval: FIRST_REMINDER,
                });
                Action::Lost(why)
            }
            Some(lost) => {
                // Every interface lost so far (and any lost since) must exist
                // again: an interface that is still gone keeps us waiting.
                for m in &missing {
                    if !lost.names.contains(m) {
                        lost.names.push(m.clone());
                    }
                }
                let back: Vec<(String, u32)> = self
                    .served
                    .iter()
                    .zip(presence)
                    .filter_map(|((name, _), p)| match p {
                        Presence::Replaced(i) if lost.names.contains(name) => {
                            Some((name.clone(), *i))
                        }
                        _ => None,
                    })
                    .collect();
                if !unknown && back.len() == lost.names.len() {
                    let list: Vec<String> = back
                        .iter()
                        .map(|(n, i)| format!("{n} (now ifindex {i})"))
                        .collect();
                    return Action::Returned(format!(
                        "served interface {} is back after {:.1} s; exiting with status {} so \
                         that the gateway is restarted and attaches to it afresh",
                        list.join(", "),
                        now.saturating_duration_since(lost.since).as_secs_f64(),
                        EXIT_INTERFACE_RETURNED
                    ));
                }
                if now >= lost.next_reminder {
                    lost.interval = (lost.interval * 2).min(MAX_REMINDER);
                    lost.next_reminder = now + lost.interval;
                    return Action::Remind(format!(
                        "{} (for {:.0} s)",
                        lost_text(&lost.names),
                        now.saturating_duration_since(lost.since).as_secs_f64()
                    ));
                }
                Action::None
            }
        }
    }
}

fn lost_text(names: &[String]) -> String {
    format!(
        "served interface {} disappeared; not forwarding on it until it returns, then \
         exiting to be restarted",
        names.join(", ")
    )
}

/// Asks the kernel about each of `served` (name, index attached to).
#[must_use]
pub fn probe(served: &[(String, u32)]) -> Vec<Presence> {
    served
        .iter()
        .map(|(name, ifindex)| match nexthop::ifindex_by_name(name) {
            Ok(i) if i == *ifindex => Presence::Same,
            Ok(i) => Presence::Replaced(i),
            Err(NextHopError::InterfaceNotFound { .. }) => Presence::Gone,
            Err(_) => Presence::Unknown,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> LinkWatch {
        LinkWatch::new(vec![("g0".into(), 3), ("g1".into(), 2)])
    }

    #[test]
    fn present_interfaces_do_nothing() {
        let mut w = watch();
        let t = Instant::now();
        assert_eq!(
            w.observe(t, &[Presence::Same, Presence::Same]),
            Action::None
        );
        assert!(!w.is_lost());
        assert_eq!(w.reason(), None);
    }

    #[test]
    fn a_loss_is_reported_once_then_reminded_with_back_off() {
        let mut w = watch();
        let t = Instant::now();
        let gone = [Presence::Gone, Presence::Same];
        let Action::Lost(why) = w.observe(t, &gone) else {
            panic!("not lost")
        };
        assert!(why.contains("g0") && !why.contains("g1"), "{why}");
        assert_eq!(w.reason().as_deref(), Some(why.as_str()));
        // Every poll for the first 30 s: nothing more is logged.
        for ms in (500..30_000).step_by(500) {
            assert_eq!(
                w.observe(t + Duration::from_millis(ms), &gone),
                Action::None
            );
        }
        let mut reminders = Vec::new();
        for s in 30..=600 {
            if let Action::Remind(m) = w.observe(t + Duration::from_secs(s), &gone) {
                assert!(m.contains("g0"), "{m}");
                reminders.push(s);
            }
        }
        // 30 s, then 60 s later, then 120 s, then 240 s.
        assert_eq!(reminders, vec![30, 90, 210, 450]);
        assert!(w.is_lost());
    }

    #[test]
    fn the_same_name_back_with_a_new_index_means_exit() {
        let mut w = watch();
        let t = Instant::now();
        assert!(matches!(
            w.observe(t, &[Presence::Gone, Presence::Same]),
            Action::Lost(_)
        ));
        // Netlink trouble decides nothing.
        assert_eq!(
            w.observe(
                t + Duration::from_secs(1),
                &[Presence::Unknown, Presence::Same]
            ),
            Action::None
        );
        let Action::Returned(m) = w.observe(
            t + Duration::from_secs(2),
            &[Presence::Replaced(9), Presence::Same],
        ) else {
            panic!("not returned")
        };
        assert!(m.contains("g0 (now ifindex 9)") && m.contains("75"), "{m}");
    }

    #[test]
    fn a_replaced_interface_is_lost_at_once() {
        // Deleted and made again between two polls: the sockets are gone all
        // the same, so it counts as lost, and then as back.
        let mut w = watch();
        let t = Instant::now();
        assert!(matches!(
            w.observe(t, &[Presence::Same, Presence::Replaced(7)]),
            Action::Lost(_)
        ));
        assert!(matches!(
            w.observe(
                t + Duration::from_millis(500),
                &[Presence::Same, Presence::Replaced(7)]
            ),
            Action::Returned(_)
        ));
    }

    #[test]
    fn every_lost_interface_must_return() {
        let mut w = watch();
        let t = Instant::now();
        assert!(matches!(
            w.observe(t, &[Presence::Gone, Presence::Gone]),
            Action::Lost(_)
        ));
        assert_eq!(
            w.observe(
                t + Duration::from_secs(1),
                &[Presence::Replaced(8), Presence::Gone]
            ),
            Action::None
        );
        assert!(matches!(
            w.observe(
                t + Duration::from_secs(2),
                &[Presence::Replaced(8), Presence::Replaced(9)]
            ),
            Action::Returned(_)
        ));
    }
}
