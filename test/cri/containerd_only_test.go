package cri

import "testing"

// containerdOnly: what only containerd, through NRI, has.
func containerdOnly(t *testing.T, c *containerd) {
}
