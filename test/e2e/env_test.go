// Package e2e runs spiffe-oci-hook under real runtimes (runc, Podman)
// against a real SPIRE server and agent. It needs root, runc, podman and
// busybox-static (test/deps.sh installs them) and the pinned SPIRE
// binaries (test/spire115/build.sh and test/spire/build.sh build them):
// SPIRE 1.15.3 is the primary line, 1.13.3 runs a compatibility subset
// (compat_test.go), and broker_test.go runs the Broker API.
package e2e

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-tools/generate"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	trustDomain = "example.org"
	hookID      = "spiffe://example.org/spiffe-oci-hook"
	refresherID = "spiffe://example.org/spiffe-oci-refresher"
	workloadID  = "spiffe://example.org/workload/runc"
	annotation  = "identity.noderesource.dev/container"
)

var (
	repoRoot      string
	hookBin       string
	hookDirectBin string // beside hookBin, which runs it with no refresher
	refresherBin  string
	buildErr      error
	once          sync.Once
)

// requireRoot skips tests that cannot run without root and builds the hook.
func requireRoot(t *testing.T) {
	t.Helper()
	testhelp.SkipShort(t, "e2e")
	if os.Getuid() != 0 {
		t.Skip("e2e: needs root (mounts, runc, podman)")
	}
	testhelp.Installed(t, "e2e", "runc", "podman")
	once.Do(func() {
		wd, _ := os.Getwd()
		repoRoot = filepath.Dir(filepath.Dir(wd))
		hookBin = filepath.Join(repoRoot, "bin", "test", "spiffe-oci-hook")
		hookDirectBin = filepath.Join(repoRoot, "bin", "test", "spiffe-oci-hook-direct")
		refresherBin = filepath.Join(repoRoot, "bin", "test", "spiffe-oci-refresher")
		for bin, pkg := range map[string]string{hookBin: "hook", hookDirectBin: "hook/direct", refresherBin: "refresher"} {
			out, err := exec.Command("go", "build", "-o", bin, filepath.Join(repoRoot, pkg)).CombinedOutput()
			if err != nil {
				buildErr = fmt.Errorf("building %s: %v\n%s", pkg, err, out)
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

// env is one test's node: a SPIRE server and agent, a tmpfs state
// directory and a node configuration file for the hook.
type env struct {
	t        *testing.T
	spire    *spiretest.SPIRE
	dir      string
	stateDir string
	config   string
	// expected are containers the test makes run without their identity
	// (checkAudit).
	expected sync.Map
}

// newEnv starts SPIRE with the hook as an authorized delegate and registers
// the hook and a workload entry for containers started by runc: the
// selectors the unix attestor sees for "runc init" at createRuntime.
func newEnv(t *testing.T) *env {
	e := startEnv(t)
	e.spire.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + runcInitPath(t)}, time.Hour)
	e.waitSynced()
	return e
}

// startEnv starts SPIRE with the hook and the refresher as authorized
// delegates and registers both; workload entries are the caller's.
func startEnv(t *testing.T) *env {
	return startEnvWith(t, "")
}

// startEnvWith is startEnv with extra agent plugins (HCL).
func startEnvWith(t *testing.T, agentPlugins string) *env {
	return startEnvOptions(t, spiretest.Options{ExtraAgentPlugins: agentPlugins})
}

// The SPIRE line and the agent API the tests of this package run
// against: the primary line with the Delegated Identity API, unless a
// test runs others under withSPIRE.
var (
	spireVersion = spiretest.V115
	agentAPI     = config.APIDelegated
)

// withSPIRE runs the rest of t (and the envs it starts) against SPIRE
// version with agent API api. With the Broker API the agent has no admin
// socket at all, and the broker endpoint admits the refresher. Tests in
// this package do not run in parallel, so a package variable is enough.
func withSPIRE(t *testing.T, version, api string) {
	oldV, oldA := spireVersion, agentAPI
	spireVersion, agentAPI = version, api
	t.Cleanup(func() { spireVersion, agentAPI = oldV, oldA })
}

// namedTest is a test that another runs again, as a subtest, under
// other conditions (runAgainst).
type namedTest struct {
	name string
	test func(*testing.T)
}

// runAgainst runs each of tests as a subtest of t against SPIRE version
// with agent API api (withSPIRE).
func runAgainst(t *testing.T, version, api string, tests []namedTest) {
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			withSPIRE(t, version, api)
			tc.test(t)
		})
	}
}

