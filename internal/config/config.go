// Package config holds the node configuration shared by spiffe-oci-hook and
// spiffe-oci-refresher: one YAML file, every key also settable by a flag.
//
// Only the node's administrator writes this file. Nothing here can be chosen
// by a container's annotations: the agent socket a privileged hook talks to,
// the state directory and the failure policy are node decisions.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// DefaultPath is where both binaries look for the node configuration.
const DefaultPath = "/etc/spiffe-oci-hook/config.yaml"

// Failure policies.
const (
	// FailClosed stops a container that asked for an identity and did not get one.
	FailClosed = "fail-closed"
	// FailOpen lets such a container start without files, after logging why.
	FailOpen = "fail-open"
)

// Config is the node configuration.
type Config struct {
	// AgentAdminSocket is the SPIRE agent's admin socket (admin_socket_path),
	// which serves the Delegated Identity API.
	AgentAdminSocket string `yaml:"agent_admin_socket"`
	// AllowedAgentSockets lists further admin sockets that a container's
	// spire_agent_address may name. AgentAdminSocket is always allowed.
	AllowedAgentSockets []string `yaml:"allowed_agent_sockets"`
	// StateDir holds the per-container files and records. It must be on
	// tmpfs: keys never touch persistent disk.
	StateDir string `yaml:"state_dir"`
	// Timeout bounds the hook's whole exchange with the agent. Keep it below
	// the timeout in the hooks.d JSON so the hook, not the runtime, reports.
	Timeout time.Duration `yaml:"timeout"`
	// FailurePolicy is FailClosed or FailOpen.
	FailurePolicy string `yaml:"failure_policy"`
	// RequireRefresher makes the hook refuse a container that asked for an
	// identity when no refresher has served the state directory within
	// RefresherGrace: nothing would rotate that identity, which would expire
	// in place. The Kubernetes DaemonSet sets it, because removing the
	// DaemonSet leaves the hook installed on the node; a package install
	// removes the hook with the refresher.
	RequireRefresher bool `yaml:"require_refresher"`
	// RefresherGrace is how long after a refresher's last heartbeat (or its
	// stop) the hook still counts it as serving: a DaemonSet's rolling
	// update or a systemd restart stays within it.
	RefresherGrace time.Duration `yaml:"refresher_grace"`
	// Refresher holds settings only the refresher reads.
	Refresher Refresher `yaml:"refresher"`
}

// Refresher holds the refresher's own settings.
type Refresher struct {
	// BackoffMin and BackoffMax bound the retry delay after the agent goes away.
	BackoffMin time.Duration `yaml:"backoff_min"`
	BackoffMax time.Duration `yaml:"backoff_max"`
	// RescanInterval is how often the state directory is scanned in full, to
	// catch up on anything a missed notification did not tell.
	RescanInterval time.Duration `yaml:"rescan_interval"`
	// LogLevel is "info" or "debug" (every rotation).
	LogLevel string `yaml:"log_level"`
	// MetricsSocket is the unix socket serving /metrics, /healthz, /readyz
	// and /status, mode 0600 (root only). Empty: StatusSocket's default,
	// refresher.sock in the state directory.
	MetricsSocket string `yaml:"metrics_socket"`
	// MetricsAddress, when set, also serves /metrics, /healthz and /readyz
	// (not /status, which names containers) on this TCP address.
	MetricsAddress string `yaml:"metrics_address"`
}

// Log levels.
const (
	LogInfo  = "info"
	LogDebug = "debug"
)

// HeartbeatInterval is how often a refresher marks the state directory as
// served: often enough that a live refresher is never older than
// RefresherGrace, seldom enough to cost nothing.
func (c Config) HeartbeatInterval() time.Duration {
	return min(max(c.RefresherGrace/4, 100*time.Millisecond), 15*time.Second)
}

// StatusSocket is the refresher's unix socket: metrics_socket, or
// refresher.sock in the state directory, which is root's only already.
func (c Config) StatusSocket() string {
	if c.Refresher.MetricsSocket != "" {
		return c.Refresher.MetricsSocket
	}
	return filepath.Join(c.StateDir, "refresher.sock")
}

