use super::*;

const A: HostId = [0xa; 16];
const B: HostId = [0xb; 16];
const C: HostId = [0xc; 16];

fn k2(c: u64, n: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&c.to_le_bytes());
    d[8..].copy_from_slice(&n.to_le_bytes());
    d
}

fn reg(st: &State, me: &HostId, act: u32, crkey: u64, nrkey: u64) -> Result<State, Status> {
    register(st, me, act, &k2(crkey, nrkey), true).map(|c| c.state)
}

fn acq(st: &State, me: &HostId, act: u32, rtype: u8, crkey: u64, prkey: u64) -> Result<Change, Status> {
    acquire(st, me, act | u32::from(rtype) << 8, &k2(crkey, prkey))
}

fn rel(st: &State, me: &HostId, act: u32, rtype: u8, crkey: u64) -> Result<Change, Status> {
    release(st, me, act | u32::from(rtype) << 8, &crkey.to_le_bytes())
}

/// (generation, type, [(key, holds)]) as `nvme resv-report --eds` shows them.
fn shown(st: &State) -> (u32, u8, Vec<(u64, bool)>) {
    let mut out = [0u8; 4096];
    let n = report(st, 1023, 1, &mut out).unwrap();
    assert_eq!(n, 4096);
    let gen_ = u32::from_le_bytes(out[..4].try_into().unwrap());
    let regctl = u16::from_le_bytes(out[5..7].try_into().unwrap()) as usize;
    let regs = (0..regctl)
        .map(|i| {
            let e = &out[64 + i * 64..128 + i * 64];
            assert_eq!(&e[..2], &[0xff, 0xff], "dynamic controller ID");
            assert_eq!(&e[16..32], &st.registrants[i].host);
            (u64::from_le_bytes(e[8..16].try_into().unwrap()), e[2] == 1)
        })
        .collect();
    (gen_, out[4], regs)
}

#[test]
fn blktests_nvme_054_sequence_reports_what_the_kernel_target_prints() {
    let st = State::default();
    assert_eq!(shown(&st), (0, 0, vec![]));
    // Register, replace, unregister.
    let st = reg(&st, &A, 0, 0, 4).unwrap();
    assert_eq!(shown(&st), (1, 0, vec![(4, false)]));
    let st = reg(&st, &A, 2, 4, 5).unwrap();
    assert_eq!(shown(&st), (2, 0, vec![(5, false)]));
    let st = reg(&st, &A, 1, 5, 0).unwrap();
    assert_eq!(shown(&st), (3, 0, vec![]));
    // Acquire Write Exclusive: no new generation.
    let st = reg(&st, &A, 0, 0, 4).unwrap();
    let st = acq(&st, &A, 0, 1, 4, 0).unwrap().state;
    assert_eq!(shown(&st), (4, 1, vec![(4, true)]));
    // Preempt oneself into Exclusive Access.
    let st = acq(&st, &A, 1, 2, 4, 4).unwrap().state;
    assert_eq!(shown(&st), (5, 2, vec![(4, true)]));
    // Release, then acquire and clear.
    let st = rel(&st, &A, 0, 2, 4).unwrap().state;
    assert_eq!(shown(&st), (5, 0, vec![(4, false)]));
    let st = acq(&st, &A, 0, 1, 4, 0).unwrap().state;
    assert_eq!(shown(&st), (5, 1, vec![(4, true)]));
    let st = rel(&st, &A, 1, 0, 4).unwrap().state;
    assert_eq!(shown(&st), (6, 0, vec![]));
}

#[test]
fn access_follows_the_specifications_table_for_every_type() {
    use Group::{Read, Write};
    // (type, non-registrant read, non-registrant write, registrant read, registrant write)
    let table = [
        (1, true, false, true, false),
        (2, false, false, false, false),
        (3, true, false, true, true),
        (4, false, false, true, true),
        (5, true, false, true, true),
        (6, false, false, true, true),
    ];
    for (t, nr_read, nr_write, r_read, r_write) in table {
        let st = reg(&State::default(), &A, 0, 0, 1).unwrap();
        let st = reg(&st, &B, 0, 0, 2).unwrap();
        let st = acq(&st, &A, 0, t, 1, 0).unwrap().state;
        let ok = |h: &HostId, g| access(&st, h, g).is_ok();
        assert!(ok(&A, Read) && ok(&A, Write), "type {t}: the holder has access");
        assert_eq!((ok(&C, Read), ok(&C, Write)), (nr_read, nr_write), "type {t}: non-registrant");
        assert_eq!((ok(&B, Read), ok(&B, Write)), (r_read, r_write), "type {t}: registrant");
        assert_eq!(access(&st, &C, Write), Err(Status::RESERVATION_CONFLICT.dnr()));
        assert_eq!(Group::of(opcode::COMPARE), Some(Read));
        assert_eq!(Group::of(opcode::FLUSH), Some(Write));
    }
}

