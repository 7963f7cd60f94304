package hook

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// defaultBudget is the node's default state budget (state_budget_mib).
const defaultBudget = config.DefaultStateBudgetMiB << 20

// TestStateBudget (issue 24, defect 2): the files the hook and the
// refresher write are tmpfs pages charged to the refresher's memory, and
// a pod chooses how many deliveries it asks for. Once the state directory
// holds the node's budget, the hook refuses a container that asks for
// more, with a line naming the budget, and leaves nothing behind; a
// container that fits is served.
func TestStateBudget(t *testing.T) {
	dir, state, fake, cfg := agentNode(t, 128)
	fake.Default = []spiffeid.ID{spiffeid.RequireFromString("spiffe://example.org/tenant")}
	bundle := writeBundle(dir, specs.Spec{Root: &specs.Root{Path: "rootfs"}, Process: &specs.Process{}})

	var sixteen strings.Builder
	for i := range annotations.MaxDeliveries {
		fmt.Fprintf(&sixteen, "- cert_dir: /certs/%d\n  credential_bundle_file_name: all.pem\n", i)
	}
	h := directHook(cfg)
	create := func(id, value string) error {
		pid := testhelp.StandIn(t)
		req, err := Find(&specs.State{ID: id, Pid: pid, Bundle: bundle, Annotations: map[string]string{annotations.Key: value}})
		if err != nil {
			t.Fatal(err)
		}
		return h.Create(context.Background(), req)
	}

	store := statedir.Store{Dir: state}
	// A container well under the budget is served. It holds one
	// generation of its files now; the refresher's first rewrite adds
	// the second, which its reservation counts already.
	before, _ := store.Used()
	if err := create("first", sixteen.String()); err != nil {
		t.Fatalf("16 deliveries on an empty node: %v", err)
	}
	after, _ := store.Used()
	if reserved, _ := store.Reserved(); reserved < 2*(after-before) {
		t.Errorf("the container reserved %d KiB; its first generation alone holds %d KiB", reserved>>10, (after-before)>>10)
	}
	// Other tenants' deliveries fill the state directory up to just under
	// the budget (what they wrote stands in as one file).
	var st unix.Statfs_t
	unix.Statfs(state, &st)
	used := int64(st.Blocks-st.Bfree) * st.Bsize
	if err := os.WriteFile(filepath.Join(state, "others"), make([]byte, defaultBudget-used-64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	err := create("past", sixteen.String())
	t.Logf("past the budget: %v", err)
	if err == nil || !strings.Contains(err.Error(), "state_budget_mib") {
		unix.Statfs(state, &st)
		t.Fatalf("a container asking for 16 deliveries was served with the state directory at %.1f MiB, past the node's %d MiB budget (error %v)",
			float64(int64(st.Blocks-st.Bfree)*st.Bsize)/(1<<20), defaultBudget>>20, err)
	}
	if _, err := os.Lstat(store.ContainerDir("past")); err == nil {
		t.Error("the refused container's directory was left in the state directory")
	}
}
