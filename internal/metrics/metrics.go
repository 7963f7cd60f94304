// Package metrics is the refresher's Prometheus registry and its HTTP
// server: /metrics, /healthz and /readyz on a root-only unix socket (plus
// /status there) and, when configured, on a TCP address.
//
// Counters are incremented where things happen (package refresh). Every
// gauge is read at scrape time from one status.Report, so there is no
// second copy of the refresher's state to drift from the first.
package metrics

import (
	"math"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

const namespace = "spiffe_oci"

// Stream error kinds, the values of the "kind" label: bounded, so that a
// new error message never makes a new series.
const (
	KindUnavailable   = "unavailable"
	KindNotAuthorized = "not_authorized"
	KindNoIdentity    = "no_identity"
	KindOther         = "other"
)

// Metrics holds the refresher's counters and its registry.
type Metrics struct {
	Registry *prometheus.Registry
	// Rotations counts deliveries rewritten with new content.
	Rotations prometheus.Counter
	// WriteFailures counts failed writes of a delivery's files.
	WriteFailures prometheus.Counter
	// StreamsOpened counts SVID streams that the agent answered.
	StreamsOpened prometheus.Counter
	// StreamErrors counts SVID stream failures by kind.
	StreamErrors *prometheus.CounterVec
	// Handoffs counts containers the hook handed over, by result.
	Handoffs *prometheus.CounterVec
	// HandoffSeconds is how long the refresher took to deliver a
	// handed-over container (the agent's answer and the files), by
	// result: the share of the container's creation spent on its
	// identity, which the hook waits for.
	HandoffSeconds *prometheus.HistogramVec

	reloads          *prometheus.CounterVec
	reloadSuccessful prometheus.Gauge
	reloadTime       prometheus.Gauge
}

// New returns the metrics of one refresher; report is read at each scrape.
func New(report func() status.Report) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Rotations: newCounter("rotations_total",
			"Deliveries whose files were rewritten with a new SVID or bundle."),
		WriteFailures: newCounter("write_failures_total",
			"Failed writes of a delivery's files (each is retried with backoff)."),
		StreamsOpened: newCounter("svid_streams_opened_total",
			"SVID streams the agent answered; a rise without new containers means streams were reopened."),
		StreamErrors: newCounterVec("svid_stream_errors_total",
			"SVID stream failures by kind: unavailable, not_authorized, no_identity, other.", "kind"),
		Handoffs: newCounterVec("handoffs_total",
			"Containers the hook handed over for their first delivery, by result: delivered or refused (the hook prints why).", "result"),
		HandoffSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "handoff_duration_seconds",
			Help: "Time the refresher took to deliver a container the hook handed over (the agent's answer, registration_wait included, and the files), by result.",
			// From a warm agent's few milliseconds up to registration_wait's
			// default 30 s for an entry still on its way.
			Buckets: []float64{.002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"result"}),
		reloads: newCounterVec("config_reloads_total",
			"Configuration reloads (SIGHUP) by result: success or failure.", "result"),
		reloadSuccessful: newGauge("config_last_reload_successful",
			"1 if the last configuration reload was applied, 0 if it was refused."),
		reloadTime: newGauge("config_last_reload_success_timestamp_seconds",
			"When the configuration in force was loaded (start or reload), Unix time."),
	}
	for _, k := range []string{KindUnavailable, KindNotAuthorized, KindNoIdentity, KindOther} {
		m.StreamErrors.WithLabelValues(k)
	}
	m.Handoffs.WithLabelValues("delivered")
	m.Handoffs.WithLabelValues("refused")
	m.HandoffSeconds.WithLabelValues("delivered")
	m.HandoffSeconds.WithLabelValues("refused")
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("failure")
	m.reloadSuccessful.Set(1)
	m.reloadTime.SetToCurrentTime()
	m.Registry.MustRegister(
		m.Rotations, m.WriteFailures, m.StreamsOpened, m.StreamErrors, m.Handoffs, m.HandoffSeconds,
		m.reloads, m.reloadSuccessful, m.reloadTime,
		&stateCollector{report: report},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Reloaded records a configuration reload's result (err nil: applied).
func (m *Metrics) Reloaded(err error) {
	if err != nil {
		m.reloads.WithLabelValues("failure").Inc()
		m.reloadSuccessful.Set(0)
		return
	}
	m.reloads.WithLabelValues("success").Inc()
	m.reloadSuccessful.Set(1)
	m.reloadTime.SetToCurrentTime()
}

var (
	descContainers = newDesc("containers",
		"Containers being served (kept supplied with fresh SVIDs).")
	descErrored = newDesc("containers_with_errors",
		"Served containers whose stream or files are in trouble now (see the status command).")
	descStreams = newDesc("svid_streams_open",
		"SVID streams open to an agent, one per served container when healthy.")
	descAgentUp = newDesc("agent_up",
		"1 if the agent at this admin socket answers, else 0.", "socket")
	descReady = newDesc("ready",
		"1 if the refresher is ready (first scan done, every agent answers), as /readyz.")
	descExpiry = newDesc("svid_earliest_expiry_timestamp_seconds",
		"NotAfter of the delivered SVID that expires first, Unix time; absent while none is known.")
	descRatio = newDesc("svid_lowest_remaining_lifetime_ratio",
		"Smallest (NotAfter - now) / (NotAfter - NotBefore) over delivered SVIDs; the agent renews at about 0.5. Absent while none is known.")
	descUnserved = newDesc("unserved_containers",
		"Running containers that asked for an identity and have none, by likely cause, at the last audit (see the status command).", "cause")
	descUnmatched = newDesc("unmatched_container_annotations",
		"Named annotations (container.<name>) that match no container of their pod, at the last audit.")
	descFailOpen = newDesc("fail_open_starts_total",
		"Containers seen started without their identity under failure_policy: fail-open.")
	descChecked = newDesc("audit_checked_containers",
		"Running containers that asked for an identity, found in the runtimes' state at the last audit.")
	descAuditTime = newDesc("audit_last_run_timestamp_seconds",
		"When the last audit of the node's containers ran, Unix time; absent before the first.")
	descBuild = newDesc("build_info",
		"The refresher's version, as a label; always 1.", "version")
)

// newCounter, newCounterVec, newGauge and newDesc make the refresher's
// metrics, all named under namespace.
func newCounter(name, help string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
}

func newCounterVec(name, help, label string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, []string{label})
}

