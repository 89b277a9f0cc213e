"""Fixtures of the VM tests: the cached Debian images and their saved states, a lab with its apt proxy, and a
factory of throw-away VMs.

Where QEMU, debootstrap or apt-cacher-ng is missing the tests skip with the reason; under CI / LANHUB_REQUIRE_LAB=1
they fail instead, like the namespace lab. Everything is torn down after each test (its VMs) and module (the lab
and the proxy), also when a test fails: VMs die with the lab's namespaces, overlays live in the lab's state
directory. Images, saved states and the apt cache live in lab.vm.cache_dir() (as root /var/cache/lanhub/vm, so a
fresh checkout reuses them) and are rebuilt only when their recipe changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.conf import settings

from lab import vm as labvm
from lab.netns import Lab
from tests.lab_helpers import lab_required

FIGURES: dict[str, float] = {}
LAYERS = ("base", "preloaded")


def require_vm() -> None:
    reason = labvm.vm_requirements_missing()
    if reason is None:
        return
    if lab_required():
        pytest.fail(f"VM lab required but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _log(message: str) -> None:
    print(f"[vm image] {message}", flush=True)


@pytest.fixture(scope="session")
def vm_images():
    """{layer: (image, saved state)}: "base" (no openvpn: the tests of apt) and "preloaded" (openvpn and python3
    installed, for the tests that do not exercise apt), each built by debootstrap on first use, and booted once
    and saved, so a test restores a clone in seconds instead of a cold boot."""
    require_vm()
    images = {}
    debootstrapped = labvm.debootstrap_seconds(settings.VAR_DIR)
    for layer in LAYERS:
        began = time.monotonic()
        image, built = labvm.ensure_image(settings.VAR_DIR, layer, log=_log)
        seconds = time.monotonic() - began
        if built:
            FIGURES[f"image_build_cold_{layer}_s"] = seconds
            began = time.monotonic()
            labvm.ensure_image(settings.VAR_DIR, layer)
            seconds = time.monotonic() - began
        else:
            FIGURES[f"image_build_cold_{layer}_recorded_s"] = image.build_seconds
        FIGURES[f"image_build_cached_{layer}_s"] = seconds
        began = time.monotonic()
        saved, made = labvm.ensure_saved_state(image, log=_log)
        if made:
            FIGURES[f"saved_state_made_{layer}_s"] = time.monotonic() - began
        FIGURES.setdefault("cold_boot_to_booted_s", saved.info["boot_seconds"])  # as recorded when it was saved
        images[layer] = (image, saved)
    seconds = labvm.debootstrap_seconds(settings.VAR_DIR)
    if seconds is not None:
        FIGURES["debootstrap_now_s" if debootstrapped is None else "debootstrap_recorded_s"] = seconds
    return images


@pytest.fixture(scope="module")
def vm_lab():
    require_vm()
    with Lab(lock_timeout=600) as built:
        yield built


@pytest.fixture(scope="module")
def apt_proxy(vm_lab):
    proxy = labvm.AptProxy(labvm.cache_dir(settings.VAR_DIR) / "apt-cache", vm_lab.state_dir / "apt-proxy")
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def make_vm(vm_lab, vm_images, apt_proxy, ssh_key):
    """make_vm(name, layer="preloaded", users=...) -> a running clone that answers SSH, on the lab's node bridge,
    with root's key ``ssh_key`` and apt through the lab's proxy. The test's VMs are removed after it."""
    made = []

    def make(name: str, layer: str = "preloaded", **options) -> labvm.VmHost:
        image, saved = vm_images[layer]
        began = time.monotonic()
        made.append(name)
        vm = labvm.add_vm(vm_lab, name, image, saved=saved, authorized_keys=ssh_key.public_line,
                          apt_proxy=apt_proxy.url, **options)
        vm.wait_for_ssh(60)
        FIGURES.setdefault("clone_restore_to_ssh_s", time.monotonic() - began)
        return vm

    yield make
    for name in made:
        labvm.remove_vm(vm_lab, name)


@pytest.fixture(scope="session", autouse=True)
def vm_figures():
    """Writes what the VM tests measured to var/vm-figures.json (benchmarks/e2e.py prints it)."""
    FIGURES.clear()
    yield FIGURES
    if FIGURES:
        report = {k: round(v, 2) for k, v in FIGURES.items()}
        report["accelerator"] = labvm.accelerator()
        print("\nLanHub VM figures:", json.dumps(report, indent=1))
        Path(settings.VAR_DIR).mkdir(parents=True, exist_ok=True)
        Path(settings.VAR_DIR, "vm-figures.json").write_text(json.dumps(report, indent=1))
