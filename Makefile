# imgfs: set-up, demo and tests.
#
# On a fresh Debian 12 machine, as root:   make demo   and   make test
# `make help` lists the targets. Nothing here needs more than Debian's packages and PyPI.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
VBIN        := $(VENV)/bin
# written after a successful `pip install -e .[test]`; lives inside .venv so it goes with it
VENV_STAMP  := $(VENV)/.imgfs-installed
DEMO_IMAGES := demo/images
MNT         := mnt
PYTEST_ARGS ?=
# pyfuse3 is built from its PyPI sdist with third_party/pyfuse3's patch applied (fallocate and
# lseek handlers: hole punching and SEEK_DATA/SEEK_HOLE on the exported files). Cython and the
# other build requirements live only in pip's isolated build environment.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_PATCH   := third_party/pyfuse3/0001-fallocate-lseek.patch
PYFUSE3_STAMP   := $(VENV)/.pyfuse3-patched
PYFUSE3_BUILD   := $(VENV)/pyfuse3-build

# Debian packages the build, the tests and the demo use (bsdextrautils brings hexdump, which the
# demo's hints use; cloop-utils, bochs, uml-utilities, dmg2img and libvhdi-utils are format
# oracles the tests compare against; nginx-light, nbdkit, libnbd-bin and qemu-block-extra (qemu's
# curl driver) are the real HTTP and NBD peers of the remote tests; mtools, dosfstools read back
# vvfat disks; xfsprogs and btrfs-progs make the reflink file systems dedup is tested on).
# python3-venv / python3-dev are added by `deps` only when $(PYTHON) lacks venv+ensurepip or its
# C headers (Debian's own python3 does; the pyenv build on the development machines has both).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc \
                qemu-utils qemu-system-common qemu-system-x86 \
                fio fdisk e2fsprogs util-linux cpio strace \
                bsdextrautils \
                cloop-utils bochs uml-utilities dmg2img libvhdi-utils \
                nginx-light nbdkit libnbd-bin qemu-block-extra \
                mtools dosfstools xfsprogs btrfs-progs \
                patch

# true when MNT is a mount point (read from the mount table: a FUSE mount whose daemon died
# cannot even be stat'ed, so `mountpoint` is no help there)
define is_mounted
awk -v d="$(CURDIR)/$(MNT)" '$$2 == d { f = 1 } END { exit !f }' /proc/self/mounts
endef

.PHONY: help deps venv demo test test-slow lint umount clean

help:
	@# (.ONESHELL strips leading blanks from recipe lines, hence printf rather than a here-document)
	printf '%s\n' 'targets:'
	printf '  %-10s %s\n' \
	    deps      "install the Debian packages (apt-get runs only when one is missing)" \
	    venv      "create .venv, build the patched pyfuse3, pip install -e '.[test]'" \
	    demo      "deps + venv, build demo/images, mount it on ./mnt, print what to try" \
	    test      "deps + venv, ruff check, pytest -q (PYTEST_ARGS='...' adds pytest options)" \
	    test-slow "the same with -m slow" \
	    lint      "ruff check imgfs tests" \
	    umount    "unmount ./mnt if mounted" \
	    clean     "umount, then remove .venv, demo/ and the empty ./mnt"

