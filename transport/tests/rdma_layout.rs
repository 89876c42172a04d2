//! Our hand-declared verbs/RDMA CM layouts against the installed C headers (libibverbs-dev and
//! librdmacm-dev, installed by tests/vm/deps.sh): a C probe prints sizes and offsets, and each
//! must equal ours.

use std::mem::{offset_of, size_of};
use std::process::Command;

use p2pnvmf_transport::rdma::sys::*;

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>
#define O(t, f, n) printf("%s %zu\n", n, offsetof(struct t, f))
#define S(t) printf("sizeof_%s %zu\n", #t, sizeof(struct t))
int main(void) {
    S(ibv_send_wr); S(ibv_recv_wr); S(ibv_sge); S(ibv_wc); S(ibv_qp_init_attr); S(ibv_qp_cap);
    S(ibv_device_attr); S(rdma_conn_param);
    O(ibv_send_wr, opcode, "send_wr.opcode"); O(ibv_send_wr, send_flags, "send_wr.send_flags");
    O(ibv_send_wr, invalidate_rkey, "send_wr.invalidate_rkey");
    O(ibv_send_wr, wr.rdma.remote_addr, "send_wr.remote_addr"); O(ibv_send_wr, wr.rdma.rkey, "send_wr.rkey");
    O(ibv_wc, status, "wc.status"); O(ibv_wc, byte_len, "wc.byte_len"); O(ibv_wc, qp_num, "wc.qp_num");
    O(ibv_qp_init_attr, cap, "init.cap"); O(ibv_qp_init_attr, qp_type, "init.qp_type");
    O(ibv_context, ops.poll_cq, "ctx.poll_cq"); O(ibv_context, ops.req_notify_cq, "ctx.req_notify_cq");
    O(ibv_context, ops.post_send, "ctx.post_send"); O(ibv_context, ops.post_recv, "ctx.post_recv");
    O(ibv_context, ops.post_srq_recv, "ctx.post_srq_recv"); S(ibv_srq_init_attr);
    O(ibv_srq_init_attr, attr.max_wr, "srq_init.max_wr");
    O(ibv_qp, qp_num, "qp.qp_num"); O(ibv_mr, lkey, "mr.lkey"); O(ibv_mr, rkey, "mr.rkey");
    O(ibv_comp_channel, fd, "comp_channel.fd");
    O(ibv_device_attr, max_qp_wr, "dev.max_qp_wr"); O(ibv_device_attr, max_cqe, "dev.max_cqe");
    O(ibv_device_attr, max_qp_rd_atom, "dev.max_qp_rd_atom");
    O(ibv_device_attr, max_qp_init_rd_atom, "dev.max_qp_init_rd_atom");
    O(rdma_cm_id, verbs, "cm_id.verbs"); O(rdma_cm_id, qp, "cm_id.qp");
    O(rdma_cm_id, route.addr.src_addr, "cm_id.src_addr"); O(rdma_cm_id, route.addr.dst_addr, "cm_id.dst_addr");
    O(rdma_cm_event, event, "cm_event.event"); O(rdma_cm_event, status, "cm_event.status");
    O(rdma_cm_event, param.conn, "cm_event.conn");
    O(rdma_conn_param, private_data_len, "conn.private_data_len");
    O(rdma_conn_param, initiator_depth, "conn.initiator_depth");
    O(rdma_conn_param, rnr_retry_count, "conn.rnr_retry_count"); O(rdma_conn_param, qp_num, "conn.qp_num");
    printf("RDMA_PS_TCP %d\nIBV_QPT_RC %d\nIBV_WR_SEND_WITH_INV %d\nIBV_WR_RDMA_READ %d\n",
           RDMA_PS_TCP, IBV_QPT_RC, IBV_WR_SEND_WITH_INV, IBV_WR_RDMA_READ);
    printf("RDMA_CM_EVENT_CONNECT_REQUEST %d\nRDMA_CM_EVENT_ESTABLISHED %d\n",
           RDMA_CM_EVENT_CONNECT_REQUEST, RDMA_CM_EVENT_ESTABLISHED);
    printf("RDMA_CM_EVENT_DISCONNECTED %d\nRDMA_CM_EVENT_TIMEWAIT_EXIT %d\n",
           RDMA_CM_EVENT_DISCONNECTED, RDMA_CM_EVENT_TIMEWAIT_EXIT);
    return 0;
}
"#;

