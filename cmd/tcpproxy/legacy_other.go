//go:build !linux

package main

import "syscall"

// legacySysProcAttr: without Linux's parent-death signal, a legacy
// program outlives a proxy that is killed (one that exits stops it).
func legacySysProcAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{} }
