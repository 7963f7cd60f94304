package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
)

// Container is one container as its OCI runtime's state tells it.
type Container struct {
	ID string
	// Root is the runtime state directory it was found in.
	Root   string
	Bundle string
	// PID is the container's init process, as the runtime recorded it,
	// and initStart its start time when the runtime recorded it (runc).
	PID       int
	initStart uint64
	// Created: the runtime created it and has not started it yet (its
	// hooks may be running now).
	Created bool
	// Annotations are the few of its OCI spec's annotations (the bundle's
	// config.json) the audit reads besides the identity ones (kept): the
	// runtime's, naming its pod and itself.
	Annotations map[string]string
	// Asks is what the audit decides on of its identity annotations.
	Asks Asks
	// HasHook: spiffe-oci-hook is among its hooks.
	HasHook bool
}

// Limits on what Asks keeps of a spec's named annotations. Kubernetes
// allows a pod a few thousand annotation keys; a container name is at
// most 63 bytes there.
const (
	maxNames   = 64
	maxNameLen = 253
)

// Asks is what the audit keeps of a set of identity annotations: never
// their values. A pod chooses their number and size (up to 256 KiB in
// Kubernetes), CRI-O copies them into each of its containers' specs, and
// the audit keeps every container's between audits.
type Asks struct {
	// Key is the annotation that applies to the container
	// (annotations.Find); "" when none does.
	Key string
	// Empty: that annotation's value is empty.
	Empty bool
	// Any: some identity annotation is there, applying or not.
	Any bool
	// Names are the container names of the named annotations
	// (annotations.Key.<name>), for the check that each names a container
	// of its pod: sorted, at most maxNames of them, none longer than
	// maxNameLen bytes (no container can be named so).
	Names []string
}

// asksOf tells what ann's identity annotations ask of the container that
// ann's name annotations name.
func asksOf(ann map[string]string) Asks {
	var a Asks
	if key, value, ok := annotations.Find(ann); ok {
		a.Key, a.Empty = strings.Clone(key), value == ""
	}
	for k := range ann {
		if !annotations.IsIdentityKey(k) {
			continue
		}
		a.Any = true
		if name, ok := strings.CutPrefix(k, annotations.Key+"."); ok && len(name) <= maxNameLen {
			a.Names = append(a.Names, name)
		}
	}
	slices.Sort(a.Names)
	if len(a.Names) > maxNames {
		a.Names = a.Names[:maxNames]
	}
	for i, n := range a.Names {
		a.Names[i] = strings.Clone(n)
	}
	a.Names = slices.Clip(a.Names)
	return a
}

// identityOnly returns ann's identity annotations with each value
// replaced by whether it is empty: all that asksOf reads of a value.
func identityOnly(ann map[string]string) map[string]string {
	var m map[string]string
	for k, v := range ann {
		if !annotations.IsIdentityKey(k) {
			continue
		}
		if m == nil {
			m = map[string]string{}
		}
		if v != "" {
			v = "-"
		}
		m[strings.Clone(k)] = v
	}
	return m
}

// stateFile is what the audit reads of a runtime's per-container state:
// runc's state.json or crun's status, whichever is there.
type stateFile struct {
	// runc
	InitPID   int    `json:"init_process_pid"`
	InitStart uint64 `json:"init_process_start"`
	Config    struct {
		Labels []string `json:"labels"`
	} `json:"config"`
	// crun
	PID    int    `json:"pid"`
	Bundle string `json:"bundle"`
}

// readState reads the container in directory dir of runtime root root.
// Its spec is read from the bundle the runtime names: the container's
// config.json as its runtime got it (CRI-O's and Podman's userdata,
// containerd's task directory, a plain runc bundle).
func readState(root, dir string) (Container, error) {
	c := Container{ID: filepath.Base(dir), Root: root}
	var st stateFile
	var raw []byte
	var err error
	for _, name := range []string{"state.json", "status"} {
		// runc's state.json holds the spec's annotations too (as labels).
		if raw, err = ocistate.ReadFile(filepath.Join(dir, name), ocistate.MaxConfigSize); !errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	if err != nil {
		return c, err
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return c, fmt.Errorf("%s: %w", dir, err)
	}
	c.PID, c.initStart, c.Bundle = st.InitPID, st.InitStart, st.Bundle
	if c.PID == 0 {
		c.PID = st.PID
	}
	for _, l := range st.Config.Labels {
		if b, ok := strings.CutPrefix(l, "bundle="); ok {
			c.Bundle = b
		}
	}
	if c.Bundle == "" {
		return c, fmt.Errorf("%s: no bundle in the runtime's state", dir)
	}
	// runc and crun keep exec.fifo until the container is started.
	if _, err := os.Stat(filepath.Join(dir, "exec.fifo")); err == nil {
		c.Created = true
	}
	data, err := ocistate.ReadFile(filepath.Join(c.Bundle, "config.json"), ocistate.MaxConfigSize)
	if err != nil {
		return c, err
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
		Hooks       *specs.Hooks      `json:"hooks"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return c, fmt.Errorf("%s/config.json: %w", c.Bundle, err)
	}
	c.Annotations, c.Asks, c.HasHook = keep(spec.Annotations), asksOf(spec.Annotations), hasHook(spec.Hooks)
	return c, nil
}

// kept are the annotations the audit reads besides the identity ones. A
// CRI container's spec carries kilobytes of others (labels, the pod's
// annotations as JSON); the audit keeps every container's between audits,
// so it keeps only these, which the runtime sets.
var kept = map[string]bool{
	crioSandboxID: true, crioType: true, crioPodName: true, crioPodNS: true,
	ctrdSandboxID: true, ctrdPodName: true, ctrdPodNS: true, podmanManager: true,
	annotations.CRIOContainerName: true, annotations.ContainerdContainerName: true, annotations.ContainerdContainerType: true,
}

func keep(all map[string]string) map[string]string {
	m := map[string]string{}
	for k, v := range all {
		if kept[k] {
			m[k] = v
		}
	}
	return m
}

// roots expands the configured runtime roots' patterns.
func roots(patterns []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, p := range patterns {
		matches, _ := filepath.Glob(p)
		for _, m := range matches {
			if st, err := os.Stat(m); err == nil && st.IsDir() && !seen[m] {
				seen[m] = true
				out = append(out, m)
			}
		}
	}
	return out
}

// expand expands the configured CRI sockets' patterns.
func expand(patterns []string) []string {
	var out []string
	for _, p := range patterns {
		matches, _ := filepath.Glob(p)
		out = append(out, matches...)
	}
	return out
}

// listRoot lists the container directories of one runtime root.
func listRoot(root string) ([]string, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var dirs []string
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join(root, e.Name()))
		}
	}
	return dirs, nil
}
