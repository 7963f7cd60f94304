package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/hook"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestBenchStateBudget (issue 24, defect 2) measures the refresher's
// memory, tmpfs pages included, with the state directory at the node's
// budget (state_budget_mib, default 64), filled the way a hostile tenant
// would: every container asks for 16 deliveries of six files (SVID, key,
// bundle, credential bundle, trust bundle, JWT bundle), eight of them a
// JWT-SVID as well. The hook (in process, the fake agent behind it)
// creates containers until it refuses one; then the real refresher binary
// runs in a memory cgroup of its own (cgroup v1 or v2) and rewrites
// everything three times (its start, then two rotations), so that both
// generations it keeps are charged to it. It runs twice: without a limit
// (the peak), then under BENCH_BUDGET_LIMIT (default 160Mi, the
// DaemonSet's), where no OOM kill and no rotation missed is the check.
//
//	SPIFFE_OCI_BENCH=1 go test -run '^TestBenchStateBudget$' -v ./test/bench
func TestBenchStateBudget(t *testing.T) {
	benchAsRoot(t, "tmpfs, mount namespaces, cgroups")
	root := testhelp.RepoRoot(t)
	dir := testhelp.ShortTempDir(t, "bbud-")
	bin := filepath.Join(dir, "spiffe-oci-refresher")
	build := exec.Command("go", "build", "-trimpath", "-tags", "grpcnotrace", "-ldflags", "-s -w -X main.version=bench", "-o", bin, "./refresher")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the refresher: %v\n%s", err, out)
	}

	// BENCH_BUDGET_MIB sets another budget (what the refresher would hold
	// without the default one).
	budget := envInt("BENCH_BUDGET_MIB", config.DefaultStateBudgetMiB)
	state := filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, state, fmt.Sprintf("mode=0700,size=%dm", budget*3/2))
	socket := filepath.Join(dir, "admin.sock")
	fake := fakeagent.Start(t, trustDomain, socket)
	fake.Default = []spiffeid.ID{spiffeid.RequireFromString(workloadID)}
	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(bundle, "rootfs"), 0o755)
	writeFile(t, filepath.Join(bundle, "config.json"), `{"root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0}}}`)

	// BENCH_BUDGET_SHAPE=small fills the budget with the smallest
	// containers instead (one delivery of four files): the most
	// containers, so the most streams, the budget lets in.
	deliveries := annotations.MaxDeliveries
	var value strings.Builder
	if os.Getenv("BENCH_BUDGET_SHAPE") == "small" {
		deliveries = 1
		value.WriteString(annValue)
	} else {
		for i := range deliveries {
			fmt.Fprintf(&value, "- cert_dir: /certs/%d\n  credential_bundle_file_name: all.pem\n  jwt_bundle_file_name: jwt_bundle.json\n", i)
			if i < annotations.MaxJWTSVIDs {
				fmt.Fprintf(&value, "  jwt_svids: [{jwt_audience: aud%d, jwt_svid_file_name: token}]\n", i)
			}
		}
	}
	cfg := config.Default()
	cfg.AgentAdminSocket = socket
	cfg.StateDir = state
	cfg.StateBudgetMiB = budget
	h := &hook.Hook{Config: cfg}
	store := statedir.Store{Dir: state}
	var dirs []string
	var refusal error
	n := 0
	for ; refusal == nil; n++ {
		pid := testhelp.StandIn(t)
		id := fmt.Sprintf("tenant-%03d", n)
		req, err := hook.Find(&specs.State{ID: id, Pid: pid, Bundle: bundle, Annotations: map[string]string{annotations.Key: value.String()}})
		if err != nil {
			t.Fatal(err)
		}
		if refusal = h.Create(context.Background(), req); refusal == nil {
			for i := range deliveries {
				dirs = append(dirs, store.DeliveryDir(id, i))
			}
		}
	}
	served := n - 1
	if !strings.Contains(refusal.Error(), "state_budget_mib") {
		t.Fatalf("container %d refused for another reason: %v", n, refusal)
	}
	used, _ := store.Used()
	progress("state budget: %d containers of %d deliveries served, state directory at %.1f MiB; the next refused: %v", served, deliveries, float64(used)/(1<<20), refusal)
	poll.Eventually(t, 10*time.Second, "the hook's streams closed", func() bool { return fake.SVIDStreams() == 0 })

	limit := os.Getenv("BENCH_BUDGET_LIMIT")
	if limit == "" {
		limit = "160Mi"
	}
	limitBytes := parseMi(t, limit)
	var rows []string
	for _, run := range []struct {
		name  string
		limit int64
	}{{"no limit", 0}, {limit, limitBytes}} {
		cg := newMemCgroup(t, run.limit)
		cfgFile := filepath.Join(dir, "config.yaml")
		writeFile(t, cfgFile, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\n", socket, state))
		w := newSwapWatcher(t, dirs)
		start := time.Now()
		r := startRefresherIn(t, bin, cfgFile, dir, cg)
		// An OOM-killed refresher rewrites nothing more: stop waiting.
		killed := func() bool { return cg.read(t).oomKills > 0 }
		poll.Eventually(t, 180*time.Second, "every delivery rewritten at the refresher's start (or an OOM kill)", func() bool {
			return killed() || fake.SVIDStreams() == int64(served) && w.allSince(start)
		})
		for k := range 2 {
			t0 := time.Now()
			fake.Rotate()
			poll.Eventually(t, 180*time.Second, fmt.Sprintf("every delivery rewritten after rotation %d (or an OOM kill)", k+1), func() bool { return killed() || w.allSince(t0) })
		}
		time.Sleep(2 * time.Second)
		m := cg.read(t)
		used, _ := store.Used()
		row := fmt.Sprintf("| %s | %d | %d | %.1f MiB | %.1f MiB | %.1f MiB | %.1f MiB | %d | %d |", run.name, served, served*deliveries,
			float64(used)/(1<<20), float64(m.peak)/(1<<20), float64(m.usage)/(1<<20), float64(m.shmem)/(1<<20), m.failcnt, m.oomKills)
		progress("state budget: %s", row)
		rows = append(rows, row)
		if err := r.Process.Signal(syscall.SIGTERM); err == nil {
			r.Wait()
		}
		w.close()
		if m.oomKills > 0 && budget == config.DefaultStateBudgetMiB {
			t.Errorf("the refresher was OOM-killed under a %s limit at the node budget: %s", run.name, row)
		}
		if m.oomKills == 0 && fake.SVIDStreams() != 0 {
			poll.Eventually(t, 10*time.Second, "the refresher's streams closed", func() bool { return fake.SVIDStreams() == 0 })
		}
	}
	fmt.Printf("\n| memory limit | containers | deliveries | state directory | peak (cgroup) | at the end | of it tmpfs (shmem) | failcnt | OOM kills |\n|---|---|---|---|---|---|---|---|---|\n%s\n", strings.Join(rows, "\n"))
}

