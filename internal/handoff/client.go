package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Deliver hands the container whose process pidfd pins to the refresher
// listening on socket, and returns the record of what it wrote. An error
// that wraps ErrUnavailable means no refresher answered; any other is the
// refresher's refusal, worded for the container's failure line, or a
// timeout. ctx bounds the whole exchange.
func Deliver(ctx context.Context, socket string, req Request, pidfd int) (statedir.Record, error) {
	payload, err := json.Marshal(req)
	if err != nil {
		return statedir.Record{}, err
	}
	if len(payload) > MaxRequest {
		return statedir.Record{}, fmt.Errorf("the annotation's value takes %d KiB; at most %d KiB can be handed to the refresher", len(payload)>>10, MaxRequest>>10)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return statedir.Record{}, fmt.Errorf("%w on %s: %v", ErrUnavailable, socket, err)
		}
		return statedir.Record{}, fmt.Errorf("connecting to spiffe-oci-refresher on %s: %w", socket, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	// The pidfd rides on the request's first byte; the refresher reads the
	// request to its end, which CloseWrite marks.
	if _, _, err := conn.WriteMsgUnix(payload, unix.UnixRights(pidfd), nil); err != nil {
		return statedir.Record{}, unavailableOr(ctx, "handing the container to spiffe-oci-refresher", err)
	}
	if err := conn.CloseWrite(); err != nil {
		return statedir.Record{}, unavailableOr(ctx, "handing the container to spiffe-oci-refresher", err)
	}
	data, err := io.ReadAll(io.LimitReader(conn, maxResponse+1))
	if err != nil {
		return statedir.Record{}, unavailableOr(ctx, "reading spiffe-oci-refresher's answer", err)
	}
	if len(data) == 0 {
		return statedir.Record{}, fmt.Errorf("%w on %s: it closed the connection without an answer (stopped in the middle of the request?)", ErrUnavailable, socket)
	}
	if len(data) > maxResponse {
		return statedir.Record{}, fmt.Errorf("spiffe-oci-refresher's answer exceeds %d KiB", maxResponse>>10)
	}
	var resp response
	if err := json.Unmarshal(data, &resp); err != nil {
		return statedir.Record{}, fmt.Errorf("spiffe-oci-refresher's answer: %w", err)
	}
	if resp.Error != "" {
		return statedir.Record{}, errors.New(resp.Error)
	}
	if resp.Record == nil {
		return statedir.Record{}, errors.New("spiffe-oci-refresher answered with neither a record nor an error")
	}
	return *resp.Record, nil
}

// unavailableOr words an I/O error of the exchange: past ctx's deadline it
// is a timeout (the refresher may still be working: nothing may be
// retried over its head); otherwise the refresher went away.
func unavailableOr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The connection's deadline is ctx's, and may fire first.
		return fmt.Errorf("%s: %w", what, context.DeadlineExceeded)
	}
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %s: %v", ErrUnavailable, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}
