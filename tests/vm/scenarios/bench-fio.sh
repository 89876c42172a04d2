# Benchmark: identical fio jobs against the kernel nvmet target (brd RAM disk) and p2pnvmf (RAM
# namespace), over RDMA and TCP, each with 2 I/O queues. Prints "bench" lines and ratios.
KNQN=nqn.2026-11.io.p2pnvmf:kernel-bench
NQN=nqn.2026-11.io.p2pnvmf:bench
RUNTIME=${BENCH_RUNTIME:-10}
modprobe brd rd_nr=1 rd_size=262144
modprobe nvmet; modprobe nvmet-rdma; modprobe nvmet-tcp
nvmet_kernel_subsys "$KNQN" /dev/ram0
nvmet_kernel_port 1 rdma 4430 "$KNQN"
nvmet_kernel_port 2 tcp 4431 "$KNQN"
rdma_config /tmp/scn/target.toml "$NQN"
RUST_LOG=warn start_target /tmp/scn/target.toml 4421

terse() { grep '^3;' | tail -n1; }
declare -A R
bench_one() {  # NAME TRANSPORT PORT NQN
    local name=$1 t=$2 port=$3 nqn=$4 dev rr sr vw
    dev=$(nvme_connect_dev "$t" "$port" "$nqn" -i 2)
    dd if=/dev/zero of="$dev" bs=1M count=64 oflag=direct status=none
    rr=$(fio --name=rr --filename="$dev" --ioengine=libaio --direct=1 --rw=randread --bs=4k \
        --iodepth=16 --numjobs=2 --group_reporting --size=64M --runtime="$RUNTIME" --time_based \
        --output-format=terse --terse-version=3 | terse | cut -d';' -f8)
    sr=$(fio --name=sr --filename="$dev" --ioengine=libaio --direct=1 --rw=read --bs=128k \
        --iodepth=16 --size=64M --runtime="$RUNTIME" --time_based \
        --output-format=terse --terse-version=3 | terse | cut -d';' -f7)
    vw=$(fio --name=vw --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --size=32M --offset_increment=32M --numjobs=2 --group_reporting --iodepth=32 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 \
        2>/dev/null | terse | cut -d';' -f49)
    nvme_disconnect_nqn "$nqn" >/dev/null
    echo "bench $name $t: 4k-randread-QD16x2 ${rr} IOPS, 128k-read-QD16 $((sr / 1024)) MiB/s, verify-job 4k-randwrite-QD32x2 ${vw} IOPS"
    R[$name-$t-rr]=$rr; R[$name-$t-sr]=$sr; R[$name-$t-vw]=$vw
}
for t in rdma tcp; do
    kport=$([[ $t == rdma ]] && echo 4430 || echo 4431)
    oport=$([[ $t == rdma ]] && echo 4420 || echo 4421)
    step "kernel nvmet over $t"
    bench_one kernel "$t" "$kport" "$KNQN"
    step "p2pnvmf over $t"
    bench_one p2pnvmf "$t" "$oport" "$NQN"
done
for t in rdma tcp; do
    for m in rr sr vw; do
        awk -v t="$t" -v m="$m" -v o="${R[p2pnvmf-$t-$m]}" -v k="${R[kernel-$t-$m]}" \
            'BEGIN { printf "ratio %s %s: p2pnvmf/kernel = %.2f\n", t, m, (k > 0 ? o / k : 0) }'
    done
done
stop_target