#[test]
fn wrong_keys_and_bad_fields_get_the_specifications_status() {
    let conflict = Err(Status::RESERVATION_CONFLICT.dnr());
    let invalid = Err(Status::INVALID_FIELD.dnr());
    let st = reg(&State::default(), &A, 0, 0, 7).unwrap();
    // Registering again: same key succeeds, another conflicts.
    assert!(reg(&st, &A, 0, 0, 7).is_ok());
    assert_eq!(reg(&st, &A, 0, 0, 8), conflict);
    // Wrong current key, unless ignored (IEKEY); not registered at all.
    assert_eq!(reg(&st, &A, 2, 6, 9), conflict);
    assert_eq!(reg(&st, &A, 2 | 1 << 3, 6, 9).unwrap().registrants[0].key, 9);
    assert_eq!(reg(&st, &B, 1, 0, 0), conflict);
    assert_eq!(acq(&st, &A, 0, 1, 6, 0).map(|c| c.state), conflict);
    assert_eq!(acq(&st, &B, 0, 1, 7, 0).map(|c| c.state), conflict);
    // Unknown actions and types, reserved bits, IEKEY where it is not allowed, CPTPL 01b.
    assert_eq!(reg(&st, &A, 3, 7, 0), invalid);
    assert_eq!(reg(&st, &A, 1 << 30, 7, 0), invalid);
    assert_eq!(reg(&st, &A, 1 << 12, 7, 0), invalid);
    for t in [0, 7, 0xff] {
        assert_eq!(acq(&st, &A, 0, t, 7, 0).map(|c| c.state), invalid, "type {t}");
    }
    assert_eq!(acq(&st, &A, 3, 1, 7, 0).map(|c| c.state), invalid);
    assert_eq!(acq(&st, &A, 1 << 3, 1, 7, 0).map(|c| c.state), invalid);
    assert_eq!(rel(&st, &A, 2, 1, 7).map(|c| c.state), invalid);
    // Data shorter than the command's structure.
    assert_eq!(register(&st, &A, 0, &[0; 8], true).map(|c| c.state), Err(Status::DATA_SGL_LENGTH_INVALID.dnr()));
    // Acquiring what another holds; releasing with another type.
    let st = reg(&st, &B, 0, 0, 8).unwrap();
    let held = acq(&st, &A, 0, 1, 7, 0).unwrap().state;
    assert_eq!(acq(&held, &B, 0, 1, 8, 0).map(|c| c.state), conflict);
    assert_eq!(acq(&held, &A, 0, 2, 7, 0).map(|c| c.state), conflict);
    assert_eq!(rel(&held, &A, 0, 2, 7).map(|c| c.state), invalid);
    // Releasing what one does not hold changes nothing.
    assert_eq!(rel(&held, &B, 0, 1, 8).unwrap().state, held);
    // Report: 128-bit host identifiers need the extended structure; the buffer must hold it.
    let mut out = [0u8; 64];
    assert_eq!(report(&held, 15, 0, &mut out), Err(Status::HOST_ID_INCONSISTENT.dnr()));
    assert_eq!(report(&held, 31, 1, &mut out), Err(Status::DATA_SGL_LENGTH_INVALID.dnr()));
    assert_eq!(report(&held, 15, 1, &mut out), Ok(64));
    assert_eq!(out[5], 2, "a short report still counts every registrant");
}

