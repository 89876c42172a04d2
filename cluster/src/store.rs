//! Registrations and reservations kept in etcd, one key per namespace
//! (`PREFIX/resv/<subnqn>/<nsid>`), so that a host fenced through one head is fenced on every
//! head. A change is a transaction on the key's revision as this head last saw it; a change
//! another head made first comes back as the newer state to apply the command to again. Every
//! head keeps the state in its namespace's `Reservation` (the I/O path reads that, never
//! etcd), kept current by the cluster's watch.
//!
//! The value is the reservation record (the same text a state file holds), then `--`, the
//! head that made the change and the notices it raised, for the hosts other heads serve.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use p2pnvmf_nvmf::Target;
use p2pnvmf_nvmf::resv::{Notice, NoticeKind, Record, State, Store, StoreError};
use p2pnvmf_nvmf::wire::hex;

use crate::{REQUEST_TIMEOUT, failed};

/// What this head's reservation stores share with its cluster session: the etcd client of the
/// current connection and, per key, the revision this head's state is at.
pub struct Shared {
    prefix: String,
    head: String,
    client: Mutex<Option<Client>>,
    revisions: Mutex<HashMap<String, Arc<Mutex<i64>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("prefix", &self.prefix).field("head", &self.head).finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(cfg: &p2pnvmf_config::Cluster) -> Arc<Shared> {
        Arc::new(Shared {
            prefix: cfg.prefix.clone(),
            head: cfg.name.clone(),
            client: Mutex::default(),
            revisions: Mutex::default(),
        })
    }

    pub(crate) fn resv_prefix(&self) -> String {
        format!("{}/resv/", self.prefix)
    }

    fn key(&self, subnqn: &str, nsid: u32) -> String {
        format!("{}{subnqn}/{nsid}", self.resv_prefix())
    }

    fn revision(&self, key: &str) -> Arc<Mutex<i64>> {
        self.revisions.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_string()).or_default().clone()
    }

    /// The store of namespace `nsid` of `subnqn`.
    pub fn store(self: &Arc<Self>, subnqn: &str, nsid: u32) -> EtcdStore {
        let key = self.key(subnqn, nsid);
        EtcdStore {
            revision: self.revision(&key),
            key,
            record: Record { subnqn: subnqn.into(), nsid },
            shared: self.clone(),
        }
    }

    /// The namespace a key `PREFIX/resv/<subnqn>/<nsid>` is of.
    fn record_of(&self, key: &str) -> Option<Record> {
        let (subnqn, nsid) = key.strip_prefix(&self.resv_prefix())?.rsplit_once('/')?;
        Some(Record { subnqn: subnqn.into(), nsid: nsid.parse().ok()? })
    }

    /// After a power loss (no head served the subsystem: the whole cluster restarted), a
    /// reservation state without PTPL ends, as on a single target (NVMe Base 2.0, 8.19): its
    /// key is deleted if it is still at `mod_revision`. Whether it was.
    pub(crate) async fn end_without_ptpl(
        &self,
        client: &mut Client,
        key: &str,
        value: &[u8],
        mod_revision: i64,
    ) -> Result<bool, crate::Broken> {
        let Some(record) = self.record_of(key) else { return Ok(false) };
        match decode(&record, key, value) {
            Ok((st, ..)) if !st.ptpl => {}
            _ => return Ok(false),
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        let r = crate::timed(client.txn(txn)).await?.map_err(failed("ending a reservation without PTPL"))?;
        if r.succeeded() {
            tracing::info!(
                subnqn = record.subnqn,
                nsid = record.nsid,
                "cluster: reservation ended: PTPL off and no head was serving (the whole cluster restarted)"
            );
        }
        Ok(r.succeeded())
    }

    pub(crate) fn connected(&self, client: Option<Client>) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
    }

    /// A value read from etcd (the first read or the watch) at `mod_revision`: made this
    /// namespace's state here if newer than what this head has, and the notices it carries
    /// told to this head's controllers of those hosts (`notify`: not for the first read).
    pub(crate) fn observed(&self, target: &Target, key: &str, value: Option<&[u8]>, mod_revision: i64, notify: bool) {
        let Some(record) = self.record_of(key) else { return };
        let (subnqn, nsid) = (record.subnqn.as_str(), record.nsid);
        let Some(ns) =
            target.subsystems().into_iter().find(|s| s.nqn == subnqn).and_then(|s| s.ns(nsid).map(|n| n.resv.clone()))
        else {
            return;
        };
        let revision = self.revision(key);
        let mut by_other = None;
        let replaced = ns.observe(|| {
            let mut rev = revision.lock().unwrap_or_else(|e| e.into_inner());
            if mod_revision <= *rev {
                return None;
            }
            let (state, by, notices) = match value.map(|v| decode(&record, key, v)) {
                None => (State::default(), String::new(), Vec::new()),
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    tracing::error!("cluster: reservation of {key} in etcd not understood, left as it was: {e}");
                    return None;
                }
            };
            *rev = mod_revision;
            if by != self.head {
                by_other = Some((by, notices));
            }
            Some(state)
        });
        let (Some(_), Some((by, notices))) = (replaced, by_other) else { return };
        tracing::info!(subnqn, nsid, by, revision = mod_revision, "cluster: reservation changed by another head");
        if !notify {
            return;
        }
        for n in notices {
            for c in target.controllers().iter().filter(|c| c.subnqn() == subnqn && c.hostid == n.host) {
                c.reservation_notice(nsid, n.kind);
            }
        }
    }
}