deps:
	@missing=()
	for p in $(APT_PACKAGES); do
	    dpkg-query -W -f='$${db:Status-Status}\n' "$$p" 2>/dev/null | grep -qx installed \
	        || missing+=("$$p")
	done
	if ! command -v $(PYTHON) >/dev/null 2>&1; then
	    missing+=(python3 python3-venv python3-dev)
	else
	    $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
	    $(PYTHON) -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	        || missing+=(python3-dev)
	fi
	if [ $${#missing[@]} -eq 0 ]; then
	    echo "deps: all Debian packages present"
	else
	    sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo
	    echo "deps: installing $${missing[*]}"
	    export DEBIAN_FRONTEND=noninteractive
	    $$sudo apt-get update -q
	    $$sudo apt-get install -y -q --no-install-recommends "$${missing[@]}"
	fi
	[ -e /dev/fuse ] || echo "deps: warning: /dev/fuse is missing (modprobe fuse?); mounting will fail" >&2

$(VBIN)/python:
	$(PYTHON) -m venv $(VENV)

# `| deps`: the packages must be there (pyfuse3 compiles against libfuse3-dev), but running
# `deps` does not by itself make the install stale.
$(PYFUSE3_STAMP): $(PYFUSE3_PATCH) | deps $(VBIN)/python
	rm -rf $(PYFUSE3_BUILD)
	mkdir -p $(PYFUSE3_BUILD)
	export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
	$(VBIN)/python -m pip download --no-binary :all: --no-deps \
	    -d $(PYFUSE3_BUILD) pyfuse3==$(PYFUSE3_VERSION)
	tar --no-same-owner -xzf $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz -C $(PYFUSE3_BUILD)
	src=$(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION)
	patch -d "$$src" -p1 --forward --batch < $(PYFUSE3_PATCH)
	# the shipped C was generated from the unpatched .pyx: make Cython regenerate it
	rm -f "$$src/src/pyfuse3/__init__.c"
	$(VBIN)/python -m pip install --no-deps --force-reinstall "$$src"
	rm -rf $(PYFUSE3_BUILD)
	touch $@

$(VENV_STAMP): pyproject.toml $(PYFUSE3_STAMP) | deps $(VBIN)/python
	PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 $(VBIN)/python -m pip install -e '.[test]'
	touch $@

venv: deps $(VENV_STAMP)

demo: venv umount
	@contrib/make-demo-images.sh $(DEMO_IMAGES)
	mkdir -p $(MNT)
	echo "+ $(VBIN)/imgfs mount --key-dir $(DEMO_IMAGES) $(DEMO_IMAGES) $(MNT)"
	$(VBIN)/imgfs mount --key-dir $(DEMO_IMAGES) $(DEMO_IMAGES) $(MNT)
	echo "+ ls -l $(MNT)"
	ls -l $(MNT)
	printf '\n%s\n\n' "$(DEMO_IMAGES) is mounted on ./$(MNT): each image NAME shows up as $(MNT)/NAME.raw. Try:"
	printf '  %s\n' \
	    "fdisk -l $(MNT)/disk.img.raw" \
	    "dd if=$(MNT)/disk.img.raw bs=1M count=1 | hexdump -C | head" \
	    "$(VBIN)/imgfs info $(DEMO_IMAGES)/disk.img" \
	    "$(VBIN)/imgfs umount $(MNT)      (or: make umount)"

test: venv
	@echo "+ ruff check imgfs tests"
	$(VBIN)/ruff check imgfs tests
	echo "+ pytest -q $(PYTEST_ARGS)"
	rc=0; $(VBIN)/python -m pytest -q $(PYTEST_ARGS) || rc=$$?
	if [ $$rc -eq 5 ]; then echo "test: pytest collected no tests (exit 5): failing" >&2; fi
	exit $$rc

test-slow: venv
	@echo "+ ruff check imgfs tests"
	$(VBIN)/ruff check imgfs tests
	echo "+ pytest -q -m slow $(PYTEST_ARGS)"
	rc=0; $(VBIN)/python -m pytest -q -m slow $(PYTEST_ARGS) || rc=$$?
	if [ $$rc -eq 5 ]; then echo "test-slow: pytest collected no tests (exit 5): failing" >&2; fi
	exit $$rc

lint: venv
	$(VBIN)/ruff check imgfs tests

# imgfs umount first (flushes and closes every image). If that fails and the mount is dead
# (its daemon is gone: stat fails), detach it with fusermount3; a live but busy mount stays
# mounted and is an error.
umount:
	@if ! $(is_mounted); then exit 0; fi
	if [ -x $(VBIN)/imgfs ]; then
	    echo "+ $(VBIN)/imgfs umount $(MNT)"
	    if $(VBIN)/imgfs umount $(MNT); then exit 0; fi
	fi
	if stat $(MNT)/ >/dev/null 2>&1; then
	    echo "umount: $(MNT) is still mounted and alive (busy?): not forcing it" >&2
	    exit 1
	fi
	echo "+ fusermount3 -u -z $(MNT)   (dead mount)"
	fusermount3 -u -z $(MNT)

clean: umount
	rm -rf $(VENV) demo *.egg-info
	if [ -d $(MNT) ] && ! $(is_mounted); then rmdir $(MNT) 2>/dev/null || true; fi
