//! Poll mode (`[performance] poll = true`): connections served by polling threads that never
//! sleep. Each poller is an OS thread running a current-thread tokio runtime that is never
//! parked: its own task comes back on every turn without a system call ([`next_turn`]) and
//! looks at the RDMA queues' completion queues for their tasks, waking a queue's task only when
//! it finds completions ([`Watch`]), and its I/O driver is polled with a
//! zero timeout every 61 task polls, so a socket's data is found by the thread that owns the
//! connection, with no interrupt-driven wake-up and no hand-off to
//! another thread between receive and completion. A backend queue opened on a poller is polled
//! too ([`p2pnvmf_nvmf::Reaping::Polled`]): its completion queue — an io_uring's, an NVMe SSD's
//! — is looked at in memory on every turn while operations are in flight, and an SSD's queue
//! pair of its own raises no interrupt. The price is a CPU per poller, busy at 100%;
//! each poller's busy share (turns in which a connection did work) is in `status` and the
//! metrics.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tracing::{info, warn};

thread_local! {
    /// Work done on this thread: events a connection handled (bumped by the transports).
    static WORK: Cell<u64> = const { Cell::new(0) };
    /// What this poller looks at for its tasks on every turn ([`Watch`]).
    static WATCHED: RefCell<Vec<Arc<Watched>>> = const { RefCell::new(Vec::new()) };
}

/// Something a poller looks at on every turn on behalf of a task — an RDMA completion queue in
/// memory — taking what it finds for the task (`true`: found something).
pub trait Look: Send + Sync {
    fn look(&self) -> bool;
}

struct Watched {
    look: Arc<dyn Look>,
    found: AtomicBool,
    gone: AtomicBool,
    waker: std::sync::Mutex<Option<Waker>>,
}

/// A task's [`Look`], registered with the poller of the thread that makes it: the poller looks
/// on every turn and wakes the task only when it finds something, so a task with nothing to
/// do is not polled at all (each idle queue polled on every turn made a turn as long as the
/// queues served). Dropping the watch unregisters it before the next look.
pub struct Watch(Arc<Watched>);

impl Watch {
    /// Registers `look` with this thread's poller; off a poller's thread nobody would look, so
    /// that is an error.
    pub fn new(look: Arc<dyn Look>) -> io::Result<Watch> {
        if p2pnvmf_nvmf::Reaping::here() != p2pnvmf_nvmf::Reaping::Polled {
            return Err(io::Error::other("a watch made off a poller's thread"));
        }
        let w = Arc::new(Watched {
            look,
            found: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            waker: std::sync::Mutex::new(None),
        });
        WATCHED.with(|all| all.borrow_mut().push(w.clone()));
        Ok(Watch(w))
    }

    /// Ready once a look has found something since the last time it was.
    pub async fn found(&self) {
        std::future::poll_fn(|cx| {
            if self.0.found.swap(false, Relaxed) {
                return std::task::Poll::Ready(());
            }
            *self.0.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("found", &self.0.found.load(Relaxed)).finish()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.gone.store(true, Relaxed);
    }
}

/// One turn's looks: the watches of this thread whose tasks have not been told yet.
fn look_all() {
    WATCHED.with(|all| {
        let mut all = all.borrow_mut();
        all.retain(|w| !w.gone.load(Relaxed));
        for w in all.iter().filter(|w| !w.found.load(Relaxed)) {
            if w.look.look() {
                w.found.store(true, Relaxed);
                if let Some(k) = w.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    k.wake();
                }
            }
        }
    });
}

/// Tells this thread's poller that the turn did work (PDUs read, completions handled); on
/// other threads it counts for nobody.
pub fn did_work() {
    WORK.with(|w| w.set(w.get().wrapping_add(1)));
}

/// How often a poller publishes its busy share.
const WINDOW: Duration = Duration::from_secs(1);

/// Runs a listener's connection on a poller (poll mode) or on the runtime.
pub(crate) fn place<F>(pollers: Option<&Pollers>, set: &mut JoinSet<()>, conn: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match pollers {
        Some(p) => p.spawn(set, conn),
        None => drop(set.spawn(conn)),
    }
}

/// One poller's figures, written by its thread, read by `status` and the metrics.
#[derive(Debug, Default)]
struct Figures {
    connections: AtomicUsize,
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    /// Busy share of the last window, in parts per million.
    recent_ppm: AtomicU64,
}

/// What `status` shows of one poller.
#[derive(Debug, Clone, PartialEq)]
pub struct PollerStatus {
    pub index: usize,
    pub cpu: Option<usize>,
    pub connections: usize,
    pub busy_seconds: f64,
    pub idle_seconds: f64,
    /// Busy share over the last second.
    pub busy_share: f64,
}

struct Poller {
    handle: Handle,
    cpu: Option<usize>,
    figures: Arc<Figures>,
    thread: Option<JoinHandle<()>>,
}

/// The polling threads, started once; connections are placed on the least loaded.
pub struct Pollers {
    pollers: Vec<Poller>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pollers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pollers").field("cpus", &self.pollers.iter().map(|p| p.cpu).collect::<Vec<_>>()).finish()
    }
}