// startEnvOptions is startEnv with SPIRE options; the trust domain and the
// delegates are always this package's.
func startEnvOptions(t *testing.T, opts spiretest.Options) *env {
	requireRoot(t)
	opts.TrustDomain, opts.AuthorizedDelegates = trustDomain, []string{hookID, refresherID}
	opts.Version = spireVersion
	if agentAPI == config.APIBroker {
		opts.Broker, opts.NoAdminSocket = true, true
		opts.Brokers = append(opts.Brokers, refresherID)
	}
	s := spiretest.Start(t, opts)
	e := &env{t: t, spire: s, dir: shortTempDir(t)}
	e.stateDir = filepath.Join(e.dir, "state")
	testhelp.MountTmpfs(t, e.stateDir, "mode=0700,size=64m")
	if agentAPI == config.APIBroker {
		// The refresher's part, for the tests that run the hook alone:
		// a broker SVID in the state directory (the harness's own, which
		// the agent admits). A refresher started later replaces it with
		// its own.
		if err := brokersvid.Write(files.Writer{}, brokersvid.Dir(e.stateDir), s.HarnessIdentity(t)); err != nil {
			t.Fatal(err)
		}
	}
	e.config = e.writeConfig("")
	// The delegate is spiffe-oci-hook-direct, which spiffe-oci-hook runs
	// when no refresher takes the container over: the hook itself never
	// speaks to the agent.
	s.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + hookDirectBin}, time.Hour)
	s.CreateEntry(t, refresherID, []string{"unix:uid:0", "unix:path:" + refresherBin}, time.Hour)
	return e
}

// waitSynced blocks until every entry created so far has reached the agent:
// the agent syncs a full snapshot, so an entry created last being there
// means the earlier ones are too.
func (e *env) waitSynced() {
	e.t.Helper()
	// A uid of its own, so that the sentinel entry (deleted, but gone
	// from the agent only at its next sync) matches no test process.
	const sentinelUID = 4242
	e.spire.WaitSynced(e.t, sentinelUID)
}

// writeConfig writes a node configuration for the hook; extra is appended.
func (e *env) writeConfig(extra string) string {
	e.t.Helper()
	path := filepath.Join(e.dir, fmt.Sprintf("config-%d.yaml", time.Now().UnixNano()))
	agent := fmt.Sprintf("agent_admin_socket: %s\n", e.spire.AdminSocket)
	if agentAPI == config.APIBroker {
		// Entries with unix:uid:0 alone match the refresher too: name
		// the SVID that is the broker's.
		agent = fmt.Sprintf("agent_api: broker\nbroker_socket: %s\nworkload_api_socket: %s\nbroker_spiffe_id: %s\n", e.spire.BrokerSocket, e.spire.WorkloadSocket, refresherID)
	}
	content := fmt.Sprintf("%sstate_dir: %s\ntimeout: 10s\n%s", agent, e.stateDir, extra)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// runcInitPath is what SPIRE's unix attestor sees as the path of the
// container's pid at createRuntime. runc 1.1 runs "runc init" from a
// detached copy of its binary, which reads as "/"; newer runcs show the
// binary. A probe hook asks the real runc once.
var (
	initPathOnce sync.Once
	initPath     string
	initPathErr  error
)

func runcInitPath(t *testing.T) string {
	initPathOnce.Do(func() {
		dir := shortTempDir(t)
		probe := filepath.Join(dir, "probe.sh")
		out := filepath.Join(dir, "exe")
		script := "#!/bin/sh\npid=$(sed 's/.*\"pid\":\\([0-9]*\\).*/\\1/')\nreadlink /proc/$pid/exe > " + out + "\n"
		if initPathErr = os.WriteFile(probe, []byte(script), 0o755); initPathErr != nil {
			return
		}
		b := newBundle(t, []string{"/bin/true"})
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{{Path: probe}}}
		if _, stderr, err := b.runc(t); err != nil {
			initPathErr = fmt.Errorf("probe: %v: %s", err, stderr)
			return
		}
		data, err := os.ReadFile(out)
		initPath, initPathErr = strings.TrimSpace(string(data)), err
	})
	if initPathErr != nil {
		t.Fatal(initPathErr)
	}
	return initPath
}

