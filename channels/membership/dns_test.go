package membership

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/tcpproxy/tcpproxy/channels"
)

// fakeDNS is a tiny authoritative DNS server on 127.0.0.1 (UDP) that
// answers SRV, A and AAAA questions from maps the test changes.
type fakeDNS struct {
	pc      net.PacketConn
	queries atomic.Int64
	done    chan struct{}

	mu    sync.Mutex
	srv   map[string][]net.SRV    // lower-case absolute name → records
	ips   map[string][]netip.Addr // lower-case absolute name → A and AAAA
	rcode dnsmessage.RCode        // when not success, the answer to everything
}

func startFakeDNS(t *testing.T) *fakeDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	d := &fakeDNS{pc: pc, done: make(chan struct{}), srv: map[string][]net.SRV{}, ips: map[string][]netip.Addr{}}
	go d.serve()
	t.Cleanup(func() {
		_ = pc.Close()
		<-d.done
	})
	return d
}

// resolver sends every query to the fake server, whatever the system's
// resolv.conf says.
func (d *fakeDNS) resolver() *net.Resolver {
	addr := d.pc.LocalAddr().String()
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var nd net.Dialer
			return nd.DialContext(ctx, "udp", addr)
		},
	}
}

func (d *fakeDNS) setSRV(name string, records ...net.SRV) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if records == nil {
		delete(d.srv, name)
	} else {
		d.srv[name] = records
	}
}

func (d *fakeDNS) setIPs(name string, ips ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if ips == nil {
		delete(d.ips, name)
		return
	}
	d.ips[name] = nil
	for _, s := range ips {
		d.ips[name] = append(d.ips[name], netip.MustParseAddr(s))
	}
}

func (d *fakeDNS) setRCode(rc dnsmessage.RCode) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.rcode = rc
}

func (d *fakeDNS) serve() {
	defer close(d.done)
	buf := make([]byte, 1500)
	for {
		n, from, err := d.pc.ReadFrom(buf)
		if err != nil {
			return // closed
		}
		d.queries.Add(1)
		if resp := d.answer(buf[:n]); resp != nil {
			_, _ = d.pc.WriteTo(resp, from)
		}
	}
}

func (d *fakeDNS) answer(req []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	name := strings.ToLower(q.Name.String())
	d.mu.Lock()
	defer d.mu.Unlock()
	rcode := d.rcode
	_, hasSRV := d.srv[name]
	_, hasIPs := d.ips[name]
	if rcode == dnsmessage.RCodeSuccess && !hasSRV && !hasIPs {
		rcode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID: h.ID, Response: true, Authoritative: true,
		RecursionDesired: h.RecursionDesired, RecursionAvailable: true, RCode: rcode,
	})
	b.EnableCompression()
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	must(b.StartQuestions())
	must(b.Question(q))
	must(b.StartAnswers())
	hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 1}
	if rcode == dnsmessage.RCodeSuccess {
		switch q.Type {
		case dnsmessage.TypeSRV:
			for _, r := range d.srv[name] {
				must(b.SRVResource(hdr, dnsmessage.SRVResource{
					Priority: r.Priority, Weight: r.Weight, Port: r.Port,
					Target: dnsmessage.MustNewName(r.Target),
				}))
			}
		case dnsmessage.TypeA:
			for _, ip := range d.ips[name] {
				if ip.Is4() {
					must(b.AResource(hdr, dnsmessage.AResource{A: ip.As4()}))
				}
			}
		case dnsmessage.TypeAAAA:
			for _, ip := range d.ips[name] {
				if ip.Is6() {
					must(b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: ip.As16()}))
				}
			}
		}
	}
	msg, err := b.Finish()
	must(err)
	return msg
}

const srvName = "_tcpproxy._tcp.web.mesh.test."

func srv(target string, port uint16) net.SRV {
	return net.SRV{Target: target, Port: port, Priority: 10, Weight: 10}
}

func dnsMember(iid, addr string) channels.Member {
	return channels.Member{IID: iid, Role: "web", Addr: addr, Channels: map[string]uint16{"peers": 2380}}
}

