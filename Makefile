# spiffe-oci-hook: an OCI hook and a node daemon that hand annotated
# containers their SPIFFE X.509 SVID as files.

SHELL := /bin/bash
GO ?= go
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR ?= $(PREFIX)/share
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
HOOK_DIR ?= $(LIBEXECDIR)/oci/hooks.d
HOOKS_JSON_DIR ?= $(DATADIR)/containers/oci/hooks.d
DOCDIR ?= $(DATADIR)/doc/spiffe-oci-hook
LICENSEDIR ?= $(DOCDIR)
CONFDIR := $(SYSCONFDIR)/spiffe-oci-hook

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# -B gobuildid: a GNU build-id note, which rpmbuild requires of every ELF file.
# -s -w: no symbol table or DWARF (stack traces keep their names): a third
# smaller, and the SPIRE agent hashes the caller's binary on every call
# when discover_workload_path is on.
LDFLAGS := -s -w -X main.version=$(VERSION) -B gobuildid
# grpcnotrace: leave out gRPC's x/net/trace (and html/template with it):
# a quarter smaller again and faster to start, for a hook run per container.
GO_TAGS := grpcnotrace
GOBUILD := CGO_ENABLED=0 $(GO) build -trimpath -tags $(GO_TAGS) -ldflags "$(LDFLAGS)"

# The JSON in the repo names the rpm's path; install writes the real one.
SHIPPED_HOOK_PATH := /usr/libexec/oci/hooks.d/spiffe-oci-hook
# Likewise the unit names these; install writes the real ones.
SHIPPED_REFRESHER_PATH := /usr/bin/spiffe-oci-refresher
# Both binaries read this file unless --config says otherwise.
DEFAULT_CONFIG := /etc/spiffe-oci-hook/config.yaml