impl Pollers {
    /// One poller per CPU in `cores`, pinned to it; with none, one poller not pinned. The
    /// error names the CPU a thread could not be pinned to.
    pub fn start(cores: &[usize]) -> io::Result<Arc<Pollers>> {
        let cpus: Vec<Option<usize>> =
            if cores.is_empty() { vec![None] } else { cores.iter().copied().map(Some).collect() };
        // Built as it goes: a poller that fails to start stops those started before it (Drop).
        let mut all = Pollers { pollers: Vec::new(), stop: Arc::new(AtomicBool::new(false)) };
        for (index, cpu) in cpus.into_iter().enumerate() {
            let figures = Arc::new(Figures::default());
            let (tx, rx) = std::sync::mpsc::channel();
            let (f, s) = (figures.clone(), all.stop.clone());
            let thread = std::thread::Builder::new().name(format!("p2pnvmf-poll{index}")).spawn(move || {
                let rt = cpu
                    .map_or(Ok(()), pin)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("performance.cores: pinning poller {index} to CPU {}: {e}", cpu.unwrap_or(0)),
                        )
                    })
                    .and_then(|()| tokio::runtime::Builder::new_current_thread().enable_all().build());
                match rt {
                    Ok(rt) => {
                        // Backend queues opened here are looked at each turn, not waited on.
                        p2pnvmf_nvmf::Reaping::mark_poller_thread();
                        let _ = tx.send(Ok(rt.handle().clone()));
                        // A task, not the future block_on polls: a task that wakes itself is
                        // queued again at once, where waking block_on's future would go through
                        // the driver (an eventfd write and an epoll_wait per turn).
                        rt.block_on(async move { drop(tokio::spawn(spin(index, f, s)).await) });
                    }
                    Err(e) => drop(tx.send(Err(e))),
                }
            })?;
            let handle = rx.recv().map_err(|_| io::Error::other("poller thread ended at start"))??;
            info!(poller = index, cpu = ?cpu, "poller started");
            all.pollers.push(Poller { handle, cpu, figures, thread: Some(thread) });
        }
        Ok(Arc::new(all))
    }

    /// Runs `conn` on the poller with the fewest connections, for as long as it lasts.
    pub fn spawn<F>(&self, set: &mut JoinSet<()>, conn: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let p = self.pollers.iter().min_by_key(|p| p.figures.connections.load(Relaxed)).expect("at least one poller");
        let counted = Counted::new(p.figures.clone());
        set.spawn_on(
            async move {
                let _counted = counted;
                conn.await
            },
            &p.handle,
        );
    }

    pub fn status(&self) -> Vec<PollerStatus> {
        self.pollers
            .iter()
            .enumerate()
            .map(|(index, p)| PollerStatus {
                index,
                cpu: p.cpu,
                connections: p.figures.connections.load(Relaxed),
                busy_seconds: p.figures.busy_ns.load(Relaxed) as f64 / 1e9,
                idle_seconds: p.figures.idle_ns.load(Relaxed) as f64 / 1e9,
                busy_share: p.figures.recent_ppm.load(Relaxed) as f64 / 1e6,
            })
            .collect()
    }
}

