package mux

import "sync"

// Received data waits in pooled buffers of a few size classes: small
// payloads (request/response traffic) take small buffers, bulk frames take
// large ones, and a stream holds no buffer at all once its data is read.
var bufClasses = [...]int{1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10}

// maxBuf is the largest class; a longer payload spans several buffers.
const maxBuf = 256 << 10

var bufPools [len(bufClasses)]sync.Pool

func init() {
	for i, size := range bufClasses {
		bufPools[i].New = func() any {
			b := make([]byte, 0, size)
			return &b
		}
	}
}

// getBuf returns an empty buffer with capacity for min(n, maxBuf) bytes,
// from the smallest class that fits. The pointer lets Put avoid allocating.
func getBuf(n int) *[]byte {
	for i, size := range bufClasses {
		if n <= size || i == len(bufClasses)-1 {
			return bufPools[i].Get().(*[]byte)
		}
	}
	panic("unreachable")
}

// putBuf returns b to its pool. Nothing may reference *b afterwards.
func putBuf(b *[]byte) {
	c := cap(*b)
	for i, size := range bufClasses {
		if c == size {
			*b = (*b)[:0]
			bufPools[i].Put(b)
			return
		}
	}
}