fn c_values() -> Vec<(String, usize)> {
    for h in ["/usr/include/infiniband/verbs.h", "/usr/include/rdma/rdma_cma.h"] {
        assert!(
            std::path::Path::new(h).exists(),
            "{h} is missing: install libibverbs-dev and librdmacm-dev (tests/vm/deps.sh does)"
        );
    }
    let dir = std::env::temp_dir().join(format!("p2pnvmf-rdma-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("probe.c"), dir.join("probe"));
    std::fs::write(&src, PROBE).unwrap();
    let cc = Command::new("cc").arg("-o").arg(&exe).arg(&src).output().expect("a C compiler (cc)");
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn layouts_match_the_installed_headers() {
    let ours: Vec<(&str, usize)> = vec![
        ("sizeof_ibv_send_wr", size_of::<IbvSendWr>()),
        ("sizeof_ibv_recv_wr", size_of::<IbvRecvWr>()),
        ("sizeof_ibv_sge", size_of::<IbvSge>()),
        ("sizeof_ibv_wc", size_of::<IbvWc>()),
        ("sizeof_ibv_qp_init_attr", size_of::<IbvQpInitAttr>()),
        ("sizeof_ibv_qp_cap", size_of::<IbvQpCap>()),
        ("sizeof_ibv_device_attr", size_of::<IbvDeviceAttr>()),
        ("sizeof_rdma_conn_param", size_of::<RdmaConnParam>()),
        ("send_wr.opcode", offset_of!(IbvSendWr, opcode)),
        ("send_wr.send_flags", offset_of!(IbvSendWr, send_flags)),
        ("send_wr.invalidate_rkey", offset_of!(IbvSendWr, invalidate_rkey)),
        ("send_wr.remote_addr", offset_of!(IbvSendWr, rdma_remote_addr)),
        ("send_wr.rkey", offset_of!(IbvSendWr, rdma_rkey)),
        ("wc.status", offset_of!(IbvWc, status)),
        ("wc.byte_len", offset_of!(IbvWc, byte_len)),
        ("wc.qp_num", offset_of!(IbvWc, qp_num)),
        ("init.cap", offset_of!(IbvQpInitAttr, cap)),
        ("init.qp_type", offset_of!(IbvQpInitAttr, qp_type)),
        ("ctx.poll_cq", offset_of!(IbvContext, poll_cq)),
        ("ctx.req_notify_cq", offset_of!(IbvContext, req_notify_cq)),
        ("ctx.post_send", offset_of!(IbvContext, post_send)),
        ("ctx.post_recv", offset_of!(IbvContext, post_recv)),
        ("ctx.post_srq_recv", offset_of!(IbvContext, post_srq_recv)),
        ("sizeof_ibv_srq_init_attr", size_of::<IbvSrqInitAttr>()),
        ("srq_init.max_wr", offset_of!(IbvSrqInitAttr, max_wr)),
        ("qp.qp_num", offset_of!(IbvQp, qp_num)),
        ("mr.lkey", offset_of!(IbvMr, lkey)),
        ("mr.rkey", offset_of!(IbvMr, rkey)),
        ("comp_channel.fd", offset_of!(IbvCompChannel, fd)),
        ("dev.max_qp_wr", offset_of!(IbvDeviceAttr, max_qp_wr)),
        ("dev.max_cqe", offset_of!(IbvDeviceAttr, max_cqe)),
        ("dev.max_qp_rd_atom", offset_of!(IbvDeviceAttr, max_qp_rd_atom)),
        ("dev.max_qp_init_rd_atom", offset_of!(IbvDeviceAttr, max_qp_init_rd_atom)),
        ("cm_id.verbs", offset_of!(RdmaCmId, verbs)),
        ("cm_id.qp", offset_of!(RdmaCmId, qp)),
        ("cm_id.src_addr", offset_of!(RdmaCmId, src_addr)),
        ("cm_id.dst_addr", offset_of!(RdmaCmId, dst_addr)),
        ("cm_event.event", offset_of!(RdmaCmEvent, event)),
        ("cm_event.status", offset_of!(RdmaCmEvent, status)),
        ("cm_event.conn", offset_of!(RdmaCmEvent, conn)),
        ("conn.private_data_len", offset_of!(RdmaConnParam, private_data_len)),
        ("conn.initiator_depth", offset_of!(RdmaConnParam, initiator_depth)),
        ("conn.rnr_retry_count", offset_of!(RdmaConnParam, rnr_retry_count)),
        ("conn.qp_num", offset_of!(RdmaConnParam, qp_num)),
        ("RDMA_PS_TCP", RDMA_PS_TCP as usize),
        ("IBV_QPT_RC", IBV_QPT_RC as usize),
        ("IBV_WR_SEND_WITH_INV", wr_opcode::SEND_WITH_INV as usize),
        ("IBV_WR_RDMA_READ", wr_opcode::RDMA_READ as usize),
        ("RDMA_CM_EVENT_CONNECT_REQUEST", cm_event::CONNECT_REQUEST as usize),
        ("RDMA_CM_EVENT_ESTABLISHED", cm_event::ESTABLISHED as usize),
        ("RDMA_CM_EVENT_DISCONNECTED", cm_event::DISCONNECTED as usize),
        ("RDMA_CM_EVENT_TIMEWAIT_EXIT", cm_event::TIMEWAIT_EXIT as usize),
    ];
    let theirs = c_values();
    assert_eq!(theirs.len(), ours.len(), "probe printed {} values, we check {}", theirs.len(), ours.len());
    for (name, v) in &ours {
        let c = theirs.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("probe lacks {name}")).1;
        assert_eq!(*v, c, "{name}: ours {v}, C headers {c}");
    }
}

#[test]
fn libraries_load_and_a_missing_one_is_named() {
    // rdma-core is installed by tests/vm/deps.sh.
    p2pnvmf_transport::rdma::available().expect("rdma-core installed");
    let e = Api::load_with(|n| if n.starts_with("librdmacm") { "librdmacm-absent.so.1".into() } else { n.into() })
        .unwrap_err();
    assert!(e.starts_with("librdmacm-absent.so.1 could not be loaded"), "{e}");
    assert!(e.ends_with("install rdma-core and ibverbs-providers"), "{e}");
}
