//go:build race

package proxybin

const raceEnabled = true
