// Package etcdcluster runs a real 3-member etcd cluster under tcpproxy:
// three network namespaces ("hosts") joined by a bridge, each running
// `tcpproxy run` in loopback mode with the default address ranges and etcd
// as the legacy program. etcd's peers talk only through the duplex channel
// "peers" (etcd-1 dials etcd-0's instance IP:2380, an impostor of its own
// proxy, whose stream reaches etcd-0's proxy, which connects to etcd-0
// from etcd-1's instance IP); the duplex channel "client" carries etcdctl
// to the other members' client ports. The test checks that the cluster
// becomes healthy, that a key written on one member is read on the others,
// and that a member whose proxy is stopped and started again (same data
// directory) rejoins and catches up.
//
// It needs root, iproute2, etcd (Debian etcd-server) and etcdctl (Debian
// etcd-client) and skips with a message otherwise. Leftover namespaces of
// an interrupted run are removed by scripts/netns/cleanup.sh.
//
// Settings (environment):
//
//	TCPPROXY_E2E_RACE=0|1      build the proxies with -race (default: as the test binary)
//	TCPPROXY_E2E_LOG=debug     the proxies' log level (default info)
//	TCPPROXY_E2E_KEEP=1        keep configs, logs and data (in $TMPDIR/tcpproxy-etcd-*)
package etcdcluster
