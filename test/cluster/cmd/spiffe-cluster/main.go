// Command spiffe-cluster runs the one-node cluster of test/cluster for
// `make cluster`: it brings the cluster up with SPIRE, installs the
// project with Helm, writes DIR/env and stays in the foreground until
// SIGTERM or SIGINT, when it stops everything and restores the host
// (`make cluster-down` sends the signal).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
)

func main() {
	opts := localcluster.Options{Log: os.Stdout}
	flag.StringVar(&opts.Runtime, "runtime", "crio", "crio or containerd")
	flag.StringVar(&opts.Dir, "dir", "/tmp/spiffe-cluster", "the cluster's directory")
	flag.StringVar(&opts.RepoRoot, "repo", ".", "the project's checkout")
	flag.StringVar(&opts.ToolDir, "tools", "bin/test", "the pinned tools (make cluster-tools)")
	flag.StringVar(&opts.SPIREBinDir, "spire-bin", "bin/test", "SPIRE_BIN_DIR: SPIRE 1.15.3's spire-server and spire-agent are in its spire-1.15")
	flag.Parse()
	opts.SPIREBinDir = filepath.Join(opts.SPIREBinDir, "spire-1.15")
	if err := run(opts); err != nil {
		fmt.Fprintf(os.Stderr, "spiffe-cluster: %v\n", err)
		os.Exit(1)
	}
}

func run(opts localcluster.Options) error {
	for _, p := range []*string{&opts.Dir, &opts.RepoRoot, &opts.ToolDir, &opts.SPIREBinDir} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	if err := localcluster.BecomeSubreaper(); err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT)
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return err
	}
	start := time.Now()
	c, err := localcluster.Up(opts)
	if err != nil {
		return err
	}
	if err := c.InstallHelm(); err != nil {
		return fmt.Errorf("%w\n%v", err, c.Down())
	}
	env := fmt.Sprintf("export KUBECONFIG=%s\nexport PATH=%s:$PATH\n", c.Kubeconfig, opts.ToolDir)
	if err := os.WriteFile(filepath.Join(opts.Dir, "env"), []byte(env), 0o644); err != nil {
		return err
	}
	info := c.ReadyText(time.Since(start), env)
	os.WriteFile(filepath.Join(opts.Dir, "ready"), []byte(info), 0o644)
	fmt.Print(info)
	// Until told to stop: collect the daemons' exited intermediates.
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-sigs:
			os.Remove(filepath.Join(opts.Dir, "ready"))
			err := c.Down()
			if err != nil {
				return err
			}
			fmt.Println("cluster: stopped; host restored")
			return nil
		case <-tick.C:
			c.Reap()
		}
	}
}