func parseMi(t *testing.T, s string) int64 {
	v, err := strconv.ParseInt(strings.TrimSuffix(s, "Mi"), 10, 64)
	if err != nil || !strings.HasSuffix(s, "Mi") {
		t.Fatalf("BENCH_BUDGET_LIMIT %q: want <n>Mi", s)
	}
	return v << 20
}

// memCgroup is a memory cgroup of the test's own, under the hierarchy's
// root: cgroup v2 (memory.max, memory.peak) or v1's memory controller.
type memCgroup struct {
	dir string
	v2  bool
}

type memUse struct {
	peak, usage, shmem int64
	failcnt, oomKills  int64
}

func newMemCgroup(t *testing.T, limit int64) *memCgroup {
	t.Helper()
	cg := &memCgroup{}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.subtree_control"); err == nil {
		cg.v2 = true
		cg.dir = filepath.Join("/sys/fs/cgroup", fmt.Sprintf("spiffe-bench-budget-%d-%d", os.Getpid(), time.Now().UnixNano()))
	} else {
		cg.dir = filepath.Join("/sys/fs/cgroup/memory", fmt.Sprintf("spiffe-bench-budget-%d-%d", os.Getpid(), time.Now().UnixNano()))
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		t.Fatalf("memory cgroup: %v", err)
	}
	t.Cleanup(func() {
		for deadline := time.Now().Add(10 * time.Second); os.Remove(cg.dir) != nil && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
	})
	if limit > 0 {
		file := "memory.limit_in_bytes"
		if cg.v2 {
			file = "memory.max"
		}
		writeFile(t, filepath.Join(cg.dir, file), strconv.FormatInt(limit, 10))
	}
	return cg
}

func (cg *memCgroup) read(t *testing.T) memUse {
	t.Helper()
	num := func(name string) int64 {
		data, err := os.ReadFile(filepath.Join(cg.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		v, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
		return v
	}
	field := func(name, key string) int64 {
		data, _ := os.ReadFile(filepath.Join(cg.dir, name))
		for _, l := range strings.Split(string(data), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == key {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				return v
			}
		}
		return 0
	}
	if cg.v2 {
		return memUse{peak: num("memory.peak"), usage: num("memory.current"), shmem: field("memory.stat", "shmem"),
			failcnt: field("memory.events", "max"), oomKills: field("memory.events", "oom_kill")}
	}
	return memUse{peak: num("memory.max_usage_in_bytes"), usage: num("memory.usage_in_bytes"), shmem: field("memory.stat", "shmem"),
		failcnt: num("memory.failcnt"), oomKills: field("memory.oom_control", "oom_kill")}
}

// startRefresherIn starts the refresher inside cg (a shell moves itself
// there, then execs it, so that nothing it allocates is charged
// elsewhere) and waits for its readiness notification.
func startRefresherIn(t *testing.T, bin, config, dir string, cg *memCgroup) *exec.Cmd {
	t.Helper()
	wrapper := filepath.Join(dir, "in-cgroup.sh")
	writeFileMode(t, wrapper, []byte("#!/bin/sh\necho $$ > \"$CGROUP/cgroup.procs\" || exit 1\nexec \"$@\"\n"), 0o755)
	t.Setenv("CGROUP", cg.dir)
	os.Remove(filepath.Join(dir, "notify.sock")) // the previous run's
	return startRefresherArgs(t, []string{wrapper, bin}, config, dir)
}
