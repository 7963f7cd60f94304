package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// These tests run the real spiffe-oci-nri binary against NRI's runtime side
// (pkg/adaptation, what containerd embeds) in a child process of its own,
// so that a containerd restart can be played as it happens on a node: the
// runtime process dies (SIGKILL), its socket file stays, and a new runtime
// process listens on the same path.

const runtimeEnv = "SPIFFE_OCI_NRI_TEST_RUNTIME"

func TestMain(m *testing.M) {
	if socket := os.Getenv(runtimeEnv); socket != "" {
		os.Exit(serveRuntime(socket))
	}
	os.Exit(m.Run())
}

// probe is one CreateContainer the test asks the runtime child to relay.
type probe struct {
	Pod  map[string]string `json:"pod"`
	Name string            `json:"name"`
}

type probeResult struct {
	Hooks       int               `json:"hooks"`
	Annotations map[string]string `json:"annotations"`
	Error       string            `json:"error"`
}

// serveRuntime is the runtime child: it starts NRI's runtime side on
// socket, says "ready", then relays one CreateContainer per stdin line.
func serveRuntime(socket string) int {
	dir := filepath.Dir(socket)
	rt, err := adaptation.New("containerd", "test",
		func(ctx context.Context, cb adaptation.SyncCB) error { _, err := cb(ctx, nil, nil); return err },
		func(context.Context, []*adaptation.ContainerUpdate) ([]*adaptation.ContainerUpdate, error) {
			return nil, nil
		},
		adaptation.WithSocketPath(socket), adaptation.WithPluginPath(filepath.Join(dir, "plugins")), adaptation.WithPluginConfigPath(filepath.Join(dir, "conf")))
	if err == nil {
		err = rt.Start()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "runtime:", err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for n := 0; in.Scan(); n++ {
		var p probe
		if err := json.Unmarshal(in.Bytes(), &p); err != nil {
			fmt.Fprintln(os.Stderr, "runtime:", err)
			return 1
		}
		id := fmt.Sprint("c", n)
		resp, err := rt.CreateContainer(context.Background(), &adaptation.CreateContainerRequest{
			Pod:       &api.PodSandbox{Id: "pod", Name: "web", Namespace: "shop", Annotations: p.Pod},
			Container: &api.Container{Id: id, PodSandboxId: "pod", Name: p.Name},
		})
		r := probeResult{Hooks: len(resp.GetAdjust().GetHooks().GetCreateRuntime()), Annotations: resp.GetAdjust().GetAnnotations()}
		if err != nil {
			r.Error = err.Error()
		}
		out, _ := json.Marshal(r)
		fmt.Println(string(out))
	}
	return 0
}

// runtimeProc is a running runtime child.
type runtimeProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startRuntime(t *testing.T, socket string) *runtimeProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), runtimeEnv+"="+socket)
	cmd.Stderr = io.Discard
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rt := &runtimeProc{cmd: cmd, in: in, out: bufio.NewScanner(stdout)}
	t.Cleanup(rt.kill)
	if !rt.out.Scan() || rt.out.Text() != "ready" {
		t.Fatalf("runtime child did not start: %q", rt.out.Text())
	}
	return rt
}

// kill plays a containerd crash: the process dies, its socket file stays.
func (r *runtimeProc) kill() {
	if r.cmd.ProcessState == nil {
		r.cmd.Process.Kill()
		r.cmd.Wait()
	}
}

// create relays one container of a pod that asked for an identity.
func (r *runtimeProc) create(t *testing.T) probeResult {
	t.Helper()
	line, _ := json.Marshal(probe{Pod: map[string]string{annotations.Key: "- cert_dir: /certs\n"}, Name: "app"})
	if _, err := r.in.Write(append(line, '\n')); err != nil {
		t.Fatal(err)
	}
	if !r.out.Scan() {
		t.Fatal("runtime child did not answer")
	}
	var res probeResult
	if err := json.Unmarshal(r.out.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	return res
}

// waitHooked waits until the runtime's containers get the hook, which
// only a registered plugin gives them.
func (r *runtimeProc) waitHooked(t *testing.T, p *pluginProc) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		res := r.create(t)
		if res.Error != "" {
			t.Fatalf("CreateContainer: %s", res.Error)
		}
		if res.Hooks == 1 && res.Annotations[annotations.Key] != "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the plugin never adjusted a container; its log:\n%s", p.log())
		}
	}
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds ./nri once per test run.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "spiffe-oci-nri-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "spiffe-oci-nri")
		if out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// pluginProc is a running spiffe-oci-nri.
type pluginProc struct {
	cmd    *exec.Cmd
	stderr testhelp.SyncBuffer
	done   chan struct{}
}

func (p *pluginProc) log() string { return p.stderr.String() }

func startPlugin(t *testing.T, socket string) *pluginProc {
	t.Helper()
	p := &pluginProc{done: make(chan struct{})}
	p.cmd = exec.Command(binary(t), "--nri-socket", socket, "--hook-path", "/opt/spiffe-oci-hook/bin/spiffe-oci-hook")
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("spiffe-oci-nri log:\n%s", p.log())
		}
	})
	return p
}

// waitLog waits until the plugin has logged s.
func (p *pluginProc) waitLog(t *testing.T, s string) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(p.log(), s); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the plugin never logged %q; its log:\n%s", s, p.log())
		}
	}
}

// stopWith sends sig and returns how long the plugin took to exit.
func (p *pluginProc) stopWith(t *testing.T, sig syscall.Signal) time.Duration {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("spiffe-oci-nri still runs 10 s after %v", sig)
	}
	took := time.Since(start)
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after %v (%v), want 0", code, sig, p.cmd.ProcessState)
	}
	return took
}

