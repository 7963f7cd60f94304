package statedir

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestUsedCountsOnlyItsOwnTmpfs: the budget may count what the state
// directory's filesystem holds only when that filesystem is its own; on
// one it shares (systemd's /run: a volatile journal, runtimes' state)
// what others hold there is not the containers' to pay for.
func TestUsedCountsOnlyItsOwnTmpfs(t *testing.T) {
	shared := tmpfsStore(t) // a directory on a tmpfs mounted above it
	other := make([]byte, 1<<20)
	if err := os.WriteFile(filepath.Join(filepath.Dir(shared.Dir), "journal"), other, 0o600); err != nil {
		t.Fatal(err)
	}
	if n, err := shared.Used(); err != nil || n != 0 {
		t.Fatalf("state directory on a shared tmpfs holding 1 MiB of others' files: Used() = %d, %v; want 0", n, err)
	}

	own := Store{Dir: filepath.Join(t.TempDir(), "state")}
	testhelp.MountTmpfs(t, own.Dir, "size=4m")
	if err := os.WriteFile(filepath.Join(own.Dir, "files"), other, 0o600); err != nil {
		t.Fatal(err)
	}
	if n, err := own.Used(); err != nil || n < 1<<20 {
		t.Fatalf("state directory on its own tmpfs holding 1 MiB: Used() = %d, %v; want at least 1 MiB", n, err)
	}
}
