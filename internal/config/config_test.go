package config

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDefaultValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	d := Default()
	if d.Timeout != 40*time.Second || d.RegistrationWait != 30*time.Second || d.EntryWait() != 30*time.Second || d.FailurePolicy != FailClosed || d.AgentAdminSocket != "/run/spire/agent/admin/admin.sock" || d.StateDir != "/run/spiffe-oci-hook" {
		t.Fatalf("Default() = %+v", d)
	}
}

func TestParse(t *testing.T) {
	c, err := Parse([]byte(`
agent_api: broker
agent_admin_socket: /run/agent/admin.sock
broker_socket: /run/agent/broker.sock
workload_api_socket: /run/agent/api.sock
broker_spiffe_id: spiffe://example.org/node/refresher
allowed_agent_sockets: [/run/other/admin.sock, /run/third.sock]
state_dir: /dev/shm/hook
state_budget_mib: 32
timeout: 3s
registration_wait: 2s
failure_policy: fail-open
require_refresher: true
refresher_grace: 90s
refresher:
  backoff_min: 250ms
  backoff_max: 1m
  rescan_interval: 1h30m
  log_level: debug
  metrics_socket: /run/m.sock
  metrics_address: 127.0.0.1:9464
  audit:
    interval: 15s
    runtime_roots: [/run/runc, /run/containerd/runc/*]
    cri_sockets: []
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		AgentAPI:            APIBroker,
		AgentAdminSocket:    "/run/agent/admin.sock",
		BrokerSocket:        "/run/agent/broker.sock",
		WorkloadAPISocket:   "/run/agent/api.sock",
		BrokerSPIFFEID:      "spiffe://example.org/node/refresher",
		AllowedAgentSockets: []string{"/run/other/admin.sock", "/run/third.sock"},
		StateDir:            "/dev/shm/hook",
		StateBudgetMiB:      32,
		Timeout:             3 * time.Second,
		RegistrationWait:    2 * time.Second,
		FailurePolicy:       FailOpen,
		RequireRefresher:    true,
		RefresherGrace:      90 * time.Second,
		Refresher: Refresher{
			BackoffMin:     250 * time.Millisecond,
			BackoffMax:     time.Minute,
			RescanInterval: 90 * time.Minute,
			LogLevel:       LogDebug,
			MetricsSocket:  "/run/m.sock",
			MetricsAddress: "127.0.0.1:9464",
			Audit:          Audit{Interval: 15 * time.Second, RuntimeRoots: []string{"/run/runc", "/run/containerd/runc/*"}, CRISockets: []string{}},
		},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Parse() = %+v, want %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestParsePartialKeepsDefaults(t *testing.T) {
	c, err := Parse([]byte("timeout: 3s\nrefresher:\n  backoff_max: 2m\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Timeout = 3 * time.Second
	want.Refresher.BackoffMax = 2 * time.Minute
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Parse() = %+v, want %+v", c, want)
	}
}

func TestParseEmpty(t *testing.T) {
	for _, in := range []string{"", "\n", "# only a comment\n"} {
		c, err := Parse([]byte(in))
		if err != nil {
			t.Fatalf("Parse(%q) error %v", in, err)
		}
		if !reflect.DeepEqual(c, Default()) {
			t.Fatalf("Parse(%q) = %+v, want defaults", in, c)
		}
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"unknown key", "agent_socket: /run/a.sock\n", "agent_socket"},
		{"misspelt nested key", "refresher:\n  backoff: 1s\n", "backoff"},
		{"dash key", "state-dir: /run/x\n", "state-dir"},
		{"bad duration", "timeout: soon\n", "line 1: cannot unmarshal !!str `soon` into time.Duration"},
		{"integer duration", "timeout: 3\n", ""},
		{"list document", "- a\n", ""},
		{"malformed", "timeout: [3s\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.in))
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, want error", tt.in, c)
			}
			if !reflect.DeepEqual(c, Config{}) {
				t.Errorf("Parse returned %+v with error", c)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*Config)
		want   string
	}{
		{"relative agent socket", func(c *Config) { c.AgentAdminSocket = "admin.sock" }, `agent_admin_socket "admin.sock" must be an absolute path`},
		{"empty agent socket", func(c *Config) { c.AgentAdminSocket = "" }, "agent_admin_socket"},
		{"unknown agent api", func(c *Config) { c.AgentAPI = "brokered" }, `agent_api "brokered" must be "delegated" or "broker"`},
		{"relative broker socket", func(c *Config) { c.BrokerSocket = "broker.sock" }, `broker_socket "broker.sock" must be an absolute path`},
		{"relative workload socket", func(c *Config) { c.WorkloadAPISocket = "api.sock" }, `workload_api_socket "api.sock" must be an absolute path`},
		{"broker id not a SPIFFE ID", func(c *Config) { c.BrokerSPIFFEID = "https://example.org/x" }, `broker_spiffe_id "https://example.org/x"`},
		{"relative allowed socket", func(c *Config) { c.AllowedAgentSockets = []string{"/ok.sock", "rel.sock"} }, `allowed_agent_sockets entry "rel.sock"`},
		{"relative state dir", func(c *Config) { c.StateDir = "run/hook" }, `state_dir "run/hook" must be an absolute path`},
		{"zero state budget", func(c *Config) { c.StateBudgetMiB = 0 }, `state_budget_mib 0 must be positive`},
		{"zero timeout", func(c *Config) { c.Timeout = 0 }, "timeout 0s must be positive"},
		{"negative timeout", func(c *Config) { c.Timeout = -time.Second }, "timeout -1s must be positive"},
		{"unknown policy", func(c *Config) { c.FailurePolicy = "fail-closd" }, `failure_policy "fail-closd" must be "fail-closed" or "fail-open"`},
		{"empty policy", func(c *Config) { c.FailurePolicy = "" }, "failure_policy"},
		{"zero backoff min", func(c *Config) { c.Refresher.BackoffMin = 0 }, "backoff_min"},
		{"backoff max below min", func(c *Config) { c.Refresher.BackoffMin = time.Minute; c.Refresher.BackoffMax = time.Second }, "backoff_min 1m0s and backoff_max 1s"},
		{"zero rescan", func(c *Config) { c.Refresher.RescanInterval = 0 }, "rescan_interval 0s must be positive"},
		{"log level", func(c *Config) { c.Refresher.LogLevel = "trace" }, `log_level "trace"`},
		{"relative metrics socket", func(c *Config) { c.Refresher.MetricsSocket = "m.sock" }, `metrics_socket "m.sock"`},
		{"zero audit interval", func(c *Config) { c.Refresher.Audit.Interval = 0 }, "audit.interval 0s must be positive"},
		{"audit interval too long", func(c *Config) { c.Refresher.Audit.Interval = time.Hour }, "at most 5m0s"},
		{"relative runtime root", func(c *Config) { c.Refresher.Audit.RuntimeRoots = []string{"run/runc"} }, `"run/runc" must be an absolute path`},
		{"bad runtime root pattern", func(c *Config) { c.Refresher.Audit.RuntimeRoots = []string{"/run/[x"} }, `"/run/[x"`},
		{"metrics address without port", func(c *Config) { c.Refresher.MetricsAddress = "localhost" }, `metrics_address "localhost"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.modify(&c)
			err := c.Validate()
			if err == nil {
				t.Fatalf("Validate(%+v) = nil", c)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not contain %q", err, tt.want)
			}
		})
	}
	c := Default()
	c.Refresher.BackoffMax = c.Refresher.BackoffMin
	if err := c.Validate(); err != nil {
		t.Fatalf("backoff_max == backoff_min: %v", err)
	}
}

