package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chromium returns the path of a Chromium or Chrome binary, or skips.
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("no Chromium installed (.ci/run installs the Debian package chromium): the status page is not tested in a browser")
	return ""
}

// browser starts a headless Chromium for the test and returns a tab's
// context and the page's errors so far (exceptions, console errors and
// blocked loads, such as a Content-Security-Policy violation).
func browser(t *testing.T) (context.Context, func() []string) {
	path := chromium(t)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.NoSandbox, // CI runs as root
		chromedp.DisableGPU,
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-quic", true),
		chromedp.WindowSize(1100, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	ctx, cancelTime := context.WithTimeout(ctx, 90*time.Second)
	t.Cleanup(func() {
		cancelTime()
		cancelTab()
		cancelAlloc()
	})
	var mu sync.Mutex
	var errs []string
	err := chromedp.Listen(ctx, func(ev any) {
		var msg string
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			msg = fmt.Sprintf("exception: %s at %s:%d", d.Text, d.URL, d.LineNumber)
			if d.Exception != nil {
				msg += ": " + d.Exception.Description
			}
		case *runtime.EventConsoleAPICalled:
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				msg = fmt.Sprintf("console.error: %v", ev.Args)
			}
		case *log.EventEntryAdded:
			if ev.Entry.Level == log.EntryLevelError {
				msg = fmt.Sprintf("log %s: %s %s", ev.Entry.Source, ev.Entry.Text, ev.Entry.URL)
			}
		}
		if msg != "" {
			mu.Lock()
			errs = append(errs, msg)
			mu.Unlock()
		}
	})
	require.NoError(t, err, "start %s", path)
	_, err = chromedp.Call(ctx, log.Enable, cdp.Empty{})
	require.NoError(t, err)
	_, err = chromedp.Call(ctx, runtime.Enable, cdp.Empty{})
	require.NoError(t, err)
	return ctx, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), errs...)
	}
}

// pageState is what the test reads off the status page.
type pageState struct {
	Updates     int               `json:"updates"`
	IID         string            `json:"iid"`
	Conn        string            `json:"conn"`
	Members     map[string]string `json:"members"`  // iid → state
	Sessions    []string          `json:"sessions"` // "peer net identity"
	Connections string            `json:"connections"`
	BytesOut    string            `json:"bytesOut"` // exact, from the cell's title
	MeshUp      []string          `json:"meshUp"`   // iids drawn as up in the mesh
	ChartLines  int               `json:"chartLines"`
	BytesMax    string            `json:"bytesMax"` // the api bytes chart's scale`
}

const readPage = `(() => {
  const q = (s) => [...document.querySelectorAll(s)];
  const text = (e, f) => { const c = e && e.querySelector('[data-field=' + f + ']'); return c ? c.textContent : ''; };
  const api = document.querySelector('#channels tr[data-channel=api]');
  const members = {};
  for (const r of q('#members tbody tr[data-iid]')) members[r.dataset.iid] = text(r, 'state');
  return {
    updates: Number(document.body.dataset.updates || 0),
    iid: document.getElementById('iid').textContent,
    conn: document.getElementById('conn').textContent,
    members,
    sessions: q('#sessions tbody tr[data-peer]').map((r) => [text(r, 'peer'), text(r, 'net'), text(r, 'identity')].join(' ')),
    connections: text(api, 'connections'),
    bytesOut: api ? api.querySelector('[data-field=bytesOut]').title : '',
    meshUp: q('#mesh circle.up').map((c) => c.dataset.iid),
    chartLines: q('#charts .chart[data-channel=api] polyline').length,
    bytesMax: (q('#charts .chart[data-channel=api] svg')[1] || { textContent: '' }).querySelector('text')?.textContent || '',
  };
})()`

// TestStatusPageInBrowser loads the status page of a running two-instance
// mesh in headless Chromium: it shows the members and sessions, and its
// counters and charts move while traffic flows, with no script error and
// nothing blocked by the page's Content-Security-Policy.
func TestStatusPageInBrowser(t *testing.T) {
	ctx, pageErrors := browser(t)
	m := startStatusMesh(t)
	m.echo(t, 100_000) // sessions up before the page loads

	read := func(c *assert.CollectT) pageState {
		st, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](readPage))
		assert.NoError(c, err)
		return st
	}
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate("http://"+m.cliAdmin+"/")))
	var before pageState
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		st := read(c)
		assert.Positive(c, st.Updates, "the page has polled")
		assert.Equal(c, "cli-1", st.IID)
		assert.Contains(c, st.Conn, "live")
		assert.Equal(c, map[string]string{"cli-1": "self", "srv-1": "up", "gone-1": "backoff"}, st.Members)
		assert.Contains(c, st.Sessions, "srv-1 unix tcpproxy://instance/srv-1?role=server")
		assert.Equal(c, []string{"srv-1"}, st.MeshUp)
		assert.Equal(c, "1", st.Connections)
		assert.Equal(c, "100000 bytes", st.BytesOut)
		before = st
	}, 30*time.Second, 100*time.Millisecond)

	// More traffic: the page's counters move without a reload, and the
	// charts get their lines once two samples exist.
	for range 3 {
		m.echo(t, 50_000)
	}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		st := read(c)
		assert.Greater(c, st.Updates, before.Updates)
		assert.Equal(c, "4", st.Connections)
		assert.Equal(c, "250000 bytes", st.BytesOut)
		assert.Equal(c, 4, st.ChartLines, "connections and bytes charts, two lines each")
		assert.Regexp(c, `^max [1-9][0-9.]*[KM]iB/s$`, st.BytesMax, "the traffic shows in the bytes chart")
	}, 30*time.Second, 100*time.Millisecond)

	// The page says so when the instance goes away.
	m.cli.stop(t)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Contains(c, read(c).Conn, "does not answer")
	}, 30*time.Second, 100*time.Millisecond)
	m.srv.stop(t)

	var errs []string
	for _, e := range pageErrors() {
		// Fetches that failed once the instance stopped are expected.
		if !strings.Contains(e, "/api/status") && !strings.Contains(e, "Failed to fetch") {
			errs = append(errs, e)
		}
	}
	assert.Empty(t, errs, "errors on the page")
	if t.Failed() {
		if html, err := chromedp.Run(ctx, chromedp.OuterHTML("html")); err == nil {
			t.Logf("page:\n%s", html)
		}
	}
}
