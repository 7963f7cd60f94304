package bench

import (
	"bufio"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// stat is a set of samples.
type stat struct {
	Name    string
	Samples []time.Duration
}

func (s stat) sorted() []time.Duration {
	c := slices.Clone(s.Samples)
	slices.Sort(c)
	return c
}

// Median is the middle sample (the mean of the two middle ones for an even count).
func (s stat) Median() time.Duration { return median(s.Samples) }

// P is the nearest-rank q-quantile.
func (s stat) P(q float64) time.Duration {
	c := s.sorted()
	if len(c) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

func (s stat) Max() time.Duration { return s.P(1) }

func median(d []time.Duration) time.Duration {
	c := slices.Clone(d)
	slices.Sort(c)
	n := len(c)
	switch {
	case n == 0:
		return 0
	case n%2 == 1:
		return c[n/2]
	default:
		return (c[n/2-1] + c[n/2]) / 2
	}
}

// paired is a_i - b_i for the samples of one round.
func paired(a, b []time.Duration) stat {
	var out []time.Duration
	for i := range min(len(a), len(b)) {
		out = append(out, a[i]-b[i])
	}
	return stat{Samples: out}
}

type machineInfo struct {
	CPUs         int
	CPUModel     string
	MemTotal     string
	Kernel       string
	Go           string
	Runc         string
	Podman       string
	SPIRE        string
	Helper       string
	RuncInitPath string
	Date         string
	// HookInits and DirectInits are the package initialisers each hook
	// binary runs before main (GODEBUG=inittrace=1).
	HookInits, DirectInits int
}

// inits counts the package initialisers bin runs before main: the lines
// GODEBUG=inittrace=1 prints, one per package with init work.
func inits(bin string) int {
	cmd := exec.Command(bin, "--version")
	cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
	out, _ := cmd.CombinedOutput()
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "init ") {
			n++
		}
	}
	return n
}

func machine(root string) machineInfo {
	m := machineInfo{
		CPUs: runtime.NumCPU(),
		Go:   runtime.Version(),
		Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"),
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				var kb int64
				fmt.Sscan(f[1], &kb)
				m.MemTotal = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	m.Runc = firstLine("runc", "--version")
	m.Podman = firstLine("podman", "--version")
	// The agent the benchmarks run: the primary line's module.
	if data, err := os.ReadFile(filepath.Join(root, "test", "spire115", "go.mod")); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "github.com/spiffe/spire" {
				m.SPIRE = f[1]
			}
		}
	}
	if data, err := os.ReadFile(filepath.Join(root, "test", "spire", "go.mod")); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) >= 2 && f[0] == "github.com/spiffe/spiffe-helper" {
				m.Helper = f[1]
			}
		}
	}
	return m
}

