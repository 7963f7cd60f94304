package nriplugin

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	validator "github.com/containerd/nri/plugins/default-validator/builtin"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

var hook = &api.Hook{Path: "/opt/spiffe-oci-hook/bin/spiffe-oci-hook", Args: []string{"spiffe-oci-hook"}, Timeout: api.Int(50)}

// startRuntime starts NRI's runtime side (what containerd embeds) on a
// socket in a fresh directory, with extra options (the default validator).
func startRuntime(t *testing.T, opts ...adaptation.Option) (*adaptation.Adaptation, string) {
	t.Helper()
	dir := testhelp.ShortTempDir(t, "nri-")
	socket := filepath.Join(dir, "nri.sock")
	syncFn := func(ctx context.Context, cb adaptation.SyncCB) error {
		_, err := cb(ctx, nil, nil)
		return err
	}
	updateFn := func(context.Context, []*adaptation.ContainerUpdate) ([]*adaptation.ContainerUpdate, error) {
		return nil, nil
	}
	opts = append([]adaptation.Option{adaptation.WithSocketPath(socket),
		adaptation.WithPluginPath(filepath.Join(dir, "plugins")), adaptation.WithPluginConfigPath(filepath.Join(dir, "conf"))}, opts...)
	rt, err := adaptation.New("containerd", "test", syncFn, updateFn, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := rt.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rt.Stop)
	return rt, socket
}

