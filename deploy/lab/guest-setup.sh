# Sourced at the top of every lab job (inside the VM): soft-RoCE on a veth pair, and the
# NVDIMM as device-DAX or fs-DAX when asked.
set -e
# Two rxe devices in one namespace only talk through the veth when routing forces it:
# locally sent traffic to the peer goes out the veth (tables 100/101), received traffic is local.
printf '%s\n' \
  "link add veth0 type veth peer name veth1" \
  "addr add 10.77.0.1/24 dev veth0" "addr add 10.77.0.2/24 dev veth1" \
  "link set veth0 up" "link set veth1 up" \
  "route add 10.77.0.2 dev veth0 src 10.77.0.1 table 100" \
  "route add 10.77.0.1 dev veth1 src 10.77.0.2 table 101" \
  "rule add pref 10 iif lo to 10.77.0.2 lookup 100" \
  "rule add pref 11 iif lo to 10.77.0.1 lookup 101" \
  "rule add pref 100 lookup local" "rule del pref 0" | ip -batch -
for i in all default veth0 veth1; do
  echo 1 > /proc/sys/net/ipv4/conf/$i/accept_local; echo 0 > /proc/sys/net/ipv4/conf/$i/rp_filter
done
rdma link add rxe0 type rxe netdev veth0
rdma link add rxe1 type rxe netdev veth1
if [ -n "$DEVDAX" ]; then
  ndctl create-namespace -f -e namespace0.0 -m devdax > /dev/null
fi
if [ -n "$FSDAX" ]; then
  ndctl create-namespace -f -e namespace0.0 -m fsdax > /dev/null
  mkfs.ext4 -q -F /dev/pmem0 && mkdir -p "$FSDAX" && mount -o dax=always /dev/pmem0 "$FSDAX"
fi
set +e