func newGauge(name, help string) prometheus.Gauge {
	return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help})
}

func newDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(namespace+"_"+name, help, labels, nil)
}

// stateCollector turns a status.Report into gauges at scrape time.
type stateCollector struct {
	report func() status.Report
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descContainers, descErrored, descStreams, descAgentUp, descReady, descExpiry, descRatio, descBuild, descUnserved, descUnmatched, descFailOpen, descChecked, descAuditTime} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	r := c.report()
	now := time.Now()
	var open, errored int
	var earliest time.Time
	ratio := math.Inf(1)
	for _, ct := range r.Containers {
		if ct.StreamOpen {
			open++
		}
		if ct.Error != "" {
			errored++
		}
		if ct.NotAfter.IsZero() {
			continue
		}
		if earliest.IsZero() || ct.NotAfter.Before(earliest) {
			earliest = ct.NotAfter
		}
		if life := ct.NotAfter.Sub(ct.NotBefore); life > 0 {
			ratio = math.Min(ratio, ct.NotAfter.Sub(now).Seconds()/life.Seconds())
		}
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(descContainers, float64(len(r.Containers)))
	gauge(descErrored, float64(errored))
	gauge(descStreams, float64(open))
	for _, a := range r.Agents {
		gauge(descAgentUp, boolValue(a.Reachable), a.Socket)
	}
	ready, _ := r.Ready()
	gauge(descReady, boolValue(ready))
	if !earliest.IsZero() {
		gauge(descExpiry, float64(earliest.Unix()))
	}
	if !math.IsInf(ratio, 1) {
		gauge(descRatio, ratio)
	}
	gauge(descBuild, 1, r.Version)

	byCause := map[string]int{}
	for _, u := range r.Audit.Unserved {
		byCause[u.Cause]++
	}
	for _, c := range audit.Causes {
		gauge(descUnserved, float64(byCause[c]), c)
	}
	gauge(descUnmatched, float64(len(r.Audit.Unmatched)))
	ch <- prometheus.MustNewConstMetric(descFailOpen, prometheus.CounterValue, float64(r.Audit.FailOpen))
	gauge(descChecked, float64(r.Audit.Checked))
	if !r.Audit.Time.IsZero() {
		gauge(descAuditTime, float64(r.Audit.Time.Unix()))
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Handler serves the registry as /metrics does.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}
