package e2e

import (
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"
)

// auditInterval is the refreshers' audit interval in these tests.
const auditInterval = time.Second

// ours holds the IDs of the containers this test binary created, so that
// the audit's findings about them can be told from findings about other
// containers under the same runtime roots (Podman's /run/runc is shared).
var ours sync.Map

func ourContainer(id string) { ours.Store(id, true) }

var (
	unservedLine = regexp.MustCompile(`msg="container running without its identity" container=(\S+)`)
	auditLine    = regexp.MustCompile(`msg=audit checked=(\d+)`)
)

// expectUnserved tells checkAudit that the test made container id run
// without its identity on purpose.
func (e *env) expectUnserved(id string) {
	e.expected.Store(id, true)
}

// checkAudit runs when a refresher of the test stops: its audit must not
// have reported any container of this test that the test did not make go
// without its identity (a false positive).
func (e *env) checkAudit(t *testing.T, log string) {
	data := readFile(log)
	checked := 0
	for _, m := range auditLine.FindAllStringSubmatch(data, -1) {
		n, _ := strconv.Atoi(m[1])
		checked = max(checked, n)
	}
	bad := 0
	for _, m := range unservedLine.FindAllStringSubmatch(data, -1) {
		id := m[1]
		if _, mine := ours.Load(id); !mine {
			continue
		}
		if _, ok := e.expected.Load(id); ok {
			continue
		}
		bad++
		t.Errorf("audit false positive: container %s was reported without its identity:\n%s", id, grepLine(data, id))
	}
	t.Logf("audit: up to %d running annotated containers checked at once; %d false positives", checked, bad)
}

func grepLine(s, sub string) string {
	re := regexp.MustCompile(`(?m)^.*` + regexp.QuoteMeta(sub) + `.*$`)
	return re.FindString(s)
}
