#!/bin/bash
# Per-frame program cost of mcrelay's attached XDP program, without the copy path (issue 13).
#
# usage (root): xtask/scripts/prog-cost.sh ROUNDS REPEAT MCRELAY_BIN [MCRELAY_BIN ...]
#   e.g. xtask/scripts/prog-cost.sh 4 2000000 target/release/mcrelay /tmp/mcrelay-other-commit
#
# For each binary: a namespace pmN with veths in0, out0..out2, `mcrelay run --no-pin --xdp-mode
# native -i in0 -i out0 -i out1 -i out2 --static 239.1.1.1@out0,out1,out2`. Then, ROUNDS times,
# interleaved: `bpftool prog run` (BPF_PROG_TEST_RUN, REPEAT runs, no live frames: the redirect
# is decided, not performed) of the bench's `bench_direct` wrapper (restores the source MAC,
# tail-calls DIRECT_TARGET[0]) with a 60-byte UDP frame to 239.1.1.1 and ingress in0, the
# target being each daemon's program, then `bench_bare` (same port set) behind the same wrapper.
# Prints the kernel's average ns per run ("r4": XDP_REDIRECT). Needs the bench object built by
# relay's build script (any `cargo build --release -p relay`); BENCH_OBJ overrides its path.
set -u
ROUNDS=$1; REPEAT=$2; shift 2
OBJ=${BENCH_OBJ:-$(ls -t target/release/build/relay-*/out/bench | head -1)}
cp "$OBJ" /tmp/pm_bench.o || exit 1
python3 - <<'PY'
import struct
dst_mac=bytes([1,0,0x5e,1,1,1]); src_mac=bytes([2,0,0,0,0,1])
def csum(b):
    s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16; return (~s)&0xffff
def frame(total):
    payload_len=total-14-20-8
    udp=struct.pack('!HHHH',5000,5001,8+payload_len,0)+bytes(payload_len)
    ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),0,0,64,17,0,bytes([198,18,0,2]),bytes([239,1,1,1]))
    ip=ip[:10]+struct.pack('!H',csum(ip))+ip[12:]
    return dst_mac+src_mac+b'\x08\x00'+ip+udp
f=frame(60)
open('/tmp/pm_frame64.bin','wb').write(f)
print(' '.join('%02x'%b for b in f[:42]), file=open('/tmp/pm_hdr.txt','w'))
PY
P=/sys/fs/bpf/pmb
rm -rf $P; mkdir -p $P
bpftool prog loadall /tmp/pm_bench.o $P type xdp pinmaps $P/maps || exit 1
bpftool map update pinned $P/maps/GEN_HEADER key 0 0 0 0 value hex $(cat /tmp/pm_hdr.txt)
i=0
for bin in "$@"; do
  ns=pm$i
  ip netns del $ns 2>/dev/null
  ip netns add $ns
  for p in in0 out0 out1 out2; do ip -n $ns link add $p type veth peer name ${p}p; ip -n $ns link set $p up; ip -n $ns link set ${p}p up; done
  ip netns exec $ns "$bin" run --no-pin --xdp-mode native -i in0 -i out0 -i out1 -i out2 --static 239.1.1.1@out0,out1,out2 >/tmp/pm_d$i.log 2>&1 &
  echo $! > /tmp/pm_pid$i
  i=$((i+1))
done
n=$i
sleep 3
bpftool map create $P/inner type devmap_hash key 4 value 8 entries 128 name pminner
for p in out0 out1 out2; do
  x=$(ip netns exec pm0 cat /sys/class/net/$p/ifindex)
  hx=$(python3 -c "import struct;print(' '.join('%d'%b for b in struct.pack('=I',$x)))")
  nsenter --net=/var/run/netns/pm0 bpftool map update pinned $P/inner key $hx value $hx 0 0 0 0
done
bpftool map update pinned $P/maps/BARE_GROUPS key 239 1 1 1 value pinned $P/inner
for i in $(seq 0 $((n-1))); do
  idx=$(ip netns exec pm$i cat /sys/class/net/in0/ifindex)
  python3 -c "import struct;open('/tmp/pm_ctx$i.bin','wb').write(struct.pack('=6I',0,60,0,$idx,0,0))"
  id=$(ip -n pm$i -j -d link show in0 | python3 -c "import json,sys;d=json.load(sys.stdin)[0];print(d['xdp']['prog']['id'])")
  echo $id > /tmp/pm_id$i
  bpftool prog show id $id | grep xlated
done
run() { # ns target_id ctx
  bpftool map update pinned $P/maps/DIRECT_TARGET key 0 0 0 0 value id $2 2>/dev/null
  nsenter --net=/var/run/netns/$1 bpftool prog run pinned $P/bench_direct data_in /tmp/pm_frame64.bin ctx_in $3 repeat $REPEAT 2>&1 | grep -o "Return value: [0-9]*, duration (average): [0-9]*" | sed 's/Return value: \([0-9]*\), duration (average): /r\1 /'
}
bare_id=$(bpftool prog show pinned $P/bench_bare | head -1 | cut -d: -f1)
for r in $(seq 1 $ROUNDS); do
  line="round $r:"
  for i in $(seq 0 $((n-1))); do line="$line | bin$i $(run pm$i $(cat /tmp/pm_id$i) /tmp/pm_ctx$i.bin)"; done
  line="$line | bare $(run pm0 $bare_id /tmp/pm_ctx0.bin)"
  echo "$line"
done
[ -n "${KEEP:-}" ] && exit 0
for i in $(seq 0 $((n-1))); do kill $(cat /tmp/pm_pid$i); done
sleep 1
for i in $(seq 0 $((n-1))); do ip netns del pm$i; done
rm -rf $P
