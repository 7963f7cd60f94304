package spiretest

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	// HarnessPath is the path of the SPIFFE ID given to the test process.
	HarnessPath = "/spiretest/harness"

	startTimeout = 60 * time.Second
	stopTimeout  = 10 * time.Second
	logTailLines = 60
)

// Options configures Start.
type Options struct {
	// TrustDomain defaults to "example.org".
	TrustDomain string
	// AuthorizedDelegates are SPIFFE IDs allowed on the admin socket, in
	// addition to the harness's own ID (always added).
	AuthorizedDelegates []string
	// ExtraAgentPlugins is HCL added to the agent's plugins block, e.g. a
	// WorkloadAttestor "k8s" pointed at a fake kubelet.
	ExtraAgentPlugins string
	// ServerOnly starts the server alone: no join token, harness entry or
	// agent. A federation test's foreign trust domain needs no more.
	ServerOnly bool
	// BundleEndpoint serves the server's SPIFFE bundle endpoint on
	// 127.0.0.1:<free port> with the https_spiffe profile (see
	// BundleEndpointURL and Federate).
	BundleEndpoint bool
	// Version is the SPIRE line: V115 (the default, the primary line of
	// the tests) or V113 (the compatibility line).
	Version string
	// Broker serves the SPIFFE Broker API (experimental.broker, SPIRE
	// 1.15.2+) at s.BrokerSocket, for the harness and Brokers.
	Broker bool
	// Brokers are SPIFFE IDs the broker endpoint admits, in addition to
	// the harness's own ID (always added with Broker).
	Brokers []string
	// NoAdminSocket leaves admin_socket_path out of the agent's
	// configuration: no Delegated Identity API at all. Needs Broker; the
	// harness then waits for SVIDs through the Broker API.
	NoAdminSocket bool
}

// SPIRE is a running SPIRE server + agent pair.
type SPIRE struct {
	Dir            string // temp dir holding configs, data, sockets and logs
	ServerSocket   string // spire-server API socket (for the CLI -socketPath)
	WorkloadSocket string // agent Workload API socket
	AdminSocket    string // agent admin socket (Delegated Identity API); "" with NoAdminSocket
	BrokerSocket   string // agent SPIFFE Broker API socket; "" without Broker
	Version        string // the SPIRE version running (V113 or V115)
	TrustDomain    string
	AgentID        string // spiffe://<td>/spire/agent/join_token/<token>; parent of CreateEntry entries
	HarnessID      string // spiffe://<td>/spiretest/harness, the test process's identity
	ServerAddr     string // 127.0.0.1:<port>
	// BundleEndpointURL is https://127.0.0.1:<port> when
	// Options.BundleEndpoint is set.
	BundleEndpointURL string
	ServerLog         string
	AgentLog          string

	serverBin, agentBin string
	agentConf           string

	mu     sync.Mutex
	server *proc
	agent  *proc
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done is closed
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// RequireRoot skips the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("spiretest: skipping, needs root (the SPIRE agent must attest processes by pid via /proc and SO_PEERCRED); run `sudo go test` or as root")
	}
}

var (
	binMu    sync.Mutex
	binCache = map[string][2]string{}
)

// Binaries returns the paths of spire-server and spire-agent of the
// primary line (V115), building them when needed (see the package comment).
func Binaries(t testing.TB) (server, agent string) {
	t.Helper()
	return VersionBinaries(t, V115)
}