// connect runs the plugin through Runner against socket, as on a node,
// and waits until rt lists it.
func connect(t *testing.T, rt *adaptation.Adaptation, socket string) *testhelp.SyncBuffer {
	t.Helper()
	logs := &testhelp.SyncBuffer{}
	r := &Runner{Plugin: &Plugin{Hook: hook}, Socket: socket, Name: Name, Index: "10", Log: slog.New(slog.NewTextHandler(logs, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	// The runtime lists the plugin only after the sync callback returns;
	// wait until it answers.
	for deadline := time.Now().Add(10 * time.Second); !registered(rt); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the runtime never listed the plugin; its log:\n%s", logs)
		}
	}
	return logs
}

// registered asks the runtime for a probe adjustment that only a connected
// plugin can produce.
func registered(rt *adaptation.Adaptation) bool {
	resp, err := rt.CreateContainer(context.Background(), &adaptation.CreateContainerRequest{
		Pod:       &api.PodSandbox{Id: "probe", Annotations: map[string]string{annotations.Key: "- cert_dir: /probe\n"}},
		Container: &api.Container{Id: "probe", PodSandboxId: "probe", Name: "probe"},
	})
	return err == nil && len(resp.GetAdjust().GetHooks().GetCreateRuntime()) == 1
}

func create(rt *adaptation.Adaptation, podAnn, ctrAnn map[string]string, name string) (*api.ContainerAdjustment, error) {
	resp, err := rt.CreateContainer(context.Background(), &adaptation.CreateContainerRequest{
		Pod:       &api.PodSandbox{Id: "pod", Name: "web", Namespace: "shop", Annotations: podAnn},
		Container: &api.Container{Id: "ctr-" + name, PodSandboxId: "pod", Name: name, Annotations: ctrAnn},
	})
	return resp.GetAdjust(), err
}

func mustCreate(t *testing.T, rt *adaptation.Adaptation, podAnn, ctrAnn map[string]string, name string) *api.ContainerAdjustment {
	t.Helper()
	adj, err := create(rt, podAnn, ctrAnn, name)
	if err != nil {
		t.Fatal(err)
	}
	return adj
}

func hooked(adj *api.ContainerAdjustment) bool {
	return len(adj.GetHooks().GetCreateRuntime()) != 0 || len(adj.GetHooks().GetPoststop()) != 0
}

// TestThroughNRI: through a real NRI connection, a container of a pod that
// asked gets the annotation and the hook at createRuntime and poststop; a
// sidecar the pod did not ask for gets the annotation (as with the
// allowlist) but no hook; a container of a pod that did not ask gets
// nothing.
func TestThroughNRI(t *testing.T) {
	rt, socket := startRuntime(t)
	logs := connect(t, rt, socket)
	value := "- cert_dir: /certs\n"

	adj := mustCreate(t, rt, map[string]string{annotations.Key + ".app": value}, nil, "app")
	if got := adj.GetAnnotations()[annotations.Key+".app"]; got != value {
		t.Errorf("container annotation %q, want %q (all: %v)", got, value, adj.GetAnnotations())
	}
	hooks := adj.GetHooks()
	for stage, hs := range map[string][]*api.Hook{"createRuntime": hooks.GetCreateRuntime(), "poststop": hooks.GetPoststop()} {
		if len(hs) != 1 || hs[0].Path != hook.Path || !slices.Equal(hs[0].Args, hook.Args) {
			t.Errorf("%s hooks %v, want exactly %v", stage, hs, hook)
		}
	}
	if len(hooks.GetPrestart()) != 0 || len(hooks.GetStartContainer()) != 0 {
		t.Errorf("hooks at other stages: %v", hooks)
	}

	adj = mustCreate(t, rt, map[string]string{annotations.Key + ".app": value, "other": "x"}, nil, "sidecar")
	if hooked(adj) {
		t.Errorf("a container the pod did not ask for got the hook: %v", adj)
	}
	if got := adj.GetAnnotations(); len(got) != 1 || got[annotations.Key+".app"] != "" {
		t.Errorf("sidecar annotations %v, want only the pod's identity annotation's key, without its value", got)
	}
	adj = mustCreate(t, rt, map[string]string{"other": "x"}, nil, "plain")
	if len(adj.GetAnnotations()) != 0 || hooked(adj) {
		t.Errorf("a pod without the annotation was adjusted: %v", adj)
	}
	if n := strings.Count(logs.String(), "registered with the NRI runtime"); n != 1 {
		t.Errorf("%d registration lines, want 1:\n%s", n, logs)
	}
}

// TestDefaultValidator: with NRI's default validator enabled (containerd:
// [plugins.'io.containerd.nri.v1.nri'.default_validator] enable = true),
// a pod annotated required-plugins.noderesource.dev/pod: ["spiffe-oci-hook"]
// is refused while the plugin is not registered, and gets the hook once it
// is. A pod without that annotation is not held up by the plugin's absence.
func TestDefaultValidator(t *testing.T) {
	rt, socket := startRuntime(t, adaptation.WithDefaultValidator(&validator.DefaultValidatorConfig{Enable: true}))
	pod := map[string]string{
		annotations.Key:                         "- cert_dir: /certs\n",
		"required-plugins.noderesource.dev/pod": `["` + Name + `"]`,
	}
	_, err := create(rt, pod, nil, "app")
	if err == nil || !strings.Contains(err.Error(), `required plugin "`+Name+`" not present`) {
		t.Fatalf("container created without the plugin: error %v", err)
	}
	t.Logf("without the plugin: %v", err)
	if adj, err := create(rt, map[string]string{"other": "x"}, nil, "plain"); err != nil || hooked(adj) {
		t.Fatalf("a pod that requires no plugin: %v, %v", adj, err)
	}

	connect(t, rt, socket)
	if adj := mustCreate(t, rt, pod, nil, "app"); !hooked(adj) {
		t.Errorf("no hook with the plugin registered: %v", adj)
	}
}

// TestRunnerBadIndex: a configuration no retry can fix ends Run at once.
func TestRunnerBadIndex(t *testing.T) {
	r := &Runner{Plugin: &Plugin{Hook: hook}, Socket: "/nonexistent/nri.sock", Name: Name, Index: "x", Log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Run(ctx); err == nil || ctx.Err() != nil {
		t.Fatalf("Run with plugin index %q: %v (context: %v)", r.Index, err, ctx.Err())
	}
}

// TestRunnerSilentRuntime: a runtime that accepts the connection and never
// answers holds neither a registration (StartTimeout) nor a shutdown.
func TestRunnerSilentRuntime(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "nri.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c // read nothing, answer nothing
		}
	}()
	logs := &testhelp.SyncBuffer{}
	r := &Runner{Plugin: &Plugin{Hook: hook}, Socket: socket, Name: Name, Index: "10", Log: slog.New(slog.NewTextHandler(logs, nil)),
		StartTimeout: 300 * time.Millisecond, MinRetry: 10 * time.Millisecond, MaxRetry: 50 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "did not configure the plugin within 300ms"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no start timeout logged:\n%s", logs)
		}
	}
	// It tries again, and a cancel while it waits for the silent runtime
	// ends Run.
	<-accepted
	<-accepted
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run still runs 10 s after its context ended")
	}
	if n := strings.Count(logs.String(), "cannot register"); n != 1 {
		t.Errorf("%d failure lines, want 1 (one per change of state):\n%s", n, logs)
	}
}