func socketPath(t *testing.T) string {
	return filepath.Join(testhelp.ShortTempDir(t, "nri-"), "nri.sock")
}

// TestSignalStops: SIGTERM (a DaemonSet rollout) and SIGINT stop the
// plugin at once, whether it is registered or waiting for the runtime.
// It exits in 1-4 ms on an idle machine; the bound is generous so that it
// holds on two busy cores: what it catches is a plugin that ignores the
// signal until SIGKILL (the kubelet's 30 s grace period).
func TestSignalStops(t *testing.T) {
	for _, c := range []struct {
		name    string
		sig     syscall.Signal
		runtime bool
	}{
		{"registered/SIGTERM", syscall.SIGTERM, true},
		{"registered/SIGINT", syscall.SIGINT, true},
		{"runtime down/SIGTERM", syscall.SIGTERM, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			socket := socketPath(t)
			var rt *runtimeProc
			if c.runtime {
				rt = startRuntime(t, socket)
			}
			p := startPlugin(t, socket)
			if c.runtime {
				rt.waitHooked(t, p)
			} else {
				p.waitLog(t, "cannot register with the NRI runtime")
			}
			took := p.stopWith(t, c.sig)
			t.Logf("exited %v after %v", took, c.sig)
			if took > stopBound {
				t.Errorf("spiffe-oci-nri took %v to exit after %v, want under %v", took, c.sig, stopBound)
			}
		})
	}
}

// TestRuntimeRestart: when the runtime dies and comes back on the same
// socket, the plugin registers again by itself and containers created
// after the restart get the hook. It logs once per change of state, not
// once per attempt.
func TestRuntimeRestart(t *testing.T) {
	socket := socketPath(t)
	rt := startRuntime(t, socket)
	p := startPlugin(t, socket)
	rt.waitHooked(t, p)

	for restart := 1; restart <= 2; restart++ {
		rt.kill()
		p.waitLog(t, "lost the connection to the NRI runtime")
		// Stay down until the plugin has retried past the longest wait
		// between attempts (100 ms doubling to 2 s: the seventh), each
		// attempt seen by a stand-in that hangs up, as a runtime that is
		// still starting would.
		hangUpOn(t, socket, 7)
		rt = startRuntime(t, socket)
		rt.waitHooked(t, p)
		if n := strings.Count(p.log(), "registered with the NRI runtime"); n != restart+1 {
			t.Errorf("after restart %d: %d registration lines, want %d", restart, n, restart+1)
		}
	}
	log := p.log()
	t.Logf("spiffe-oci-nri log:\n%s", log)
	if n := strings.Count(log, "lost the connection to the NRI runtime"); n != 2 {
		t.Errorf("%d lost-connection lines for 2 restarts, want 2", n)
	}
	for _, unwanted := range []string{"cannot register", "level=ERROR"} {
		if strings.Contains(log, unwanted) {
			t.Errorf("log has %q:\n%s", unwanted, log)
		}
	}
	if lines := strings.Count(log, "\n"); lines > 8 {
		t.Errorf("%d log lines for 2 restarts, want one per change of state:\n%s", lines, log)
	}
	if took := p.stopWith(t, syscall.SIGTERM); took > stopBound {
		t.Errorf("took %v to exit after SIGTERM, want under %v", took, stopBound)
	}
}

// stopBound is how long the plugin may take to exit after SIGTERM in these
// tests: far above the milliseconds it takes, far below a grace period.
const stopBound = 5 * time.Second

// hangUpOn listens on the runtime's socket in place of the runtime and
// hangs up on every connection until n have come, then leaves the socket
// file behind as a crashed runtime would.
func hangUpOn(t *testing.T, socket string, n int) {
	t.Helper()
	os.Remove(socket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	l.SetDeadline(time.Now().Add(60 * time.Second))
	for i := range n {
		c, err := l.Accept()
		if err != nil {
			t.Fatalf("the plugin tried %d times in 60 s, want %d: %v", i, n, err)
		}
		c.Close()
	}
}

// TestLogrusLevels: NRI's and ttrpc's lines reach slog at their level,
// except ttrpc's errors of a server that is closing, which belong to the
// lost connection the runner reports once (TestRuntimeRestart wants no
// error line for a runtime restart).
func TestLogrusLevels(t *testing.T) {
	var got []slog.Level
	h := logrusToSlog{log: slog.New(levelRecorder{&got})}
	for _, e := range []*logrus.Entry{
		{Level: logrus.ErrorLevel, Message: "ttrpc: create connection failed", Data: logrus.Fields{logrus.ErrorKey: ttrpc.ErrServerClosed}},
		{Level: logrus.ErrorLevel, Message: "ttrpc: failed accept", Data: logrus.Fields{logrus.ErrorKey: errors.New("accept: too many open files")}},
		{Level: logrus.WarnLevel, Message: "warned"},
		{Level: logrus.InfoLevel, Message: "informed"},
	} {
		if err := h.Fire(e); err != nil {
			t.Fatal(err)
		}
	}
	if want := []slog.Level{slog.LevelDebug, slog.LevelError, slog.LevelWarn, slog.LevelDebug}; !slices.Equal(got, want) {
		t.Fatalf("levels %v, want %v", got, want)
	}
}

// levelRecorder is a slog.Handler that records each record's level.
type levelRecorder struct{ levels *[]slog.Level }

func (levelRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r levelRecorder) Handle(_ context.Context, rec slog.Record) error {
	*r.levels = append(*r.levels, rec.Level)
	return nil
}
func (r levelRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r levelRecorder) WithGroup(string) slog.Handler      { return r }
