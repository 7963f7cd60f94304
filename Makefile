# spiffe-oci-hook: an OCI hook and a node daemon that hand annotated
# containers their SPIFFE X.509 SVID as files.

GO ?= go
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR ?= $(PREFIX)/share
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
HOOK_DIR ?= $(LIBEXECDIR)/oci/hooks.d
HOOKS_JSON_DIR ?= $(DATADIR)/containers/oci/hooks.d

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
GOBUILD := CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)"

# The JSON in the repo names the rpm's path; install writes the real one.
SHIPPED_HOOK_PATH := /usr/libexec/oci/hooks.d/spiffe-oci-hook

# Where the test harness keeps the pinned SPIRE binaries.
SPIRE_BIN_DIR ?= $(CURDIR)/bin/test

.PHONY: all build binary test test-deps test-unit test-integration spire bench install install.nobuild uninstall clean

all: build

build binary: bin/spiffe-oci-hook

bin/spiffe-oci-hook: FORCE
	$(GOBUILD) -o $@ ./hook

FORCE:

# Everything, on a fresh machine: packages, pinned SPIRE, unit and
# end-to-end tests (real runc, Podman and SPIRE; needs root).
test: test-deps spire build
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	SPIRE_BIN_DIR=$(SPIRE_BIN_DIR) $(GO) test -count=1 -timeout 30m ./...

test-unit:
	$(GO) test -count=1 -short ./internal/...

test-integration: test-deps spire build
	SPIRE_BIN_DIR=$(SPIRE_BIN_DIR) $(GO) test -count=1 -timeout 30m ./test/...

test-deps:
	test/deps.sh

spire:
	test/spire/build.sh $(SPIRE_BIN_DIR)

install: build install.nobuild

# The binary goes in before the JSON that points at it: a runtime that
# reads hooks.d must never find a hook whose binary is missing.
install.nobuild:
	install -D -m 0755 bin/spiffe-oci-hook $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook
	install -d -m 0755 $(DESTDIR)$(HOOKS_JSON_DIR)
	sed 's|$(SHIPPED_HOOK_PATH)|$(HOOK_DIR)/spiffe-oci-hook|' hooks.d/spiffe-oci-hook.json > $(DESTDIR)$(HOOKS_JSON_DIR)/spiffe-oci-hook.json
	chmod 0644 $(DESTDIR)$(HOOKS_JSON_DIR)/spiffe-oci-hook.json

# The JSON goes first, so that no runtime runs a hook being removed.
uninstall:
	rm -f $(DESTDIR)$(HOOKS_JSON_DIR)/spiffe-oci-hook.json
	rm -f $(DESTDIR)$(HOOK_DIR)/spiffe-oci-hook

clean:
	rm -rf bin/spiffe-oci-hook bin/spiffe-oci-refresher
