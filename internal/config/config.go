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

	"github.com/spiffe/go-spiffe/v2/spiffeid"
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

// Agent APIs (agent_api).
const (
	// APIDelegated is SPIRE's Delegated Identity API on the admin socket.
	APIDelegated = "delegated"
	// APIBroker is the SPIFFE Broker API (SPIRE 1.15.2+, experimental.broker).
	APIBroker = "broker"
)

// Config is the node configuration.
type Config struct {
	// AgentAPI is the agent API the hook and the refresher speak:
	// APIDelegated (the default) or APIBroker.
	AgentAPI string `yaml:"agent_api"`
	// AgentAdminSocket is the SPIRE agent's admin socket (admin_socket_path),
	// which serves the Delegated Identity API.
	AgentAdminSocket string `yaml:"agent_admin_socket"`
	// BrokerSocket is the agent's SPIFFE Broker API socket
	// (experimental.broker.socket_path), used with APIBroker.
	BrokerSocket string `yaml:"broker_socket"`
	// WorkloadAPISocket is the agent's Workload API socket, from which the
	// refresher fetches its own X.509-SVID, the broker SVID (APIBroker).
	WorkloadAPISocket string `yaml:"workload_api_socket"`
	// BrokerSPIFFEID picks, among the refresher's own SVIDs from the
	// Workload API, the one to present to the Broker API (one listed in
	// the agent's brokers). Empty: the Workload API's default SVID.
	BrokerSPIFFEID string `yaml:"broker_spiffe_id"`
	// AllowedAgentSockets lists further agent sockets (admin or broker,
	// as agent_api says) that a container's spire_agent_address may name.
	// The node's own (NodeAgentSocket) is always allowed.
	AllowedAgentSockets []string `yaml:"allowed_agent_sockets"`
	// StateDir holds the per-container files and records. It must be on
	// tmpfs: keys never touch persistent disk.
	StateDir string `yaml:"state_dir"`
	// StateBudgetMiB bounds what the state directory holds, in MiB: the
	// hook refuses a container whose files would take it past. Those
	// files are tmpfs pages charged to the refresher's memory, and a pod
	// chooses how many deliveries it asks for; size the refresher's
	// memory limit from it (BENCHMARKS.md, "The state budget").
	StateBudgetMiB int `yaml:"state_budget_mib"`
	// Timeout bounds the hook's whole exchange with the agent. Keep it below
	// the timeout in the hooks.d JSON so the hook, not the runtime, reports.
	Timeout time.Duration `yaml:"timeout"`
	// RegistrationWait is how long the hook waits, within Timeout, for an
	// identity that is on its way: the agent answers a pid no entry matches
	// yet with an empty update, and a new pod's entry (written by
	// spire-controller-manager once the pod is scheduled) reaches the agent
	// seconds later. Unavailable agents are retried within it too. Zero:
	// the agent's first answer decides. The hook waits at most EntryWait.
	RegistrationWait time.Duration `yaml:"registration_wait"`
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
	// Audit is the audit of running containers (package audit).
	Audit Audit `yaml:"audit"`
}

// Audit configures the refresher's audit: every running container on the
// node that asked for an identity is checked against the deliveries made.
type Audit struct {
	// Interval between audits (the first runs at start). At most
	// MaxAuditInterval, so that an unserved container is reported soon.
	Interval time.Duration `yaml:"interval"`
	// RuntimeRoots are the OCI runtimes' state directories (runc's and
	// crun's --root), shell patterns allowed: CRI-O, Podman and plain runc
	// use /run/runc or /run/crun, containerd /run/containerd/runc/<namespace>.
	RuntimeRoots []string `yaml:"runtime_roots"`
	// CRISockets are CRI runtime sockets asked for their pods' annotations
	// (containerd keeps a pod's annotations out of its containers' specs
	// unless spiffe-oci-nri copies them). Missing sockets are skipped;
	// shell patterns allowed.
	CRISockets []string `yaml:"cri_sockets"`
}

// MaxAuditInterval bounds refresher.audit.interval.
const MaxAuditInterval = 5 * time.Minute

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
		{"agent_api", cur.AgentAPI, next.AgentAPI},
		{"workload_api_socket", cur.WorkloadAPISocket, next.WorkloadAPISocket},
		{"broker_spiffe_id", cur.BrokerSPIFFEID, next.BrokerSPIFFEID},
		{"refresher.metrics_socket", cur.StatusSocket(), next.StatusSocket()},
		{"refresher.metrics_address", cur.Refresher.MetricsAddress, next.Refresher.MetricsAddress},
	} {
		if s.a != s.b {
			return fmt.Errorf("%s cannot change while the refresher runs (%q -> %q): restart it", s.key, s.a, s.b)
		}
	}
	return nil
}

