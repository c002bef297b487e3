package main

import "syscall"

// legacySysProcAttr makes the kernel send the legacy program SIGTERM when
// the proxy dies, even by SIGKILL: it must not live on without its proxy.
func legacySysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