// RestartOnly returns an error naming the first setting that differs
// between cur and next and that a running refresher cannot change: it has
// open sockets and files under them. Everything else applies on reload.
func RestartOnly(cur, next Config) error {
	for _, s := range []struct{ key, a, b string }{
		{"state_dir", cur.StateDir, next.StateDir},
		{"refresher.metrics_socket", cur.StatusSocket(), next.StatusSocket()},
		{"refresher.metrics_address", cur.Refresher.MetricsAddress, next.Refresher.MetricsAddress},
	} {
		if s.a != s.b {
			return fmt.Errorf("%s cannot change while the refresher runs (%q -> %q): restart it", s.key, s.a, s.b)
		}
	}
	return nil
}

// Default returns the configuration used when no file and no flag says otherwise.
func Default() Config {
	return Config{
		AgentAdminSocket: "/run/spire/agent/admin/admin.sock",
		StateDir:         "/run/spiffe-oci-hook",
		Timeout:          10 * time.Second,
		FailurePolicy:    FailClosed,
		RefresherGrace:   2 * time.Minute,
		Refresher: Refresher{
			BackoffMin:     500 * time.Millisecond,
			BackoffMax:     30 * time.Second,
			RescanInterval: 30 * time.Second,
			LogLevel:       LogInfo,
		},
	}
}

// Validate checks that a configuration is usable.
func (c Config) Validate() error {
	if !filepath.IsAbs(c.AgentAdminSocket) {
		return fmt.Errorf("agent_admin_socket %q must be an absolute path", c.AgentAdminSocket)
	}
	for _, s := range c.AllowedAgentSockets {
		if !filepath.IsAbs(s) {
			return fmt.Errorf("allowed_agent_sockets entry %q must be an absolute path", s)
		}
	}
	if !filepath.IsAbs(c.StateDir) {
		return fmt.Errorf("state_dir %q must be an absolute path", c.StateDir)
	}
	if c.Timeout <= 0 {
		return fmt.Errorf("timeout %s must be positive", c.Timeout)
	}
	if c.FailurePolicy != FailClosed && c.FailurePolicy != FailOpen {
		return fmt.Errorf("failure_policy %q must be %q or %q", c.FailurePolicy, FailClosed, FailOpen)
	}
	if c.RefresherGrace <= 0 {
		return fmt.Errorf("refresher_grace %s must be positive", c.RefresherGrace)
	}
	r := c.Refresher
	if r.BackoffMin <= 0 || r.BackoffMax < r.BackoffMin {
		return fmt.Errorf("refresher backoff_min %s and backoff_max %s must be positive and ordered", r.BackoffMin, r.BackoffMax)
	}
	if r.RescanInterval <= 0 {
		return fmt.Errorf("refresher rescan_interval %s must be positive", r.RescanInterval)
	}
	if r.LogLevel != LogInfo && r.LogLevel != LogDebug {
		return fmt.Errorf("refresher log_level %q must be %q or %q", r.LogLevel, LogInfo, LogDebug)
	}
	if r.MetricsSocket != "" && !filepath.IsAbs(r.MetricsSocket) {
		return fmt.Errorf("refresher metrics_socket %q must be an absolute path", r.MetricsSocket)
	}
	if a := r.MetricsAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("refresher metrics_address %q must be host:port: %w", a, err)
		}
	}
	return nil
}

// AgentSocketAllowed reports whether socket is one the node allows a
// container's annotation to name.
func (c Config) AgentSocketAllowed(socket string) bool {
	return socket == c.AgentAdminSocket || slices.Contains(c.AllowedAgentSockets, socket)
}

// Parse reads a configuration file's content on top of the defaults.
// Unknown keys are errors: a typo must not silently fall back to a default.
func Parse(data []byte) (Config, error) {
	c := Default()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, errors.New(strings.Join(strings.Fields(err.Error()), " "))
	}
	return c, nil
}

// Flags binds the shared settings to a FlagSet. Flags the user sets win over
// the file; the file wins over the defaults.
type Flags struct {
	fs   *flag.FlagSet
	path string
	set  Config
}

