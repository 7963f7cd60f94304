// Package logkey names the keys of the programs' structured log lines:
// spiffe-oci-hook's, spiffe-oci-refresher's and spiffe-oci-nri's.
// Operators' queries, the tests and the docs match lines by their keys
// (container=…, error=…), so a key that more than one line uses is spelled
// once, here, and means the same in every program. A key that only one
// line uses stays a literal beside its line.
package logkey

const (
	// Container is a container's ID (the runtime's, as in its OCI state).
	Container = "container"
	// Error is the error a line reports.
	Error = "error"
	// PID is a container's process ID, as the host sees it.
	PID = "pid"
	// SPIFFEID is the SPIFFE ID of an SVID delivered or held.
	SPIFFEID = "spiffe_id"
	// CertDir is a delivery's cert_dir, inside the container.
	CertDir = "cert_dir"
	// Expires is when an SVID expires.
	Expires = "expires"
	// Signal is a renew_signal's name.
	Signal = "signal"
	// Reason says why the refresher forgot or removed a container.
	Reason = "reason"
	// Containers is how many containers are served, or the names of a
	// pod's containers.
	Containers = "containers"
	// StateDir is the state directory.
	StateDir = "state_dir"
	// AgentSocket is the node agent's socket.
	AgentSocket = "agent_socket"
	// WorkloadAPISocket is the agent's Workload API socket (agent_api
	// broker).
	WorkloadAPISocket = "workload_api_socket"
	// Pod and Namespace name a Kubernetes pod.
	Pod       = "pod"
	Namespace = "namespace"
	// Detail says what an audit finding means and what to do.
	Detail = "detail"
	// NRISocket is the NRI runtime's socket.
	NRISocket = "nri_socket"
	// Version is a program's version.
	Version = "version"
)
