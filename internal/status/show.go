package status

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Show writes the status command's output: one line about the refresher,
// then a header and one line per container recorded in the state
// directory. The running refresher tells each container's error and what
// it last wrote; when it is down, the state directory alone does, and the
// first line says so. It returns whether the refresher answered.
func Show(ctx context.Context, w io.Writer, store statedir.Store, socket string) (running bool, err error) {
	rep, repErr := NewClient(socket).Report(ctx)
	running = repErr == nil
	served := map[string]Container{}
	if running {
		for _, c := range rep.Containers {
			served[c.ID] = c
		}
		ready, why := rep.Ready()
		state := "ready"
		if !ready {
			state = "NOT READY: " + why
		}
		var agents []string
		for _, a := range rep.Agents {
			s := "reachable"
			if !a.Reachable {
				s = "UNREACHABLE"
			}
			agents = append(agents, fmt.Sprintf("agent %s %s", a.Socket, s))
		}
		fmt.Fprintf(w, "refresher: running %s, %s; serving %d containers; %s\n", rep.Version, state, len(rep.Containers), strings.Join(agents, "; "))
		fmt.Fprintln(w, auditSummary(rep.Audit))
	} else {
		fmt.Fprintf(w, "refresher: NOT RUNNING (%v): no file is being rotated; what follows is read from %s\n", repErr, store.Dir)
	}

	ids, err := store.IDs()
	if err != nil {
		return running, err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CONTAINER\tSPIFFE ID\tNOT AFTER\tLAST ROTATION\tERROR")
	for _, id := range ids {
		rec, err := store.Load(id)
		if err != nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t%s\n", id, oneLine(err.Error()))
			continue
		}
		c, ok := served[id]
		if !ok {
			c = FromDisk(store, rec)
			if running {
				c.Error = join("not served by the refresher (container starting, or its process is gone)", c.Error)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", id, orDash(strings.Join(c.SPIFFEIDs, ",")), stamp(c.NotAfter), stamp(c.LastRotation), orDash(oneLine(c.Error)))
	}
	if running {
		auditRows(tw, rep.Audit)
	}
	return running, tw.Flush()
}

// auditSummary is the status line about the last audit.
func auditSummary(a audit.Result) string {
	if a.Time.IsZero() {
		return "audit: not run yet"
	}
	s := fmt.Sprintf("audit: %s: %d running containers asked for an identity, %d WITHOUT one; %d annotations name no container; %d fail-open starts",
		stamp(a.Time), a.Checked, len(a.Unserved), len(a.Unmatched), a.FailOpen)
	if len(a.Errors) > 0 {
		s += "; could not read: " + strings.Join(a.Errors, "; ")
	}
	return s
}

// auditRows adds a row for each container the last audit found running
// without its identity, and for each annotation that names no container.
func auditRows(w io.Writer, a audit.Result) {
	for _, u := range a.Unserved {
		where := ""
		if u.Pod != "" {
			where = fmt.Sprintf(" (pod %s/%s, container %s)", u.Namespace, u.Pod, u.Name)
		}
		fmt.Fprintf(w, "%s\t-\t-\t-\tNO IDENTITY%s: %s: %s\n", u.ID, where, u.Cause, oneLine(u.Detail))
	}
	for _, u := range a.Unmatched {
		fmt.Fprintf(w, "pod %s/%s\t-\t-\t-\tannotation %s names no container of the pod (containers: %s)\n", u.Namespace, u.Pod, u.Annotation, strings.Join(u.Containers, ","))
	}
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func join(a, b string) string {
	if b == "" {
		return a
	}
	return a + "; " + b
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
