// Package tun attaches tcpproxy's synthetic address ranges to a kernel TUN
// device (golang.zx2c4.com/wireguard/tun), so that unmodified programs on
// the host reach addresses that live in a userspace stack (package
// netstack).
//
// Linux delivers all of 127.0.0.0/8 to lo through the `local` routing
// table, consulted by the rule at priority 0, and drops 127/8 packets on
// any other interface as martian. Create therefore, in the current network
// namespace:
//
//   - sets route_localnet=1 and rp_filter=0 on the device (and disables
//     IPv6 on it); route_localnet of "all" is not needed, the kernel ORs
//     it with the device's;
//   - brings the device up with the configured MTU;
//   - fills a routing table of its own (Table(name)) with
//     "<prefix> dev <tun> src 127.0.0.1" for each synthetic prefix and
//     "local <addr> dev lo" for each address that must stay on the host
//     (127.0.0.1 and the instance's bind IP; see Device.AddLocal);
//   - adds "from all to <prefix> lookup <table>" at priority RulePriority
//     for each prefix, and moves the `local` rule from priority 0 to
//     LocalRulePriority so that those rules come first.
//
// Without the route's src the kernel picks source 0.0.0.0. Device.Close
// undoes all of it; Cleanup undoes it after a crash.
//
// This rewires the namespace's loopback: run it only in a namespace of its
// own (a container's, or one a test made), never in a shared host's root
// namespace. Every call acts on the network namespace of the calling OS
// thread at Create time; the Device keeps a netlink handle bound to that
// namespace, so Close is safe from any goroutine.
package tun