// hook returns the rspec.Hook that runs spiffe-oci-hook with config.
func (e *env) hook(config string) rspec.Hook {
	return rspec.Hook{Path: hookBin, Args: []string{"spiffe-oci-hook", "--config", config}}
}

// shortTempDir returns a temporary directory with a short path (unix
// socket paths are limited to 108 bytes).
func shortTempDir(t *testing.T) string {
	t.Helper()
	return testhelp.ShortTempDir(t, "e2e-")
}

// podmanStore returns a temp dir for a private Podman store (--root
// <dir>/root --runroot <dir>/runroot). containers/storage's overlay driver
// bind-mounts its home onto itself (to make it private) and leaves that
// mount behind when podman exits; the cleanup unmounts it so the dir can
// be removed (cleanups run last-in first-out: this one before RemoveAll).
func podmanStore(t *testing.T) string {
	t.Helper()
	store := shortTempDir(t)
	t.Cleanup(func() { unix.Unmount(filepath.Join(store, "root", "overlay"), unix.MNT_DETACH) })
	return store
}

// bundle is a runtime-tools generated OCI bundle with a busybox rootfs.
type bundle struct {
	*generate.Generator
	dir, rootfs, id string
}

func newBundle(t *testing.T, args []string) *bundle {
	t.Helper()
	dir := shortTempDir(t)
	rootfs := filepath.Join(dir, "rootfs")
	makeBusyboxRootfs(t, rootfs)
	g, err := generate.New("linux")
	if err != nil {
		t.Fatal(err)
	}
	g.SetRootPath("rootfs")
	g.SetProcessTerminal(false)
	g.SetProcessArgs(args)
	g.SetHostname("e2e")
	// No network namespace setup is needed for these tests.
	id := fmt.Sprintf("e2e-%d", time.Now().UnixNano())
	ourContainer(id)
	return &bundle{Generator: &g, dir: dir, rootfs: rootfs, id: id}
}

func (b *bundle) save(t *testing.T) {
	t.Helper()
	if err := b.SaveToFile(filepath.Join(b.dir, "config.json"), generate.ExportOptions{}); err != nil {
		t.Fatal(err)
	}
}

// runc saves the bundle and runs it to completion with `runc run`.
func (b *bundle) runc(t *testing.T) (stdout, stderr string, err error) {
	return b.run(t, "runc")
}

// run saves the bundle and runs it to completion with runtime (runc or
// crun; both take the same command line).
func (b *bundle) run(t *testing.T, runtime string) (stdout, stderr string, err error) {
	t.Helper()
	b.save(t)
	root := filepath.Join(b.dir, runtime+"-root")
	cmd := exec.Command(runtime, "--root", root, "run", "--bundle", b.dir, b.id)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	t.Cleanup(func() { exec.Command(runtime, "--root", root, "delete", "--force", b.id).Run() })
	return out.String(), errb.String(), err
}

// runDetached saves the bundle and starts it with `<runtime> run
// --detach` (runc or crun), and returns the file its output goes to; the
// container is deleted at cleanup.
func (b *bundle) runDetached(t *testing.T, runtime string) string {
	t.Helper()
	b.save(t)
	// The container inherits the runtime's stdout and stderr: a file, not
	// a pipe that Run would wait on until the container exits.
	out := filepath.Join(b.dir, "out")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	root := filepath.Join(b.dir, runtime+"-root")
	cmd := exec.Command(runtime, "--root", root, "run", "--detach", "--bundle", b.dir, b.id)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s run --detach: %v: %s", runtime, err, readFile(out))
	}
	t.Cleanup(func() { exec.Command(runtime, "--root", root, "delete", "--force", b.id).Run() })
	return out
}