func firstLine(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return "unavailable"
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

type createResult struct {
	Name                   string
	Variants               []stat // in rig.variants order
	HookWall, Fetch        stat
	Overhead               stat
	NoAnnWall              stat
	PairedNoAnn, PairedAnn stat
	PairedJWT              stat
	// The same annotated container handed over to a running refresher:
	// the hook's wall time, the agent round-trip measured beside it, and
	// their difference; the runc-level paired Δ.
	HandoffWall, HandoffFetch stat
	HandoffOverhead           stat
	PairedHandoff             stat
	// Per round, the refresher's own time for the container
	// (spiffe_oci_handoff_duration_seconds: its fetch and the files), and
	// the hook's wall time less that: the hook's own.
	HandoffRefresher, HandoffOwn stat
}

type helperResult struct {
	Mem     mem
	IdleCPU time.Duration
}

type results struct {
	Rounds, Rotations int
	Idle              time.Duration
	Machine           machineInfo
	Create            []createResult // A: agent as e2e runs it; B: no executable hashing
	Helper            helperResult
	Scale             []scaleResult
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

// cpuMS shows small CPU times with more digits.
func cpuMS(d time.Duration) string {
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

func signedMS(d time.Duration) string {
	return fmt.Sprintf("%+.1f ms", float64(d)/float64(time.Millisecond))
}

func mib(kb int64) string { return fmt.Sprintf("%.1f MiB", float64(kb)/1024) }

func gib(kb int64) string { return fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20)) }

// Targets.
const (
	targetNoAnn     = 3 * time.Millisecond
	targetOverhead  = 5 * time.Millisecond
	targetRatio     = 0.7 // the hook asking the agent itself (spiffe-oci-hook-direct)
	targetHandoff   = 0.5 // the hook handing the container to the refresher (issue 26)
	targetRSSKiB    = 58 * 1024
	targetRotateP99 = time.Second
	targetScale     = 1000
)

func verdict(ok bool, miss string) string {
	if ok {
		return "met"
	}
	return "**missed** by " + miss
}

func (c createResult) ratio() float64 { return c.helperRatio(c.HookWall) }

// handoffRatio is ratio for the container handed over to the refresher.
func (c createResult) handoffRatio() float64 { return c.helperRatio(c.HandoffWall) }

func (c createResult) helperRatio(hook stat) float64 {
	h := c.Variants[4].Median()
	if h == 0 {
		return 0
	}
	return float64(hook.Median()) / float64(h)
}

var passLabel = []string{"A", "B"}

func (r *results) scale(n int) *scaleResult {
	for i := range r.Scale {
		if r.Scale[i].N == n {
			return &r.Scale[i]
		}
	}
	return nil
}

// table renders every result as Markdown.
func (r *results) table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Agent configurations (one real SPIRE %s agent, restarted between them):\n\n", r.Machine.SPIRE)
	for k, c := range r.Create {
		fmt.Fprintf(&b, "- **%s**: %s\n", passLabel[k], c.Name)
	}
	fmt.Fprintf(&b, "\n### Container create latency: `runc run` of busybox `/bin/true`, %d interleaved rounds per variant\n\n", r.Rounds)
	b.WriteString("| Agent | Variant | median | p95 | median − no hook | paired Δ (median of per-round differences) |\n|---|---|---:|---:|---:|---:|\n")
	for k, c := range r.Create {
		base := c.Variants[0].Median()
		for i, name := range []string{"no hook", "hook configured, no annotation", "hook + annotation, no refresher (spiffe-oci-hook-direct)"} {
			v := c.Variants[i]
			delta, pd := "—", "—"
			if i == 1 {
				delta, pd = signedMS(v.Median()-base), signedMS(c.PairedNoAnn.Median())
			}
			if i == 2 {
				delta, pd = signedMS(v.Median()-base), signedMS(c.PairedAnn.Median())
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", passLabel[k], name, ms(v.Median()), ms(v.P(0.95)), delta, pd)
		}
		if len(c.Variants) > jwtVariant {
			v := c.Variants[jwtVariant]
			fmt.Fprintf(&b, "| %s | hook + annotation with a JWT-SVID and JWT bundles, no refresher | %s | %s | %s | %s |\n", passLabel[k], ms(v.Median()), ms(v.P(0.95)), signedMS(v.Median()-base), signedMS(c.PairedJWT.Median()))
		}
		if len(c.Variants) > handoffVariant {
			v := c.Variants[handoffVariant]
			fmt.Fprintf(&b, "| %s | **hook + annotation, handed to the refresher** | %s | %s | %s | %s |\n", passLabel[k], ms(v.Median()), ms(v.P(0.95)), signedMS(v.Median()-base), signedMS(c.PairedHandoff.Median()))
		}
	}

	fmt.Fprintf(&b, "\n### Where the annotated hook's time goes, and the hook vs spiffe-helper %s one-shot (%d rounds)\n\n", r.Machine.Helper, r.Rounds)
	b.WriteString("| Measurement |")
	for k := range r.Create {
		fmt.Fprintf(&b, " %s median | %s p95 |", passLabel[k], passLabel[k])
	}
	b.WriteString("\n|---|")
	for range r.Create {
		b.WriteString("---:|---:|")
	}
	b.WriteString("\n")
	row := func(label string, f func(c createResult) (string, string)) {
		b.WriteString("| " + label + " |")
		for _, c := range r.Create {
			m, p := f(c)
			fmt.Fprintf(&b, " %s | %s |", m, p)
		}
		b.WriteString("\n")
	}
	row("**handed to the refresher**: hook process wall time at createRuntime (fork → reaped: pidfd + handoff, the refresher's fetch over its open connection and write, mount, record)", func(c createResult) (string, string) {
		return ms(c.HandoffWall.Median()), ms(c.HandoffWall.P(0.95))
	})
	row("handed over: agent round-trip alone, `agent.FetchX509` over a new connection, same pid, same moment", func(c createResult) (string, string) {
		return ms(c.HandoffFetch.Median()), ms(c.HandoffFetch.P(0.95))
	})
	row("handed over: hook wall − that round-trip (per round; the refresher's own fetch, on its open connection with the bundles it follows, is shorter than this round-trip)", func(c createResult) (string, string) {
		return ms(c.HandoffOverhead.Median()), ms(c.HandoffOverhead.P(0.95))
	})
	row("handed over: the refresher's delivery of that very container by its own clock (`spiffe_oci_handoff_duration_seconds`, read before and after each round: its fetch on its open connection, the render and the files)", func(c createResult) (string, string) {
		return ms(c.HandoffRefresher.Median()), ms(c.HandoffRefresher.P(0.95))
	})
	row("handed over: **hook's own time** = wall − the refresher's delivery (per round: exec, Go start, config, state, pidfd, the socket both ways, mount, record, exit)", func(c createResult) (string, string) {
		return "**" + ms(c.HandoffOwn.Median()) + "**", ms(c.HandoffOwn.P(0.95))
	})
	row("no refresher (spiffe-oci-hook runs spiffe-oci-hook-direct): hook process wall time at createRuntime (fork → reaped: handoff refused, exec, fetch + write + mount + record)", func(c createResult) (string, string) {
		return ms(c.HookWall.Median()), ms(c.HookWall.P(0.95))
	})
	row("no refresher: agent round-trip alone, `agent.FetchX509` over a new connection, same pid, same moment", func(c createResult) (string, string) {
		return ms(c.Fetch.Median()), ms(c.Fetch.P(0.95))
	})
	row("no refresher: **hook's own overhead** = wall − round-trip (per round)", func(c createResult) (string, string) {
		return "**" + ms(c.Overhead.Median()) + "**", ms(c.Overhead.P(0.95))
	})
	row("spiffe-helper one-shot wall time (start → exit: Workload API fetch + write)", func(c createResult) (string, string) {
		return ms(c.Variants[4].Median()), ms(c.Variants[4].P(0.95))
	})
	row("hook process wall time, no annotation (reads config and state, exits)", func(c createResult) (string, string) {
		return ms(c.NoAnnWall.Median()), ms(c.NoAnnWall.P(0.95))
	})
	row(fmt.Sprintf("exec floor: `spiffe-oci-hook --version` (fork, exec, Go runtime and package init, exit; %d package initialisers)", r.Machine.HookInits), func(c createResult) (string, string) {
		return ms(c.Variants[6].Median()), ms(c.Variants[6].P(0.95))
	})
	row(fmt.Sprintf("exec floor: `spiffe-oci-hook-direct --version` (%d package initialisers)", r.Machine.DirectInits), func(c createResult) (string, string) {
		if len(c.Variants) <= directFloorVariant {
			return "—", "—"
		}
		return ms(c.Variants[directFloorVariant].Median()), ms(c.Variants[directFloorVariant].P(0.95))
	})
	row("exec floor: `spiffe-helper -version`", func(c createResult) (string, string) {
		return ms(c.Variants[7].Median()), ms(c.Variants[7].P(0.95))
	})
	row("**ratio hook / spiffe-helper, handed to the refresher** (medians)", func(c createResult) (string, string) {
		return fmt.Sprintf("**%.2f**", c.handoffRatio()), ""
	})
	row("ratio hook / spiffe-helper, no refresher (medians)", func(c createResult) (string, string) {
		return fmt.Sprintf("%.2f", c.ratio()), ""
	})

	fmt.Fprintf(&b, "\n### Keeping SVIDs fresh: spiffe-oci-refresher (fake agent, in-process) vs spiffe-helper daemons (real SPIRE agent)\n\n")
	b.WriteString("| Process | containers | RSS served+idle | peak RSS (VmHWM) | PSS | private | threads | CPU per minute idle | rotation p50 | rotation p99 | rotation max | CPU per rotation | start → all rewritten |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range r.Scale {
		fmt.Fprintf(&b, "| spiffe-oci-refresher | %d | %s | %s | %s | %s | %d | %s | %s | %s | %s | %s | %s |\n",
			s.N, mib(s.Mem.RSS), mib(max(s.Mem.HWM, s.MemAfter.HWM)), mib(s.Mem.PSS), mib(s.Mem.Private), s.Mem.Threads,
			cpuMS(s.IdleCPU), ms(s.Rotation.Median()), ms(s.Rotation.P(0.99)), ms(s.Rotation.Max()), ms(s.RotationCPU), ms(s.Startup))
	}
	hm := r.Helper.Mem
	fmt.Fprintf(&b, "| spiffe-helper daemon (one per pod) | 1 | %s | %s | %s | %s | %d | %s | — | — | — | — | — |\n",
		mib(hm.RSS), mib(hm.HWM), mib(hm.PSS), mib(hm.Private), hm.Threads, cpuMS(r.Helper.IdleCPU))
	fmt.Fprintf(&b, "| 1,000 spiffe-helper daemons (× 1,000) | 1,000 | %s | — | %s | %s | %d | %s | — | — | — | — | — |\n",
		gib(hm.RSS*1000), gib(hm.PSS*1000), gib(hm.Private*1000), hm.Threads*1000, fmt.Sprintf("%.2f s", 1000*r.Helper.IdleCPU.Seconds()))

	b.WriteString("\n### Targets\n\n| Target | Result | Verdict |\n|---|---|---|\n")
	for k, c := range r.Create {
		noAnn := c.PairedNoAnn.Median()
		fmt.Fprintf(&b, "| %s: no-annotation path within 3 ms of no hook | paired Δ median %s (medians differ by %s) | %s |\n",
			passLabel[k], signedMS(noAnn), signedMS(c.Variants[1].Median()-c.Variants[0].Median()), verdict(noAnn <= targetNoAnn, ms(noAnn-targetNoAnn)))
	}
	for k, c := range r.Create {
		ov := c.HandoffOwn.Median()
		fmt.Fprintf(&b, "| %s, handed to the refresher: hook's own time ≤ 5 ms | median %s (p95 %s) | %s |\n", passLabel[k], ms(ov), ms(c.HandoffOwn.P(0.95)), verdict(ov <= targetOverhead, ms(ov-targetOverhead)))
	}
	for k, c := range r.Create {
		ratio := c.handoffRatio()
		fmt.Fprintf(&b, "| %s, handed to the refresher: hook / spiffe-helper one-shot ≤ 0.5 | %.2f (%s / %s) | %s |\n", passLabel[k], ratio, ms(c.HandoffWall.Median()), ms(c.Variants[4].Median()), verdict(ratio <= targetHandoff, fmt.Sprintf("%.2f", ratio-targetHandoff)))
	}
	for k, c := range r.Create {
		ratio := c.ratio()
		fmt.Fprintf(&b, "| %s, no refresher (spiffe-oci-hook-direct): hook / spiffe-helper one-shot ≤ 0.7 | %.2f (%s / %s) | %s |\n", passLabel[k], ratio, ms(c.HookWall.Median()), ms(c.Variants[4].Median()), verdict(ratio <= targetRatio, fmt.Sprintf("%.2f", ratio-targetRatio)))
	}
	if s := r.scale(targetScale); s != nil {
		peak := max(s.Mem.HWM, s.MemAfter.HWM)
		fmt.Fprintf(&b, "| refresher peak RSS ≤ 58 MiB at 1,000 containers | %s served+idle, %s peak (VmHWM), %s after rotations | %s |\n",
			mib(s.Mem.RSS), mib(peak), mib(s.MemAfter.RSS), verdict(peak <= targetRSSKiB, mib(peak-targetRSSKiB)+" (peak)"))
		p99 := s.Rotation.P(0.99)
		worst := slices.Max(s.RotationP99PerRotation)
		fmt.Fprintf(&b, "| rotation p99 ≤ 1 s at 1,000 containers | %s over %d rotations × %d containers (worst single rotation %s) | %s |\n",
			ms(p99), r.Rotations, s.N, ms(worst), verdict(p99 <= targetRotateP99, ms(p99-targetRotateP99)))
	}
	return b.String()
}

// TestMarkedSections: the runc part keeps the other parts' sections.
func TestMarkedSections(t *testing.T) {
	doc := "# Benchmarks\nold runc part\n<!-- begin node -->\n## Node\nx\n<!-- end node -->\n\n<!-- begin audit -->\n## Audit\n<!-- end audit -->\n"
	want := "\n<!-- begin node -->\n## Node\nx\n<!-- end node -->\n\n<!-- begin audit -->\n## Audit\n<!-- end audit -->\n"
	if got := markedSections(doc); got != want {
		t.Errorf("markedSections = %q, want %q", got, want)
	}
	if got := markedSections("no sections\n<!-- begin broken -->\n"); got != "" {
		t.Errorf("unterminated section kept: %q", got)
	}
}
