// Package audit finds every running container on the node that asked for
// an identity and checks that it got one. It reads the OCI runtimes' own
// state (runc's and crun's state directories and the bundles' config.json
// they name, which CRI-O, containerd, Podman and plain runc or crun all
// leave), the CRI's pod annotations where containerd keeps them out of
// the specs, and the state directory's records and fail-open traces. It
// never writes: not to a container, not to a runtime's state, not to the
// state directory.
//
// A container that asked and has no delivery is the failure the hook
// cannot report itself: the hook did not run (the runtime does not read
// the hooks directory the JSON went to; the NRI plugin was down), or it
// let the container start without files under fail-open.
package audit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Pod and container annotations the CRI runtimes set on every container.
const (
	crioSandboxID   = "io.kubernetes.cri-o.SandboxID"
	crioType        = "io.kubernetes.cri-o.ContainerType"
	crioPodName     = "io.kubernetes.pod.name"
	crioPodNS       = "io.kubernetes.pod.namespace"
	ctrdSandboxID   = "io.kubernetes.cri.sandbox-id"
	ctrdPodName     = "io.kubernetes.cri.sandbox-name"
	ctrdPodNS       = "io.kubernetes.cri.sandbox-namespace"
	typeSandbox     = "sandbox"
	podmanManager   = "io.container.manager"
	podmanLibpod    = "libpod"
	hookBinaryName  = "spiffe-oci-hook"
	unmatchedRounds = 2
)

// Auditor audits one node. Its methods are not safe for concurrent use:
// the refresher runs one audit at a time.
type Auditor struct {
	Store    statedir.Store
	Settings func() config.Audit
	Log      *slog.Logger

	cache      map[string]cached          // container state dir -> what it said
	records    map[string]cachedRecord    // container ID -> its record
	logged     map[string]bool            // unserved instances and unmatched annotations already logged
	unmatched  map[string]int             // pod/annotation -> audits in a row it matched nothing
	failOpen   map[statedir.FailOpen]bool // traces counted
	failOpened uint64
}

type cachedRecord struct {
	mod  time.Time
	size int64
	ino  uint64
	rec  statedir.Record
}

type cached struct {
	mod  time.Time
	size int64
	c    Container
	err  error
}

// New returns an auditor of the containers whose deliveries store records.
func New(store statedir.Store, settings func() config.Audit, log *slog.Logger) *Auditor {
	return &Auditor{Store: store, Settings: settings, Log: log,
		cache: map[string]cached{}, records: map[string]cachedRecord{}, logged: map[string]bool{}, unmatched: map[string]int{}, failOpen: map[statedir.FailOpen]bool{}}
}

// running is a container found running, with what the audit knows of it.
type running struct {
	Container
	start                uint64
	sandbox              string
	pod, namespace, name string
}

// Run audits the node once.
func (a *Auditor) Run(ctx context.Context) Result {
	set := a.Settings()
	rep := Result{Time: time.Now()}
	all, errs := a.containers(set.RuntimeRoots)
	rep.Errors = errs

	pods := map[string]pod{}
	var criErrs []string
	for _, s := range expand(set.CRISockets) {
		ps, err := criPods(ctx, s)
		if err != nil {
			rep.Errors = append(rep.Errors, err.Error())
			criErrs = append(criErrs, err.Error())
		}
		for id, p := range ps {
			pods[id] = p
		}
	}
	traces, err := a.Store.FailOpens()
	if err != nil {
		rep.Errors = append(rep.Errors, err.Error())
	}
	a.countFailOpen(traces)
	rep.FailOpen = a.failOpened

	// Every container of each pod, running or not: a named annotation
	// matches an init container that has exited too.
	names := map[string][]string{}
	podAsks := map[string]podNames{}
	var live []running
	for _, c := range all {
		r := running{Container: c, sandbox: first(c.Annotations, crioSandboxID, ctrdSandboxID),
			name:      first(c.Annotations, annotations.CRIOContainerName, annotations.ContainerdContainerName),
			pod:       first(c.Annotations, crioPodName, ctrdPodName),
			namespace: first(c.Annotations, crioPodNS, ctrdPodNS)}
		if p, ok := pods[r.sandbox]; ok {
			r.pod, r.namespace = p.Name, p.Namespace
			if _, seen := podAsks[r.sandbox]; !seen {
				podAsks[r.sandbox] = podNames{pod: p.Name, namespace: p.Namespace, names: asksOf(p.Identity).Names}
			}
		}
		isSandbox := c.Annotations[crioType] == typeSandbox || c.Annotations[annotations.ContainerdContainerType] == typeSandbox
		if r.sandbox != "" && !isSandbox {
			names[r.sandbox] = append(names[r.sandbox], r.name)
			if _, seen := podAsks[r.sandbox]; !seen && c.Asks.Any {
				// CRI-O copies the pod's annotations into each container's spec.
				podAsks[r.sandbox] = podNames{pod: r.pod, namespace: r.namespace, names: c.Asks.Names}
			}
		}
		if isSandbox || c.Created || c.PID <= 0 {
			continue
		}
		// A stopped container keeps its runtime state until it is
		// removed: its init must still be there.
		if unix.Kill(c.PID, 0) == unix.ESRCH {
			continue
		}
		live = append(live, r)
	}

	liveIDs := make(map[string]bool, len(live))
	for _, r := range live {
		liveIDs[r.ID] = true
	}
	for id := range a.records {
		if !liveIDs[id] {
			delete(a.records, id)
		}
	}
	podLive := map[string]bool{}
	for _, r := range live {
		podLive[r.sandbox] = true
		u, asked := a.check(r, pods, criErrs, traces)
		if !asked {
			continue
		}
		rep.Checked++
		if u != nil {
			rep.Unserved = append(rep.Unserved, *u)
		}
	}
	rep.Unmatched = a.unmatchedNames(podAsks, names, podLive)
	a.logFindings(rep)
	return rep
}

