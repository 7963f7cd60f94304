package refresh

import (
	"bytes"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestContainerIDReuse: `podman restart` runs a new process under the same
// container ID. The order that lost the new instance's files: the
// refresher learns of the old process's exit only after the hook recorded
// the new instance. The test forces it by holding the exit notice back
// until the new record exists and the refresher serves it, then checks
// that the new instance keeps its record and files, stays served and
// keeps rotating.
func TestContainerIDReuse(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	const id = "restarted"
	old := n.workloadProcess()
	n.deliverInstance(id, old.Process.Pid, true, classic)
	held := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	r, _ := n.start(func(r *Refresher) {
		r.hooks.exited = func(string) {
			once.Do(func() {
				close(held)
				<-release
			})
		}
	})
	testhelp.Eventually(t, 5*time.Second, "old instance served", func() bool { return r.Count() == 1 })
	old.Process.Kill()
	old.Wait()
	select {
	case <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("the old instance's exit was never noticed")
	}

	// The runtime starts the new instance; its hook writes and records.
	cur := n.workloadProcess()
	n.deliverInstance(id, cur.Process.Pid, false, classic)
	delivered := n.cert(id)
	time.Sleep(300 * time.Millisecond) // the refresher sees the new record
	close(release)

	testhelp.Eventually(t, 5*time.Second, "new instance served", func() bool {
		rep := r.Report()
		return len(rep.Containers) == 1 && rep.Containers[0].PID == cur.Process.Pid
	})
	time.Sleep(300 * time.Millisecond) // give a wrong cleanup time to act
	rec, err := n.store.Load(id)
	if err != nil {
		t.Fatalf("the new instance's record was removed after the old one exited: %v", err)
	}
	if rec.PID != cur.Process.Pid {
		t.Fatalf("record names pid %d, want the new instance's %d", rec.PID, cur.Process.Pid)
	}
	if _, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem", "svid_key.pem"); err != nil {
		t.Fatalf("the new instance's files were removed after the old one exited: %v", err)
	}
	delivered = n.cert(id)
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "new instance's files rotated", func() bool { return !bytes.Equal(n.cert(id), delivered) })

	// When the new instance exits, its state goes as usual.
	cur.Process.Kill()
	cur.Wait()
	testhelp.Eventually(t, 5*time.Second, "new instance's state removed after its exit", func() bool {
		_, err := os.Stat(n.store.ContainerDir(id))
		return os.IsNotExist(err) && r.Count() == 0
	})
}
