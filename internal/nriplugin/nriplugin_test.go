package nriplugin

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

var hook = &api.Hook{Path: "/opt/spiffe-oci-hook/bin/spiffe-oci-hook", Args: []string{"spiffe-oci-hook"}, Timeout: api.Int(15)}

// runtime starts NRI's runtime side (what containerd embeds) on a socket
// and connects the plugin to it through NRI's stub, as on a node.
func runtime(t *testing.T) *adaptation.Adaptation {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "nri-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "nri.sock")
	synced := make(chan struct{}, 1)
	syncFn := func(ctx context.Context, cb adaptation.SyncCB) error {
		_, err := cb(ctx, nil, nil)
		synced <- struct{}{}
		return err
	}
	updateFn := func(context.Context, []*adaptation.ContainerUpdate) ([]*adaptation.ContainerUpdate, error) {
		return nil, nil
	}
	rt, err := adaptation.New("containerd", "test", syncFn, updateFn,
		adaptation.WithSocketPath(socket), adaptation.WithPluginPath(filepath.Join(dir, "plugins")), adaptation.WithPluginConfigPath(filepath.Join(dir, "conf")))
	if err != nil {
		t.Fatal(err)
	}
	if err := rt.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rt.Stop)

	s, err := stub.New(&Plugin{Hook: hook}, stub.WithPluginName("spiffe-oci-hook"), stub.WithPluginIdx("10"), stub.WithSocketPath(socket))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() { cancel(); s.Stop(); <-done })
	select {
	case <-synced:
	case err := <-done:
		t.Fatalf("plugin stopped: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the plugin did not register with the runtime")
	}
	// The runtime lists the plugin only after the sync callback returns;
	// wait until it answers.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if registered(rt) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the runtime never listed the plugin")
		}
	}
	return rt
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

func create(t *testing.T, rt *adaptation.Adaptation, podAnn, ctrAnn map[string]string, name string) *api.ContainerAdjustment {
	t.Helper()
	resp, err := rt.CreateContainer(context.Background(), &adaptation.CreateContainerRequest{
		Pod:       &api.PodSandbox{Id: "pod", Name: "web", Namespace: "shop", Annotations: podAnn},
		Container: &api.Container{Id: "ctr-" + name, PodSandboxId: "pod", Name: name, Annotations: ctrAnn},
	})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetAdjust()
}

// TestThroughNRI: through a real NRI connection, a container of a pod that
// asked gets the annotation and the hook at createRuntime and poststop; a
// container of a pod that did not ask gets nothing.
func TestThroughNRI(t *testing.T) {
	rt := runtime(t)
	value := "- cert_dir: /certs\n"

	adj := create(t, rt, map[string]string{annotations.Key + ".app": value}, nil, "app")
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

	// The named entry belongs to "app"; a sidecar in the same pod without
	// an entry of its own and no unnamed key gets nothing.
	adj = create(t, rt, map[string]string{annotations.Key + ".app": value}, nil, "sidecar")
	if len(adj.GetAnnotations()) != 0 || adj.GetHooks() != nil && len(adj.GetHooks().GetCreateRuntime()) != 0 {
		t.Errorf("a container the pod did not ask for was adjusted: %v", adj)
	}
	adj = create(t, rt, nil, nil, "plain")
	if len(adj.GetAnnotations()) != 0 || adj.GetHooks() != nil && len(adj.GetHooks().GetCreateRuntime()) != 0 {
		t.Errorf("a pod without the annotation was adjusted: %v", adj)
	}
}

func TestAdjust(t *testing.T) {
	v := "- cert_dir: /certs\n"
	cases := []struct {
		name    string
		pod     map[string]string
		ctr     map[string]string
		ctrName string
		wantKey string
	}{
		{"unnamed key applies to every container", map[string]string{annotations.Key: v}, nil, "any", annotations.Key},
		{"named key wins", map[string]string{annotations.Key: "- cert_dir: /other\n", annotations.Key + ".app": v}, nil, "app", annotations.Key + ".app"},
		{"other container's key does not apply", map[string]string{annotations.Key + ".db": v}, nil, "app", ""},
		{"already allowlisted: no duplicate annotation", map[string]string{annotations.Key: v}, map[string]string{annotations.Key: v}, "app", annotations.Key},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			adj := Adjust(hook, &api.PodSandbox{Annotations: c.pod}, &api.Container{Name: c.ctrName, Annotations: c.ctr})
			if c.wantKey == "" {
				if adj != nil {
					t.Fatalf("adjusted: %v", adj)
				}
				return
			}
			if adj == nil || len(adj.GetHooks().GetCreateRuntime()) != 1 {
				t.Fatalf("no hook injected: %v", adj)
			}
			_, copied := adj.GetAnnotations()[c.wantKey]
			if _, had := c.ctr[c.wantKey]; copied == had {
				t.Errorf("annotation %s copied=%v while the container had it=%v", c.wantKey, copied, had)
			}
			if copied && adj.GetAnnotations()[c.wantKey] != v {
				t.Errorf("copied value %q", adj.GetAnnotations()[c.wantKey])
			}
		})
	}
}