#[test]
fn preempting_unregisters_notifies_and_names_whom_to_abort() {
    let st = reg(&State::default(), &A, 0, 0, 1).unwrap();
    let st = reg(&st, &B, 0, 0, 2).unwrap();
    let st = reg(&st, &C, 0, 0, 3).unwrap();
    let held = acq(&st, &B, 0, 3, 2, 0).unwrap().state;
    // A preempts the holder B (Write Exclusive Registrants Only) with B's key, into Exclusive Access.
    let c = acq(&held, &A, 2, 2, 1, 2).unwrap();
    assert_eq!(c.state.holder, Some(Holder { host: A, rtype: RType::ExclusiveAccess }));
    assert_eq!(c.state.registrants.iter().map(|r| r.host).collect::<Vec<_>>(), [A, C]);
    assert_eq!(c.state.generation, held.generation + 1);
    assert!(c.notices.contains(&Notice { host: B, kind: NoticeKind::RegistrationPreempted }));
    // The type changed: the remaining registrant hears the reservation was released.
    assert!(c.notices.contains(&Notice { host: C, kind: NoticeKind::ReservationReleased }));
    assert_eq!(c.aborted, [B]);
    // Plain preempt aborts nothing; a key nobody has conflicts.
    assert!(acq(&held, &A, 1, 3, 1, 2).unwrap().aborted.is_empty());
    assert_eq!(acq(&held, &A, 1, 3, 1, 9).map(|c| c.state), Err(Status::RESERVATION_CONFLICT.dnr()));
    // All Registrants: every registrant holds it; preempting with key 0 leaves only the preemptor.
    let all = acq(&st, &B, 0, 6, 2, 0).unwrap().state;
    assert!(all.holds(&A) && all.holds(&C));
    let c = acq(&all, &A, 2, 1, 1, 0).unwrap();
    assert_eq!(c.state.registrants.len(), 1);
    assert_eq!(c.state.holder, Some(Holder { host: A, rtype: RType::WriteExclusive }));
    assert_eq!(c.aborted, [B, C]);
    // Its holder unregistering passes an All Registrants reservation on; Registrants Only ends
    // with a notice to the others.
    let left = reg(&all, &B, 1, 2, 0).unwrap();
    assert_eq!(left.holder.map(|h| h.rtype), Some(RType::ExclusiveAccessAllRegistrants));
    let c = register(&held, &B, 1, &k2(2, 0), true).unwrap();
    assert_eq!(c.state.holder, None);
    assert_eq!(c.notices.len(), 2);
    // Clear: everyone else hears their reservation was preempted.
    let c = rel(&held, &C, 1, 0, 3).unwrap();
    assert!(c.state.registrants.is_empty() && c.state.holder.is_none());
    assert_eq!(c.notices.iter().filter(|n| n.kind == NoticeKind::ReservationPreempted).count(), 2);
}