HOOK_JSON_SED := s|"$(SHIPPED_HOOK_PATH)"|"$(HOOK_DIR)/spiffe-oci-hook"|
UNIT_SED := s|$(SHIPPED_REFRESHER_PATH) |$(BINDIR)/spiffe-oci-refresher |; s|--config $(DEFAULT_CONFIG)|--config $(CONFDIR)/config.yaml|
ifneq ($(CONFDIR)/config.yaml,$(DEFAULT_CONFIG))
# A SYSCONFDIR other than /etc: tell the hook where its config went.
HOOK_JSON_SED += ; s|"args": \["spiffe-oci-hook"\]|"args": ["spiffe-oci-hook", "--config", "$(CONFDIR)/config.yaml"]|
endif
DOCS := $(wildcard README.md)
# The pages README.md links to, installed as docs/ beside it so the links hold.
DOC_PAGES := $(wildcard docs/*.md)
LICENSES := LICENSE

# Where the test harness keeps the pinned SPIRE binaries: 1.13.3 (and
# spiffe-helper) in SPIRE_BIN_DIR, 1.15.3 (the primary line of the
# end-to-end tests) in SPIRE_BIN_DIR/spire-1.15.
SPIRE_BIN_DIR ?= $(CURDIR)/bin/test

# Where the CRI tests (test/cri) find the pinned CRI-O, containerd and crictl.
CRI_BIN_DIR := $(CURDIR)/bin/test

# The pinned gotestsum (test/gotestsum) runs the tests; test/testreport
# reads the go test -json events it keeps (TEST_EVENTS; `gotestsum tool
# slowest --jsonfile bin/test/test-events.json` reads them too) and prints
# the skipped tests with their reasons and the counts. Under CI=true a skip
# that test/skips.txt does not allow is a failure.
GOTESTSUM := $(CRI_BIN_DIR)/gotestsum
TEST_EVENTS := $(CRI_BIN_DIR)/test-events.json
TESTREPORT_FLAGS := $(if $(filter true,$(CI)),-ci)

# run_tests ENV,GO-TEST-ARGS: go test through gotestsum (a line per
# package, the failures' output at the end), then the report; fails if
# either does.
define run_tests
	@mkdir -p $(CRI_BIN_DIR); rc=0; tests_start=$$(date +%s); \
	$(1) $(GOTESTSUM) --format pkgname-and-test-fails --format-icons text --hide-summary skipped --jsonfile $(TEST_EVENTS) -- $(2) || rc=$$?; \
	now=$$(date +%s); \
	echo "timing: tools built in $$(cat $(CRI_BIN_DIR)/.tools-time 2>/dev/null || echo '?') s, tests ran in $$((now - tests_start)) s$${MAKE_TEST_START:+, total $$((now - MAKE_TEST_START)) s}"; \
	$(GO) run ./test/testreport -events $(TEST_EVENTS) $(TESTREPORT_FLAGS) || rc=1; \
	exit $$rc
endef

# Why make test needs root, in one line.
NEEDS_ROOT := needs root: its tests mount tmpfs state directories, run runc, Podman, CRI-O, containerd and a systemd node, and the SPIRE agent attests their processes by pid. Run it as root (sudo make test), or run make test-nonroot for the tests that work without root

.PHONY: all build binary test test-as-root test-nonroot test-systemd test-deps test-fuzz test-unit test-integration spire cri-tools cluster-tools cluster cluster-down gotestsum demo bench install install.nobuild uninstall rpm clean

all: build

build binary: bin/spiffe-oci-hook bin/spiffe-oci-hook-direct bin/spiffe-oci-refresher bin/spiffe-oci-nri

bin/spiffe-oci-hook: FORCE
	$(GOBUILD) -o $@ ./hook

# What spiffe-oci-hook runs, from its own directory, when no refresher
# takes the container over: it asks the agent itself.
bin/spiffe-oci-hook-direct: FORCE
	$(GOBUILD) -o $@ ./hook/direct

bin/spiffe-oci-refresher: FORCE
	$(GOBUILD) -o $@ ./refresher

# The NRI plugin runs only in the containerd DaemonSet image, so install
# and the rpm leave it out.
bin/spiffe-oci-nri: FORCE
	$(GOBUILD) -o $@ ./nri

FORCE:

# Everything, on a fresh machine: packages, pinned SPIRE, CRI-O, containerd
# and crictl, unit and end-to-end tests (real runc, Podman, CRI-O,
# containerd and SPIRE), and the systemd node (test/systemd: the unit
# under a real systemd). Root only: without root it stops at once, before
# installing or building anything, and says why. -p 1: one test package
# at a time, so that the runtimes, SPIRE instances and the systemd node of
# different packages never share this machine's two cores or its cgroup
# tree. It ends with a line "timing: tools built in N s, tests ran in N s,
# total N s", every skipped test and its reason, and a line
# "summary: N passed, N failed, N skipped".
test:
	@[ "$$(id -u)" = 0 ] || { echo "make test: $(NEEDS_ROOT)" >&2; exit 1; }
	@rm -f $(CRI_BIN_DIR)/.tools-time; MAKE_TEST_START=$$(date +%s) $(MAKE) --no-print-directory test-as-root

test-as-root: tools build test-fuzz
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(call run_tests,SPIFFE_OCI_SYSTEMD=1 SPIRE_BIN_DIR=$(SPIRE_BIN_DIR),-p 1 -count=1 -timeout 30m ./...)

# What works without root: vet, gofmt and every test that does not need
# root (parsers, file writer, packaging, the report itself). The tests
# that need root skip, and the report lists each with its reason: they did
# not run. Installs nothing (test/deps.sh needs root); builds gotestsum.
test-nonroot: gotestsum
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	@if [ "$$(id -u)" != 0 ]; then echo "make test-nonroot: running only the tests that work without root; those that need root skip and are listed at the end (make test, as root, runs everything)"; fi
	$(call run_tests,,-count=1 -timeout 30m ./...)

# The shipped unit, SPIRE and Quadlet-style Podman services under a real
# systemd: PID 1 of a privileged Podman container on this machine's root
# (an overlay), where `make install.nobuild PREFIX=/usr` installs the built
# binaries. Needs root; leaves the host's cgroup tree as it found it.
# About a minute; `make test` runs it too.
test-systemd: test-deps spire build
	SPIFFE_OCI_SYSTEMD=1 SPIRE_BIN_DIR=$(SPIRE_BIN_DIR) $(GO) test -count=1 -timeout 20m -v -run '^TestSystemdNode$$' ./test/systemd

# Each fuzz target for a bounded time (FUZZTIME), seeded from its corpus.
FUZZTIME ?= 10s
test-fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/annotations
	$(GO) test -run '^$$' -fuzz '^FuzzParseState$$' -fuzztime $(FUZZTIME) ./internal/ocistate
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/config

# The unit tests: internal/'s, and test/subreaper's, a unit test that ran
# here while the package lived under internal/.
test-unit:
	$(GO) test -count=1 -short ./internal/... ./test/subreaper

test-integration: tools build
	$(call run_tests,SPIFFE_OCI_SYSTEMD=1 SPIRE_BIN_DIR=$(SPIRE_BIN_DIR),-p 1 -count=1 -timeout 30m ./test/...)

test-deps:
	test/deps.sh

# The pinned third-party tools, one target a tools module, longest first.
# Each script takes its own module's lock and skips what is up to date
# (seconds once built). TOOLS_JOBS modules are built at a time; one by
# default: each go build already keeps both cores busy, and on this 2-core
# machine two at a time took the cold tools build to 50 min, against
# 36 min one at a time (docs/development.md, "How long a run takes").
TOOLS_JOBS ?= 1
SPIRE_TOOLS := tool-spire115 tool-spire
CRI_TOOLS := tool-crio tool-containerd tool-crictl
CLUSTER_TOOLS := tool-kubernetes tool-helm tool-spire-controller-manager tool-cni
ALL_TOOLS := tool-kubernetes $(SPIRE_TOOLS) tool-crio tool-containerd tool-helm tool-spire-controller-manager tool-crictl tool-cni tool-gotestsum

.PHONY: tools $(ALL_TOOLS)

tool-spire:
	test/spire/build.sh $(SPIRE_BIN_DIR)
tool-spire115:
	test/spire115/build.sh $(SPIRE_BIN_DIR)/spire-1.15
tool-crictl:
	test/crictl/build.sh $(CRI_BIN_DIR)
tool-crio:
	test/crio/build.sh $(CRI_BIN_DIR)
tool-containerd:
	test/containerd/build.sh $(CRI_BIN_DIR)
tool-helm:
	test/helm/build.sh $(CRI_BIN_DIR)
tool-kubernetes:
	test/kubernetes/build.sh $(CRI_BIN_DIR)
tool-cni:
	test/cni/build.sh $(CRI_BIN_DIR)/cni
tool-spire-controller-manager:
	test/spire-controller-manager/build.sh $(CRI_BIN_DIR)
tool-gotestsum:
	test/gotestsum/build.sh $(CRI_BIN_DIR)

# Every tool make test needs, TOOLS_JOBS at a time, with the time it took.
tools: test-deps
	@mkdir -p $(CRI_BIN_DIR); start=$$(date +%s); $(MAKE) --no-print-directory -j$(TOOLS_JOBS) $(ALL_TOOLS) && \
	echo $$(( $$(date +%s) - start )) > $(CRI_BIN_DIR)/.tools-time && \
	echo "tools: built in $$(cat $(CRI_BIN_DIR)/.tools-time) s"

spire: test-deps
	@$(MAKE) --no-print-directory -j$(TOOLS_JOBS) $(SPIRE_TOOLS)

# The pinned crictl, CRI-O (with pinns) and containerd for test/cri.
cri-tools: test-deps
	@$(MAKE) --no-print-directory -j$(TOOLS_JOBS) $(CRI_TOOLS)

# The pinned gotestsum that runs make test's go test (seconds once built).
gotestsum: tool-gotestsum

# The pinned Kubernetes v1.34.4 (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl), etcd v3.6.4, CNI plugins v1.9.0,
# spire-controller-manager v0.7.0 and helm for the one-node cluster (test/cluster, make cluster), with the CRI
# tools.
cluster-tools: test-deps
	@$(MAKE) --no-print-directory -j$(TOOLS_JOBS) $(CLUSTER_TOOLS) $(CRI_TOOLS)

# A one-node cluster on this host (docs/cluster.md): etcd, the API server,
# the controller manager, the scheduler and a kubelet, CRI-O or containerd
# (RUNTIME), SPIRE in the cluster (test/cluster/manifests/spire.yaml), and
# spiffe-oci-hook installed with helm. It keeps running in the background
# (test/cluster/cmd/spiffe-cluster under setsid) and prints KUBECONFIG, the
# busybox image and the command that registers a workload. make
# cluster-down stops it and restores the host. Needs root.
RUNTIME ?= crio
CLUSTER_DIR ?= /tmp/spiffe-cluster
cluster: test-deps spire cluster-tools build
	@if [ -f $(CLUSTER_DIR)/launcher.pid ] && kill -0 $$(cat $(CLUSTER_DIR)/launcher.pid) 2>/dev/null; then \
		echo "a cluster is already running (make cluster-down)" >&2; exit 1; fi
	@mkdir -p $(CLUSTER_DIR) && rm -f $(CLUSTER_DIR)/ready
	@$(GO) build -o $(CLUSTER_DIR)/spiffe-cluster ./test/cluster/cmd/spiffe-cluster
	@setsid $(CLUSTER_DIR)/spiffe-cluster -runtime $(RUNTIME) -dir $(CLUSTER_DIR) -repo $(CURDIR) \
		-tools $(CRI_BIN_DIR) -spire-bin $(SPIRE_BIN_DIR) >$(CLUSTER_DIR)/launcher.log 2>&1 </dev/null & \
	echo $$! >$(CLUSTER_DIR)/launcher.pid; \
	echo "starting the cluster ($(RUNTIME)); progress in $(CLUSTER_DIR)/launcher.log"; \
	while [ ! -f $(CLUSTER_DIR)/ready ]; do \
		if ! kill -0 $$(cat $(CLUSTER_DIR)/launcher.pid) 2>/dev/null; then cat $(CLUSTER_DIR)/launcher.log; rm -f $(CLUSTER_DIR)/launcher.pid; exit 1; fi; \
		sleep 1; done; \
	cat $(CLUSTER_DIR)/ready

cluster-down:
	@if [ ! -f $(CLUSTER_DIR)/launcher.pid ]; then echo "no cluster is running ($(CLUSTER_DIR)/launcher.pid)"; exit 0; fi; \
	pid=$$(cat $(CLUSTER_DIR)/launcher.pid); kill -TERM $$pid 2>/dev/null; \
	while kill -0 $$pid 2>/dev/null; do sleep 1; done; \
	tail -n 5 $(CLUSTER_DIR)/launcher.log; \
	if grep -q '^cluster: stopped; host restored' $(CLUSTER_DIR)/launcher.log; then rm -rf $(CLUSTER_DIR); else \
		echo "cluster-down: see $(CLUSTER_DIR)/launcher.log and $(CLUSTER_DIR)/logs" >&2; exit 1; fi

# The primary SPIRE line (1.15.3, the only SPIRE it builds) in a temp dir
# with a 30 s TTL entry, the refresher, and an annotated Podman container
# that prints its SPIFFE ID, its certificate's expiry and a rotation;
# everything it starts is cleaned up (needs root).
demo: test-deps tool-spire115 build
	@SPIFFE_OCI_DEMO=1 SPIRE_BIN_DIR=$(SPIRE_BIN_DIR) $(GO) test -count=1 -run '^TestDemo$$' -v ./test/e2e/ | grep -E '^(demo|container):|^(--- FAIL|FAIL|ok)'; exit $${PIPESTATUS[0]}

# Benchmarks (root; runc, busybox-static, pinned SPIRE, CRI-O, containerd):
# prints Markdown tables and rewrites BENCHMARKS.md. Numbers only, no timed
# assertions. BENCH_PARTS picks the parts (default all): runc (test/bench:
# the hook against runc and spiffe-helper, the refresher at scale with a
# fake agent; about 3 minutes, rewrites the whole file), hookfloor (what
# skipping the bundle RPC or a smaller exec floor would save the hook; about
# a minute), podstart (pod start
# under CRI-O and containerd per pattern; about 5 minutes), node (a full
# node of 110 pods under CRI-O with the real agent; about 9 minutes) and
# broker (the hook with the Delegated Identity API against the SPIFFE
# Broker API, on SPIRE 1.15.3; about 3 minutes) and registration (new
# pods registered by spire-controller-manager on the real cluster, the
# hook against a spiffe-helper init container, SPIRE's default intervals
# and 1 s; about 20 minutes per runtime, BENCH_REG_RUNTIMES, default crio).
# The last four replace only their own sections. BENCH_ROUNDS, BENCH_SCALES,
# BENCH_IDLE, BENCH_ROTATIONS, BENCH_POD_ROUNDS, BENCH_RUNTIMES,
# BENCH_NODE_PODS, BENCH_NODE_TTL, BENCH_NODE_ROTATIONS and BENCH_REG_PODS
# tune them.
BENCH_PARTS ?= runc hookfloor podstart node broker registration
bench: spire cri-tools build
	@set -e; tmp=$$(mktemp -d /tmp/bench-bin.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	ulimit -n $$(ulimit -Hn); \
	export SPIFFE_OCI_BENCH=1 BENCH_LDFLAGS="$(LDFLAGS)" BENCH_TAGS="$(GO_TAGS)" SPIRE_BIN_DIR=$(SPIRE_BIN_DIR); \
	for part in $(BENCH_PARTS); do case $$part in \
	runc) $(GO) test -c -o "$$tmp/bench.test" ./test/bench; "$$tmp/bench.test" -test.run '^TestBench$$' -test.timeout 20m ;; \
	hookfloor) $(GO) test -c -o "$$tmp/cri.test" ./test/cri; (cd test/cri && "$$tmp/cri.test" -test.run '^TestBenchHookFloor$$' -test.timeout 20m -test.v) ;; \
	podstart) $(GO) test -c -o "$$tmp/cri.test" ./test/cri; (cd test/cri && "$$tmp/cri.test" -test.run '^TestBenchPodStart$$' -test.timeout 30m -test.v) ;; \
	node) $(GO) test -c -o "$$tmp/cri.test" ./test/cri; (cd test/cri && "$$tmp/cri.test" -test.run '^TestBenchNode$$' -test.timeout 60m -test.v) ;; \
	broker) $(GO) test -c -o "$$tmp/bench.test" ./test/bench; "$$tmp/bench.test" -test.run '^TestBenchBrokerAPI$$' -test.timeout 20m ;; \
	registration) $(GO) test -c -o "$$tmp/cluster.test" ./test/cluster; (cd test/cluster && "$$tmp/cluster.test" -test.run '^TestBenchRegistration$$' -test.timeout 90m -test.v) ;; \
	*) echo "BENCH_PARTS: unknown part $$part" >&2; exit 2 ;; \
	esac; done

install: build install.nobuild

# The hook binaries go in before the JSON that points at them (the direct
# one first, as the hook runs it): a runtime that reads hooks.d must never
# find a hook whose binary is missing. The JSON is
# written aside and renamed into place (runtimes read only *.json), and
# install fails if the rendering did not take. An existing node config (an
# admin's edits) is never overwritten.
install.nobuild:
	install -D -m 0755 bin/spiffe-oci-hook-direct $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook-direct
	install -D -m 0755 bin/spiffe-oci-hook $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook
	install -d -m 0755 $(DESTDIR)$(HOOKS_JSON_DIR)
	sed '$(HOOK_JSON_SED)' hooks.d/spiffe-oci-hook.json > $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp
	grep -qF '"$(HOOK_DIR)/spiffe-oci-hook"' $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp || { echo "install: hooks.d JSON: hook path not rendered" >&2; exit 1; }
	grep -qF '"$(CONFDIR)/config.yaml"' $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp || [ "$(CONFDIR)/config.yaml" = "$(DEFAULT_CONFIG)" ] || { echo "install: hooks.d JSON: --config not rendered" >&2; exit 1; }
	chmod 0644 $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp
	mv -f $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp $(DESTDIR)$(HOOKS_JSON_DIR)/spiffe-oci-hook.json
	install -D -m 0755 bin/spiffe-oci-refresher $(DESTDIR)$(BINDIR)/spiffe-oci-refresher
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed '$(UNIT_SED)' refresher/spiffe-oci-refresher.service > $(DESTDIR)$(UNITDIR)/spiffe-oci-refresher.service
	grep -qF 'ExecStart=$(BINDIR)/spiffe-oci-refresher --config $(CONFDIR)/config.yaml' $(DESTDIR)$(UNITDIR)/spiffe-oci-refresher.service || { echo "install: unit: ExecStart not rendered" >&2; exit 1; }
	chmod 0644 $(DESTDIR)$(UNITDIR)/spiffe-oci-refresher.service
	install -D -m 0644 tmpfiles.d/spiffe-oci-hook.conf $(DESTDIR)$(TMPFILESDIR)/spiffe-oci-hook.conf
	install -d -m 0755 $(DESTDIR)$(CONFDIR)
	[ -e $(DESTDIR)$(CONFDIR)/config.yaml ] || install -m 0644 deploy/config.yaml $(DESTDIR)$(CONFDIR)/config.yaml
	install -d -m 0755 $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LICENSEDIR)
	$(if $(DOCS),install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/)
	$(if $(DOC_PAGES),install -d -m 0755 $(DESTDIR)$(DOCDIR)/docs && install -m 0644 $(DOC_PAGES) $(DESTDIR)$(DOCDIR)/docs/)
	install -m 0644 $(LICENSES) $(DESTDIR)$(LICENSEDIR)/

# The JSON goes first, so that no runtime runs a hook being removed. The
# state directory (/run/spiffe-oci-hook, tmpfs) is left to running
# containers and goes at the next boot. The
# node config stays (an admin may have edited it): remove $(CONFDIR) by
# hand. Stop the service first: systemctl disable --now spiffe-oci-refresher
uninstall:
	rm -f $(DESTDIR)$(HOOKS_JSON_DIR)/spiffe-oci-hook.json $(DESTDIR)$(HOOKS_JSON_DIR)/.spiffe-oci-hook.json.tmp
	rm -f $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook-direct
	rm -f $(DESTDIR)$(BINDIR)/spiffe-oci-refresher
	rm -f $(DESTDIR)$(UNITDIR)/spiffe-oci-refresher.service
	rm -f $(DESTDIR)$(TMPFILESDIR)/spiffe-oci-hook.conf
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(DOCS))) $(addprefix $(DESTDIR)$(DOCDIR)/docs/,$(notdir $(DOC_PAGES))) $(addprefix $(DESTDIR)$(LICENSEDIR)/,$(notdir $(LICENSES)))
	rmdir $(DESTDIR)$(DOCDIR)/docs $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LICENSEDIR) 2>/dev/null || :
	@echo "uninstall: left $(DESTDIR)$(CONFDIR)/config.yaml in place"

# rpm: an rpm (and source rpm) in rpm/build/, from a git archive of the
# working tree as git sees it (tracked and untracked files, less what
# .gitignore excludes; uncommitted changes included, nothing committed), or
# of RPM_REF (e.g. make rpm RPM_REF=v1.2.0).
RPM_TOPDIR := $(CURDIR)/rpm/build
RPM_REF ?=
# rpm versions hold no "-": v1.2.0-3-gabcdef -> 1.2.0.3.gabcdef; an untagged
# tree -> 0.0.0.git<hash>.
RPM_VERSION ?= $(shell echo '$(VERSION)' | sed -E -e '/^v?[0-9]+\./!s/^/0.0.0.git/' -e 's/^v//' -e 's/-/./g')
# On a host whose rpm database does not hold the build dependencies (Debian,
# Ubuntu), rpmbuild cannot check them.
RPMBUILD_FLAGS ?= $(shell rpm -q rpm >/dev/null 2>&1 || echo --nodeps)

rpm:
	rm -rf $(RPM_TOPDIR)
	mkdir -p $(RPM_TOPDIR)/SOURCES
	set -e; \
	if [ -n "$(RPM_REF)" ]; then tree='$(RPM_REF)'; else \
	  idx=$$(mktemp); trap 'rm -f $$idx' EXIT; \
	  cp "$$(git rev-parse --git-path index)" $$idx 2>/dev/null || rm -f $$idx; \
	  GIT_INDEX_FILE=$$idx git add -A; tree=$$(GIT_INDEX_FILE=$$idx git write-tree); \
	fi; \
	git archive --format=tar.gz --prefix=spiffe-oci-hook-$(RPM_VERSION)/ -o $(RPM_TOPDIR)/SOURCES/spiffe-oci-hook-$(RPM_VERSION).tar.gz $$tree
	rpmbuild -ba $(RPMBUILD_FLAGS) \
		--define '_topdir $(RPM_TOPDIR)' \
		--define 'pkg_version $(RPM_VERSION)' \
		--define 'upstream_version $(VERSION)' \
		rpm/spiffe-oci-hook.spec

clean:
	rm -rf bin/spiffe-oci-hook bin/spiffe-oci-refresher bin/spiffe-oci-nri rpm/build
