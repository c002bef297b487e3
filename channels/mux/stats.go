package mux

import (
	"sync/atomic"
	"time"
)

// Stats is a snapshot of a session's counters, for status pages and
// metrics.
type Stats struct {
	// RTT is the smoothed round-trip time of the keepalive pings; 0 until
	// the first pong.
	RTT time.Duration
	// BytesSent and BytesReceived count stream data: the payloads of data
	// frames written to and read from the connection, not their headers
	// nor control frames.
	BytesSent, BytesReceived uint64
	// Streams is NumStreams.
	Streams int
}

// counters are the session's traffic counters. The reader adds what it
// receives and the connection's owner what it wrote, each with one atomic
// add per frame or batch, so the data path pays next to nothing.
type counters struct {
	sent, received atomic.Uint64
}

// frameIn counts a received frame.
func (c *counters) frameIn(h header) {
	if h.typ == typeData {
		c.received.Add(uint64(h.length))
	}
}

// dataBytes is the stream data a batch carries.
func dataBytes(batch []frame) uint64 {
	var n int
	for i := range batch {
		if f := &batch[i]; f.typ == typeData {
			n += f.payloadLen()
		}
	}
	return uint64(n)
}

// RTT returns the smoothed round-trip time of the keepalive pings, 0 until
// one was answered.
func (s *Session) RTT() time.Duration { return time.Duration(s.rtt.Load()) }

// Stats returns the session's counters.
func (s *Session) Stats() Stats {
	return Stats{
		RTT:           s.RTT(),
		BytesSent:     s.counters.sent.Load(),
		BytesReceived: s.counters.received.Load(),
		Streams:       s.NumStreams(),
	}
}
