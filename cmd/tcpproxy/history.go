package main

import (
	"slices"
	"sync"
	"time"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// historyLen and historyEvery: the status page charts the last five
// minutes of every channel, from a sample every two seconds.
const (
	historyLen   = 150
	historyEvery = 2 * time.Second
)

// history is the channels' counters sampled at a fixed interval, oldest
// first; the status page draws rates from the differences.
type history struct {
	IntervalSeconds float64 `json:"intervalSeconds"`
	// Times are the samples' times in Unix milliseconds.
	Times    []int64                    `json:"times"`
	Channels map[string]*channelHistory `json:"channels"`
}

// channelHistory holds one channel's counters, one entry per sample.
type channelHistory struct {
	Connections []int64 `json:"connections"`
	Failed      []int64 `json:"failed"`
	Refused     []int64 `json:"refused"`
	Active      []int64 `json:"active"`
	BytesOut    []int64 `json:"bytesOut"`
	BytesIn     []int64 `json:"bytesIn"`
}

// series are h's counters, in the order of values.
func (h *channelHistory) series() [6]*[]int64 {
	return [6]*[]int64{&h.Connections, &h.Failed, &h.Refused, &h.Active, &h.BytesOut, &h.BytesIn}
}

// values are st's counters, in the order of series.
func values(st proxy.ChannelStats) [6]int64 {
	return [6]int64{st.Connections, st.Failed, st.Refused, st.Active, st.BytesOut, st.BytesIn}
}

// sampler keeps the last historyLen samples of a proxy's counters.
type sampler struct {
	every time.Duration

	mu    sync.Mutex
	times []int64
	chans map[string]*channelHistory
}

func newSampler(every time.Duration) *sampler {
	return &sampler{every: every, times: []int64{}, chans: make(map[string]*channelHistory)}
}

// add records one sample of stats taken at t.
func (s *sampler) add(t time.Time, stats []proxy.ChannelStats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	drop := len(s.times) + 1 - historyLen
	push := func(v *[]int64, x int64) {
		if drop > 0 {
			*v = append((*v)[:0], (*v)[drop:]...)
		}
		*v = append(*v, x)
	}
	for _, st := range stats {
		h := s.chans[st.Channel]
		if h == nil {
			// A channel first seen now starts at zero, like the others'
			// length, so that every series lines up with times.
			h = &channelHistory{}
			for _, v := range h.series() {
				*v = make([]int64, len(s.times))
			}
			s.chans[st.Channel] = h
		}
		vals := values(st)
		for i, v := range h.series() {
			push(v, vals[i])
		}
	}
	push(&s.times, t.UnixMilli())
}

// snapshot returns a copy of the samples.
func (s *sampler) snapshot() *history {
	if s == nil {
		return &history{Times: []int64{}, Channels: map[string]*channelHistory{}}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	h := &history{IntervalSeconds: s.every.Seconds(), Times: slices.Clone(s.times), Channels: make(map[string]*channelHistory, len(s.chans))}
	for name, c := range s.chans {
		out := &channelHistory{}
		dst := out.series()
		for i, v := range c.series() {
			*dst[i] = slices.Clone(*v)
		}
		h.Channels[name] = out
	}
	return h
}

// run samples src every s.every until stop is closed.
func (s *sampler) run(src func() []proxy.ChannelStats, stop <-chan struct{}) {
	t := time.NewTicker(s.every)
	defer t.Stop()
	for {
		if stats := src(); stats != nil {
			s.add(time.Now(), stats)
		}
		select {
		case <-t.C:
		case <-stop:
			return
		}
	}
}