// VersionBinaries is Binaries for the SPIRE line version: V113 from
// test/spire into SPIRE_BIN_DIR, V115 from test/spire115 into
// SPIRE_BIN_DIR/spire-1.15.
func VersionBinaries(t testing.TB, version string) (server, agent string) {
	t.Helper()
	root := testhelp.RepoRoot(t)
	dir := os.Getenv("SPIRE_BIN_DIR")
	override := dir != ""
	if !override {
		dir = filepath.Join(root, "bin", "test")
	}
	module := "spire"
	switch version {
	case V113:
	case V115:
		dir, module = filepath.Join(dir, "spire-1.15"), "spire115"
	default:
		t.Fatalf("spiretest: unknown SPIRE version %q (want %s or %s)", version, V113, V115)
	}
	binMu.Lock()
	defer binMu.Unlock()
	if b, ok := binCache[dir]; ok {
		return b[0], b[1]
	}
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	if !override || !isExecutable(server) || !isExecutable(agent) {
		script := filepath.Join(root, "test", module, "build.sh")
		t.Logf("spiretest: running %s %s (first build takes minutes)", script, dir)
		start := time.Now()
		cmd := exec.Command(script, dir)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("spiretest: %s failed: %v\n%s", script, err, out)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Logf("spiretest: build took %s", d.Round(time.Second))
		}
	}
	for _, p := range []string{server, agent} {
		if !isExecutable(p) {
			t.Fatalf("spiretest: %s missing after build", p)
		}
	}
	binCache[dir] = [2]string{server, agent}
	return server, agent
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// Start starts a SPIRE server and agent; see the package comment.
func Start(t testing.TB, opts Options) *SPIRE {
	t.Helper()
	if opts.Version == "" {
		opts.Version = V115
	}
	if (opts.Broker || opts.NoAdminSocket) && opts.Version == V113 {
		t.Fatalf("spiretest: SPIRE %s serves no Broker API (1.15.2+)", opts.Version)
	}
	if opts.NoAdminSocket && !opts.Broker {
		t.Fatal("spiretest: NoAdminSocket needs Broker: the harness must reach the agent somehow")
	}
	serverBin, agentBin := VersionBinaries(t, opts.Version)

	td := opts.TrustDomain
	if td == "" {
		td = "example.org"
	}
	if _, err := spiffeid.TrustDomainFromString(td); err != nil {
		t.Fatalf("spiretest: bad trust domain %q: %v", td, err)
	}

	dir, err := os.MkdirTemp("/tmp", "spt-")
	if err != nil {
		t.Fatalf("spiretest: %v", err)
	}
	s := &SPIRE{
		Dir:            dir,
		ServerSocket:   filepath.Join(dir, "server", "api.sock"),
		WorkloadSocket: filepath.Join(dir, "workload", "api.sock"),
		AdminSocket:    filepath.Join(dir, "admin", "admin.sock"),
		Version:        opts.Version,
		TrustDomain:    td,
		HarnessID:      "spiffe://" + td + HarnessPath,
		ServerLog:      filepath.Join(dir, "server.log"),
		AgentLog:       filepath.Join(dir, "agent.log"),
		serverBin:      serverBin,
		agentBin:       agentBin,
		agentConf:      filepath.Join(dir, "agent.conf"),
	}
	if opts.NoAdminSocket {
		s.AdminSocket = ""
	}
	if opts.Broker {
		// Not in the Workload API socket's directory: SPIRE refuses that.
		s.BrokerSocket = filepath.Join(dir, "broker", "broker.sock")
	}
	for _, d := range []string{"server", "workload", "admin", "broker", "agent-data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatalf("spiretest: %v", err)
		}
	}
	if len(s.AdminSocket) > 100 || len(s.WorkloadSocket) > 100 || len(s.BrokerSocket) > 100 {
		t.Fatalf("spiretest: socket path too long: %s", s.AdminSocket)
	}
	t.Cleanup(func() { s.cleanup(t) })

	port := freePort(t)
	s.ServerAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	federation := ""
	if opts.BundleEndpoint {
		bport := freePort(t)
		s.BundleEndpointURL = "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(bport))
		// A one-minute hint (SPIRE's floor): a federated server polls
		// this endpoint every 15 s or so.
		federation = fmt.Sprintf(`
    federation {
        bundle_endpoint {
            address = "127.0.0.1"
            port = %d
            refresh_hint = "1m"
            profile "https_spiffe" {}
        }
    }`, bport)
	}

	serverConf := filepath.Join(dir, "server.conf")
	writeFile(t, serverConf, fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    ca_ttl = "24h"
    default_x509_svid_ttl = "1h"
    experimental {
        # Reload the authorized-entry cache every second (default 5s) so
        # new entries reach agents quickly.
        cache_reload_interval = "1s"
    }%s
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, port, s.ServerSocket, td, filepath.Join(dir, "server"), federation, filepath.Join(dir, "server", "datastore.sqlite3")))

	s.server = s.spawn(t, "server", serverBin, s.ServerLog, "run", "-config", serverConf)
	s.waitServer(t)
	if opts.ServerOnly {
		return s
	}

	// Join token for the agent.
	out := s.ServerCLI(t, "token", "generate", "-socketPath", s.ServerSocket, "-ttl", "3600", "-output", "json")
	var tok struct {
		Value string `json:"value"`
	}
	if err := json.Unmarshal(out, &tok); err != nil || tok.Value == "" {
		t.Fatalf("spiretest: parsing token generate output %q: %v", out, err)
	}
	s.AgentID = "spiffe://" + td + "/spire/agent/join_token/" + tok.Value

	// Identity for the test process itself, so it can use the admin API.
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("spiretest: %v", err)
	}
	if r, err := filepath.EvalSymlinks(exe); err == nil {
		exe = r
	}
	s.CreateEntry(t, s.HarnessID, []string{
		"unix:uid:" + strconv.Itoa(os.Getuid()),
		"unix:path:" + exe,
	}, 0)

	delegates := append([]string{s.HarnessID}, opts.AuthorizedDelegates...)
	var dl []string
	for _, d := range delegates {
		dl = append(dl, strconv.Quote(d))
	}
	admin := ""
	if s.AdminSocket != "" {
		admin = fmt.Sprintf("admin_socket_path = %q\n    authorized_delegates = [%s]", s.AdminSocket, strings.Join(dl, ", "))
	}
	writeFile(t, s.agentConf, fmt.Sprintf(`agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = %q
    %s
    trust_domain = %q
    insecure_bootstrap = true
    join_token = %q
    experimental {
        # Poll the server for entries every second (default 5s).
        sync_interval = "1s"
%s
    }
}

plugins {
    KeyManager "disk" {
        plugin_data {
            directory = %q
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = true
        }
    }
%s
}
`, filepath.Join(dir, "agent-data"), port, s.WorkloadSocket, admin, td, tok.Value,
		s.brokerConfig(opts), filepath.Join(dir, "agent-data"), opts.ExtraAgentPlugins))

	s.StartAgent(t)
	return s
}