func TestAgentSocketAllowed(t *testing.T) {
	c := Default()
	c.AllowedAgentSockets = []string{"/run/other/admin.sock"}
	for socket, want := range map[string]bool{
		c.AgentAdminSocket:                   true,
		"/run/other/admin.sock":              true,
		"/run/other/admin.sock/":             false,
		"/run/other//admin.sock":             false,
		"/run/other/../other/admin.sock":     false,
		"/tmp/agent.sock":                    false,
		"":                                   false,
		"/run/spire/agent/admin/admin.sock2": false,
	} {
		if got := c.AgentSocketAllowed(socket); got != want {
			t.Errorf("AgentSocketAllowed(%q) = %v, want %v", socket, got, want)
		}
	}
	// With the Broker API the node's socket is broker_socket; the admin
	// socket is no longer one a container may name.
	c.AgentAPI = APIBroker
	if c.NodeAgentSocket() != c.BrokerSocket || !c.AgentSocketAllowed(c.BrokerSocket) || c.AgentSocketAllowed(c.AgentAdminSocket) {
		t.Errorf("agent_api broker: node socket %q, broker socket allowed %v, admin socket allowed %v",
			c.NodeAgentSocket(), c.AgentSocketAllowed(c.BrokerSocket), c.AgentSocketAllowed(c.AgentAdminSocket))
	}
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func load(t *testing.T, refresher bool, args ...string) (Config, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f := Bind(fs)
	if refresher {
		f.BindRefresher()
	}
	if err := fs.Parse(args); err != nil {
		t.Fatalf("flag parse: %v", err)
	}
	return f.Load()
}

func TestFlagsFileThenFlags(t *testing.T) {
	p := writeFile(t, `
agent_admin_socket: /file/admin.sock
allowed_agent_sockets: [/file/other.sock]
state_dir: /file/state
timeout: 4s
failure_policy: fail-open
require_refresher: true
refresher_grace: 45s
refresher:
  backoff_min: 2s
  backoff_max: 20s
  rescan_interval: 5m
`)
	fileCfg := Config{
		AgentAPI:            APIDelegated,
		AgentAdminSocket:    "/file/admin.sock",
		BrokerSocket:        Default().BrokerSocket,
		WorkloadAPISocket:   Default().WorkloadAPISocket,
		AllowedAgentSockets: []string{"/file/other.sock"},
		StateDir:            "/file/state",
		StateBudgetMiB:      DefaultStateBudgetMiB,
		Timeout:             4 * time.Second,
		RegistrationWait:    Default().RegistrationWait,
		FailurePolicy:       FailOpen,
		RequireRefresher:    true,
		RefresherGrace:      45 * time.Second,
		Refresher:           Refresher{BackoffMin: 2 * time.Second, BackoffMax: 20 * time.Second, RescanInterval: 5 * time.Minute, LogLevel: LogInfo, Audit: Default().Refresher.Audit},
	}

	// No flag set: the file's values, not the flags' defaults.
	c, err := load(t, true, "--config", p)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, fileCfg) {
		t.Fatalf("Load() = %+v, want %+v", c, fileCfg)
	}

	// One flag set: only that value changes.
	c, err = load(t, true, "--config", p, "--timeout", "7s")
	if err != nil {
		t.Fatal(err)
	}
	want := fileCfg
	want.Timeout = 7 * time.Second
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Load() = %+v, want %+v", c, want)
	}

	// A flag set to the default value still wins over the file.
	c, err = load(t, false, "--config", p, "--failure-policy", FailClosed)
	if err != nil {
		t.Fatal(err)
	}
	want = fileCfg
	want.FailurePolicy = FailClosed
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Load() = %+v, want %+v", c, want)
	}

	// Every flag set.
	c, err = load(t, true, "--config", p,
		"--agent-api", "broker",
		"--agent-admin-socket", "/flag/admin.sock",
		"--broker-socket", "/flag/broker.sock",
		"--workload-api-socket", "/flag/api.sock",
		"--state-dir", "/flag/state",
		"--state-budget-mib", "200",
		"--timeout", "1s",
		"--registration-wait", "700ms",
		"--failure-policy", FailClosed,
		"--require-refresher=false",
		"--refresher-grace", "3s",
		"--backoff-min", "1s",
		"--backoff-max", "9s",
		"--rescan-interval", "1m",
		"--log-level", "debug",
		"--metrics-socket", "/flag/m.sock",
		"--metrics-address", ":9464",
		"--audit-interval", "10s",
		"--runtime-roots", "/flag/runc,/flag/crun/*",
		"--cri-sockets", "/flag/cri.sock",
	)
	if err != nil {
		t.Fatal(err)
	}
	want = Config{
		AgentAPI:            APIBroker,
		AgentAdminSocket:    "/flag/admin.sock",
		BrokerSocket:        "/flag/broker.sock",
		WorkloadAPISocket:   "/flag/api.sock",
		AllowedAgentSockets: []string{"/file/other.sock"},
		StateDir:            "/flag/state",
		StateBudgetMiB:      200,
		Timeout:             time.Second,
		RegistrationWait:    700 * time.Millisecond,
		FailurePolicy:       FailClosed,
		RefresherGrace:      3 * time.Second,
		Refresher: Refresher{BackoffMin: time.Second, BackoffMax: 9 * time.Second, RescanInterval: time.Minute, LogLevel: LogDebug, MetricsSocket: "/flag/m.sock", MetricsAddress: ":9464",
			Audit: Audit{Interval: 10 * time.Second, RuntimeRoots: []string{"/flag/runc", "/flag/crun/*"}, CRISockets: []string{"/flag/cri.sock"}}},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Load() = %+v, want %+v", c, want)
	}
}

func TestFlagsErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.yaml")
	if _, err := load(t, false, "--config", missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("explicit missing --config: error = %v", err)
	}

	bad := writeFile(t, "timeot: 3s\n")
	if _, err := load(t, false, "--config", bad); err == nil || !strings.Contains(err.Error(), "config "+bad) || !strings.Contains(err.Error(), "timeot") {
		t.Fatalf("unknown key: error = %v", err)
	}

	// The result is validated after the flags apply.
	good := writeFile(t, "timeout: 3s\n")
	if _, err := load(t, false, "--config", good, "--state-dir", "relative"); err == nil || !strings.Contains(err.Error(), `state_dir "relative"`) {
		t.Fatalf("relative --state-dir: error = %v", err)
	}
	invalid := writeFile(t, "failure_policy: sometimes\n")
	if _, err := load(t, false, "--config", invalid); err == nil || !strings.Contains(err.Error(), `failure_policy "sometimes"`) {
		t.Fatalf("invalid file value: error = %v", err)
	}
	// A flag can repair what the file got wrong.
	if c, err := load(t, false, "--config", invalid, "--failure-policy", FailOpen); err != nil || c.FailurePolicy != FailOpen || c.Timeout != Default().Timeout {
		t.Fatalf("flag over invalid file: %+v, %v", c, err)
	}

	// A directory is not a missing file.
	if _, err := load(t, false, "--config", t.TempDir()); err == nil {
		t.Fatal("--config naming a directory: no error")
	}
}