// containers reads every runtime root, reusing what it read before of a
// container whose state file has not changed.
func (a *Auditor) containers(patterns []string) ([]Container, []string) {
	var out []Container
	var errs []string
	seen := map[string]bool{}
	for _, root := range roots(patterns) {
		dirs, err := listRoot(root)
		if err != nil {
			errs = append(errs, fmt.Sprintf("runtime state %s: %v", root, err))
			continue
		}
		for _, dir := range dirs {
			st := stateStat(dir)
			if st == nil {
				continue // not a container, or being created or deleted
			}
			seen[dir] = true
			cc, ok := a.cache[dir]
			if !ok || !cc.mod.Equal(st.ModTime()) || cc.size != st.Size() {
				c, err := readState(root, dir)
				cc = cached{mod: st.ModTime(), size: st.Size(), c: c, err: err}
				a.cache[dir] = cc
			}
			if tl := (*ocistate.TooLargeError)(nil); errors.As(cc.err, &tl) {
				errs = append(errs, fmt.Sprintf("container %s in %s: %v, more than any runtime writes: the audit cannot tell whether it asked for an identity", cc.c.ID, root, tl))
				continue
			}
			if cc.err != nil {
				continue // a container being removed: its bundle goes first
			}
			c := cc.c
			// exec.fifo goes when the container starts, without the state
			// file changing.
			if c.Created {
				if _, err := os.Stat(filepath.Join(dir, "exec.fifo")); err != nil {
					c.Created = false
					cc.c.Created = false
					a.cache[dir] = cc
				}
			}
			out = append(out, c)
		}
	}
	for dir := range a.cache {
		if !seen[dir] {
			delete(a.cache, dir)
		}
	}
	return out, errs
}

// stateStat stats a container's state file: runc's or crun's.
func stateStat(dir string) os.FileInfo {
	for _, name := range []string{"state.json", "status"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return st
		}
	}
	return nil
}

