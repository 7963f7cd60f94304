package audit

import "time"

// Result is one audit of the node's running containers: every one that
// asked for an identity, found in the runtimes' own state, checked against
// the deliveries recorded. The refresher's status report serves the last
// (status.Report.Audit): its JSON field names are that report's format.
type Result struct {
	// Time the audit ran; zero before the first.
	Time time.Time `json:"time"`
	// Checked counts the running containers that asked for an identity,
	// or that the audit cannot tell whether they did (CauseCRIUnreadable).
	Checked int `json:"checked"`
	// Unserved are those of them without a delivery.
	Unserved []Unserved `json:"unserved"`
	// Unmatched are named annotations (container.<name>) that match no
	// container of their pod.
	Unmatched []Unmatched `json:"unmatched"`
	// FailOpen counts the containers the refresher has seen started
	// without their identity under failure_policy: fail-open, since it
	// started.
	FailOpen uint64 `json:"fail_open_total"`
	// Errors are runtime state directories or CRI sockets that could not
	// be read: the audit may have missed containers there.
	Errors []string `json:"errors,omitempty"`
}

// Causes of an unserved container: the values of the metric's "cause"
// label, so a bounded set.
const (
	CauseHookNotConfigured = "hook_not_configured"
	CauseNRIPluginAbsent   = "nri_plugin_absent"
	CauseFailOpen          = "fail_open"
	CauseEmptyAnnotation   = "empty_annotation"
	CauseNoRecord          = "hook_left_no_record"
	// CauseCRIUnreadable: a containerd container whose pod's annotations
	// could not be read from the CRI; the audit cannot tell whether it
	// asked.
	CauseCRIUnreadable = "cri_unreadable"
)

// Causes lists every cause.
var Causes = []string{CauseHookNotConfigured, CauseNRIPluginAbsent, CauseFailOpen, CauseEmptyAnnotation, CauseNoRecord, CauseCRIUnreadable}

// Unserved is a running container that asked for an identity and has no
// delivery.
type Unserved struct {
	ID        string `json:"id"`
	PID       int    `json:"pid"`
	Pod       string `json:"pod,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	// Root is the runtime state directory it was found in.
	Root  string `json:"runtime_root"`
	Cause string `json:"cause"`
	// Detail says what was seen and what to do.
	Detail string `json:"detail"`
}

// Unmatched is a named annotation that names no container of its pod.
type Unmatched struct {
	Pod        string   `json:"pod"`
	Namespace  string   `json:"namespace"`
	Annotation string   `json:"annotation"`
	Containers []string `json:"containers"`
}