impl Drop for Pollers {
    /// Stops the threads (their connections were waited for by the listeners).
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for p in &mut self.pollers {
            if let Some(t) = p.thread.take()
                && t.join().is_err()
            {
                warn!(cpu = ?p.cpu, "a poller thread panicked");
            }
        }
    }
}

/// A connection counted on its poller while it lives.
struct Counted(Arc<Figures>);

impl Counted {
    fn new(f: Arc<Figures>) -> Counted {
        f.connections.fetch_add(1, Relaxed);
        Counted(f)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// Comes back on the poller's next turn: the task is queued again at once (not deferred to
/// after the driver's poll, as `yield_now` is), so polling a completion queue or the clock
/// costs no system call; the runtime still polls its driver (epoll with a zero timeout, timers)
/// every `event_interval` task polls.
pub(crate) async fn next_turn() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return std::task::Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// A cheap monotonic tick count for accounting each turn: the TSC where there is one (no
/// system call, unlike a clock that is not in the vDSO); turned into seconds once a window.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn ticks() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no preconditions on x86_64.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn ticks() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Turns between looks at the clock.
const CLOCK_EVERY: u32 = 1024;

/// The poller's own task: comes back on every turn, so the runtime never parks, and accounts
/// each turn (the tasks polled since its last one, the driver's poll) busy or idle by whether
/// a connection did work in it; once a window, the ticks become seconds.
async fn spin(index: usize, f: Arc<Figures>, stop: Arc<AtomicBool>) {
    let label = index.to_string();
    let share = metrics::gauge!("p2pnvmf_poller_busy_share", "poller" => label.clone());
    let conns = metrics::gauge!("p2pnvmf_poller_connections", "poller" => label);
    let (mut window_start, mut last) = (Instant::now(), ticks());
    let (mut busy, mut idle, mut turns) = (0u64, 0u64, 0u32);
    let mut seen = WORK.get();
    while !stop.load(Relaxed) {
        next_turn().await;
        look_all();
        let t = ticks();
        let turn = t.wrapping_sub(last);
        last = t;
        let work = WORK.get();
        if work != seen {
            seen = work;
            busy += turn;
        } else {
            idle += turn;
        }
        turns += 1;
        if turns < CLOCK_EVERY {
            continue;
        }
        turns = 0;
        let window = window_start.elapsed();
        if window >= WINDOW {
            let ns = window.as_nanos() as u64;
            let busy_ns = (u128::from(ns) * u128::from(busy) / u128::from((busy + idle).max(1))) as u64;
            f.busy_ns.fetch_add(busy_ns, Relaxed);
            f.idle_ns.fetch_add(ns - busy_ns, Relaxed);
            let ppm = busy_ns.saturating_mul(1_000_000) / ns.max(1);
            f.recent_ppm.store(ppm, Relaxed);
            share.set(ppm as f64 / 1e6);
            conns.set(f.connections.load(Relaxed) as f64);
            (window_start, busy, idle) = (Instant::now(), 0, 0);
        }
    }
}

/// Keeps the calling thread off the pollers' CPUs (`cores`), so the target's other threads
/// (the runtime's workers: listeners, admin socket, metrics, cluster) do not take turns on a
/// poller's CPU; a no-op when no CPU would be left.
#[allow(unsafe_code)]
pub fn keep_off(cores: &[usize]) {
    if cores.is_empty() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes one set of the
    // size given; CPU_CLR and CPU_COUNT stay within it (indices checked).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return warn!("reading this thread's CPUs: {}", io::Error::last_os_error());
        }
        for &c in cores.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_CLR(c, &mut set);
        }
        if libc::CPU_COUNT(&set) == 0 {
            return;
        }
        set
    };
    if let Err(e) = set_affinity(&set) {
        warn!("keeping a thread off the pollers' CPUs {cores:?}: {e}");
    }
}

/// Pins the calling thread to `cpu` (also `wake-cost`'s threads).
#[allow(unsafe_code)]
pub fn pin(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (checked above).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    set_affinity(&set)
}