// DefaultStateBudgetMiB is state_budget_mib's default: the budget the
// DaemonSet's 160 MiB memory limit for the refresher was sized at
// (BENCHMARKS.md, "The state budget").
const DefaultStateBudgetMiB = 64

// Default returns the configuration used when no file and no flag says otherwise.
func Default() Config {
	return Config{
		AgentAPI:          APIDelegated,
		AgentAdminSocket:  "/run/spire/agent/admin/admin.sock",
		BrokerSocket:      "/run/spire/agent/broker/broker.sock",
		WorkloadAPISocket: "/run/spire/agent/public/api.sock",
		StateDir:          "/run/spiffe-oci-hook",
		StateBudgetMiB:    DefaultStateBudgetMiB,
		Timeout:           40 * time.Second,
		RegistrationWait:  30 * time.Second,
		FailurePolicy:     FailClosed,
		RefresherGrace:    2 * time.Minute,
		Refresher: Refresher{
			BackoffMin:     500 * time.Millisecond,
			BackoffMax:     30 * time.Second,
			RescanInterval: 30 * time.Second,
			LogLevel:       LogInfo,
			Audit: Audit{
				Interval:     30 * time.Second,
				RuntimeRoots: []string{"/run/runc", "/run/crun", "/run/containerd/runc/*"},
				CRISockets:   []string{"/run/containerd/containerd.sock"},
			},
		},
	}
}

// EntryWait is how long the hook waits for a registration entry:
// RegistrationWait, kept inside Timeout with room for the rest of the
// exchange (5 s, or half of a Timeout under 10 s). A file written for an
// older version, with timeout 10s and no registration_wait, stays valid
// and waits 5 s.
func (c Config) EntryWait() time.Duration {
	return min(c.RegistrationWait, c.Timeout-min(5*time.Second, c.Timeout/2))
}

// Validate checks that a configuration is usable.
func (c Config) Validate() error {
	if c.AgentAPI != APIDelegated && c.AgentAPI != APIBroker {
		return fmt.Errorf("agent_api %q must be %q or %q", c.AgentAPI, APIDelegated, APIBroker)
	}
	if !filepath.IsAbs(c.AgentAdminSocket) {
		return fmt.Errorf("agent_admin_socket %q must be an absolute path", c.AgentAdminSocket)
	}
	if !filepath.IsAbs(c.BrokerSocket) {
		return fmt.Errorf("broker_socket %q must be an absolute path", c.BrokerSocket)
	}
	if !filepath.IsAbs(c.WorkloadAPISocket) {
		return fmt.Errorf("workload_api_socket %q must be an absolute path", c.WorkloadAPISocket)
	}
	if c.BrokerSPIFFEID != "" {
		if _, err := spiffeid.FromString(c.BrokerSPIFFEID); err != nil {
			return fmt.Errorf("broker_spiffe_id %q: %w", c.BrokerSPIFFEID, err)
		}
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
	if c.RegistrationWait < 0 {
		return fmt.Errorf("registration_wait %s must not be negative", c.RegistrationWait)
	}
	if c.StateBudgetMiB <= 0 {
		return fmt.Errorf("state_budget_mib %d must be positive", c.StateBudgetMiB)
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
	if a := r.Audit.Interval; a <= 0 || a > MaxAuditInterval {
		return fmt.Errorf("refresher audit.interval %s must be positive and at most %s", a, MaxAuditInterval)
	}
	for _, p := range append(slices.Clone(r.Audit.RuntimeRoots), r.Audit.CRISockets...) {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("refresher audit: %q must be an absolute path", p)
		}
		if _, err := filepath.Match(p, p); err != nil {
			return fmt.Errorf("refresher audit: %q: %w", p, err)
		}
	}
	if a := r.MetricsAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("refresher metrics_address %q must be host:port: %w", a, err)
		}
	}
	return nil
}

// NodeAgentSocket is the agent socket of the API in use: broker_socket
// with agent_api broker, agent_admin_socket otherwise.
func (c Config) NodeAgentSocket() string {
	if c.AgentAPI == APIBroker {
		return c.BrokerSocket
	}
	return c.AgentAdminSocket
}

