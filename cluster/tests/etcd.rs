//! Heads against a real etcd (Debian's etcd-server, installed by tests/vm/deps.sh), each
//! through a relay this test can cut like a network partition: bytes stop flowing both ways
//! while the connections stay open.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use p2pnvmf_cluster::{Cluster, Shared};
use p2pnvmf_nvmf::ana::State;
use p2pnvmf_nvmf::resv::{self, Reservation};
use p2pnvmf_nvmf::{Port, Subsystem, Target, TrType, TransportParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Members of one etcd cluster on loopback, killed with the test.
struct Etcd {
    members: Vec<(String, u16, u16, Option<Child>)>,
    dir: PathBuf,
}

impl Etcd {
    fn start(n: usize) -> Etcd {
        let dir = std::env::temp_dir().join(format!("p2pnvmf-etcd-{}-{}", std::process::id(), free_port()));
        let members: Vec<_> = (0..n).map(|i| (format!("m{i}"), free_port(), free_port(), None)).collect();
        let mut e = Etcd { members, dir };
        for i in 0..n {
            e.spawn(i);
        }
        for i in 0..n {
            e.wait_ready(i);
        }
        e
    }

    fn initial_cluster(&self) -> String {
        let m: Vec<_> = self.members.iter().map(|(n, _, p, _)| format!("{n}=http://127.0.0.1:{p}")).collect();
        m.join(",")
    }

    fn spawn(&mut self, i: usize) {
        let cluster = self.initial_cluster();
        let (name, client, peer, _) = &self.members[i];
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir"])
            .arg(self.dir.join(name))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server: tests/vm/deps.sh installs it)");
        self.members[i].3 = Some(child);
    }

    fn wait_ready(&self, i: usize) {
        let port = self.members[i].1;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd member {i} did not listen on {port}");
    }

    fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].1))
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].3.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay to etcd that can be cut: while cut, nothing it reads is forwarded and new
/// connections are held without reaching etcd, as packets lost in a partition.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let o = open.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let o = o.clone();
                tokio::spawn(async move {
                    while !o.load(Ordering::SeqCst) {
                        sleep(Duration::from_millis(10)).await;
                    }
                    let Ok(up) = TcpStream::connect(upstream).await else { return };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::spawn(pump(dr, uw, o.clone()));
                    tokio::spawn(pump(ur, dw, o));
                });
            }
        });
        Relay { addr, open }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self, cut: bool) {
        self.open.store(!cut, Ordering::SeqCst);
    }
}

