//! Where a namespace's reservation lives while Persist Through Power Loss is on: a [`Store`]
//! (a cluster-wide store can take the place of the file one), and [`FileStore`], a small text
//! file per namespace written atomically (temporary file, fsync, rename, fsync of the
//! directory) and refused whole, with its path and the reason, when damaged.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Holder, RType, Registrant, State};

/// Why a reservation state could not be loaded or kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line}: {why}; the file is refused, not served from (move it away to start without it)")]
    Damaged { path: PathBuf, line: usize, why: String },
    /// A shared store changed since this head last saw it: the newer state, to apply the
    /// command to again.
    #[error("changed by another head")]
    Stale(Option<State>),
    /// A shared store cannot be reached now (the command may be retried, here or elsewhere).
    #[error("{0}")]
    Unavailable(String),
}

/// Keeps one namespace's reservation state.
pub trait Store: Send + Sync + fmt::Debug {
    /// What was kept, `None` when nothing was.
    fn load(&self) -> Result<Option<State>, StoreError>;
    /// Keeps `state` (PTPL on, or any state in a shared store) or forgets what was kept
    /// (`None`: PTPL turned off); `notices` are the change's, for other heads' hosts.
    fn save(&self, state: Option<&State>, notices: &[super::Notice]) -> Result<(), StoreError>;
    /// Shared by several heads: every change is saved, PTPL or not (the state is the cluster's,
    /// and a change another head made first comes back as [`StoreError::Stale`]).
    fn shared(&self) -> bool {
        false
    }
}

const MAGIC: &str = "p2pnvmf-reservation 1";

/// The text form of a namespace's reservation state, naming the namespace it belongs to: a
/// line per fact, then a CRC-32 of all before it. Files and cluster stores keep it.
#[derive(Debug, Clone)]
pub struct Record {
    pub subnqn: String,
    pub nsid: u32,
}

/// One file per namespace.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    record: Record,
}

impl FileStore {
    /// The file of namespace `nsid` of `subnqn` under `dir`.
    pub fn new(dir: &Path, subnqn: &str, nsid: u32) -> FileStore {
        let name: String = subnqn.chars().map(|c| if c == '/' { '_' } else { c }).collect();
        FileStore { path: dir.join(format!("{name}.ns{nsid}.resv")), record: Record { subnqn: subnqn.into(), nsid } }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.path.clone(), source }
    }
}

impl Record {
    /// The text for `st` (PTPL off is said; a file only ever holds a state with PTPL on).
    pub fn encode(&self, st: &State) -> String {
        let mut s = format!("{MAGIC}\nsubnqn {}\nnsid {}\ngeneration {}\n", self.subnqn, self.nsid, st.generation);
        if !st.ptpl {
            s += "ptpl 0\n";
        }
        for r in &st.registrants {
            s += &format!("registrant {} {:#x}\n", crate::wire::hex(&r.host), r.key);
        }
        if let Some(h) = st.holder {
            s += &format!("holder {} {}\n", crate::wire::hex(&h.host), h.rtype as u8);
        }
        let crc = p2pnvmf_config::dhchap::crc32(s.as_bytes());
        s + &format!("crc32 {crc:08x}\n")
    }

    /// The state `text` holds; `origin` (a file, a key) names it in errors.
    pub fn decode(&self, text: &str, origin: &Path) -> Result<State, StoreError> {
        let damaged = |line: usize, why: String| StoreError::Damaged { path: origin.to_path_buf(), line, why };
        let body_end = text.rfind("crc32 ").ok_or_else(|| damaged(text.lines().count(), "no crc32 line".into()))?;
        let (body, tail) = text.split_at(body_end);
        let last = body.lines().count() + 1;
        let crc = tail.trim_end().strip_prefix("crc32 ").and_then(|c| u32::from_str_radix(c, 16).ok());
        if crc != Some(p2pnvmf_config::dhchap::crc32(body.as_bytes())) {
            return Err(damaged(last, "the CRC-32 does not match the content".into()));
        }
        let mut st = State { ptpl: true, ..State::default() };
        let mut seen_magic = false;
        for (i, line) in body.lines().enumerate() {
            let n = i + 1;
            let bad = |why: &str| damaged(n, format!("{why}: '{line}'"));
            let mut w = line.split(' ');
            match (w.next(), w.next(), w.next(), w.next()) {
                _ if n == 1 => seen_magic = line == MAGIC,
                (Some("subnqn"), Some(nqn), None, None) if nqn == self.subnqn => {}
                (Some("nsid"), Some(id), None, None) if id.parse() == Ok(self.nsid) => {}
                (Some("subnqn" | "nsid"), ..) => return Err(bad("the state of another namespace")),
                (Some("generation"), Some(g), None, None) => {
                    st.generation = g.parse().map_err(|_| bad("generation"))?
                }
                (Some("ptpl"), Some(p @ ("0" | "1")), None, None) => st.ptpl = p == "1",
                (Some("registrant"), Some(h), Some(k), None) => {
                    let host = crate::wire::unhex(h).ok_or_else(|| bad("host identifier"))?;
                    let key = k.strip_prefix("0x").and_then(|k| u64::from_str_radix(k, 16).ok());
                    let key = key.ok_or_else(|| bad("key"))?;
                    if st.registrants.iter().any(|r| r.host == host) {
                        return Err(bad("host registered twice"));
                    }
                    st.registrants.push(Registrant { host, key });
                }
                (Some("holder"), Some(h), Some(t), None) => {
                    let host = crate::wire::unhex(h).ok_or_else(|| bad("host identifier"))?;
                    let rtype = t.parse().ok().and_then(RType::from_u8).ok_or_else(|| bad("reservation type"))?;
                    if !st.registrants.iter().any(|r| r.host == host) {
                        return Err(bad("the holder is not registered"));
                    }
                    st.holder = Some(Holder { host, rtype });
                }
                _ => return Err(bad("not understood")),
            }
        }
        if !seen_magic {
            return Err(damaged(1, format!("not a reservation state file (first line is not '{MAGIC}')")));
        }
        Ok(st)
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<State>, StoreError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => self.record.decode(&text, &self.path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    fn save(&self, state: Option<&State>, _notices: &[super::Notice]) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        match state {
            Some(st) => {
                fs::create_dir_all(dir).map_err(|e| self.io(e))?;
                let tmp = self.path.with_extension("resv.tmp");
                let write = || -> std::io::Result<()> {
                    let mut f = fs::File::create(&tmp)?;
                    f.write_all(self.record.encode(st).as_bytes())?;
                    f.sync_all()?;
                    fs::rename(&tmp, &self.path)
                };
                write().map_err(|e| self.io(e))?;
            }
            None => match fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.io(e)),
                _ => {}
            },
        }
        // The rename (or removal) itself survives a power loss once the directory is synced.
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| self.io(e))
    }
}
