// Package mux multiplexes full-duplex byte streams over one connection,
// with yamux's version 0 framing and stream semantics, built for a proxy
// that carries many TCP connections between two peers.
//
// Compared with go-yamux it copies less and makes fewer system calls: a
// Write hands its buffer to the session's writer goroutine without copying
// it and waits until it is written; the writer writes what is queued, from
// all streams, with one writev (every small frame queued, and about 512 KiB
// of bulk data at a time, or 50 ms of a slower link's rate, shared fairly
// among the busy streams, so that a message does not wait behind every
// busy stream's data); a stream's SYN rides on its first frame; received
// data is queued in pooled buffers that Read copies out of and WriteTo
// hands to its writer as they are.
//
// A session bounds the received data it holds unread over all its streams
// (Config.MaxBuffered): windows stop growing as it fills, and past it the
// stream a frame is for is reset, so a peer that opens many streams that
// nothing reads cannot make it hold each one's window.
//
// A stream ends with io.EOF only when the peer half-closed it and every
// byte before was read. Any other end (a reset by either side, the session's
// end for whatever reason) fails Read, Write and WriteTo with an error
// matching ErrStreamReset that never matches io.EOF, so a truncated stream
// cannot pass for a complete one.
//
// # Goroutines
//
// A session runs three goroutines, all ending with it: the reader, which
// reads frames and queues received data on streams (it never writes to
// the connection: window updates, pongs and resets are queued for the
// writer, so two peers with full connections cannot deadlock); the writer,
// which owns the connection's writes; and the keepalive, which pings. A
// stream has no goroutine, and holds no buffer while idle.
//
// # Wire format
//
// Frames are yamux's version 0: a 12-byte header (version, type, flags,
// stream ID, length) and, for data frames, the payload. Streams start with
// a 256 KiB window each way, which window updates extend. Unlike go-yamux,
// an opener sends nothing until the stream's first frame, which carries
// SYN, the acceptor's first frame carries ACK, and a SYN must name an ID
// above every ID the peer opened before (the opener assigns IDs as SYNs
// are queued, so they leave in order). A session therefore expects this
// package at the other end, not go-yamux.
package mux