/// Runs the calling thread on the CPUs of `set`.
#[allow(unsafe_code)]
fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity reads one set of the size given, which `set` is.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A watched task sleeps while its look finds nothing — the poller looks on every turn —
    /// is woken once it finds something, and a dropped watch is looked at no more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_watched_task_sleeps_until_its_look_finds_something() {
        #[derive(Default)]
        struct Flag {
            looks: AtomicUsize,
            ready: AtomicBool,
        }
        impl Look for Flag {
            fn look(&self) -> bool {
                self.looks.fetch_add(1, Relaxed);
                self.ready.swap(false, Relaxed)
            }
        }
        let pollers = Pollers::start(&[]).unwrap();
        let flag = Arc::new(Flag::default());
        let polls = Arc::new(AtomicUsize::new(0));
        let (f, p) = (flag.clone(), polls.clone());
        let mut set = JoinSet::new();
        assert!(Watch::new(flag.clone()).is_err(), "off a poller's thread nobody would look");
        pollers.spawn(&mut set, async move {
            let watch = Watch::new(f).unwrap();
            // Counts the task's polls: one to start, one per wake-up.
            std::future::poll_fn(|cx| {
                p.fetch_add(1, Relaxed);
                let found = std::pin::pin!(watch.found());
                found.poll(cx)
            })
            .await;
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while flag.looks.load(Relaxed) < 1000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(flag.looks.load(Relaxed) >= 1000, "the poller looks on every turn");
        assert_eq!(polls.load(Relaxed), 1, "a task whose look finds nothing is not polled again");
        flag.ready.store(true, Relaxed);
        tokio::time::timeout(Duration::from_secs(5), set.join_next()).await.unwrap().unwrap().unwrap();
        assert_eq!(polls.load(Relaxed), 2, "woken once, and found it");
        let looks = flag.looks.load(Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(flag.looks.load(Relaxed), looks, "the dropped watch is looked at no more");
    }

    /// A poller serves a connection placed on it (an echo over loopback TCP, registered with
    /// the poller's own driver), counts it while it lives and accounts its turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_poller_serves_its_connections_and_accounts_its_turns() {
        let pollers = Pollers::start(&[]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = [0u8; 5];
            for _ in 0..100 {
                s.write_all(b"hello").await.unwrap();
                s.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"hello");
            }
        });
        let (std_stream, _) = tokio::task::block_in_place(|| listener.accept()).unwrap();
        std_stream.set_nonblocking(true).unwrap();
        let mut set = JoinSet::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        pollers.spawn(&mut set, async move {
            let _ = tx.send((std::thread::current().name().map(str::to_string), p2pnvmf_nvmf::Reaping::here()));
            let mut s = tokio::net::TcpStream::from_std(std_stream).unwrap();
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        did_work();
                        s.write_all(&buf[..n]).await.unwrap();
                    }
                }
            }
        });
        let (thread, reaping) = rx.await.unwrap();
        assert_eq!(thread.as_deref(), Some("p2pnvmf-poll0"));
        assert_eq!(reaping, p2pnvmf_nvmf::Reaping::Polled, "backend queues opened on a poller are polled");
        assert_eq!(p2pnvmf_nvmf::Reaping::here(), p2pnvmf_nvmf::Reaping::Signalled, "elsewhere they are not");
        assert_eq!(pollers.status()[0].connections, 1);
        client.await.unwrap();
        set.join_next().await.unwrap().unwrap();
        assert_eq!(pollers.status()[0].connections, 0);
        // Published once the first window (a second) has passed.
        let deadline = Instant::now() + 3 * WINDOW;
        let st = loop {
            let st = pollers.status().remove(0);
            if st.busy_seconds + st.idle_seconds > 0.0 || Instant::now() > deadline {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(st.busy_seconds > 0.0 && st.idle_seconds > st.busy_seconds, "{st:?}");
        assert_eq!(st.cpu, None);
    }

    #[test]
    fn a_cpu_out_of_range_is_refused_naming_the_key() {
        let e = Pollers::start(&[libc::CPU_SETSIZE as usize]).unwrap_err();
        assert!(e.to_string().contains("performance.cores: pinning poller 0 to CPU 1024"), "{e}");
    }
}