// check tells whether container r asked for an identity, and if so and it
// has no delivery, why not as far as can be told. A containerd container
// whose spec does not say and whose pod could not be read from a CRI
// (criErrs) may have asked: it is checked too, and reported as such.
func (a *Auditor) check(r running, pods map[string]pod, criErrs []string, traces []statedir.FailOpen) (*Unserved, bool) {
	asks := r.Asks
	viaPod, unknown := false, false
	if r.Annotations[annotations.ContainerdContainerType] == annotations.ContainerdTypeContainer && !asks.Any {
		p, ok := pods[r.sandbox]
		switch {
		case ok && len(p.Identity) > 0:
			// The pod's annotation, with the container's name keys.
			asks = asksOf(merged(p.Identity, r.Annotations))
			viaPod = true
		case !ok && len(criErrs) > 0:
			unknown = true
		}
	}
	key := asks.Key
	if key == "" && !unknown {
		return nil, false
	}
	// runc records its init's start time: a record naming it serves the
	// container. Otherwise (crun, or no such record) /proc tells the start
	// time, and whether the pid is still the container's at all.
	rec, recErr := a.record(r.ID)
	if r.initStart != 0 && recErr == nil && rec.PID == r.PID && rec.StartTime == r.initStart {
		return nil, true
	}
	start, err := process.StartTime(r.PID)
	if err != nil || (r.initStart != 0 && r.initStart != start) {
		return nil, false // stopped, its pid maybe reused
	}
	r.start = start
	if recErr == nil && rec.PID == r.PID && rec.StartTime == start {
		return nil, true
	}
	u := &Unserved{ID: r.ID, PID: r.PID, Pod: r.pod, Namespace: r.namespace, Name: r.name, Root: r.Root}
	switch {
	case unknown:
		u.Cause = CauseCRIUnreadable
		u.Detail = fmt.Sprintf("its pod's annotations are only in the CRI, which could not be read (%s), so the audit cannot tell whether it asked for an identity: make the CRI socket readable by the refresher (its answer must stay under %d MiB)",
			strings.Join(criErrs, "; "), maxCRIMessage>>20)
	case asks.Empty:
		u.Cause = CauseEmptyAnnotation
		u.Detail = fmt.Sprintf("annotation %s is empty: the hooks.d \"when\" clause never matches an empty value, so the hook never ran; give it a delivery list", key)
	case failOpenTrace(traces, r) != nil:
		f := failOpenTrace(traces, r)
		u.Cause = CauseFailOpen
		u.Detail = fmt.Sprintf("started WITHOUT its identity at %s under failure_policy: fail-open: %s", f.Time.UTC().Format(time.RFC3339), f.Error)
	case viaPod:
		u.Cause = CauseNRIPluginAbsent
		u.Detail = fmt.Sprintf("its pod asks for an identity (%s) but the annotation never reached the container's spec, so containerd ran no hook: spiffe-oci-nri was not running when the container was created and no NRI validator held it; start the plugin, add %s to the pod, and recreate the pod", key, "required-plugins.noderesource.dev/pod: '[\"spiffe-oci-hook\"]'")
	case r.HasHook:
		u.Cause = CauseNoRecord
		u.Detail = fmt.Sprintf("spiffe-oci-hook is in its spec but left no record for pid %d in %s: check that the hook's state_dir is the refresher's, and the hook's lines in syslog", r.PID, a.Store.Dir)
	default:
		u.Cause = CauseHookNotConfigured
		u.Detail = "the runtime did not run spiffe-oci-hook: " + hookAdvice(r.Annotations)
	}
	return u, true
}

// record reads container id's record, again only when its file changed:
// most audits find every record as they left it.
func (a *Auditor) record(id string) (statedir.Record, error) {
	st, err := os.Stat(a.Store.RecordPath(id))
	if err != nil {
		delete(a.records, id)
		return statedir.Record{}, err
	}
	if c, ok := a.records[id]; ok && c.mod.Equal(st.ModTime()) && c.size == st.Size() && c.ino == inode(st) {
		return c.rec, nil
	}
	rec, err := a.Store.Load(id)
	if err != nil {
		return rec, err
	}
	// Only what the check needs is kept.
	rec = statedir.Record{ID: rec.ID, PID: rec.PID, StartTime: rec.StartTime}
	a.records[id] = cachedRecord{mod: st.ModTime(), size: st.Size(), ino: inode(st), rec: rec}
	return rec, nil
}

func inode(st os.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Ino
	}
	return 0
}

// hookAdvice says where the runtime that made a container looks for hooks.
func hookAdvice(ann map[string]string) string {
	switch {
	case ann[crioSandboxID] != "":
		return "no hooks directory CRI-O reads holds spiffe-oci-hook.json (CRI-O reads only /usr/share/containers/oci/hooks.d unless its hooks_dir says otherwise): install the JSON there or add its directory to hooks_dir, then recreate the pod"
	case ann[ctrdSandboxID] != "":
		return "containerd injected no hook: run spiffe-oci-nri (or NRI's hook-injector with pod_annotations allowed), then recreate the pod"
	case ann[podmanManager] == podmanLibpod:
		return "no hooks directory Podman reads holds spiffe-oci-hook.json (/usr/share/containers/oci/hooks.d, /etc/containers/oci/hooks.d, or the --hooks-dir given): install it there, then recreate the container"
	}
	return "its config.json has no spiffe-oci-hook createRuntime hook: add it to the bundle, then recreate the container"
}

