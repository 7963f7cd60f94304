package systemd

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// SPIRE inside the node, as units, at the paths the node config defaults to.
const (
	trustDomain    = "example.org"
	serverSocket   = "/run/spire/server/api.sock"
	workloadSock   = "/run/spire/agent/public/api.sock"
	adminSocket    = "/run/spire/agent/admin/admin.sock" // config.yaml's default
	spireBinInNode = "/opt/spire/bin"
	hookID         = "spiffe://" + trustDomain + "/spiffe-oci-hook"
	refresherID    = "spiffe://" + trustDomain + "/spiffe-oci-refresher"
)

const serverConf = `server {
    bind_address = "127.0.0.1"
    bind_port = "8081"
    socket_path = "` + serverSocket + `"
    trust_domain = "` + trustDomain + `"
    data_dir = "/var/lib/spire/server"
    log_level = "DEBUG"
    ca_ttl = "24h"
    default_x509_svid_ttl = "1h"
    experimental {
        cache_reload_interval = "1s"
    }
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "/var/lib/spire/server/datastore.sqlite3"
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`

// The agent attests workloads with the unix attestor (the hook and the
// refresher, pinned to their binaries) and the systemd attestor (the
// containers, by the unit that runs them).
const agentConf = `agent {
    data_dir = "/var/lib/spire/agent"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "8081"
    socket_path = "` + workloadSock + `"
    admin_socket_path = "` + adminSocket + `"
    trust_domain = "` + trustDomain + `"
    insecure_bootstrap = true
    authorized_delegates = ["` + hookID + `", "` + refresherID + `"]
    experimental {
        sync_interval = "1s"
    }
}
plugins {
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = true
        }
    }
    WorkloadAttestor "systemd" {
    }
}
`

const serverUnit = `[Unit]
Description=SPIRE server
[Service]
ExecStart=` + spireBinInNode + `/spire-server run -config /etc/spire/server.conf
[Install]
WantedBy=multi-user.target
`

const agentUnit = `[Unit]
Description=SPIRE agent
After=spire-server.service
[Service]
EnvironmentFile=/etc/spire/agent.env
ExecStart=` + spireBinInNode + `/spire-agent run -config /etc/spire/agent.conf -joinToken ${JOIN_TOKEN}
[Install]
WantedBy=multi-user.target
`

// startSPIRE runs the SPIRE server and agent as units and returns the
// agent's SPIFFE ID (the parent of workload entries).
func startSPIRE(t *testing.T, n *node) string {
	t.Helper()
	n.write("/etc/spire/server.conf", serverConf, 0o644)
	n.write("/etc/spire/agent.conf", agentConf, 0o644)
	n.write("/etc/systemd/system/spire-server.service", serverUnit, 0o644)
	n.write("/etc/systemd/system/spire-agent.service", agentUnit, 0o644)
	n.must("systemctl daemon-reload && systemctl start spire-server")
	n.must(waitFor(60, spireBinInNode+"/spire-server healthcheck -socketPath "+serverSocket))
	out := n.must(spireBinInNode + "/spire-server token generate -socketPath " + serverSocket + " -ttl 3600 -output json")
	var tok struct {
		Value string `json:"value"`
	}
	if err := json.Unmarshal([]byte(out), &tok); err != nil || tok.Value == "" {
		t.Fatalf("token generate: %q: %v", out, err)
	}
	n.write("/etc/spire/agent.env", "JOIN_TOKEN="+tok.Value+"\n", 0o600)
	n.must("systemctl start spire-agent")
	n.must(waitFor(60, spireBinInNode+"/spire-agent healthcheck -socketPath "+workloadSock))
	return "spiffe://" + trustDomain + "/spire/agent/join_token/" + tok.Value
}

// createEntry registers an entry under the agent.
func createEntry(t *testing.T, n *node, parent, id string, ttl time.Duration, selectors ...string) {
	t.Helper()
	cmd := fmt.Sprintf("%s/spire-server entry create -socketPath %s -parentID %s -spiffeID %s -x509SVIDTTL %d",
		spireBinInNode, serverSocket, parent, id, int(ttl/time.Second))
	for _, s := range selectors {
		cmd += " -selector " + s
	}
	if out := n.must(cmd); !strings.Contains(out, id) {
		t.Fatalf("entry create %s: %s", id, out)
	}
}

// waitFor is a shell loop that retries cmd every half second for up to
// secs seconds and fails with its last output.
func waitFor(secs int, cmd string) string {
	return fmt.Sprintf(`i=0; until out=$(%s 2>&1); do i=$((i+1)); if [ $i -ge %d ]; then echo "$out"; exit 1; fi; sleep 0.5; done; echo "$out"`, cmd, secs*2)
}
