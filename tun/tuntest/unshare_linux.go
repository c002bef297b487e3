package tuntest

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// unshareNet moves the calling thread into a new network namespace.
func unshareNet() error {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
	}
	return nil
}
