package channels_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

// Two nodes share an in-memory transport. The cache node serves a reply
// channel; the web node opens a stream to it through a request channel,
// which dials a session on first use. The stream carries bytes both ways
// and half-closes like TCP.
func Example() {
	if err := requestReply(context.Background()); err != nil {
		fmt.Println(err)
	}
	// Output: cache-1 answered "PING from web-1:40000" (<nil>)
}

func requestReply(ctx context.Context) error {
	transport := channels.NewMemoryTransport()
	quiet := slog.New(slog.DiscardHandler)

	cache, err := channels.NewNode(channels.Config{
		IID: "cache-1", Role: "cache", ListenAddr: "cache-1:7000", Transport: transport, Logger: quiet,
	})
	if err != nil {
		return err
	}
	defer cache.Close()
	replies, err := cache.Reply("cache")
	if err != nil {
		return err
	}
	if err := cache.Start(ctx); err != nil {
		return err
	}

	web, err := channels.NewNode(channels.Config{
		IID: "web-1", Role: "web", Transport: transport, Logger: quiet,
		Members: membership.Static(channels.Member{
			IID: "cache-1", Role: "cache", Addr: "cache-1:7000", Channels: map[string]uint16{"cache": 6379},
		}),
	})
	if err != nil {
		return err
	}
	defer web.Close()
	requests, err := web.Request("cache", "", channels.RoundRobin())
	if err != nil {
		return err
	}
	if err := web.Start(ctx); err != nil {
		return err
	}

	// The server side: answer one request in upper case, then end.
	go func() {
		in, err := replies.Accept(ctx)
		if err != nil {
			return
		}
		defer in.Stream.Close()
		req, _ := io.ReadAll(in.Stream) // until the client's FIN
		fmt.Fprintf(in.Stream, "%s from %s:%d", bytes.ToUpper(req), in.Header.SourceIID, in.Header.SourcePort)
		_ = in.Stream.CloseWrite()
	}()

	stream, member, err := requests.Open(ctx, channels.Header{Channel: "cache", SourceIID: "web-1", SourcePort: 40000, TargetPort: 6379})
	if err != nil {
		return err
	}
	defer stream.Close()
	fmt.Fprint(stream, "ping")
	_ = stream.CloseWrite() // a FIN: the server's ReadAll returns
	answer, err := io.ReadAll(stream)
	fmt.Printf("%s answered %q (%v)\n", member.IID, answer, err)
	return nil
}