// AgentSocketAllowed reports whether socket is one the node allows a
// container's annotation to name.
func (c Config) AgentSocketAllowed(socket string) bool {
	return socket == c.NodeAgentSocket() || slices.Contains(c.AllowedAgentSockets, socket)
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
	fs.StringVar(&f.set.AgentAPI, "agent-api", d.AgentAPI, "agent API: delegated (Delegated Identity API) or broker (SPIFFE Broker API)")
	fs.StringVar(&f.set.AgentAdminSocket, "agent-admin-socket", d.AgentAdminSocket, "SPIRE agent admin socket (Delegated Identity API)")
	fs.StringVar(&f.set.BrokerSocket, "broker-socket", d.BrokerSocket, "SPIRE agent SPIFFE Broker API socket (agent_api broker)")
	fs.StringVar(&f.set.WorkloadAPISocket, "workload-api-socket", d.WorkloadAPISocket, "SPIRE agent Workload API socket, source of the broker SVID (agent_api broker)")
	fs.StringVar(&f.set.BrokerSPIFFEID, "broker-spiffe-id", "", "which of the refresher's own SVIDs is the broker identity (default: the Workload API's default SVID)")
	fs.StringVar(&f.set.StateDir, "state-dir", d.StateDir, "state directory on tmpfs for per-container files and records")
	fs.DurationVar(&f.set.Timeout, "timeout", d.Timeout, "bound on the whole exchange with the agent")
	fs.DurationVar(&f.set.RegistrationWait, "registration-wait", d.RegistrationWait, "how long, within timeout, to wait for a registration entry on its way to the agent (0: the first answer decides)")
	fs.IntVar(&f.set.StateBudgetMiB, "state-budget-mib", d.StateBudgetMiB, "MiB the state directory may hold: the hook refuses a container whose files would take it past")
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
	f.fs.DurationVar(&f.set.Refresher.Audit.Interval, "audit-interval", d.Refresher.Audit.Interval, "interval of the audit of running containers")
	f.fs.Func("runtime-roots", "comma-separated OCI runtime state directories (patterns) the audit reads", func(v string) error {
		f.set.Refresher.Audit.RuntimeRoots = strings.Split(v, ",")
		return nil
	})
	f.fs.Func("cri-sockets", "comma-separated CRI sockets the audit asks for pod annotations", func(v string) error {
		f.set.Refresher.Audit.CRISockets = strings.Split(v, ",")
		return nil
	})
}

// override sets *setting to flag, when the flag named name was given.
func override[T any](explicit map[string]bool, name string, setting *T, flag T) {
	if explicit[name] {
		*setting = flag
	}
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

	override(explicit, "agent-api", &c.AgentAPI, f.set.AgentAPI)
	override(explicit, "agent-admin-socket", &c.AgentAdminSocket, f.set.AgentAdminSocket)
	override(explicit, "broker-socket", &c.BrokerSocket, f.set.BrokerSocket)
	override(explicit, "workload-api-socket", &c.WorkloadAPISocket, f.set.WorkloadAPISocket)
	override(explicit, "broker-spiffe-id", &c.BrokerSPIFFEID, f.set.BrokerSPIFFEID)
	override(explicit, "state-dir", &c.StateDir, f.set.StateDir)
	override(explicit, "allowed-agent-sockets", &c.AllowedAgentSockets, f.set.AllowedAgentSockets)
	override(explicit, "timeout", &c.Timeout, f.set.Timeout)
	override(explicit, "registration-wait", &c.RegistrationWait, f.set.RegistrationWait)
	override(explicit, "state-budget-mib", &c.StateBudgetMiB, f.set.StateBudgetMiB)
	override(explicit, "failure-policy", &c.FailurePolicy, f.set.FailurePolicy)
	override(explicit, "require-refresher", &c.RequireRefresher, f.set.RequireRefresher)
	override(explicit, "refresher-grace", &c.RefresherGrace, f.set.RefresherGrace)
	override(explicit, "backoff-min", &c.Refresher.BackoffMin, f.set.Refresher.BackoffMin)
	override(explicit, "backoff-max", &c.Refresher.BackoffMax, f.set.Refresher.BackoffMax)
	override(explicit, "rescan-interval", &c.Refresher.RescanInterval, f.set.Refresher.RescanInterval)
	override(explicit, "log-level", &c.Refresher.LogLevel, f.set.Refresher.LogLevel)
	override(explicit, "metrics-socket", &c.Refresher.MetricsSocket, f.set.Refresher.MetricsSocket)
	override(explicit, "metrics-address", &c.Refresher.MetricsAddress, f.set.Refresher.MetricsAddress)
	override(explicit, "audit-interval", &c.Refresher.Audit.Interval, f.set.Refresher.Audit.Interval)
	override(explicit, "runtime-roots", &c.Refresher.Audit.RuntimeRoots, f.set.Refresher.Audit.RuntimeRoots)
	override(explicit, "cri-sockets", &c.Refresher.Audit.CRISockets, f.set.Refresher.Audit.CRISockets)
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", f.path, err)
	}
	return c, nil
}
