.PHONY: run test lab lab-down bench

run:  ## set up and run the portal: web, worker, beat (and a private Redis if none answers)
	scripts/run.sh

test:  ## set up and run the whole test suite
	scripts/test.sh

lab:  ## build the Hangzhou + Hong Kong lab in network namespaces and connect two players (needs root)
	scripts/bootstrap.sh test
	.venv/bin/python manage.py migrate --noinput
	.venv/bin/python manage.py lab up --nodes hangzhou,hongkong --players alice,bob

lab-down:
	.venv/bin/python manage.py lab down

bench:  ## print the benchmark figures
	.venv/bin/python benchmarks/topology.py
	.venv/bin/python benchmarks/issue_player.py
