package localcluster

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// What a kubelet, a container runtime, the CNI bridge and the installed
// DaemonSets change on a host, recorded before the cluster starts,
// restored when it stops, and compared afterwards (the leak check).

// sysctls the kubelet sets (setupKernelTunables, with
// protectKernelDefaults off) and the bridge plugin (isGateway enables
// forwarding).
var sysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
}

// watchedPaths are created by the kubelet even with its own root dir
// (device-plugins, /var/log/containers), by the runtimes' defaults, or by
// what the cluster installs (the hook, its JSON and config, the state
// directory, SPIRE's sockets, the NRI socket). What did not exist before
// is removed (a hostPath DirectoryOrCreate makes the parents too).
var watchedPaths = []string{
	"/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/etc/kubernetes",
	"/usr/libexec/kubernetes", "/var/lib/cni", "/etc/cni", "/opt/cni", "/run/netns", "/var/run/netns",
	"/etc/crio", "/var/lib/crio", "/run/crio", "/var/log/crio",
	"/etc/containerd", "/var/lib/containerd", "/run/containerd", "/opt/containerd",
	"/run/nri", "/var/run/nri", "/opt/nri", "/etc/nri", "/etc/cdi", "/var/run/cdi",
	"/opt/spiffe-oci-hook", "/etc/spiffe-oci-hook", "/run/spiffe-oci-hook", "/run/spire",
	"/run/runc", "/run/crun", "/run/containers",
	"/etc/containers/oci", "/usr/share/containers/oci",
	"/etc/containers/oci/hooks.d", "/usr/share/containers/oci/hooks.d",
	"/etc/containers/oci/hooks.d/spiffe-oci-hook.json", "/usr/share/containers/oci/hooks.d/spiffe-oci-hook.json",
}

// hostState is the host as the cluster found it.
type hostState struct {
	sysctls   map[string]string
	iptables  map[string]map[string]bool // command -> table:chain set
	rules     map[string]string          // command -> rules, counters stripped
	links     map[string]bool
	mounts    map[string]bool
	absent    []string
	logLinks  map[string]bool // entries of /var/log/containers, if it existed
	cgroupDir string          // the kubelet's cgroupRoot, relative
}

func snapshotHost(cgroupRoot string) (*hostState, error) {
	h := &hostState{sysctls: map[string]string{}, iptables: map[string]map[string]bool{}, rules: map[string]string{}, cgroupDir: cgroupRoot}
	for _, s := range sysctls {
		if v, err := os.ReadFile("/proc/sys/" + s); err == nil {
			h.sysctls[s] = strings.TrimSpace(string(v))
		}
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		chains, rules, err := iptablesState(cmd)
		if err != nil {
			return nil, err
		}
		h.iptables[cmd], h.rules[cmd] = chains, rules
	}
	h.links = links()
	h.mounts = mountpoints()
	for _, p := range watchedPaths {
		if _, err := os.Lstat(p); err != nil {
			h.absent = append(h.absent, p)
		}
	}
	if ents, err := os.ReadDir("/var/log/containers"); err == nil {
		h.logLinks = map[string]bool{}
		for _, e := range ents {
			h.logLinks[e.Name()] = true
		}
	}
	if left := cgroupDirs(cgroupRoot); len(left) > 0 {
		return nil, fmt.Errorf("cgroup root %s already exists (%s): a cluster is running, or one leaked; run make cluster-down", cgroupRoot, left[0])
	}
	return h, nil
}

// iptablesState lists table:chain and the rules (without counters).
func iptablesState(cmd string) (map[string]bool, string, error) {
	out, err := exec.Command(cmd).Output()
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", cmd, err)
	}
	chains := map[string]bool{}
	var rules []string
	table := ""
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, ":"):
			chains[table+":"+strings.Fields(line[1:])[0]] = true
		case strings.HasPrefix(line, "-A"):
			rules = append(rules, table+" "+line)
		}
	}
	sort.Strings(rules)
	return chains, strings.Join(rules, "\n"), nil
}

func links() map[string]bool {
	set := map[string]bool{}
	ents, _ := os.ReadDir("/sys/class/net")
	for _, e := range ents {
		set[e.Name()] = true
	}
	return set
}

func mountpoints() map[string]bool {
	set := map[string]bool{}
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			set[f[4]] = true
		}
	}
	return set
}

