package tun

import (
	"fmt"
	"os"
)

// setSysctl writes value to /proc/sys/<key>. Files under /proc/sys/net
// belong to the network namespace of the calling thread.
func setSysctl(key, value string) error {
	if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0); err != nil {
		return fmt.Errorf("tun: set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}