#[test]
fn ptpl_follows_cptpl_where_the_namespace_can_keep_it() {
    let on = register(&State::default(), &A, 3 << 30, &k2(0, 1), true).unwrap().state;
    assert!(on.ptpl);
    assert!(!register(&State::default(), &A, 3 << 30, &k2(0, 1), false).unwrap().state.ptpl);
    assert!(!register(&on, &A, 2 << 30 | 2, &k2(1, 2), true).unwrap().state.ptpl);
    assert!(register(&on, &A, 2, &k2(1, 2), true).unwrap().state.ptpl, "00b: no change");
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("p2pnvmf-resv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

use std::path::PathBuf;

#[test]
fn a_persistent_reservation_survives_and_a_damaged_file_is_refused_with_its_path() {
    let dir = scratch_dir("store");
    let store = || Box::new(FileStore::new(&dir, "nqn.2026-12.io.p2pnvmf:a/b", 3));
    let r = Reservation::persistent(store()).unwrap();
    assert!(r.ptpl_capable());
    // Without PTPL nothing is written.
    r.apply(|st, cap| register(st, &A, 0, &k2(0, 1), cap)).unwrap();
    assert!(!FileStore::new(&dir, "nqn.2026-12.io.p2pnvmf:a/b", 3).path().exists());
    r.apply(|st, cap| register(st, &B, 3 << 30, &k2(0, 2), cap)).unwrap();
    r.apply(|st, _| acquire(st, &B, 5 << 8, &k2(2, 0))).unwrap();
    let path = FileStore::new(&dir, "nqn.2026-12.io.p2pnvmf:a/b", 3).path().to_path_buf();
    assert!(path.file_name().unwrap().to_str().unwrap().contains("a_b.ns3"));
    let again = Reservation::persistent(store()).unwrap();
    assert_eq!(again.state(), r.state());
    assert!(again.state().ptpl && again.state().holds(&A));
    // Another namespace's file under this one's name is refused.
    let other = FileStore::new(&dir, "nqn.other", 3);
    std::fs::copy(&path, other.path()).unwrap();
    let e = other.load().unwrap_err().to_string();
    assert!(e.contains("another namespace") && e.contains("nqn.other.ns3.resv"), "{e}");
    // A flipped byte is caught by the CRC, named with the path.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("registrant 0a", "registrant 0b", 1)).unwrap();
    let e = Reservation::persistent(store()).unwrap_err().to_string();
    assert!(e.contains(&*path.to_string_lossy()) && e.contains("CRC-32"), "{e}");
    std::fs::write(&path, "garbage").unwrap();
    assert!(Reservation::persistent(store()).unwrap_err().to_string().contains("no crc32 line"));
    // PTPL turned off forgets the file.
    std::fs::write(&path, text).unwrap();
    let r = Reservation::persistent(store()).unwrap();
    r.set_ptpl(false).unwrap();
    assert!(!path.exists());
    assert_eq!(Reservation::persistent(store()).unwrap().state(), State::default());
    assert_eq!(Reservation::default().set_ptpl(true), Err(Status::INVALID_FIELD.dnr()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn preempt_and_abort_waits_for_the_preempted_hosts_queues_and_refuses_their_new_commands() {
    let r = Reservation::default();
    let a_queue = r.track(&A);
    let b_queue = r.track(&B);
    r.apply(|st, c| register(st, &A, 0, &k2(0, 1), c)).unwrap();
    r.apply(|st, c| register(st, &B, 0, &k2(0, 2), c)).unwrap();
    r.apply(|st, _| acquire(st, &B, 1 << 8, &k2(2, 0))).unwrap();
    let (v0, verdict) = r.verdict(&A);
    assert_eq!(verdict.write, Err(Status::RESERVATION_CONFLICT.dnr()));
    assert!(verdict.read.is_ok());
    // B has a command in flight when A preempts and aborts.
    b_queue.fetch_add(1, Ordering::SeqCst);
    a_queue.fetch_add(1, Ordering::SeqCst);
    let (change, drain) = r.apply(|st, _| acquire(st, &A, 2 | 1 << 8, &k2(1, 2))).unwrap();
    let drain = drain.expect("preempt and abort waits");
    assert_eq!(change.aborted, [B]);
    assert!(r.version() > v0);
    assert!(!drain.done());
    assert_eq!(r.verdict(&B).1.read, Err(Status::ABORTED_BY_REQUEST));
    assert_eq!(r.verdict(&B).1.write, Err(Status::RESERVATION_CONFLICT.dnr()), "fenced at once");
    // Only the preempted host's queues count.
    b_queue.fetch_sub(1, Ordering::SeqCst);
    assert!(drain.done());
    r.drained(&drain);
    assert_eq!(r.verdict(&B).1.write, Err(Status::RESERVATION_CONFLICT.dnr()));
    assert!(r.verdict(&B).1.read.is_ok());
    drop(b_queue);
    assert_eq!(r.track(&C).load(Ordering::SeqCst), 0);
}

proptest::proptest! {
    /// Any sequence of reservation commands from three hosts, with any CDW10 and keys from a
    /// small set (so that they match now and then): never a panic, and the state stays whole —
    /// each host registered once, the holder registered, the generation never going back.
    #[test]
    fn any_command_sequence_keeps_the_state_whole(
        cmds in proptest::collection::vec((0usize..3, 0u8..4, proptest::prelude::any::<u32>(), 0u64..4, 0u64..4, 0u8..8), 1..40)
    ) {
        let r = Reservation::default();
        let hosts = [A, B, C];
        let mut generation = 0;
        for (h, op, cdw10, k1, k2_, rtype) in cmds {
            let me = &hosts[h];
            // Half the time a well-formed CDW10 (action in bits 2:0, type in 15:8).
            let cdw10 = if cdw10 & 1 == 0 { (cdw10 >> 1) & 7 | u32::from(rtype) << 8 } else { cdw10 };
            let data = k2(k1, k2_);
            let _ = match op {
                0 => r.apply(|st, cap| register(st, me, cdw10, &data, cap)),
                1 => r.apply(|st, _| acquire(st, me, cdw10, &data)),
                2 => r.apply(|st, _| release(st, me, cdw10, &data)),
                _ => {
                    let mut out = vec![0u8; 256];
                    let _ = report(&r.state(), cdw10, cdw10 >> 7, &mut out);
                    continue;
                }
            };
            let st = r.state();
            let mut ids: Vec<_> = st.registrants.iter().map(|x| x.host).collect();
            ids.sort();
            ids.dedup();
            proptest::prop_assert_eq!(ids.len(), st.registrants.len());
            if let Some(hd) = st.holder {
                proptest::prop_assert!(st.registrants.iter().any(|x| x.host == hd.host), "{:?}", st);
            }
            proptest::prop_assert!(st.generation >= generation);
            generation = st.generation;
        }
    }
}
