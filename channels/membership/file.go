package membership

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
)

// DefaultInterval is File's polling period when none is given.
const DefaultInterval = 500 * time.Millisecond

// File returns a Source that reads the YAML member list at path (see Parse)
// and polls it every interval (DefaultInterval when zero or negative). A new
// list is sent only when the members changed. A file that cannot be read or
// parsed later on is logged (slog.Default) and the previous list is kept;
// at the first read it is an error from Watch, so a node does not start on
// a broken file.
func File(path string, interval time.Duration) channels.Source {
	if interval <= 0 {
		interval = DefaultInterval
	}
	return &fileSource{path: path, interval: interval}
}

type fileSource struct {
	path     string
	interval time.Duration
}

func (f *fileSource) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	raw, members, err := f.load()
	if err != nil {
		return nil, err
	}
	out := newLatest()
	out.offer(clone(members))
	go f.poll(ctx, out, raw, members) // ends with ctx, as Source requires
	return out.ch, nil
}

func (f *fileSource) load() ([]byte, []channels.Member, error) {
	raw, err := os.ReadFile(f.path)
	if err != nil {
		return nil, nil, fmt.Errorf("membership file: %w", err)
	}
	members, err := Parse(raw)
	if err != nil {
		return raw, nil, fmt.Errorf("membership file %s: %w", f.path, err)
	}
	return raw, members, nil
}

func (f *fileSource) poll(ctx context.Context, out *latest, lastRaw []byte, last []channels.Member) {
	defer out.close()
	log := slog.Default().With("membership_file", f.path)
	t := time.NewTicker(f.interval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		raw, err := os.ReadFile(f.path)
		if err == nil && bytes.Equal(raw, lastRaw) {
			continue // unchanged: skip parsing
		}
		var members []channels.Member
		if err == nil {
			members, err = Parse(raw)
			if err != nil {
				err = fmt.Errorf("membership file %s: %w", f.path, err)
			}
		} else {
			err = fmt.Errorf("membership file: %w", err)
		}
		if err != nil {
			// Log each distinct problem once, not on every poll.
			if err.Error() != lastErr {
				lastErr = err.Error()
				log.Error("keeping the previous member list", "err", err)
			}
			continue
		}
		lastRaw, lastErr = raw, ""
		if equal(members, last) {
			continue // only comments or formatting changed
		}
		last = members
		log.Info("member list changed", "members", len(members))
		out.offer(clone(members))
	}
}
