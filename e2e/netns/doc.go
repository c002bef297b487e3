// Package netns holds tcpproxy's multi-host tests: several `tcpproxy run`
// processes, each in its own network namespace ("host") joined to the
// others by a veth pair and a bridge, carrying checksummed traffic between
// legacy clients and servers while faults are injected: degraded links
// (netem, or a userspace emulation of it where the kernel has none), links
// taken down, proxies killed with SIGKILL.
//
// The tests need root and the ip command; they skip otherwise. Leftover
// namespaces of an interrupted run are removed by scripts/netns/cleanup.sh.
//
// Settings (environment):
//
//	TCPPROXY_SOAK=10m          soak duration (default 20s)
//	TCPPROXY_SOAK_WORKERS=16   soak clients opening connection after connection (default 8)
//	TCPPROXY_SOAK_INTERACTIVE=256  long interactive soak connections at once (default 48)
//	TCPPROXY_SOAK_SHAPE=0      soak over plain links (default: shaped, 1-100 Mbit/s, 20-200ms RTT, loss)
//	TCPPROXY_SOAK_SEED=N       replay a soak's links and load (its log prints the seed)
//	TCPPROXY_SOAK_TLS=1        soak with mutual TLS sessions (default: plaintext)
//	TCPPROXY_SOAK_REPORT=FILE  also write the soak summary there
//	TCPPROXY_CONGESTION=20     run TestCongestedUplink, the proxy against direct TCP on a congested link, for 20 cycles (about 9s each)
//	TCPPROXY_CONGESTION_MODE=proxied  its load: proxied, direct, or mixed (default; the two compete on the link)
//	TCPPROXY_E2E_RACE=0|1      build the proxies with -race (default: as the test binary)
//	TCPPROXY_E2E_LOG=debug     the proxies' log level (default info)
//	TCPPROXY_E2E_SESSION_CC=cubic  the proxies' transport.congestionControl (default: the host's, which new namespaces take from the machine)
//	TCPPROXY_E2E_KEEP=1        keep configs, proxy logs and slow-ID.txt (the hosts' sockets, ss -tiem, when connection ID ran 30s or two thirds of its bound; slow-fault-HOST-TIME.txt when a host did not recover from a fault) in $TMPDIR/tcpproxy-e2e-TEST-*
package netns
