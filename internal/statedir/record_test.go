package statedir

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

func tmpfsStore(t *testing.T) Store {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	testhelp.MountTmpfs(t, dir, "size=4m")
	s := Store{Dir: filepath.Join(dir, "state")}
	if err := os.Mkdir(s.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.Init(); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestInitRefusesPersistentDisk: keys never touch persistent disk, so a
// state directory that is not tmpfs is refused with a line saying so.
func TestInitRefusesPersistentDisk(t *testing.T) {
	// The test's temp dir, or /var/tmp where TMPDIR is a tmpfs: a
	// directory on disk that every Linux host has.
	dir := ""
	for _, parent := range []string{os.TempDir(), "/var/tmp"} {
		var st unix.Statfs_t
		if err := unix.Statfs(parent, &st); err != nil {
			continue
		}
		if st.Type != unix.TMPFS_MAGIC && st.Type != unix.RAMFS_MAGIC {
			d, err := os.MkdirTemp(parent, "record-disk-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(d) })
			dir = d
			break
		}
	}
	if dir == "" {
		t.Skip("both $TMPDIR and /var/tmp are on tmpfs: no persistent-disk directory to refuse")
	}
	err := Store{Dir: filepath.Join(dir, "state")}.Init()
	if err == nil || !strings.Contains(err.Error(), "is not on tmpfs") || !strings.Contains(err.Error(), "/run") {
		t.Fatalf("Init on %s: %v", dir, err)
	}
}

func TestSaveLoadListRemove(t *testing.T) {
	s := tmpfsStore(t)
	rec := Record{
		ID: "abc", PID: 42, StartTime: 7, Owner: files.Owner{UID: 1000, GID: 1000}, AgentSocket: "/run/admin.sock",
		Deliveries: []Delivery{{Delivery: annotations.Delivery{CertDir: "/certs", SVIDFileName: "a", KeyFileName: "b", BundleFileName: "c"}, Delivered: "spiffe://example.org/w"}},
	}
	if err := s.Save(rec); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load("abc")
	if err != nil {
		t.Fatal(err)
	}
	if got.PID != 42 || got.StartTime != 7 || got.Owner != rec.Owner || !reflect.DeepEqual(got.Deliveries, rec.Deliveries) || got.Deliveries[0].Delivered != "spiffe://example.org/w" {
		t.Errorf("Load = %+v", got)
	}
	// A temp file from a Save in progress is not a record.
	os.WriteFile(filepath.Join(s.RecordsDir(), ".tmp.xyz.123"), nil, 0o600)
	if ids, err := s.IDs(); err != nil || !slices.Equal(ids, []string{"abc"}) {
		t.Errorf("IDs = %v, %v", ids, err)
	}

	// A container directory without a record is an orphan; one with a
	// record is not.
	os.MkdirAll(s.DeliveryDir("abc", 0), 0o700)
	os.MkdirAll(s.ContainerDir("lost"), 0o700)
	if o, err := s.Orphans(); err != nil || !slices.Equal(o, []string{"lost"}) {
		t.Errorf("Orphans = %v, %v", o, err)
	}

	if err := s.Remove("abc"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{s.RecordPath("abc"), s.ContainerDir("abc")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived Remove (%v)", p, err)
		}
	}
	if err := s.Remove("abc"); err != nil {
		t.Errorf("removing twice: %v", err)
	}
}

func TestIDsAreCheckedAsPathElements(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	for _, id := range []string{"", "../x", "a/b", ".hidden"} {
		if _, err := s.Load(id); err == nil {
			t.Errorf("Load(%q) accepted", id)
		}
		if err := s.Remove(id); err == nil {
			t.Errorf("Remove(%q) accepted", id)
		}
	}
	if _, ok := IDFromFileName("x.json"); !ok {
		t.Error("x.json is a record")
	}
	for _, n := range []string{"x.json.tmp", ".tmp.x.json", "x"} {
		if _, ok := IDFromFileName(n); ok {
			t.Errorf("%s taken for a record", n)
		}
	}
}
