package proxy_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// TestProxyOwnsWhatItMade: a proxy given only iid, role, channels and the
// node's settings makes its network and node, starts the node in Start,
// carries a connection end to end, sends Ready, Change, Synced in order,
// and releases the node's listener in Shutdown.
func TestProxyOwnsWhatItMade(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), proxytest.Timeout)
	defer cancel()
	quiet := slog.New(slog.DiscardHandler)
	server, err := proxy.New(proxy.Config{
		IID: "s-1", Role: "s",
		Channels:   map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}},
		Addressing: ranges(221),
		Node:       channels.Config{ListenAddr: "127.0.0.1:0"},
		Logger:     quiet,
	})
	require.NoError(t, err)
	serverEvents := proxytest.Record(server.Events())
	require.Empty(t, server.Self().Addr, "the node listens only once started")
	require.NoError(t, server.Start(ctx))
	self := server.Self()
	require.NotEmpty(t, self.Addr)
	assert.Equal(t, map[string]uint16{"db": 7000}, self.Channels)
	ready := serverEvents.Next(t).(proxy.Ready)
	require.IsType(t, proxy.Synced{}, serverEvents.Next(t), "a reply-only proxy has nothing between Ready and Synced")

	ln, err := net.Listen("tcp", netip.AddrPortFrom(ready.BindIP, 7000).String())
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()

	client, err := proxy.New(proxy.Config{
		IID: "c-1", Role: "c",
		Channels:   map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 7000}},
		Addressing: ranges(223),
		Node:       channels.Config{Members: membership.Static(self)},
		Logger:     quiet,
	})
	require.NoError(t, err)
	clientEvents := proxytest.Record(client.Events())
	require.NoError(t, client.Start(ctx))
	require.IsType(t, proxy.Ready{}, clientEvents.Next(t))
	change := clientEvents.Next(t).(proxy.Change)
	require.True(t, change.Listening)
	require.IsType(t, proxy.Synced{}, clientEvents.Next(t))

	c, err := net.Dial("tcp", netip.AddrPortFrom(change.IP, change.Port).String())
	require.NoError(t, err)
	msg := []byte("through two proxies that own their meshes")
	_, err = c.Write(msg)
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, msg, got)
	c.Close()

	require.NoError(t, client.Shutdown(ctx))
	require.NoError(t, server.Shutdown(ctx))
	// The server's node is closed: nothing listens at its address.
	_, err = net.Dial("tcp", self.Addr)
	require.Error(t, err, "the node's listener outlived Shutdown")
	clientEvents.WaitClosed(t)
	serverEvents.WaitClosed(t)
}

// TestProxyRefusesAnotherInstancesMesh: the mesh must be the proxy's own
// instance; a mix-up is an error, not a proxy that introduces itself to
// its peers under another name.
func TestProxyRefusesAnotherInstancesMesh(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	mesh, err := channels.NewNode(channels.Config{IID: "b-9", Role: "b", Logger: quiet})
	require.NoError(t, err)
	defer mesh.Close()
	chans := map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}}
	_, err = proxy.New(proxy.Config{IID: "a-1", Role: "a", Channels: chans, Mesh: mesh, Logger: quiet})
	require.ErrorContains(t, err, `the mesh is instance "b-9" (role "b") but the proxy is "a-1" (role "a")`)

	_, err = proxy.New(proxy.Config{IID: "a-1", Role: "a", Channels: chans, Node: channels.Config{IID: "b-9"}, Logger: quiet})
	require.ErrorContains(t, err, `Node is instance "b-9"`)
	_, err = proxy.New(proxy.Config{IID: "a-1", Role: "a", Channels: chans, Node: channels.Config{Role: "b"}, Logger: quiet})
	require.ErrorContains(t, err, `(role "b") but the proxy is "a-1" (role "a")`)
}
