package statedir

import (
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// TestRemoveInstance: the state of an instance that exited goes, unless
// the record on disk now names another instance under the same ID.
func TestRemoveInstance(t *testing.T) {
	s := tmpfsStore(t)
	save := func(pid int, start uint64) {
		t.Helper()
		if err := s.Save(Record{ID: "abc", PID: pid, StartTime: start}); err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(s.DeliveryDir("abc", 0), 0o700)
	}
	save(20, 9) // the new instance's record replaced the old one
	if removed, err := s.RemoveInstance("abc", 10, 7); err != nil || removed {
		t.Fatalf("RemoveInstance of the old instance = %v, %v; want it to keep the new one's state", removed, err)
	}
	if _, err := s.Load("abc"); err != nil {
		t.Fatalf("the new instance's record went: %v", err)
	}
	if removed, err := s.RemoveInstance("abc", 20, 9); err != nil || !removed {
		t.Fatalf("RemoveInstance of the recorded instance = %v, %v", removed, err)
	}
	for _, p := range []string{s.RecordPath("abc"), s.ContainerDir("abc"), s.lockPath("abc")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived (%v)", p, err)
		}
	}
	// No record at all (poststop ran): the files go too.
	os.MkdirAll(s.DeliveryDir("abc", 0), 0o700)
	if removed, err := s.RemoveInstance("abc", 20, 9); err != nil || !removed {
		t.Errorf("RemoveInstance without a record = %v, %v", removed, err)
	}
}

// TestRemoveOrphan: a container's files go only while it has no record,
// and it says whether there were any, with no lock file left behind.
func TestRemoveOrphan(t *testing.T) {
	s := tmpfsStore(t)
	if removed, err := s.RemoveOrphan("abc"); err != nil || removed {
		t.Fatalf("RemoveOrphan with nothing there = %v, %v", removed, err)
	}
	os.MkdirAll(s.DeliveryDir("abc", 0), 0o700)
	if err := s.Save(Record{ID: "abc", PID: 10, StartTime: 7}); err != nil {
		t.Fatal(err)
	}
	if removed, err := s.RemoveOrphan("abc"); err != nil || removed {
		t.Fatalf("RemoveOrphan of a recorded container = %v, %v", removed, err)
	}
	if _, err := os.Stat(s.DeliveryDir("abc", 0)); err != nil {
		t.Fatalf("a recorded container's files went: %v", err)
	}
	os.Remove(s.RecordPath("abc"))
	// The hook let the container start without its identity
	// (fail-open): its trace is the audit's, and stays.
	if err := s.SaveFailOpen(FailOpen{ID: "abc", PID: 10, StartTime: 7, Error: "agent down"}); err != nil {
		t.Fatal(err)
	}
	if removed, err := s.RemoveOrphan("abc"); err != nil || !removed {
		t.Fatalf("RemoveOrphan of files with no record = %v, %v", removed, err)
	}
	for _, p := range []string{s.ContainerDir("abc"), s.lockPath("abc")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived (%v)", p, err)
		}
	}
	if traces, err := s.FailOpens(); err != nil || len(traces) != 1 {
		t.Errorf("fail-open traces after RemoveOrphan: %v, %v; want the one saved", traces, err)
	}
}

// TestLockExcludes: a second holder waits for the first, also when the
// first removes the lock file with the state.
func TestLockExcludes(t *testing.T) {
	s := tmpfsStore(t)
	l, err := s.Lock("abc")
	if err != nil || l == nil {
		t.Fatalf("Lock = %v, %v", l, err)
	}
	var got atomic.Bool
	done := make(chan struct{})
	go func() {
		l2, err := s.Lock("abc")
		if err != nil {
			t.Error(err)
		}
		got.Store(true)
		l2.Unlock()
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	if got.Load() {
		t.Fatal("a second holder got the lock while the first held it")
	}
	if err := s.RemoveLocked("abc"); err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter never got the lock")
	}
	// Without a state directory there is nothing to lock.
	if l, err := (Store{Dir: t.TempDir()}).Lock("abc"); l != nil || err != nil {
		t.Errorf("Lock in an empty directory = %v, %v", l, err)
	}
}