// cgroupDirs lists root in every cgroup hierarchy where it exists.
func cgroupDirs(root string) []string {
	var dirs []string
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		if e.Type()&os.ModeSymlink != 0 {
			continue // cpu -> cpu,cpuacct
		}
		d := filepath.Join("/sys/fs/cgroup", e.Name(), root)
		if fi, err := os.Lstat(d); err == nil && fi.IsDir() {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// restore undoes what the cluster changed; run once every process of the
// cluster is gone. It returns what it could not undo.
func (h *hostState) restore(dir string) error {
	var errs []error
	// Mounts first (pod volumes, netns, shm, the state tmpfs), deepest
	// first, then the paths under them.
	var newMounts []string
	for m := range mountpoints() {
		if !h.mounts[m] && ours(m, dir) {
			newMounts = append(newMounts, m)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(newMounts)))
	for _, m := range newMounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	for _, d := range cgroupDirs(h.cgroupDir) {
		if err := removeCgroupTree(d); err != nil {
			errs = append(errs, err)
		}
	}
	for l := range links() {
		if !h.links[l] && l == cniBridge {
			if out, err := exec.Command("ip", "link", "delete", l).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("ip link delete %s: %v: %s", l, err, out))
			}
		}
	}
	for s, v := range h.sysctls {
		if cur, _ := os.ReadFile("/proc/sys/" + s); strings.TrimSpace(string(cur)) != v {
			if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("restoring sysctl %s=%s: %w", s, v, err))
			}
		}
	}
	for cmd, before := range h.iptables {
		ipt := strings.TrimSuffix(cmd, "-save")
		now, _, err := iptablesState(cmd)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for tc := range now {
			table, chain, _ := strings.Cut(tc, ":")
			// Only the kubelet's (KUBE-*) and CNI's: another program's
			// new chains are its own (a leak check reports them).
			if before[tc] || !(strings.HasPrefix(chain, "KUBE-") || strings.HasPrefix(chain, "CNI-")) {
				continue
			}
			exec.Command(ipt, "-t", table, "-F", chain).Run()
			if out, err := exec.Command(ipt, "-t", table, "-X", chain).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("%s -t %s -X %s: %v: %s", ipt, table, chain, err, out))
			}
		}
	}
	if h.logLinks != nil {
		ents, _ := os.ReadDir("/var/log/containers")
		for _, e := range ents {
			if !h.logLinks[e.Name()] {
				os.Remove(filepath.Join("/var/log/containers", e.Name()))
			}
		}
	}
	for _, p := range slices.Backward(h.absent) {
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mountPrefixes are where the cluster's mounts are: its directory, the
// state tmpfs, pod network namespaces, the kubelet's default root, SPIRE's
// and NRI's sockets. Down unmounts only there, so that a concurrent
// program's mounts elsewhere are left alone.
var mountPrefixes = []string{StateDir, "/run/netns", "/var/run/netns", "/var/lib/kubelet", "/run/spire", "/run/nri", "/var/run/nri"}

func ours(m, dir string) bool {
	for _, p := range append(mountPrefixes, dir) {
		if m == p || strings.HasPrefix(m, p+"/") {
			return true
		}
	}
	return false
}

// kubeRules keeps the rules that name a kubelet or CNI chain.
func kubeRules(rules string) string {
	var kept []string
	for _, r := range strings.Split(rules, "\n") {
		if strings.Contains(r, "KUBE-") || strings.Contains(r, "CNI-") || strings.Contains(r, cniBridge) {
			kept = append(kept, r)
		}
	}
	return strings.Join(kept, "\n")
}

// removeCgroupTree removes a cgroup directory and its children, deepest
// first (cgroupfs directories go with rmdir, not unlink).
func removeCgroupTree(d string) error {
	var dirs []string
	filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
		if err == nil && e.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for _, p := range slices.Backward(dirs) {
		if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// leaks compares the host with the snapshot: what is left is a leak.
func (h *hostState) leaks(dir string) []string {
	var left []string
	for s, v := range h.sysctls {
		if cur, _ := os.ReadFile("/proc/sys/" + s); strings.TrimSpace(string(cur)) != v {
			left = append(left, fmt.Sprintf("sysctl %s is %s, was %s", s, strings.TrimSpace(string(cur)), v))
		}
	}
	for cmd, before := range h.rules {
		chains, rules, err := iptablesState(cmd)
		if err != nil {
			left = append(left, err.Error())
			continue
		}
		for tc := range chains {
			if _, chain, _ := strings.Cut(tc, ":"); !h.iptables[cmd][tc] && (strings.HasPrefix(chain, "KUBE-") || strings.HasPrefix(chain, "CNI-")) {
				left = append(left, fmt.Sprintf("%s: chain %s added", cmd, tc))
			}
		}
		if kubeRules(rules) != kubeRules(before) {
			left = append(left, fmt.Sprintf("%s: KUBE-/CNI- rules changed", cmd))
		}
	}
	if links()[cniBridge] && !h.links[cniBridge] {
		left = append(left, "network interface "+cniBridge)
	}
	// Only where the cluster mounts: this machine is shared, and a
	// concurrent unit test's mount elsewhere is not the cluster's leak.
	for m := range mountpoints() {
		if !h.mounts[m] && ours(m, dir) {
			left = append(left, "mount "+m)
		}
	}
	for _, p := range h.absent {
		if _, err := os.Lstat(p); err == nil {
			left = append(left, "path "+p)
		}
	}
	for _, d := range cgroupDirs(h.cgroupDir) {
		left = append(left, "cgroup "+d)
	}
	if h.logLinks != nil {
		ents, _ := os.ReadDir("/var/log/containers")
		for _, e := range ents {
			if !h.logLinks[e.Name()] {
				left = append(left, "/var/log/containers/"+e.Name())
			}
		}
	}
	sort.Strings(left)
	return left
}
