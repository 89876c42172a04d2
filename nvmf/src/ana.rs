//! Asymmetric Namespace Access (NVMe Base 2.0, 8.1): each namespace belongs to an ANA group
//! whose state this head reports on every path it offers. A multipathing host sends I/O to
//! Optimized paths, falls back to Non-optimized ones, and retries elsewhere on the path status
//! a command to an Inaccessible, Persistent Loss or Change group gets.
//!
//! States are per head (every listener of a head reports the same), set from the configuration
//! or by the cluster; the I/O path reads a group's state with one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::Status;

/// Groups a head knows, ANAGRPID 1..=MAX_GROUPS (ANAGRPMAX and NANAGRPID in Identify
/// Controller; the same number as Linux's nvmet).
pub const MAX_GROUPS: u32 = p2pnvmf_config::ANA_GROUPS;

/// Namespaces a subsystem may hold (MNAN): the host sizes its ANA log buffer from it once, at
/// connect, so it stays fixed whatever a reload adds.
pub const MAX_NAMESPACES: u32 = p2pnvmf_config::MAX_NAMESPACES as u32;

/// The ANA log page's length as a host sizes it: header, NANAGRPID descriptors, MNAN NSIDs.
pub const MAX_LOG_LEN: usize = 16 + MAX_GROUPS as usize * 32 + MAX_NAMESPACES as usize * 4;

/// Transition time (ANATT, seconds): how long a host waits for a group in Change before it
/// gives the path up.
pub const TRANSITION_SECS: u8 = 10;

pub use p2pnvmf_config::AnaState as State;

/// The path status an I/O command gets in `state` (NVMe Base 2.0, 8.1.3 and Figure 103): none
/// where the path serves I/O. Without Do Not Retry: the host retries on another path.
pub fn refusal(state: State) -> Option<Status> {
    match state {
        State::Optimized | State::NonOptimized => None,
        State::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
        State::Inaccessible => Some(Status::ANA_INACCESSIBLE),
        State::Change => Some(Status::ANA_TRANSITION),
    }
}

/// One ANA group on this head: its state and the change count its log descriptor carries.
#[derive(Debug)]
pub struct Group {
    pub id: u32,
    state: AtomicU8,
    changed: AtomicU64,
}

impl Group {
    /// A group of its own, Optimized: what a namespace is in until a head's table places it.
    pub fn standalone(id: u32) -> Arc<Group> {
        Arc::new(Group { id, state: AtomicU8::new(State::Optimized as u8), changed: AtomicU64::new(0) })
    }

    /// The state now: the I/O path's one load (Acquire pairs with the setter, so a command
    /// that sees a state sees the change count that came with it).
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire)).unwrap_or(State::Inaccessible)
    }

    /// The path step of every I/O and reservation command to a namespace of this group: its
    /// path status where this head does not serve the group now.
    pub fn admit(&self) -> Result<(), Status> {
        refusal(self.state()).map_or(Ok(()), Err)
    }

    pub fn change_count(&self) -> u64 {
        self.changed.load(Ordering::Acquire)
    }
}

/// A head's ANA groups, shared by every subsystem it serves (group IDs are head-wide, as a
/// port's groups are in Linux's nvmet).
#[derive(Debug)]
pub struct Groups {
    groups: Vec<Arc<Group>>,
    /// Moves on with every change of any group: each change gives its group the new value,
    /// so a log page's header count (the largest of its groups') grows with every change it
    /// shows.
    changes: AtomicU64,
}

impl Groups {
    /// Every group in `initial(id)`'s state.
    pub fn new(initial: impl Fn(u32) -> State) -> Arc<Groups> {
        let groups = (1..=MAX_GROUPS)
            .map(|id| Arc::new(Group { id, state: AtomicU8::new(initial(id) as u8), changed: AtomicU64::new(0) }))
            .collect();
        Arc::new(Groups { groups, changes: AtomicU64::new(0) })
    }

    /// Group `id` (1..=MAX_GROUPS; the configuration checks the range).
    pub fn get(&self, id: u32) -> Option<&Arc<Group>> {
        self.groups.get((id as usize).checked_sub(1)?)
    }

    /// Sets a group's state; true when it changed (the caller announces it).
    pub fn set(&self, id: u32, state: State) -> bool {
        let Some(g) = self.get(id) else { return false };
        if g.state.load(Ordering::Acquire) == state as u8 {
            return false;
        }
        let count = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
        g.changed.store(count, Ordering::Release);
        g.state.store(state as u8, Ordering::Release);
        true
    }

