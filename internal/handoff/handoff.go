// Package handoff is how the hook hands a container over to the refresher,
// which holds warm agent connections: one request and the container's
// pidfd (SCM_RIGHTS) over a root-only unix socket in the state directory,
// one answer, the container's record once its files are written. The hook
// then mounts them itself, as the refresher has no CAP_SYS_ADMIN.
//
// The refresher trusts the request no more than it must. It takes the pid
// from the pidfd, not from the message; it parses the annotation's value
// again with the same parser; it checks the container ID by the state
// directory's rules and the agent socket by the node's configuration.
// The owner and the mount label of the files are the hook's word: only
// root may connect, and root can set both on any file anyway.
//
// The hook holds the container's lock (package statedir) from before it
// hands the container over until it has recorded it, or removed what was
// written. That is how the refresher knows, once the lock is free, that a
// container with files and no record was given up (Server.Settle).
//
// The package links what the hook's binary needs and no more (no gRPC):
// the hook's exec time is the floor of every container's start.
package handoff

import (
	"errors"
	"fmt"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Request is a container the hook hands over.
type Request struct {
	ID string `json:"id"`
	// Key and Value are the annotation as the container's spec holds it;
	// the refresher parses them itself.
	Key   string `json:"key"`
	Value string `json:"value"`
	// Owner is the files' host owner (the container's user, through its
	// user namespace); MountLabel the container's SELinux mount label.
	Owner      files.Owner `json:"owner"`
	MountLabel string      `json:"mount_label,omitempty"`
	// Timeout and RegistrationWait are the hook's (its node configuration,
	// which may have been edited apart from the refresher's): how long the
	// hook waits for the answer, and for an entry on its way within it.
	Timeout          time.Duration `json:"timeout"`
	RegistrationWait time.Duration `json:"registration_wait"`
}

// MaxTimeout bounds the Timeout a request may ask the refresher to spend.
const MaxTimeout = 5 * time.Minute

// response is the refresher's answer: the record, or why not.
type response struct {
	Record *statedir.Record `json:"record,omitempty"`
	Error  string           `json:"error,omitempty"`
}

// Bounds on what crosses the socket. An annotation's value is bounded by
// the whole pod's annotations (256 KiB in Kubernetes); the answer is the
// record, which the request's deliveries bound.
const (
	MaxRequest  = 512 << 10
	maxResponse = 2 << 20
)

// ErrUnavailable means no refresher answered: none listens on the socket,
// or it closed the connection without an answer (it stopped or died in
// the middle of the request). Nothing it did is to be kept: the hook may
// clean up and ask the agent itself.
var ErrUnavailable = errors.New("no spiffe-oci-refresher answered")

// Validate checks what the refresher can check of a request by the rules
// everything else in the state directory follows, and returns its
// deliveries parsed.
func (r Request) Validate() ([]annotations.Delivery, error) {
	if err := ocistate.ValidateID(r.ID); err != nil {
		return nil, err
	}
	if !annotations.IsIdentityKey(r.Key) {
		return nil, fmt.Errorf("%.100q is not an identity annotation", r.Key)
	}
	if r.Owner.UID < 0 || r.Owner.GID < 0 {
		return nil, fmt.Errorf("owner %d:%d is not a host user", r.Owner.UID, r.Owner.GID)
	}
	if r.Timeout < 0 || r.Timeout > MaxTimeout || r.RegistrationWait < 0 {
		return nil, fmt.Errorf("timeout %s, registration_wait %s: want a timeout within %s", r.Timeout, r.RegistrationWait, MaxTimeout)
	}
	return annotations.Parse(r.Key, r.Value)
}
