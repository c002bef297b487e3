package proxy

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestRateLog(t *testing.T) {
	var r rateLog
	t0 := time.Unix(1000, 0)
	ok, held := r.allow(t0)
	assert.True(t, ok, "the first goes through")
	assert.Zero(t, held)
	for i := range 5 {
		ok, _ = r.allow(t0.Add(time.Duration(i) * time.Second))
		assert.False(t, ok, "repeats within the interval are held back")
	}
	ok, held = r.allow(t0.Add(logInterval))
	assert.True(t, ok, "one per interval")
	assert.Equal(t, 5, held, "with the number held back")
	ok, held = r.allow(t0.Add(3 * logInterval))
	assert.True(t, ok)
	assert.Zero(t, held)
}
