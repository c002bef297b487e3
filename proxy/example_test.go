package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// Two proxies on one host: "cache-1" serves its legacy server (here a
// line-echo server started on Ready) on the reply channel "cache", and
// "web-1" gives its legacy client a local address for the request channel
// of the same name. Each proxy owns the network and the channels.Node it
// made, and Shutdown releases them. In a deployment every instance has its
// network namespace and keeps the default address ranges; here the two
// share one, so each gets ranges of its own.
func Example() {
	if err := twoProxies(context.Background()); err != nil {
		fmt.Println(err)
	}
	// Output:
	// cache-1: proxy.Ready bind 127.211.x.y
	// cache-1: proxy.Synced
	// web-1: proxy.Ready bind 127.201.x.y
	// web-1: proxy.Change cache listening on 127.202.0.1:6379
	// web-1: proxy.Synced
	// redis> PING from 127.211.x.y
	// web-1: proxy.Closed
	// cache-1: proxy.Closed
}

func twoProxies(ctx context.Context) error {
	quiet := slog.New(slog.DiscardHandler)
	cache, err := proxy.New(proxy.Config{
		IID: "cache-1", Role: "cache",
		Channels:   map[string]proxy.ChannelConfig{"cache": {Kind: proxy.KindReply, Port: 6379}},
		Addressing: ranges(211),
		Node:       channels.Config{ListenAddr: "127.0.0.1:0"},
		Logger:     quiet,
	})
	if err != nil {
		return err
	}
	if err := cache.Start(ctx); err != nil {
		return err
	}
	cacheEvents := cache.Events()
	ready := (<-cacheEvents).(proxy.Ready)
	fmt.Println("cache-1:", describe(ready))
	fmt.Println("cache-1:", describe(<-cacheEvents))
	server, err := serveEcho(ready.BindIP)
	if err != nil {
		return err
	}
	defer server.Close()

	web, err := proxy.New(proxy.Config{
		IID: "web-1", Role: "web",
		Channels:   map[string]proxy.ChannelConfig{"cache": {Kind: proxy.KindRequest, Port: 6379}},
		Addressing: ranges(201),
		// cache.Self() is cache-1's membership entry, with the address its
		// node listens on; a deployment lists it in a members file or a
		// registry.
		Node:   channels.Config{Members: membership.Static(cache.Self())},
		Logger: quiet,
	})
	if err != nil {
		return err
	}
	if err := web.Start(ctx); err != nil {
		return err
	}
	var addr netip.AddrPort
	for e := range web.Events() {
		fmt.Println("web-1:", describe(e))
		if c, ok := e.(proxy.Change); ok && c.Listening {
			addr = netip.AddrPortFrom(c.IP, c.Port)
		}
		if _, ok := e.(proxy.Synced); ok {
			break
		}
	}

	// The legacy client: it knows only the request address.
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		return err
	}
	fmt.Fprintln(c, "PING")
	answer, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil {
		return err
	}
	fmt.Print("redis> ", answer)

	for _, p := range []*proxy.Proxy{web, cache} {
		stop, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := p.Shutdown(stop)
		cancel()
		if err != nil {
			return err
		}
		for e := range p.Events() {
			if _, ok := e.(proxy.Closed); ok {
				fmt.Printf("%s: %s\n", p.IID(), describe(e))
			}
		}
	}
	return nil
}

// ranges gives a proxy the instance range 127.X.0.0/16 and the request
// range 127.X+1.0.0/16.
func ranges(x byte) proxy.Addressing {
	return proxy.Addressing{
		InstanceRange: netip.PrefixFrom(netip.AddrFrom4([4]byte{127, x, 0, 0}), 16),
		RequestRange:  netip.PrefixFrom(netip.AddrFrom4([4]byte{127, x + 1, 0, 0}), 16),
	}
}

// serveEcho stands in for the legacy server: it answers each line with the
// line and the caller's address, which is the calling instance's IP.
func serveEcho(ip netip.Addr) (net.Listener, error) {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 6379).String())
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				caller := netip.MustParseAddrPort(c.RemoteAddr().String()).Addr()
				fmt.Fprintf(c, "%s from %s\n", strings.TrimSpace(line), hideHost(caller))
			}()
		}
	}()
	return ln, nil
}

func describe(e proxy.Event) string {
	switch e := e.(type) {
	case proxy.Ready:
		return "proxy.Ready bind " + hideHost(e.BindIP)
	case proxy.Change:
		return fmt.Sprintf("proxy.Change %s listening on %v:%d", e.Channel, e.IP, e.Port)
	}
	return fmt.Sprintf("%T", e)
}

// hideHost keeps the example's output stable: an instance IP depends on a
// hash of the iid.
func hideHost(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("%d.%d.x.y", b[0], b[1])
}