    /// Every group with its state.
    pub fn states(&self) -> impl Iterator<Item = (u32, State)> + '_ {
        self.groups.iter().map(|g| (g.id, g.state()))
    }
}

/// The Asymmetric Namespace Access log page (NVMe Base 2.0, 5.16.1.13, Figures 219–220) for a
/// subsystem's namespaces: one descriptor per group that holds any of them, in group order, with
/// their NSIDs unless `groups_only` (RGO). Each namespace is (NSID, its group).
pub fn log_page<'a>(namespaces: impl Iterator<Item = (u32, &'a Arc<Group>)> + Clone, groups_only: bool) -> Vec<u8> {
    let mut groups: Vec<&Arc<Group>> = namespaces.clone().map(|(_, g)| g).collect();
    groups.sort_by_key(|g| g.id);
    groups.dedup_by_key(|g| g.id);
    let mut page = vec![0u8; 16];
    let header_count = groups.iter().map(|g| g.change_count()).max().unwrap_or(0);
    page[..8].copy_from_slice(&header_count.to_le_bytes());
    page[8..10].copy_from_slice(&(groups.len() as u16).to_le_bytes());
    for g in groups {
        let nsids: Vec<u32> = namespaces.clone().filter(|(_, ng)| ng.id == g.id).map(|(n, _)| n).collect();
        let mut desc = [0u8; 32];
        desc[..4].copy_from_slice(&g.id.to_le_bytes());
        let listed = if groups_only { 0 } else { nsids.len() as u32 };
        desc[4..8].copy_from_slice(&listed.to_le_bytes());
        desc[8..16].copy_from_slice(&g.change_count().to_le_bytes());
        desc[16] = g.state() as u8;
        page.extend_from_slice(&desc);
        if !groups_only {
            for nsid in nsids {
                page.extend_from_slice(&nsid.to_le_bytes());
            }
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_the_path_statuses_hosts_fail_over_on() {
        assert_eq!(refusal(State::Optimized), None);
        assert_eq!(refusal(State::NonOptimized), None);
        // SCT 3 (path related), no DNR: Linux fails the request over to another path.
        for (s, sc) in [(State::PersistentLoss, 1), (State::Inaccessible, 2), (State::Change, 3)] {
            let st = refusal(s).unwrap();
            assert_eq!((st.sct(), st.sc(), st.to_cqe_field() & 1 << 15), (3, sc, 0), "{s}");
        }
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(State::from_u8(s as u8), Some(s));
        }
        assert_eq!(State::parse("active"), None);
    }

    #[test]
    fn a_change_moves_the_counts_and_the_log_shows_groups_with_their_namespaces() {
        let t = Groups::new(|id| if id == 2 { State::NonOptimized } else { State::Optimized });
        let (g1, g2) = (t.get(1).unwrap().clone(), t.get(2).unwrap().clone());
        assert!(t.get(0).is_none() && t.get(MAX_GROUPS + 1).is_none());
        let ns = [(1u32, &g1), (2, &g2), (3, &g1)];
        let page = log_page(ns.iter().copied(), false);
        // Header: change count 0, two descriptors; group 1 lists NSIDs 1 and 3.
        assert_eq!(page.len(), 16 + 32 + 8 + 32 + 4);
        assert_eq!(u16::from_le_bytes([page[8], page[9]]), 2);
        assert_eq!(&page[16..20], &1u32.to_le_bytes());
        assert_eq!(&page[20..24], &2u32.to_le_bytes());
        assert_eq!(page[32], State::Optimized as u8);
        assert_eq!(&page[48..56], &[1, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&page[56..60], &2u32.to_le_bytes());
        assert_eq!(page[72], State::NonOptimized as u8);

        assert!(t.set(2, State::Inaccessible));
        assert!(!t.set(2, State::Inaccessible), "the same state again is no change");
        assert!(!t.set(MAX_GROUPS + 1, State::Optimized));
        assert!(t.set(1, State::Change));
        let page = log_page(ns.iter().copied(), true);
        // RGO: no NSID lists, NNSIDS 0; the header count is the newest group's.
        assert_eq!(page.len(), 16 + 2 * 32);
        assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 2);
        assert_eq!((page[16 + 4], page[16 + 8], page[16 + 16]), (0, 2, State::Change as u8));
        assert_eq!((page[48 + 8], page[48 + 16]), (1, State::Inaccessible as u8));
    }
}