// podNames are the names a pod's named annotations (container.<name>)
// give (Asks.Names), and the pod.
type podNames struct {
	pod, namespace string
	names          []string
}

// unmatchedNames reports the named annotations (container.<name>) of each
// pod that match none of its containers, once that held for two audits in
// a row while the pod had a running container: the kubelet creates a
// pod's containers one after the other.
func (a *Auditor) unmatchedNames(podAsks map[string]podNames, names map[string][]string, podLive map[string]bool) []Unmatched {
	var out []Unmatched
	now := map[string]int{}
	for sandbox, p := range podAsks {
		if !podLive[sandbox] {
			continue
		}
		for _, name := range p.names {
			if slices.Contains(names[sandbox], name) {
				continue
			}
			k := annotations.Key + "." + name
			id := sandbox + "/" + k
			now[id] = a.unmatched[id] + 1
			if now[id] < unmatchedRounds {
				continue
			}
			out = append(out, Unmatched{Annotation: k, Containers: slices.Sorted(slices.Values(names[sandbox])), Pod: p.pod, Namespace: p.namespace})
		}
	}
	a.unmatched = now
	slices.SortFunc(out, func(x, y Unmatched) int {
		return strings.Compare(x.Namespace+"/"+x.Pod+"/"+x.Annotation, y.Namespace+"/"+y.Pod+"/"+y.Annotation)
	})
	return out
}

// countFailOpen counts the fail-open traces not seen before.
func (a *Auditor) countFailOpen(traces []statedir.FailOpen) {
	now := map[statedir.FailOpen]bool{}
	for _, f := range traces {
		k := statedir.FailOpen{ID: f.ID, PID: f.PID, StartTime: f.StartTime}
		if !a.failOpen[k] {
			a.failOpened++
		}
		now[k] = true
	}
	a.failOpen = now
}

// logFindings logs each unserved instance and unmatched annotation once.
func (a *Auditor) logFindings(rep Result) {
	now := map[string]bool{}
	for _, u := range rep.Unserved {
		k := fmt.Sprintf("%s/%d/%s", u.ID, u.PID, u.Cause)
		now[k] = true
		if !a.logged[k] {
			a.Log.Error("container running without its identity", logkey.Container, u.ID, logkey.Pod, u.Pod, logkey.Namespace, u.Namespace,
				"name", u.Name, logkey.PID, u.PID, "cause", u.Cause, logkey.Detail, u.Detail)
		}
	}
	for _, u := range rep.Unmatched {
		k := u.Namespace + "/" + u.Pod + "/" + u.Annotation
		now[k] = true
		if !a.logged[k] {
			a.Log.Error("annotation names no container of its pod", logkey.Pod, u.Pod, logkey.Namespace, u.Namespace, "annotation", u.Annotation,
				logkey.Containers, strings.Join(u.Containers, ","), logkey.Detail, "no container gets an identity from it: correct the container name in the annotation")
		}
	}
	for _, e := range rep.Errors {
		now["error "+e] = true
		if !a.logged["error "+e] {
			a.Log.Warn("audit: could not read", logkey.Error, e)
		}
	}
	a.logged = now
}

func failOpenTrace(traces []statedir.FailOpen, r running) *statedir.FailOpen {
	for i, f := range traces {
		if f.ID == r.ID && f.PID == r.PID && (f.StartTime == 0 || f.StartTime == r.start) {
			return &traces[i]
		}
	}
	return nil
}

// hasHook reports whether spiffe-oci-hook is among a spec's creation hooks.
func hasHook(h *specs.Hooks) bool {
	if h == nil {
		return false
	}
	//lint:ignore SA1019 prestart is how CRI-O and older runtimes run it.
	for _, hk := range slices.Concat(h.CreateRuntime, h.Prestart) { //nolint:staticcheck
		if filepath.Base(hk.Path) == hookBinaryName || (len(hk.Args) > 0 && filepath.Base(hk.Args[0]) == hookBinaryName) {
			return true
		}
	}
	return false
}

func merged(a, b map[string]string) map[string]string {
	m := make(map[string]string, len(a)+len(b))
	for k, v := range a {
		m[k] = v
	}
	for k, v := range b {
		m[k] = v
	}
	return m
}

func first(m map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := m[k]; v != "" {
			return v
		}
	}
	return ""
}