// The default path, when missing, means defaults. The test points the
// flag's default at a missing temporary path without setting the flag, so it
// does not depend on /etc of the machine.
func TestFlagsMissingDefaultPath(t *testing.T) {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f := Bind(fs)
	f.BindRefresher()
	if got := fs.Lookup("config").DefValue; got != DefaultPath {
		t.Fatalf("--config default = %q, want %q", got, DefaultPath)
	}
	f.path = filepath.Join(t.TempDir(), "absent.yaml")
	if err := fs.Parse([]string{"--timeout", "2s"}); err != nil {
		t.Fatal(err)
	}
	c, err := f.Load()
	if err != nil {
		t.Fatalf("missing default file: %v", err)
	}
	want := Default()
	want.Timeout = 2 * time.Second
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Load() = %+v, want %+v", c, want)
	}

	// Without any flag: exactly the defaults.
	fs = flag.NewFlagSet("test", flag.ContinueOnError)
	f = Bind(fs)
	f.path = filepath.Join(t.TempDir(), "absent.yaml")
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if c, err := f.Load(); err != nil || !reflect.DeepEqual(c, Default()) {
		t.Fatalf("Load() = %+v, %v; want defaults", c, err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("")
	f.Add("timeout: 3s\n")
	f.Add("agent_admin_socket: /run/a.sock\nallowed_agent_sockets: [/b]\nstate_dir: /s\nfailure_policy: fail-open\nrefresher:\n  backoff_min: 1s\n  backoff_max: 2s\n  rescan_interval: 3s\n")
	f.Add("unknown: 1\n")
	f.Add("timeout: 3\n")
	f.Add("- a\n")
	f.Add("a: &a [x,x,x]\nb: &b [*a,*a,*a]\n")
	f.Fuzz(func(t *testing.T, in string) {
		c, err := Parse([]byte(in))
		if err != nil {
			if !reflect.DeepEqual(c, Config{}) {
				t.Fatalf("Parse returned %+v with error %v", c, err)
			}
			return
		}
		// Validate must not panic, whatever was parsed.
		_ = c.Validate()
		if !c.AgentSocketAllowed(c.NodeAgentSocket()) {
			t.Fatalf("the configured agent socket %q is not allowed", c.NodeAgentSocket())
		}
	})
}

// TestRestartOnly: the settings a running refresher cannot take on reload
// are named; the others may change.
func TestRestartOnly(t *testing.T) {
	cur := Default()
	if got := cur.StatusSocket(); got != "/run/spiffe-oci-hook/refresher.sock" {
		t.Errorf("StatusSocket() = %q", got)
	}
	live := cur
	live.Refresher.LogLevel = LogDebug
	live.Refresher.RescanInterval = time.Minute
	live.Refresher.BackoffMax = time.Hour
	live.AgentAdminSocket = "/run/other.sock"
	live.FailurePolicy = FailOpen
	live.Refresher.MetricsSocket = cur.StatusSocket() // the same socket, spelled out
	if err := RestartOnly(cur, live); err != nil {
		t.Errorf("live settings refused: %v", err)
	}
	for _, tc := range []struct {
		key    string
		mutate func(*Config)
	}{
		{"state_dir", func(c *Config) { c.StateDir = "/run/elsewhere" }},
		{"refresher.metrics_socket", func(c *Config) { c.Refresher.MetricsSocket = "/run/m.sock" }},
		{"refresher.metrics_address", func(c *Config) { c.Refresher.MetricsAddress = ":9464" }},
		{"agent_api", func(c *Config) { c.AgentAPI = APIBroker }},
		{"workload_api_socket", func(c *Config) { c.WorkloadAPISocket = "/run/other/api.sock" }},
		{"broker_spiffe_id", func(c *Config) { c.BrokerSPIFFEID = "spiffe://example.org/b" }},
	} {
		next := cur
		tc.mutate(&next)
		if err := RestartOnly(cur, next); err == nil || !strings.HasPrefix(err.Error(), tc.key+" cannot change") {
			t.Errorf("%s changed: error = %v", tc.key, err)
		}
	}
}

// TestRefresherKeys: require_refresher and refresher_grace parse, their
// flags win over the file, a non-positive grace is refused, and the
// heartbeat stays well inside the grace.
func TestRefresherKeys(t *testing.T) {
	p := writeFile(t, "require_refresher: true\nrefresher_grace: 8s\n")
	c, err := load(t, false, "--config", p)
	if err != nil {
		t.Fatal(err)
	}
	if !c.RequireRefresher || c.RefresherGrace != 8*time.Second {
		t.Errorf("file: require_refresher %v, refresher_grace %s", c.RequireRefresher, c.RefresherGrace)
	}
	if c, err = load(t, false, "--config", p, "--require-refresher=false", "--refresher-grace", "1m"); err != nil {
		t.Fatal(err)
	}
	if c.RequireRefresher || c.RefresherGrace != time.Minute {
		t.Errorf("flags: require_refresher %v, refresher_grace %s", c.RequireRefresher, c.RefresherGrace)
	}
	if d := Default(); d.RequireRefresher || d.RefresherGrace != 2*time.Minute {
		t.Errorf("defaults: require_refresher %v, refresher_grace %s", d.RequireRefresher, d.RefresherGrace)
	}
	if _, err := load(t, false, "--config", writeFile(t, "refresher_grace: 0s\n")); err == nil || !strings.Contains(err.Error(), "refresher_grace") {
		t.Errorf("refresher_grace 0s: %v", err)
	}
	for _, grace := range []time.Duration{time.Second, 8 * time.Second, 2 * time.Minute, time.Hour} {
		c := Config{RefresherGrace: grace}
		if i := c.HeartbeatInterval(); i <= 0 || i > grace/2 {
			t.Errorf("grace %s: heartbeat every %s", grace, i)
		}
	}
}

// TestEntryWait: the wait stays inside timeout with room for the rest of
// the exchange, so a file written before registration_wait existed
// (timeout 10s) stays valid.
func TestEntryWait(t *testing.T) {
	for _, c := range []struct{ timeout, wait, want time.Duration }{
		{40 * time.Second, 30 * time.Second, 30 * time.Second},
		{10 * time.Second, 30 * time.Second, 5 * time.Second},
		{4 * time.Second, 30 * time.Second, 2 * time.Second},
		{40 * time.Second, 0, 0},
		{20 * time.Second, 15 * time.Second, 15 * time.Second},
	} {
		cfg := Default()
		cfg.Timeout, cfg.RegistrationWait = c.timeout, c.wait
		if err := cfg.Validate(); err != nil {
			t.Fatalf("timeout %s, registration_wait %s: %v", c.timeout, c.wait, err)
		}
		if got := cfg.EntryWait(); got != c.want {
			t.Errorf("timeout %s, registration_wait %s: EntryWait() = %s, want %s", c.timeout, c.wait, got, c.want)
		}
	}
	cfg := Default()
	cfg.RegistrationWait = -time.Second
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "registration_wait") {
		t.Fatalf("negative registration_wait: %v", err)
	}
}
