package hook

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// tempNode skips without root, and returns a temp directory short enough
// for unix sockets and a tmpfs state directory of sizeMiB in it, both
// removed when t ends.
func tempNode(t *testing.T, sizeMiB int) (dir, state string) {
	t.Helper()
	return testhelp.TempNode(t, "needs root: tmpfs state directory and a mount namespace", "hook-", fmt.Sprintf("size=%dm", sizeMiB))
}

// agentNode is tempNode with a fake agent serving on the node's admin
// socket, and the hook's configuration for the two.
func agentNode(t *testing.T, sizeMiB int) (dir, state string, fake *fakeagent.Agent, cfg config.Config) {
	t.Helper()
	dir, state = tempNode(t, sizeMiB)
	socket := filepath.Join(dir, "a.sock")
	fake = fakeagent.Start(t, "example.org", socket)
	cfg = config.Default()
	cfg.AgentAdminSocket = socket
	cfg.StateDir = state
	return dir, state, fake, cfg
}

// writeBundle writes an OCI bundle under dir, its config.json spec and
// its root "rootfs", and returns its path.
func writeBundle(dir string, spec specs.Spec) string {
	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(bundle, "rootfs"), 0o755)
	data, _ := json.Marshal(spec)
	os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644)
	return bundle
}

// directHook is the hook that asks the agent itself (spiffe-oci-hook-direct),
// with each of set applied to its deliverer.
func directHook(cfg config.Config, set ...func(*deliver.Deliverer)) *Hook {
	d := &deliver.Deliverer{Config: cfg}
	for _, f := range set {
		f(d)
	}
	return &Hook{Config: cfg, Deliver: d.Direct}
}