func TestDNSSRV(t *testing.T) {
	d := startFakeDNS(t)
	d.setSRV(srvName, srv("web-1.web.mesh.test.", 7001), srv("web-0.web.mesh.test.", 7000))
	logs := testLogs(t)
	src := DNS(DNSConfig{
		Name: "web.mesh.test.", Service: "tcpproxy",
		Role: "web", Channels: map[string]uint16{"peers": 2380},
		Interval: 5 * time.Millisecond, Resolver: d.resolver(), Logger: logs.logger(),
	})
	ch := watchSource(t, src)
	first := waitList(t, ch, 5*time.Second, "web-0", "web-1")
	assert.Equal(t, []channels.Member{
		dnsMember("web-0", "web-0.web.mesh.test:7000"),
		dnsMember("web-1", "web-1.web.mesh.test:7001"),
	}, first)

	// A join and a leave in one change.
	d.setSRV(srvName, srv("web-1.web.mesh.test.", 7001), srv("web-2.web.mesh.test.", 7002))
	assert.Equal(t, []string{"web-1", "web-2"}, iids(recvList(t, ch)))

	// A failing server keeps the list; the next change after it is seen.
	d.setRCode(dnsmessage.RCodeServerFailure)
	n := d.queries.Load()
	require.Eventually(t, func() bool { return d.queries.Load() >= n+5 }, 5*time.Second, time.Millisecond)
	select {
	case list := <-ch:
		require.FailNow(t, "a failed lookup changed the list", "%v", iids(list))
	default:
	}
	d.setSRV(srvName, srv("web-2.web.mesh.test.", 7002))
	d.setRCode(dnsmessage.RCodeSuccess)
	assert.Equal(t, []string{"web-2"}, iids(recvList(t, ch)))
	assert.Equal(t, 1, strings.Count(logs.String(), "lookup failed"), "logged once, not on every poll: %s", logs.String())

	// The same iid twice: the smaller addr is kept, and it is logged.
	d.setSRV(srvName, srv("web-2.b.mesh.test.", 7002), srv("web-2.a.mesh.test.", 7002), srv("web-3.web.mesh.test.", 7003))
	got := recvList(t, ch)
	assert.Equal(t, []channels.Member{
		dnsMember("web-2", "web-2.a.mesh.test:7002"),
		dnsMember("web-3", "web-3.web.mesh.test:7003"),
	}, got)
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), `names both`) }, 5*time.Second, time.Millisecond)

	// The service has no instance left: NXDOMAIN is an empty list.
	d.setSRV(srvName)
	assert.Empty(t, recvList(t, ch))

	got[0].Channels["peers"] = 1 // lists are copies
	d.setSRV(srvName, srv("web-2.a.mesh.test.", 7002))
	assert.Equal(t, uint16(2380), recvList(t, ch)[0].Channels["peers"])
}

func TestDNSAddresses(t *testing.T) {
	d := startFakeDNS(t)
	d.setIPs("pods.mesh.test.", "127.0.10.2", "fd00::5", "127.0.10.1")
	src := DNS(DNSConfig{
		Name: "pods.mesh.test.", Port: 7000, Role: "web",
		Channels: map[string]uint16{"peers": 2380},
		Interval: 5 * time.Millisecond, Resolver: d.resolver(), Logger: testLogs(t).logger(),
	})
	ch := watchSource(t, src)
	assert.Equal(t, []channels.Member{
		dnsMember("127-0-10-1", "127.0.10.1:7000"),
		dnsMember("127-0-10-2", "127.0.10.2:7000"),
		dnsMember("fd00--5", "[fd00::5]:7000"),
	}, waitList(t, ch, 5*time.Second, "127-0-10-1", "127-0-10-2", "fd00--5"))

	d.setIPs("pods.mesh.test.", "127.0.10.2")
	assert.Equal(t, []channels.Member{dnsMember("127-0-10-2", "127.0.10.2:7000")}, recvList(t, ch))
	// The name exists but has no address (NODATA): an empty list.
	d.setIPs("pods.mesh.test.", []string{}...)
	assert.Empty(t, recvList(t, ch))
}

func TestDNSStart(t *testing.T) {
	d := startFakeDNS(t)
	r := d.resolver()
	for name, tc := range map[string]struct {
		cfg  DNSConfig
		want string
	}{
		"no name":          {DNSConfig{Port: 1}, "empty name"},
		"no port":          {DNSConfig{Name: "x.test."}, "need a port"},
		"negative":         {DNSConfig{Name: "x.test.", Port: 1, Interval: -1}, "negative interval"},
		"bad channel port": {DNSConfig{Name: "x.test.", Port: 1, Channels: map[string]uint16{"x": 0}}, `channel "x"`},
		"long role":        {DNSConfig{Name: "x.test.", Port: 1, Role: strings.Repeat("r", 256)}, "role length 256"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := DNS(tc.cfg).Watch(context.Background())
			require.ErrorContains(t, err, tc.want)
		})
	}

	// A failing server at the first lookup fails Watch.
	d.setRCode(dnsmessage.RCodeServerFailure)
	_, err := DNS(DNSConfig{Name: "web.mesh.test.", Service: "tcpproxy", Resolver: r}).Watch(context.Background())
	require.ErrorContains(t, err, "_tcpproxy._tcp.web.mesh.test. SRV")
	var de *net.DNSError
	require.True(t, errors.As(err, &de), "%T", err)

	// A name without records yet is an empty list, not an error: the
	// first instance of a headless service finds nobody.
	d.setRCode(dnsmessage.RCodeSuccess)
	ch := watchSource(t, DNS(DNSConfig{Name: "web.mesh.test.", Service: "tcpproxy", Interval: time.Hour, Resolver: r}))
	assert.Empty(t, recvList(t, ch))
}

func TestIPIID(t *testing.T) {
	for ip, want := range map[string]string{
		"10.1.2.3":        "10-1-2-3",
		"fd00::1:5":       "fd00--1-5",
		"fe80::1%eth0":    "fe80--1-eth0",
		"::ffff:10.1.2.3": "--ffff-10-1-2-3",
	} {
		assert.Equal(t, want, ipIID(netip.MustParseAddr(ip)), ip)
	}
}

// recvList returns the next list from ch.
func recvList(t *testing.T, ch <-chan []channels.Member) []channels.Member {
	t.Helper()
	select {
	case list, ok := <-ch:
		require.True(t, ok, "channel closed")
		return list
	case <-time.After(5 * time.Second):
		require.FailNow(t, "no list within 5s")
		return nil
	}
}