async fn pump(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, open: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Cut: what was read is lost, like packets dropped on the way.
        if open.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn head(name: &str, etcd: Vec<String>, ttl: u32) -> (Arc<Target>, Cluster) {
    let target = Target::new(Vec::new(), Vec::new());
    let cfg = p2pnvmf_config::Cluster {
        etcd,
        name: name.into(),
        lease_ttl_secs: ttl,
        standby: State::NonOptimized,
        prefix: "/test".into(),
    };
    let c = Cluster::start(&cfg, target.clone(), BTreeSet::from([1, 2]), Shared::new(&cfg));
    (target, c)
}

fn state(t: &Target, g: u32) -> State {
    t.ana.get(g).unwrap().state()
}

async fn until(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_from_etcd_fences_itself_before_another_takes_over() {
    let etcd = Etcd::start(1);
    let (ra, rb) = (Relay::start(etcd.client_addr(0)).await, Relay::start(etcd.client_addr(0)).await);
    let (ta, a) = head("a", vec![ra.url()], 2);
    until("a owns both groups", Duration::from_secs(10), || {
        state(&ta, 1) == State::Optimized && state(&ta, 2) == State::Optimized
    })
    .await;
    let (tb, b) = head("b", vec![rb.url()], 2);
    until("b stands by", Duration::from_secs(10), || state(&tb, 1) == State::NonOptimized).await;
    assert_eq!(b.status()["groups"][0]["owner"], "a");

    // Sample both heads every millisecond while a is cut off.
    let (sa, sb) = (ta.clone(), tb.clone());
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(6) {
            samples.push((t0.elapsed(), state(&sa, 1), state(&sb, 1)));
            sleep(Duration::from_millis(1)).await;
        }
        samples
    });
    ra.cut(true);
    let samples = sampler.await.unwrap();
    let both = samples.iter().filter(|(_, x, y)| *x == State::Optimized && *y == State::Optimized).count();
    assert_eq!(both, 0, "a moment with two Optimized owners");
    let fenced = samples.iter().find(|s| s.1 == State::Inaccessible).expect("a fenced itself").0;
    let taken = samples.iter().find(|s| s.2 == State::Optimized).expect("b took the group over").0;
    eprintln!("cut at 0: a inaccessible after {fenced:?}, b optimized after {taken:?}");
    assert!(fenced < taken && fenced < Duration::from_secs(2), "a fenced at {fenced:?}, b took over at {taken:?}");
    assert!(a.status()["serving_for_ms"].is_null(), "a shows no lease: {}", a.status());

    // The link comes back: a stands by, b keeps the group (no flapping back).
    ra.cut(false);
    until("a stands by again", Duration::from_secs(10), || state(&ta, 1) == State::NonOptimized).await;
    sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (state(&ta, 1), state(&tb, 1), state(&tb, 2)),
        (State::NonOptimized, State::Optimized, State::Optimized)
    );

    // b leaves (a planned stop revokes its lease): a takes over at once, not after a TTL.
    let t0 = Instant::now();
    b.stop().await;
    assert_eq!(state(&tb, 1), State::Inaccessible);
    let took = until("a owns group 1 again", Duration::from_secs(10), || state(&ta, 1) == State::Optimized).await;
    eprintln!("planned stop: a optimized {:?} after b left", t0.elapsed());
    assert!(took < Duration::from_secs(1), "{took:?}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_member_changes_nothing_and_lost_quorum_fences_until_it_returns() {
    let mut etcd = Etcd::start(3);
    let urls: Vec<String> = (0..3).map(|i| format!("http://{}", etcd.client_addr(i))).collect();
    // The default lease: a member lost (perhaps the raft leader, perhaps the one a head talks
    // to) must not outlast it.
    let (ta, a) = head("a", urls.clone(), 5);
    until("a owns group 1", Duration::from_secs(10), || state(&ta, 1) == State::Optimized).await;
    let (tb, b) = head("b", urls, 5);
    until("b stands by", Duration::from_secs(10), || state(&tb, 1) == State::NonOptimized).await;

    // One member of three down (each head may have been talking to it): nothing changes.
    etcd.kill(0);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!((state(&ta, 1), state(&tb, 1)), (State::Optimized, State::NonOptimized), "after {:?}", t0.elapsed());
        sleep(Duration::from_millis(5)).await;
    }
    // Two down: no quorum, no renewal: both fence within the lease.
    etcd.kill(1);
    let fenced = until("both fenced", Duration::from_secs(5), || {
        state(&ta, 1) == State::Inaccessible && state(&tb, 1) == State::Inaccessible
    })
    .await;
    eprintln!("quorum lost: both heads inaccessible after {fenced:?}");
    // Quorum back: one owner again.
    etcd.spawn(0);
    etcd.spawn(1);
    let back = until("one owner again", Duration::from_secs(30), || {
        let (x, y) = (state(&ta, 1), state(&tb, 1));
        (x == State::Optimized) != (y == State::Optimized) && x != State::Inaccessible && y != State::Inaccessible
    })
    .await;
    eprintln!("quorum back: one owner after {back:?}");
    a.stop().await;
    b.stop().await;
}

/// A head serving namespace 1 of NQN, its reservation kept in etcd.
fn resv_head(name: &str, etcd: Vec<String>) -> (Arc<Target>, Cluster) {
    let cfg = p2pnvmf_config::Cluster {
        etcd,
        name: name.into(),
        lease_ttl_secs: 5,
        standby: State::NonOptimized,
        prefix: "/resv-test".into(),
    };
    let shared = Shared::new(&cfg);
    let mut ns = p2pnvmf_nvmf::Namespace::new(NQN, 1, Arc::new(p2pnvmf_nvmf::Null));
    ns.resv = Arc::new(Reservation::persistent(Box::new(shared.store(NQN, 1))).unwrap());
    let target = Target::new(vec![Arc::new(p2pnvmf_nvmf::Subsystem::open(NQN, vec![ns]))], Vec::new());
    let c = Cluster::start(&cfg, target.clone(), BTreeSet::from([1]), shared);
    (target, c)
}

const NQN: &str = "nqn.2026-12.io.p2pnvmf:resv";
const H1: [u8; 16] = [1; 16];
const H2: [u8; 16] = [2; 16];
const H3: [u8; 16] = [3; 16];

fn resv_of(t: &Target) -> Arc<Reservation> {
    t.subsystems()[0].ns(1).unwrap().resv.clone()
}

fn keys(a: u64, b: u64) -> Vec<u8> {
    [a.to_le_bytes(), b.to_le_bytes()].concat()
}