var busyboxApplets = []string{"sh", "cat", "ls", "stat", "grep", "sed", "base64", "strings", "touch", "sleep", "id", "echo", "true", "head", "test", "readlink", "mkdir", "od", "awk"}

func makeBusyboxRootfs(t *testing.T, rootfs string) {
	t.Helper()
	bin := filepath.Join(rootfs, "bin")
	for _, d := range []string{bin, filepath.Join(rootfs, "proc"), filepath.Join(rootfs, "dev"), filepath.Join(rootfs, "sys"), filepath.Join(rootfs, "tmp"), filepath.Join(rootfs, "etc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static is missing: %v", err)
	}
	if err := os.WriteFile(filepath.Join(bin, "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, a := range busyboxApplets {
		if err := os.Symlink("busybox", filepath.Join(bin, a)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(rootfs, "etc", "passwd"), []byte("root:x:0:0:root:/:/bin/sh\napp:x:1000:1000:app:/:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(rootfs, "etc", "group"), []byte("root:x:0:\napp:x:1000:\n"), 0o644)
}

// pemBlocks splits the section of out between begin and end markers that
// the container printed.
func section(t *testing.T, out, name string) string {
	t.Helper()
	begin, end := "=== "+name+" ===\n", "=== end "+name+" ===\n"
	i := strings.Index(out, begin)
	j := strings.Index(out, end)
	if i < 0 || j < i {
		t.Fatalf("container output has no %s section:\n%s", name, out)
	}
	return out[i+len(begin) : j]
}

// printFiles is a container script that prints what a workload would read
// from dir, and facts about the mount, between markers.
func printFiles(dir string) string {
	return fmt.Sprintf(`set -e
d=%[1]s
echo "=== cert ==="; cat $d/svid.pem; echo "=== end cert ==="
echo "=== key ==="; cat $d/svid_key.pem; echo "=== end key ==="
echo "=== bundle ==="; cat $d/svid_bundle.pem; echo "=== end bundle ==="
echo "=== keystat ==="; stat -L -c '%%a %%u %%g' $d/svid_key.pem; echo "=== end keystat ==="
echo "=== id ==="; id -u; echo "=== end id ==="
echo "=== mount ==="; grep " $d " /proc/self/mountinfo; echo "=== end mount ==="
if touch $d/probe 2>/dev/null; then echo WRITABLE; fi
`, dir)
}

// checkSVID checks that cert and key (PEM) form a valid SVID for wantID
// that chains to the bundle.
func checkSVID(t *testing.T, cert, key, bundlePEM string, wantID string) *x509svid.SVID {
	t.Helper()
	svid, err := x509svid.Parse([]byte(cert), []byte(key))
	if err != nil {
		t.Fatalf("cert and key do not form an SVID (the key must match the cert): %v", err)
	}
	if svid.ID.String() != wantID {
		t.Fatalf("SVID is for %s, want %s", svid.ID, wantID)
	}
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	b, err := x509bundle.Parse(td, []byte(bundlePEM))
	if err != nil {
		t.Fatalf("bundle: %v", err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, b); err != nil {
		t.Fatalf("SVID does not chain to the bundle: %v", err)
	}
	return svid
}

func leafOf(t *testing.T, certPEM string) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode([]byte(certPEM))
	if block == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// listState lists every path under the state directory, less the broker
// SVID's directory (agent_api broker): it is the node's, not a container's.
func (e *env) listState() []string {
	var paths []string
	broker := brokersvid.Dir(e.stateDir)
	filepath.Walk(e.stateDir, func(p string, _ os.FileInfo, _ error) error {
		if p == broker {
			return filepath.SkipDir
		}
		paths = append(paths, strings.TrimPrefix(p, e.stateDir))
		return nil
	})
	return paths
}

// readRecord decodes container id's record.
func (e *env) readRecord(id string) map[string]any {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.stateDir, "records", id+".json"))
	if err != nil {
		e.t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		e.t.Fatal(err)
	}
	return m
}
