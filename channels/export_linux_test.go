package channels

// SetSameHostMinSendBuffer sets the least send buffer a dialer takes the
// same-host socket with, until the returned restore is called.
func SetSameHostMinSendBuffer(n int) (restore func()) {
	old := sameHostMinSendBuffer
	sameHostMinSendBuffer = n
	return func() { sameHostMinSendBuffer = old }
}