func (s *SPIRE) waitServer(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		if s.server.exited() {
			s.dumpLogs(t)
			t.Fatalf("spiretest: spire-server exited during startup: %v", s.server.err)
		}
		cmd := exec.Command(s.serverBin, "healthcheck", "-socketPath", s.ServerSocket)
		if err := cmd.Run(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.dumpLogs(t)
			t.Fatalf("spiretest: spire-server not healthy after %s", startTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// spawn starts a process in its own process group with output appended to logPath.
func (s *SPIRE) spawn(t testing.TB, name, bin, logPath string, args ...string) *proc {
	t.Helper()
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("spiretest: %v", err)
	}
	defer lf.Close()
	fmt.Fprintf(lf, "=== spiretest: starting %s at %s\n", name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(bin, args...)
	cmd.Dir = s.Dir
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("spiretest: starting %s: %v", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p
}

// stop signals p and waits; escalates to SIGKILL after stopTimeout.
func stop(p *proc, sig syscall.Signal) error {
	if p == nil || p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("did not exit %s after %s, killed", sig, stopTimeout)
	}
}

// StartAgent starts the agent (again) with the same config and data dir and
// waits until the admin API authorizes the harness, i.e. the agent has its
// SVID and has synced entries. A restarted agent re-uses the SVID saved in
// its data dir (KeyManager "disk").
func (s *SPIRE) StartAgent(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	if s.agent != nil && !s.agent.exited() {
		s.mu.Unlock()
		t.Fatalf("spiretest: StartAgent: agent already running")
	}
	s.agent = s.spawn(t, "agent", s.agentBin, s.AgentLog, "run", "-config", s.agentConf)
	s.mu.Unlock()
	if s.AdminSocket == "" {
		// The Broker API needs the harness's own SVID first.
		s.harnessBroker(t, true)
	}
	s.WaitForSVID(t, os.Getpid(), s.HarnessID, startTimeout)
}

// StopAgent stops the agent with SIGTERM and waits for it to exit.
func (s *SPIRE) StopAgent(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.agent == nil || s.agent.exited() {
		t.Fatalf("spiretest: StopAgent: agent not running")
	}
	if err := stop(s.agent, syscall.SIGTERM); err != nil {
		t.Errorf("spiretest: StopAgent: %v", err)
	}
}

// KillAgent kills the agent with SIGKILL and waits for it to exit. Socket
// files may be left behind (connections to them are refused).
func (s *SPIRE) KillAgent(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.agent == nil || s.agent.exited() {
		t.Fatalf("spiretest: KillAgent: agent not running")
	}
	_ = stop(s.agent, syscall.SIGKILL)
}

// AgentRunning reports whether the agent process is running.
func (s *SPIRE) AgentRunning() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.agent != nil && !s.agent.exited()
}

func (s *SPIRE) cleanup(t testing.TB) {
	s.mu.Lock()
	agent, server := s.agent, s.server
	s.mu.Unlock()
	if err := stop(agent, syscall.SIGTERM); err != nil {
		t.Logf("spiretest: agent: %v", err)
	}
	if err := stop(server, syscall.SIGTERM); err != nil {
		t.Logf("spiretest: server: %v", err)
	}
	if t.Failed() {
		s.dumpLogs(t)
	}
	if os.Getenv("SPIRETEST_KEEP") != "" {
		t.Logf("spiretest: keeping %s", s.Dir)
		return
	}
	_ = os.RemoveAll(s.Dir)
}

func (s *SPIRE) dumpLogs(t testing.TB) {
	for _, f := range []string{s.ServerLog, s.AgentLog} {
		t.Logf("spiretest: last %d lines of %s:\n%s", logTailLines, f, tail(f, logTailLines))
	}
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("spiretest: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatalf("spiretest: %v", err)
	}
}