/// A reservation change on a runtime worker (a shared store waits for etcd in place).
async fn on(
    t: &Arc<Target>,
    rule: impl Fn(&resv::State, bool) -> Result<resv::Change, p2pnvmf_nvmf::Status> + Send + 'static,
) {
    let r = resv_of(t);
    tokio::spawn(async move { r.apply(rule).map(drop) }).await.unwrap().expect("the change is made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_made_through_one_head_fences_on_the_other() {
    let etcd = Etcd::start(1);
    let url = vec![format!("http://{}", etcd.client_addr(0))];
    let (ta, a) = resv_head("a", url.clone());
    let (tb, b) = resv_head("b", url);
    until("both heads serve", Duration::from_secs(10), || {
        state(&ta, 1) != State::Inaccessible && state(&tb, 1) != State::Inaccessible
    })
    .await;

    // Host 1 registers and takes Write Exclusive through head A.
    on(&ta, |st, cap| resv::register(st, &H1, 0, &keys(0, 1), cap)).await;
    on(&ta, |st, _| resv::acquire(st, &H1, 1 << 8, &keys(1, 0))).await;
    until("head B sees host 1's reservation", Duration::from_secs(5), || resv_of(&tb).state().holder.is_some()).await;
    let (rb, ra) = (resv_of(&tb), resv_of(&ta));
    assert_eq!(rb.state(), ra.state());
    let (_, v) = rb.verdict(&H2);
    assert_eq!(
        v.of(resv::Group::Write),
        Err(p2pnvmf_nvmf::Status::RESERVATION_CONFLICT.dnr()),
        "host 2 may not write through B"
    );
    assert_eq!(v.of(resv::Group::Read), Ok(()), "but may read");

    // Hosts 2 and 3 register at once through both heads: one transaction loses the race, sees
    // the newer state and applies its command to it again.
    let (x, y) = (ta.clone(), tb.clone());
    tokio::join!(
        on(&x, |st, cap| resv::register(st, &H3, 0, &keys(0, 3), cap)),
        on(&y, |st, cap| resv::register(st, &H2, 0, &keys(0, 2), cap)),
    );
    until("both heads see three registrants", Duration::from_secs(5), || {
        ra.state().registrants.len() == 3 && rb.state().registrants.len() == 3
    })
    .await;

    // Head A dies; host 2 preempts host 1 through head B.
    a.stop().await;
    drop(ta);
    on(&tb, |st, _| resv::acquire(st, &H2, 1 | 1 << 8, &keys(2, 1))).await;
    let st = rb.state();
    assert_eq!(st.holder.map(|h| h.host), Some(H2));
    assert!(!st.registrants.iter().any(|r| r.host == H1), "host 1's registration is gone");
    assert_eq!(rb.verdict(&H2).1.of(resv::Group::Write), Ok(()));

    // A head that starts later reads the state before it serves.
    let (tc, c) = resv_head("c", vec![format!("http://{}", etcd.client_addr(0))]);
    until("head C serves", Duration::from_secs(10), || state(&tc, 1) != State::Inaccessible).await;
    assert_eq!(resv_of(&tc).state(), st);
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_without_ptpl_ends_when_the_whole_cluster_restarts() {
    let etcd = Etcd::start(1);
    let url = vec![format!("http://{}", etcd.client_addr(0))];
    let serving = |t: &Arc<Target>| state(t, 1) != State::Inaccessible;
    let (ta, a) = resv_head("a", url.clone());
    let (tb, b) = resv_head("b", url.clone());
    until("both heads serve", Duration::from_secs(10), || serving(&ta) && serving(&tb)).await;
    // PTPL off (CPTPL 0 leaves it as it was: off).
    on(&ta, |st, cap| resv::register(st, &H1, 0, &keys(0, 1), cap)).await;
    on(&ta, |st, _| resv::acquire(st, &H1, 1 << 8, &keys(1, 0))).await;
    until("head B sees it", Duration::from_secs(5), || resv_of(&tb).state().holder.is_some()).await;
    // One head restarting while the other serves is no power loss: the state stays.
    a.stop().await;
    let (ta, a) = resv_head("a", url.clone());
    until("head A serves again", Duration::from_secs(10), || serving(&ta)).await;
    assert!(resv_of(&ta).state().holder.is_some(), "a head restarted beside a live one kept the reservation");
    // Every head stops: the next one to start finds no head before it, a power loss.
    a.stop().await;
    b.stop().await;
    let (tc, c) = resv_head("c", url.clone());
    until("head C serves", Duration::from_secs(10), || serving(&tc)).await;
    assert_eq!(resv_of(&tc).state(), resv::State::default(), "the reservation without PTPL ended");

    // With PTPL on (CPTPL 11b), it survives the same restart.
    on(&tc, |st, cap| resv::register(st, &H2, 3 << 30, &keys(0, 2), cap)).await;
    on(&tc, |st, _| resv::acquire(st, &H2, 1 << 8, &keys(2, 0))).await;
    let kept = resv_of(&tc).state();
    assert!(kept.ptpl && kept.holder.is_some());
    c.stop().await;
    let (td, d) = resv_head("d", url);
    until("head D serves", Duration::from_secs(10), || serving(&td)).await;
    assert_eq!(resv_of(&td).state(), kept, "the reservation with PTPL survived");
    d.stop().await;
}

/// A head with one NVMe/TCP port on `addr` serving (namespace-less) subsystems `nqns`.
fn port_head(name: &str, addr: &str, etcd: Vec<String>, nqns: &[&str]) -> (Arc<Target>, Cluster) {
    let params = TransportParams { ioccsz: 4, max_xfer: 4096, msdbd: 1, keyed_sgls: false };
    let port = Port { id: 1, trtype: TrType::Tcp, traddr: addr.into(), trsvcid: "4420".into(), params };
    let target = Target::new(subsystems(nqns), vec![port]);
    let cfg = p2pnvmf_config::Cluster {
        etcd,
        name: name.into(),
        lease_ttl_secs: 5,
        standby: State::NonOptimized,
        prefix: "/disc-test".into(),
    };
    let c = Cluster::start(&cfg, target.clone(), BTreeSet::from([1]), Shared::new(&cfg));
    (target, c)
}

fn subsystems(nqns: &[&str]) -> Vec<Arc<Subsystem>> {
    nqns.iter().map(|n| Arc::new(Subsystem::open(n, Vec::new()))).collect()
}

/// How many records of head `t`'s discovery log name subsystem `nqn`.
fn listed(t: &Target, nqn: &str) -> usize {
    t.discovery_log("nqn.2014-08.org.nvmexpress:uuid:test").windows(nqn.len()).filter(|w| *w == nqn.as_bytes()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subsystem_added_by_reload_reaches_the_other_heads_discovery_log() {
    let etcd = Etcd::start(1);
    let url = vec![format!("http://{}", etcd.client_addr(0))];
    let (ta, a) = port_head("a", "10.0.2.15", url.clone(), &["nqn.x:one"]);
    let (tb, b) = port_head("b", "10.0.2.16", url, &["nqn.x:one"]);
    until("B lists its port and A's for the subsystem both serve", Duration::from_secs(10), || {
        listed(&tb, "nqn.x:one") == 2
    })
    .await;
    // Both heads reloaded with a second subsystem, B first.
    tb.reconfigure(subsystems(&["nqn.x:one", "nqn.x:two"]));
    b.subsystems_changed();
    ta.reconfigure(subsystems(&["nqn.x:one", "nqn.x:two"]));
    sleep(Duration::from_millis(500)).await;
    assert_eq!(listed(&tb, "nqn.x:two"), 1, "B lists only its own port until A registers again");
    a.subsystems_changed();
    until("B lists A's port for the new subsystem", Duration::from_secs(5), || listed(&tb, "nqn.x:two") == 2).await;
    assert_eq!(listed(&ta, "nqn.x:two"), 2, "and A lists B's");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_move_hands_the_group_to_the_named_head_and_back() {
    let etcd = Etcd::start(1);
    let url = vec![format!("http://{}", etcd.client_addr(0))];
    let (ta, a) = head("a", url.clone(), 5);
    until("a owns group 1", Duration::from_secs(10), || state(&ta, 1) == State::Optimized).await;
    let (tb, b) = head("b", url, 5);
    until("b stands by", Duration::from_secs(10), || state(&tb, 1) == State::NonOptimized).await;
    assert!(a.move_group(1, "c".into()).await.unwrap_err().contains("no live head named 'c'"));

    let (sa, sb) = (ta.clone(), tb.clone());
    let sampler = tokio::spawn(async move {
        let mut seen = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            let s = (state(&sa, 1), state(&sb, 1));
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            sleep(Duration::from_micros(200)).await;
        }
        seen
    });
    // Asked through the head that gives the group up, then back through the other.
    let moved = a.move_group(1, "b".into()).await.expect("moved to b");
    eprintln!("{moved}");
    assert_eq!((state(&ta, 1), state(&tb, 1)), (State::NonOptimized, State::Optimized));
    assert_eq!(state(&tb, 2), State::NonOptimized, "group 2 stays a's");
    let seen = sampler.await.unwrap();
    eprintln!("states (a, b) as they changed: {seen:?}");
    assert!(!seen.contains(&(State::Optimized, State::Optimized)), "{seen:?}");
    assert!(a.move_group(1, "b".into()).await.unwrap().contains("b's already"));
    let back = b.move_group(1, "a".into()).await.expect("failback to a");
    eprintln!("{back}");
    assert_eq!((state(&ta, 1), state(&tb, 1)), (State::Optimized, State::NonOptimized));
    // The move keys are gone with their lease: a group freed later goes to whoever is first.
    a.stop().await;
    until("b takes both groups when a leaves", Duration::from_secs(5), || {
        state(&tb, 1) == State::Optimized && state(&tb, 2) == State::Optimized
    })
    .await;
    b.stop().await;
}
