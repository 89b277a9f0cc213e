"""Fixtures of the VM tests: the cached Debian image, a lab with its apt proxy, and one VM per module.

Where QEMU, debootstrap or apt-cacher-ng is missing the tests skip with the reason; under CI / LANHUB_REQUIRE_LAB=1
they fail instead, like the namespace lab. Everything is torn down after the module, also when a test fails: the
VM dies with the lab's namespaces, the proxy is stopped, and the overlays live in the lab's state directory.
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


def require_vm() -> None:
    reason = labvm.vm_requirements_missing()
    if reason is None:
        return
    if lab_required():
        pytest.fail(f"VM lab required but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vm_image():
    """The base image (no openvpn), built by debootstrap on first use and cached under var/vm/."""
    require_vm()
    began = time.monotonic()
    image, built = labvm.ensure_image(settings.VAR_DIR, "base", log=lambda m: print(f"[vm image] {m}", flush=True))
    FIGURES["image_build_cold_s" if built else "image_build_cached_s"] = time.monotonic() - began
    if built:  # the cached path, measured in the same run
        began = time.monotonic()
        labvm.ensure_image(settings.VAR_DIR, "base")
        FIGURES["image_build_cached_s"] = time.monotonic() - began
    else:
        FIGURES["image_build_cold_recorded_s"] = image.build_seconds
    return image


@pytest.fixture(scope="module")
def vm_lab():
    require_vm()
    with Lab(lock_timeout=600) as built:
        yield built


@pytest.fixture(scope="module")
def apt_proxy(vm_lab):
    proxy = labvm.AptProxy(Path(settings.VAR_DIR) / "vm" / "apt-cache", vm_lab.state_dir / "apt-proxy")
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session", autouse=True)
def vm_figures():
    """Writes what the VM tests measured to var/vm-figures.json (benchmarks/e2e.py prints it)."""
    FIGURES.clear()
    yield FIGURES
    if FIGURES:
        report = {k: round(v, 2) for k, v in FIGURES.items()}
        report["accelerator"] = labvm.accelerator()
        print("\nLanHub VM figures:", json.dumps(report, indent=1))
        Path(settings.VAR_DIR, "vm-figures.json").write_text(json.dumps(report, indent=1))
