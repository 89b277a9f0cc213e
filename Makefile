.PHONY: run test test-vm lab lab-down bench

run:  ## set up and run the portal: web, worker, beat (and a private Redis if none answers)
	scripts/run.sh

test:  ## set up and run the whole test suite (the VM tests too, except those marked vm_extra: make test-vm)
	scripts/test.sh

test-vm:  ## all the tests on QEMU Debian VMs, vm_extra included (tests/vm; root, qemu-system-x86, debootstrap, apt-cacher-ng)
	scripts/test.sh tests/vm -m vm  # -m vm replaces pytest.ini's "not vm_extra"

lab:  ## build the Hangzhou + Hong Kong lab in network namespaces and connect two players (needs root)
	scripts/bootstrap.sh test
	.venv/bin/python manage.py migrate --noinput
	.venv/bin/python manage.py lab up --nodes hangzhou,hongkong --players alice,bob

lab-down:
	.venv/bin/python manage.py lab down

bench:  ## print the benchmark figures
	.venv/bin/python benchmarks/topology.py
	.venv/bin/python benchmarks/issue_player.py
