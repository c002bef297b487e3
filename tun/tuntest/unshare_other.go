//go:build !linux

package tuntest

import "errors"

// unshareNet fails: network namespaces are Linux's (Skip skips first).
func unshareNet() error { return errors.New("network namespaces need Linux") }