/// One namespace's reservation in etcd.
#[derive(Debug)]
pub struct EtcdStore {
    key: String,
    record: Record,
    /// The key's revision this head's state is at (0: absent).
    revision: Arc<Mutex<i64>>,
    shared: Arc<Shared>,
}

fn encode(record: &Record, st: &State, head: &str, notices: &[Notice]) -> String {
    let mut s = record.encode(st) + "--\n";
    s += &format!("by {head}\n");
    for n in notices {
        s += &format!("notice {} {}\n", hex(&n.host), n.kind as u8);
    }
    s
}

fn decode(record: &Record, key: &str, value: &[u8]) -> Result<(State, String, Vec<Notice>), StoreError> {
    let text = String::from_utf8_lossy(value);
    let (body, extra) = text.split_once("--\n").unwrap_or((&text, ""));
    let state = record.decode(body, Path::new(key))?;
    let mut by = String::new();
    let mut notices = Vec::new();
    for line in extra.lines() {
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["by", h] => by = h.to_string(),
            ["notice", h, k] => {
                let host = p2pnvmf_nvmf::wire::unhex::<16>(h);
                let kind = match k {
                    "1" => Some(NoticeKind::RegistrationPreempted),
                    "2" => Some(NoticeKind::ReservationReleased),
                    "3" => Some(NoticeKind::ReservationPreempted),
                    _ => None,
                };
                if let (Some(host), Some(kind)) = (host, kind) {
                    notices.push(Notice { host, kind });
                }
            }
            _ => {}
        }
    }
    Ok((state, by, notices))
}

impl Store for EtcdStore {
    /// Nothing at start: the cluster reads every namespace's state when it connects, before
    /// this head serves any group.
    fn load(&self) -> Result<Option<State>, StoreError> {
        Ok(None)
    }

    fn save(&self, state: Option<&State>, notices: &[Notice]) -> Result<(), StoreError> {
        let unavailable = |why: String| StoreError::Unavailable(format!("etcd {}: {why}", self.key));
        let client = self.shared.client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let client = client.ok_or_else(|| unavailable("not connected".into()))?;
        let handle = tokio::runtime::Handle::try_current().map_err(|e| unavailable(e.to_string()))?;
        // The command's queue waits for etcd (reservation commands only, never I/O), and for
        // another command's transaction on this key: its worker thread (with the tasks queued
        // on it) is handed over to the runtime meanwhile, so nothing waits behind it.
        tokio::task::block_in_place(|| self.transact(&handle, client, state, notices))
    }

    fn shared(&self) -> bool {
        true
    }
}

impl EtcdStore {
    /// The transaction on the key's revision as this head saw it, run to its end on `handle`.
    fn transact(
        &self,
        handle: &tokio::runtime::Handle,
        mut client: Client,
        state: Option<&State>,
        notices: &[Notice],
    ) -> Result<(), StoreError> {
        let unavailable = |why: String| StoreError::Unavailable(format!("etcd {}: {why}", self.key));
        let mut rev = self.revision.lock().unwrap_or_else(|e| e.into_inner());
        let put = match state {
            Some(st) => TxnOp::put(self.key.clone(), encode(&self.record, st, &self.shared.head, notices), None),
            None => TxnOp::delete(self.key.clone(), None),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(self.key.clone(), CompareOp::Equal, *rev)])
            .and_then([put])
            .or_else([TxnOp::get(self.key.clone(), None)]);
        let r = handle
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await })
            .map_err(|_| unavailable(format!("no answer in {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| unavailable(failed("transaction")(e)))?;
        if r.succeeded() {
            *rev = r.header().map_or(*rev, |h| h.revision());
            return Ok(());
        }
        let current = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| (kv.mod_revision(), kv.value().to_vec()))),
            _ => None,
        });
        match current.flatten() {
            None => {
                *rev = 0;
                Err(StoreError::Stale(None))
            }
            Some((mod_rev, value)) => {
                *rev = mod_rev;
                let (st, ..) = decode(&self.record, &self.key, &value)?;
                Err(StoreError::Stale(Some(st)))
            }
        }
    }
}