func TestAdjust(t *testing.T) {
	v := "- cert_dir: /certs\n"
	cases := []struct {
		name     string
		pod      map[string]string
		ctr      map[string]string
		ctrName  string
		wantHook bool
		wantAnn  []string // annotations copied onto the container
	}{
		{"unnamed key applies to every container", map[string]string{annotations.Key: v, "x": "y"}, nil, "any", true, []string{annotations.Key}},
		{"named key wins; only it copied", map[string]string{annotations.Key: "- cert_dir: /other\n", annotations.Key + ".app": v}, nil, "app", true, []string{annotations.Key + ".app"}},
		{"other container's key: its key copied without its value, no hook", map[string]string{annotations.Key + ".db": v}, nil, "app", false, []string{annotations.Key + ".db"}},
		{"already allowlisted: no duplicate annotation", map[string]string{annotations.Key: v}, map[string]string{annotations.Key: v}, "app", true, nil},
		{"container's own key (container_annotations allowlist), pod has none", nil, map[string]string{annotations.Key: v}, "app", true, nil},
		{"container's own key next to another container's pod key: nothing copied", map[string]string{annotations.Key + ".db": v}, map[string]string{annotations.Key + ".app": v}, "app", true, nil},
		{"look-alike key is not ours", map[string]string{annotations.Key + "s": v, annotations.Key + "/x": v}, nil, "app", false, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			adj := Adjust(hook, &api.PodSandbox{Annotations: c.pod}, &api.Container{Name: c.ctrName, Annotations: c.ctr})
			if got := len(adj.GetHooks().GetCreateRuntime()) == 1 && len(adj.GetHooks().GetPoststop()) == 1; got != c.wantHook {
				t.Errorf("hook injected %v, want %v: %v", got, c.wantHook, adj)
			}
			var got []string
			for k, val := range adj.GetAnnotations() {
				got = append(got, k)
				if want := c.pod[k]; val != want && (c.wantHook || val != "") {
					t.Errorf("copied %s=%q, the pod has %q", k, val, want)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, c.wantAnn) {
				t.Errorf("copied annotations %v, want %v", got, c.wantAnn)
			}
		})
	}
	if adj := Adjust(hook, &api.PodSandbox{}, &api.Container{Name: "app"}); adj != nil {
		t.Errorf("a pod without annotations was adjusted: %v", adj)
	}
}

// TestAdjustCopiesOnlyWhatApplies (issue 24, defect 3): a pod chooses its
// annotations' number and size. Each container gets the one annotation
// that applies to it, with its value; a container none applies to gets
// one of the pod's identity keys without its value (so that a hook
// injected by NRI's hook-injector sees that the pod asked for another
// container). The other containers' annotations are never copied.
func TestAdjustCopiesOnlyWhatApplies(t *testing.T) {
	big := "- cert_dir: /certs\n#" + strings.Repeat("x", 250<<10)
	pod := map[string]string{annotations.Key: "- cert_dir: /all\n"}
	for i := range 100 {
		pod[fmt.Sprintf("%s.n%03d", annotations.Key, i)] = big
	}
	size := func(adj *api.ContainerAdjustment) int {
		n := 0
		for k, v := range adj.GetAnnotations() {
			n += len(k) + len(v)
		}
		return n
	}
	adj := Adjust(hook, &api.PodSandbox{Annotations: pod}, &api.Container{Name: "n007"})
	if got := adj.GetAnnotations(); len(got) != 1 || got[annotations.Key+".n007"] != big || !hooked(adj) {
		t.Errorf("container n007: %d annotations copied (%d bytes), hook %v; want only its own", len(got), size(adj), hooked(adj))
	}
	adj = Adjust(hook, &api.PodSandbox{Annotations: pod}, &api.Container{Name: "side"})
	if got := adj.GetAnnotations(); len(got) != 1 || got[annotations.Key] != "- cert_dir: /all\n" || !hooked(adj) {
		t.Errorf("container side: %d annotations copied (%d bytes), hook %v; want only %s", len(got), size(adj), hooked(adj), annotations.Key)
	}
	delete(pod, annotations.Key)
	adj = Adjust(hook, &api.PodSandbox{Annotations: pod}, &api.Container{Name: "side"})
	if got := adj.GetAnnotations(); len(got) != 1 || size(adj) > 100 || hooked(adj) {
		t.Errorf("container side of a pod that asked for others: %d annotations copied (%d bytes), hook %v; want one key without its value, no hook", len(got), size(adj), hooked(adj))
	}
}