// Bind registers --config and one flag per shared setting on fs.
func Bind(fs *flag.FlagSet) *Flags {
	f := &Flags{fs: fs}
	d := Default()
	fs.StringVar(&f.path, "config", DefaultPath, "node configuration file (YAML); a missing default file means defaults")
	fs.StringVar(&f.set.AgentAdminSocket, "agent-admin-socket", d.AgentAdminSocket, "SPIRE agent admin socket (Delegated Identity API)")
	fs.StringVar(&f.set.StateDir, "state-dir", d.StateDir, "state directory on tmpfs for per-container files and records")
	fs.DurationVar(&f.set.Timeout, "timeout", d.Timeout, "bound on the whole exchange with the agent")
	fs.Func("allowed-agent-sockets", "comma-separated further admin sockets an annotation's spire_agent_address may name", func(v string) error {
		f.set.AllowedAgentSockets = strings.Split(v, ",")
		return nil
	})
	fs.StringVar(&f.set.FailurePolicy, "failure-policy", d.FailurePolicy, "fail-closed (container does not start without identity) or fail-open")
	fs.BoolVar(&f.set.RequireRefresher, "require-refresher", d.RequireRefresher, "refuse annotated containers when no refresher has served the node within refresher-grace")
	fs.DurationVar(&f.set.RefresherGrace, "refresher-grace", d.RefresherGrace, "how long after a refresher's last heartbeat it still counts as serving")
	return f
}

// BindRefresher registers the refresher's own flags as well.
func (f *Flags) BindRefresher() {
	d := Default()
	f.fs.DurationVar(&f.set.Refresher.BackoffMin, "backoff-min", d.Refresher.BackoffMin, "first retry delay after the agent goes away")
	f.fs.DurationVar(&f.set.Refresher.BackoffMax, "backoff-max", d.Refresher.BackoffMax, "largest retry delay")
	f.fs.DurationVar(&f.set.Refresher.RescanInterval, "rescan-interval", d.Refresher.RescanInterval, "interval of full scans of the state directory")
	f.fs.StringVar(&f.set.Refresher.LogLevel, "log-level", d.Refresher.LogLevel, "info, or debug to log every rotation")
	f.fs.StringVar(&f.set.Refresher.MetricsSocket, "metrics-socket", "", "unix socket for /metrics, /healthz, /readyz and /status (default <state_dir>/refresher.sock)")
	f.fs.StringVar(&f.set.Refresher.MetricsAddress, "metrics-address", "", "also serve /metrics, /healthz and /readyz on this TCP host:port")
}

// Path is the configuration file Load reads.
func (f *Flags) Path() string { return f.path }

// Load reads the configuration file named by --config (a missing file is an
// error only when --config was given), applies the flags that were set and
// validates the result. Call it after fs.Parse.
func (f *Flags) Load() (Config, error) {
	explicit := map[string]bool{}
	f.fs.Visit(func(fl *flag.Flag) { explicit[fl.Name] = true })

	c := Default()
	data, err := os.ReadFile(f.path)
	switch {
	case err == nil:
		if c, err = Parse(data); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", f.path, err)
		}
	case errors.Is(err, fs.ErrNotExist) && !explicit["config"]:
	default:
		return Config{}, fmt.Errorf("config: %w", err)
	}

	if explicit["agent-admin-socket"] {
		c.AgentAdminSocket = f.set.AgentAdminSocket
	}
	if explicit["state-dir"] {
		c.StateDir = f.set.StateDir
	}
	if explicit["allowed-agent-sockets"] {
		c.AllowedAgentSockets = f.set.AllowedAgentSockets
	}
	if explicit["timeout"] {
		c.Timeout = f.set.Timeout
	}
	if explicit["failure-policy"] {
		c.FailurePolicy = f.set.FailurePolicy
	}
	if explicit["require-refresher"] {
		c.RequireRefresher = f.set.RequireRefresher
	}
	if explicit["refresher-grace"] {
		c.RefresherGrace = f.set.RefresherGrace
	}
	if explicit["backoff-min"] {
		c.Refresher.BackoffMin = f.set.Refresher.BackoffMin
	}
	if explicit["backoff-max"] {
		c.Refresher.BackoffMax = f.set.Refresher.BackoffMax
	}
	if explicit["rescan-interval"] {
		c.Refresher.RescanInterval = f.set.Refresher.RescanInterval
	}
	if explicit["log-level"] {
		c.Refresher.LogLevel = f.set.Refresher.LogLevel
	}
	if explicit["metrics-socket"] {
		c.Refresher.MetricsSocket = f.set.Refresher.MetricsSocket
	}
	if explicit["metrics-address"] {
		c.Refresher.MetricsAddress = f.set.Refresher.MetricsAddress
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", f.path, err)
	}
	return c, nil
}
