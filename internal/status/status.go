// Package status is what the running refresher says about itself: the
// report it serves as JSON on its unix socket, and the client that the
// status command and the DaemonSet's probes use to read it.
//
// The socket is the refresher's only control surface. It lives in the
// state directory (root only) and is mode 0600, because the report names
// every container and SPIFFE ID on the node.
package status

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
)

// Paths served on the socket.
const (
	PathStatus  = "/status"
	PathHealthz = "/healthz"
	PathReadyz  = "/readyz"
	PathMetrics = "/metrics"
)

// Report is the refresher's state at one moment.
type Report struct {
	Version string `json:"version"`
	// Scanned is true once the first scan of the state directory is done.
	Scanned bool `json:"scanned"`
	// Agents are the agent admin sockets in use: the node's, and any other
	// a container's record names.
	Agents     []Agent     `json:"agents"`
	Containers []Container `json:"containers"`
	// Audit is the last audit of the node's running containers.
	Audit audit.Result `json:"audit"`
}

// Agent is one agent admin socket.
type Agent struct {
	Socket string `json:"socket"`
	// Reachable is true while the agent answers: its bundle stream is open
	// (or an SVID stream just answered) and it has sent bundles.
	Reachable bool `json:"reachable"`
}

// Container is one served container.
type Container struct {
	ID  string `json:"id"`
	PID int    `json:"pid"`
	// SPIFFEIDs are the IDs last written, one per delivery.
	SPIFFEIDs []string `json:"spiffe_ids"`
	// NotBefore and NotAfter are those of the delivered SVID that expires
	// first; zero until one is known.
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// LastRotation is when the current files were written.
	LastRotation time.Time `json:"last_rotation"`
	// StreamOpen is true while the container's SVID stream is open.
	StreamOpen bool `json:"stream_open"`
	// Error is the container's current trouble ("" when healthy).
	Error string `json:"error,omitempty"`
}

// Ready reports whether the refresher is ready: its first scan is done
// and every agent it uses answers. It returns why not otherwise.
func (r Report) Ready() (bool, string) {
	if !r.Scanned {
		return false, "first scan of the state directory not done"
	}
	if len(r.Agents) == 0 {
		return false, "no agent connection"
	}
	var down []string
	for _, a := range r.Agents {
		if !a.Reachable {
			down = append(down, a.Socket)
		}
	}
	if len(down) > 0 {
		return false, "agent unreachable: " + strings.Join(down, ", ")
	}
	return true, "ready"
}

// Client talks to a refresher's unix socket.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client for the refresher listening on socket.
func NewClient(socket string) *Client {
	return &Client{Socket: socket, http: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		},
	}}
}

// Get fetches path and returns the HTTP status code and body.
func (c *Client) Get(ctx context.Context, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://refresher"+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("refresher socket %s: %w", c.Socket, unwrapURL(err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return 0, nil, fmt.Errorf("refresher socket %s: %w", c.Socket, err)
	}
	return resp.StatusCode, body, nil
}

// Report fetches the running refresher's report.
func (c *Client) Report(ctx context.Context) (Report, error) {
	code, body, err := c.Get(ctx, PathStatus)
	if err != nil {
		return Report{}, err
	}
	if code != http.StatusOK {
		return Report{}, fmt.Errorf("refresher socket %s: %s: HTTP %d", c.Socket, PathStatus, code)
	}
	var r Report
	if err := json.Unmarshal(body, &r); err != nil {
		return Report{}, fmt.Errorf("refresher socket %s: %s: %w", c.Socket, PathStatus, err)
	}
	return r, nil
}

// unwrapURL drops net/http's `Get "http://refresher/status":` prefix,
// which names a URL that does not exist.
func unwrapURL(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok || !strings.HasPrefix(err.Error(), "Get ") {
			return err
		}
		err = u.Unwrap()
	}
}

// Probe is the DaemonSet's liveness or readiness probe: it fetches
// endpoint ("healthz" or "readyz") and returns the answer's text, or an
// error unless the refresher answered HTTP 200.
func (c *Client) Probe(ctx context.Context, endpoint string) (string, error) {
	code, body, err := c.Get(ctx, "/"+endpoint)
	if err != nil {
		return "", err
	}
	text := strings.TrimSpace(string(body))
	if code != http.StatusOK {
		return "", fmt.Errorf("%s: HTTP %d: %s", endpoint, code, text)
	}
	return text, nil
}
