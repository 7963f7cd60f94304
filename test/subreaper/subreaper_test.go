package subreaper

import (
	"os/exec"
	"strings"
	"testing"
)

// TestKillOrphans: a daemon's child, orphaned by its parent's exit, is
// reparented to the subreaper, reported and killed; a tracked child is
// left alone.
func TestKillOrphans(t *testing.T) {
	if err := Become(); err != nil {
		t.Fatal(err)
	}
	keep := exec.Command("sleep", "300")
	if err := keep.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { keep.Process.Kill(); keep.Wait() })
	// sh starts the sleep in the background and exits: the sleep is an
	// orphan, as a daemonized shim is.
	if out, err := exec.Command("sh", "-c", "sleep 301 >/dev/null 2>&1 &").CombinedOutput(); err != nil {
		t.Fatalf("sh: %v: %s", err, out)
	}
	killed := KillOrphans(map[int]bool{keep.Process.Pid: true})
	if len(killed) != 1 || !strings.HasSuffix(killed[0], "sleep 301") {
		t.Fatalf("killed %q, want the orphaned sleep 301 only", killed)
	}
	if again := KillOrphans(map[int]bool{keep.Process.Pid: true}); len(again) != 0 {
		t.Fatalf("second pass killed %q: the first left something", again)
	}
	if keep.ProcessState != nil {
		t.Fatal("the tracked child was reaped by KillOrphans")
	}
	if _, state := stat(keep.Process.Pid); state == 'Z' || state == 0 {
		t.Fatalf("the tracked child is gone (state %q)", state)
	}
}
