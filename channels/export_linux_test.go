package channels

import "log/slog"

// SetSameHostMinSendBuffer sets the least send buffer a dialer takes the
// same-host socket with, until the returned restore is called.
func SetSameHostMinSendBuffer(n int) (restore func()) {
	old := sameHostMinSendBuffer
	sameHostMinSendBuffer = n
	return func() { sameHostMinSendBuffer = old }
}

// TransportLogging returns tr with logger l, as NewNode gives it.
func TransportLogging(tr Transport, l *slog.Logger) Transport {
	return tr.(loggingTransport).withLogger(l)
}
