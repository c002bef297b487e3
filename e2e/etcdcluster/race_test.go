//go:build race

package etcdcluster

const raceEnabled = true
