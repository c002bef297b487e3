//go:build !race

package etcdcluster

const raceEnabled = false
