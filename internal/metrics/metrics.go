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

	reloads          *prometheus.CounterVec
	reloadSuccessful prometheus.Gauge
	reloadTime       prometheus.Gauge
}

// New returns the metrics of one refresher; report is read at each scrape.
func New(report func() status.Report) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "rotations_total",
			Help: "Deliveries whose files were rewritten with a new SVID or bundle.",
		}),
		WriteFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "write_failures_total",
			Help: "Failed writes of a delivery's files (each is retried with backoff).",
		}),
		StreamsOpened: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "svid_streams_opened_total",
			Help: "SVID streams the agent answered; a rise without new containers means streams were reopened.",
		}),
		StreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "svid_stream_errors_total",
			Help: "SVID stream failures by kind: unavailable, not_authorized, no_identity, other.",
		}, []string{"kind"}),
		Handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "handoffs_total",
			Help: "Containers the hook handed over for their first delivery, by result: delivered or refused (the hook prints why).",
		}, []string{"result"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "config_reloads_total",
			Help: "Configuration reloads (SIGHUP) by result: success or failure.",
		}, []string{"result"}),
		reloadSuccessful: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "config_last_reload_successful",
			Help: "1 if the last configuration reload was applied, 0 if it was refused.",
		}),
		reloadTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "config_last_reload_success_timestamp_seconds",
			Help: "When the configuration in force was loaded (start or reload), Unix time.",
		}),
	}
	for _, k := range []string{KindUnavailable, KindNotAuthorized, KindNoIdentity, KindOther} {
		m.StreamErrors.WithLabelValues(k)
	}
	m.Handoffs.WithLabelValues("delivered")
	m.Handoffs.WithLabelValues("refused")
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("failure")
	m.reloadSuccessful.Set(1)
	m.reloadTime.SetToCurrentTime()
	m.Registry.MustRegister(
		m.Rotations, m.WriteFailures, m.StreamsOpened, m.StreamErrors, m.Handoffs,
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
	descContainers = prometheus.NewDesc(namespace+"_containers",
		"Containers being served (kept supplied with fresh SVIDs).", nil, nil)
	descErrored = prometheus.NewDesc(namespace+"_containers_with_errors",
		"Served containers whose stream or files are in trouble now (see the status command).", nil, nil)
	descStreams = prometheus.NewDesc(namespace+"_svid_streams_open",
		"SVID streams open to an agent, one per served container when healthy.", nil, nil)
	descAgentUp = prometheus.NewDesc(namespace+"_agent_up",
		"1 if the agent at this admin socket answers, else 0.", []string{"socket"}, nil)
	descReady = prometheus.NewDesc(namespace+"_ready",
		"1 if the refresher is ready (first scan done, every agent answers), as /readyz.", nil, nil)
	descExpiry = prometheus.NewDesc(namespace+"_svid_earliest_expiry_timestamp_seconds",
		"NotAfter of the delivered SVID that expires first, Unix time; absent while none is known.", nil, nil)
	descRatio = prometheus.NewDesc(namespace+"_svid_lowest_remaining_lifetime_ratio",
		"Smallest (NotAfter - now) / (NotAfter - NotBefore) over delivered SVIDs; the agent renews at about 0.5. Absent while none is known.", nil, nil)
	descUnserved = prometheus.NewDesc(namespace+"_unserved_containers",
		"Running containers that asked for an identity and have none, by likely cause, at the last audit (see the status command).", []string{"cause"}, nil)
	descUnmatched = prometheus.NewDesc(namespace+"_unmatched_container_annotations",
		"Named annotations (container.<name>) that match no container of their pod, at the last audit.", nil, nil)
	descFailOpen = prometheus.NewDesc(namespace+"_fail_open_starts_total",
		"Containers seen started without their identity under failure_policy: fail-open.", nil, nil)
	descChecked = prometheus.NewDesc(namespace+"_audit_checked_containers",
		"Running containers that asked for an identity, found in the runtimes' state at the last audit.", nil, nil)
	descAuditTime = prometheus.NewDesc(namespace+"_audit_last_run_timestamp_seconds",
		"When the last audit of the node's containers ran, Unix time; absent before the first.", nil, nil)
	descBuild = prometheus.NewDesc(namespace+"_build_info",
		"The refresher's version, as a label; always 1.", []string{"version"}, nil)
)

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
