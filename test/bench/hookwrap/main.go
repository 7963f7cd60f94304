// Command hookwrap is a helper of the benchmarks in test/bench; it is not
// shipped. Two modes, both run by runc as createRuntime hooks:
//
//	hookwrap time LOG HOOK ARGV0 ARGS...
//	    runs HOOK (argv ARGV0 ARGS...) with this process's stdin, stdout and
//	    stderr, and appends "<container-id> <start-ns> <end-ns> <exit-code>"
//	    to LOG: the hook process's wall time, from just before fork to
//	    just after it was reaped. Exits with the hook's code.
//	hookwrap fetch LOG SOCKET N
//	    reads the OCI state from stdin and, while runc still holds the
//	    container at createRuntime, asks the agent's admin SOCKET N times
//	    for the container's pid exactly as the hook does (a new connection,
//	    internal/agent's FetchX509, close), appending
//	    "<container-id> <spiffe-id> <ns>..." to LOG: the agent round-trip
//	    alone. The benchmark pads this binary to the hook binary's size,
//	    because the agent hashes its caller's executable on every call.
//	    With HOOKWRAP_SVID_ONLY=1 it opens only the SVID stream.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: hookwrap time LOG HOOK ARGV0 ARGS... | hookwrap fetch LOG SOCKET N")
	}
	switch os.Args[1] {
	case "time":
		if len(os.Args) < 5 {
			fail("usage: hookwrap time LOG HOOK ARGV0 ARGS...")
		}
		os.Exit(timeHook(os.Args[2], os.Args[3], os.Args[4:]))
	case "fetch":
		if len(os.Args) != 5 {
			fail("usage: hookwrap fetch LOG SOCKET N")
		}
		n, err := strconv.Atoi(os.Args[4])
		if err != nil || n < 1 {
			fail("bad N " + os.Args[4])
		}
		fetch(os.Args[2], os.Args[3], n)
	default:
		fail("unknown mode " + os.Args[1])
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "hookwrap: "+msg)
	os.Exit(2)
}

type state struct {
	ID  string `json:"id"`
	Pid int    `json:"pid"`
}

func timeHook(log, hook string, argv []string) int {
	// The state is read first (runc closes stdin after writing it) so that
	// the hook gets exactly the same bytes, and so that the read is not
	// counted in the hook's time.
	in, err := readAll(os.Stdin)
	if err != nil {
		fail(err.Error())
	}
	var st state
	_ = json.Unmarshal(in, &st)
	r, w, err := os.Pipe()
	if err != nil {
		fail(err.Error())
	}
	if _, err := w.Write(in); err != nil { // a state is far below the pipe's 64 KiB
		fail(err.Error())
	}
	w.Close()
	cmd := &exec.Cmd{Path: hook, Args: argv, Stdin: r, Stdout: os.Stdout, Stderr: os.Stderr}
	start := time.Now()
	err = cmd.Run()
	end := time.Now()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		fail(err.Error())
	}
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fail(err.Error())
	}
	fmt.Fprintf(f, "%s %d %d %d\n", st.ID, start.UnixNano(), end.UnixNano(), code)
	f.Close()
	return code
}

func fetch(log, socket string, n int) {
	in, err := readAll(os.Stdin)
	if err != nil {
		fail(err.Error())
	}
	var st state
	if err := json.Unmarshal(in, &st); err != nil || st.Pid <= 0 {
		fail(fmt.Sprintf("no pid in the state: %v", err))
	}
	line := st.ID
	// HOOKWRAP_SVID_ONLY=1: the SVID stream alone, without the bundle
	// stream FetchX509 opens beside it (what a hook that took its bundle
	// elsewhere would ask).
	svidOnly := os.Getenv("HOOKWRAP_SVID_ONLY") == "1"
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		start := time.Now()
		c, err := agent.New(socket)
		if err != nil {
			fail(err.Error())
		}
		var u *agent.X509SVIDs
		if svidOnly {
			var s *agent.SVIDStream
			if s, err = c.SubscribeX509SVIDs(ctx, st.Pid); err == nil {
				u, err = s.Recv()
			}
		} else {
			u, _, err = c.FetchX509(ctx, st.Pid, agent.Wait{})
		}
		c.Close()
		d := time.Since(start)
		cancel()
		if err != nil {
			fail(err.Error())
		}
		if i == 0 {
			line += " " + u.SVIDs[0].ID.String()
		}
		line += " " + strconv.FormatInt(int64(d), 10)
	}
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fail(err.Error())
	}
	fmt.Fprintln(f, line)
	f.Close()
}

func readAll(f *os.File) ([]byte, error) { return io.ReadAll(f) }
