// Package statuspage is the admin endpoint's live status page: one HTML
// page with its script and style sheet, embedded in the binary so that it
// works without any network. The script polls /api/status (with the
// channels' recent history) and draws the mesh as this instance sees it,
// its sessions, and each channel's counters with small charts of
// connection and byte rates; it uses no framework and no external asset.
package statuspage

import (
	"embed"
	"net/http"
)

//go:embed index.html static
var files embed.FS

// Handler serves the page at / and its assets under /static/.
func Handler() http.Handler {
	fileServer := http.FileServerFS(files)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// Only this page's own script and style, and nothing it loads
		// from elsewhere; no framing by other sites.
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		if r.URL.Path == "/" {
			http.ServeFileFS(w, r, files, "index.html")
			return
		}
		fileServer.ServeHTTP(w, r)
	})
}
