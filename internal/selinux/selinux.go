// Package selinux gives the files delivered to a container the container's
// SELinux mount label, so that a confined container can read them through
// the bind mount without the runtime relabelling anything.
package selinux

import (
	// Imported as goselinux: its package name is selinux too, and inside
	// this package that name would read as this package.
	goselinux "github.com/opencontainers/selinux/go-selinux"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// For returns the labeler for a container's mount label (linux.mountLabel
// in config.json), or nil when there is nothing to do: no label, or a host
// without SELinux.
func For(mountLabel string) files.Labeler {
	if mountLabel == "" || !goselinux.GetEnabled() {
		return nil
	}
	return Labeler{MountLabel: mountLabel}
}

// Labeler labels paths with one context, without following symlinks (the
// writer labels its symlinks as well as their targets).
type Labeler struct {
	MountLabel string
}

// Label implements files.Labeler.
func (l Labeler) Label(path string) error {
	return goselinux.LsetFileLabel(path, l.MountLabel)
}
