#!/usr/bin/env python3
"""Writes the seeds of the fuzz targets' corpora (corpus/<target>/): well-formed inputs the
fuzzers mutate from, so they start past the handshakes. The rest of each corpus is what fuzzing
found, minimised (cargo fuzz cmin). Run from fuzz/."""
import os
import shutil
import struct

NQN = b"nqn.2026-11.io.p2pnvmf:fuzz"
HOST = b"nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-0000-0000-0000-000000000001"


def sqe(opcode, cid=1, nsid=0, cdw=(0,) * 6, sgl=(0, 0, 0x5A), flags=0x40):
    """A 64-byte SQE; `sgl` is (address, length, SGL identifier) in DPTR."""
    addr, length, ident = sgl
    s = struct.pack("<BBHI", opcode, flags, cid, nsid) + bytes(16)
    s += struct.pack("<QI", addr, length) + bytes(3) + bytes([ident])
    s += struct.pack("<6I", *cdw)
    assert len(s) == 64
    return s


def connect_data(cntlid=0xFFFF):
    d = bytes([7] * 16) + struct.pack("<H", cntlid) + bytes(238)
    d += NQN.ljust(256, b"\0") + HOST.ljust(256, b"\0") + bytes(256)
    assert len(d) == 1024
    return d


def fabrics(fctype, cdw=(0,) * 6, sgl=(0, 0, 0x5A), flags=0x40):
    return sqe(0x7F, nsid=fctype, cdw=cdw, sgl=sgl, flags=flags)


CONNECT = fabrics(1, cdw=(0, 31, 0, 0, 0, 0))
CC_ENABLE = fabrics(0, cdw=(0, 0x14, 1 | 6 << 16 | 4 << 20, 0, 0, 0), flags=0)
ADMIN = {
    "identify-ctrl": sqe(0x06, cdw=(1, 0, 0, 0, 0, 0)),
    "identify-ns": sqe(0x06, nsid=1, cdw=(0, 0, 0, 0, 0, 0)),
    "identify-nslist": sqe(0x06, cdw=(2, 0, 0, 0, 0, 0)),
    "log-smart": sqe(0x02, nsid=0xFFFFFFFF, cdw=(0x02 | 127 << 16, 0, 0, 0, 0, 0)),
    "log-error": sqe(0x02, cdw=(0x01 | 15 << 16, 0, 0, 0, 0, 0)),
    "get-features-queues": sqe(0x0A, cdw=(0x07, 0, 0, 0, 0, 0)),
    "set-features-queues": sqe(0x09, cdw=(0x07, 0x00030003, 0, 0, 0, 0)),
    "keep-alive": sqe(0x18),
    "property-get-cap": fabrics(4, cdw=(1, 0, 0, 0, 0, 0), flags=0),
}


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def capsule(s, data=b""):
    """CapsuleCmd (type 4) with in-capsule data right after the header."""
    hlen = 72
    return struct.pack("<BBBBI", 4, 0, hlen, hlen if data else 0, hlen + len(data)) + s + data


ICREQ = struct.pack("<BBBBI", 0, 0, 128, 0, 128) + struct.pack("<HBBI", 0, 0, 0, 0) + bytes(112)
assert len(ICREQ) == 128


def main():
    for t in ("tcp_connection", "admin_commands", "rdma_private_data", "config", "dhchap"):
        os.makedirs(f"corpus/{t}", exist_ok=True)
    # NVMe/TCP: the handshake, Connect with in-capsule data, enable, then commands.
    icd = lambda n: (0, n, 0x01)  # in-capsule data block at offset 0
    stream = ICREQ + capsule(fabrics(1, cdw=(0, 31, 0, 0, 0, 0), sgl=icd(1024)), connect_data())
    stream += capsule(fabrics(0, cdw=(0, 0x14, 1 | 6 << 16 | 4 << 20, 0, 0, 0), flags=0))
    write("corpus/tcp_connection/connect-enable", stream)
    for name, s in ADMIN.items():
        write(f"corpus/tcp_connection/{name}", stream + capsule(s))
    # An I/O queue's write with in-capsule data, and a read.
    io = ICREQ + capsule(fabrics(1, cdw=(1 << 16, 31, 0, 0, 0, 0), sgl=icd(1024)), connect_data(1))
    w = sqe(0x01, nsid=1, cdw=(0, 0, 7, 0, 0, 0), sgl=icd(4096))
    write("corpus/tcp_connection/io-write", io + capsule(w, bytes(range(256)) * 16))
    write("corpus/tcp_connection/io-read", io + capsule(sqe(0x02, nsid=1, cdw=(0, 0, 7, 0, 0, 0), sgl=(0, 4096, 0x5A))))
    # Admin commands after the harness's own Connect: [SQE, length, data].
    for name, s in ADMIN.items():
        write(f"corpus/admin_commands/{name}", s + struct.pack("<H", 4096) + bytes(4096))
    write("corpus/admin_commands/connect-again", CONNECT + struct.pack("<H", 1024) + connect_data())
    # RDMA CM private data: admin and I/O queue requests (RECFMT, QID, HRQSIZE, HSQSIZE).
    write("corpus/rdma_private_data/admin", struct.pack("<HHHH", 0, 0, 32, 31) + bytes(24))
    write("corpus/rdma_private_data/io", struct.pack("<HHHH", 0, 1, 128, 127) + bytes(24))
    # DH-HMAC-CHAP: Negotiate (SHA-256/384/512, NULL and ffdhe groups), receive the challenge,
    # a Reply of the right shape with a wrong response and a C2, receive Success1/Failure1.
    ids = bytes([1, 2, 3]) + bytes(27) + bytes([0, 1, 2, 3, 4, 5]) + bytes(24)
    negotiate = struct.pack("<BBHHBB", 0, 0, 0, 1, 0, 1) + struct.pack("<BBBB", 1, 0, 3, 6) + ids
    reply = struct.pack("<BBHHBBBBHI", 1, 2, 0, 1, 32, 0, 1, 0, 0, 7) + bytes(32) + bytes([0x5A] * 32)
    op = lambda kind, data, length=None: struct.pack("<BH", kind, len(data) if length is None else length) + data
    write("corpus/dhchap/negotiate-reply", b"\0" + op(0, negotiate) + op(1, b"", 128) + op(0, reply) + op(1, b"", 128))
    success2 = struct.pack("<BBHH", 1, 4, 0, 1) + bytes(10)
    write("corpus/dhchap/out-of-order", b"\1" + op(0, success2) + op(0, negotiate) + op(0, negotiate) + op(1, b"", 16))
    # The configuration: the shipped ones.
    for src in ("../deploy/default.toml", "../deploy/examples/appliance.toml"):
        shutil.copy(src, f"corpus/config/{os.path.basename(src)}")


if __name__ == "__main__":
    main()
